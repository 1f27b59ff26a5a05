"""Peer-to-peer detection: NCCL_P2P_DISABLE=1 where a node's GPUs cannot access each other, unless the user chose."""

from __future__ import annotations

import os

import pytest

from lavis.engine import distributed
from lavis.engine.distributed import p2p_disable_reason, pairs_without_p2p


def test_all_pairs_can_access_each_other():
    assert pairs_without_p2p(4, lambda a, b: True) == []
    assert p2p_disable_reason(4, lambda a, b: True, {}) is None


def test_one_pair_without_p2p_disables_it():
    def can(a: int, b: int) -> bool:
        return {a, b} != {1, 2}

    assert pairs_without_p2p(3, can) == [(1, 2), (2, 1)]
    assert p2p_disable_reason(3, can, {}) == "GPUs 1->2, 2->1 cannot access each other's memory (no peer-to-peer)"


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_users_own_setting_wins(value: str):
    assert p2p_disable_reason(2, lambda a, b: False, {"NCCL_P2P_DISABLE": value}) is None


def test_one_gpu_needs_no_check():
    def never(a: int, b: int) -> bool:
        raise AssertionError("no pair to check")

    assert p2p_disable_reason(1, never, {}) is None


def test_the_launch_path_sets_and_says_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed.torch.cuda, "can_device_access_peer", lambda a, b: False)
    distributed.disable_p2p_if_unsupported()
    assert os.environ["NCCL_P2P_DISABLE"] == "1"
    assert "set NCCL_P2P_DISABLE=1" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("NCCL_P2P_DISABLE")
    distributed.disable_p2p_if_unsupported()  # every rank sets it for its own process; only local rank 0 prints
    assert os.environ["NCCL_P2P_DISABLE"] == "1" and capsys.readouterr().err == ""


def test_init_distributed_decides_before_nccl_starts(monkeypatch: pytest.MonkeyPatch):
    import deepspeed

    seen: list[tuple[str, str | None]] = []
    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed.torch.cuda, "can_device_access_peer", lambda a, b: False)
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda dist_backend, **kw: seen.append((dist_backend, os.environ.get("NCCL_P2P_DISABLE"))))
    distributed.init_distributed()
    assert seen == [("nccl", "1")]
