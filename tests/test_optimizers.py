"""`train.optimizer`: AdamW and bitsandbytes' 8-bit AdamW under the pipeline (clipping, checkpoints, exact resume,
the planner's bytes)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from lavis.engine.optim import PipeAdamW, build_optimizer
from lavis.pipeline.plan import optimizer_bytes_per_param

from .conftest import losses, train

STEPS = 5


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.linspace(-1, 1, 8192).reshape(64, 128).clone())


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_each_optimizer_steps_and_round_trips_its_state(kind: str):
    p = _param()
    opt = build_optimizer(kind, [{"params": [p]}], clip=0.0, norm_group=None, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.cos(p.detach() * 3)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # a copy: state_dict() shares the live moment tensors
    per_param = state["state"][0]
    per_param = per_param.get("__bnb_optimizer_quant_state__", per_param)  # bitsandbytes nests its 8-bit state
    moment = per_param["exp_avg" if kind == "adamw" else "state1"]
    assert moment.dtype == (torch.float32 if kind == "adamw" else torch.uint8)
    q = torch.nn.Parameter(p.detach().clone())
    again = build_optimizer(kind, [{"params": [q]}], clip=0.0, norm_group=None, lr=1e-2, weight_decay=0.0)
    again.load_state_dict(state)
    p.grad = q.grad = torch.sin(p.detach())
    opt.step()
    again.step()
    assert torch.equal(p, q)  # the reloaded state continues exactly


def test_8bit_adamw_tracks_fp32_adamw_closely():
    a, b = _param(), _param()
    opt_a = build_optimizer("adamw", [{"params": [a]}], clip=0.0, norm_group=None, lr=1e-3, weight_decay=0.0)
    opt_b = build_optimizer("adamw8bit", [{"params": [b]}], clip=0.0, norm_group=None, lr=1e-3, weight_decay=0.0)
    for i in range(10):
        a.grad = torch.cos(a.detach() * (i + 1))
        b.grad = torch.cos(b.detach() * (i + 1))
        opt_a.step()
        opt_b.step()
    moved = (a - _param()).abs().mean()
    assert (a - b).abs().mean() < 0.05 * moved


def test_the_fp32_optimizer_is_still_pipeadamw():
    p = _param()
    assert isinstance(build_optimizer("adamw", [{"params": [p]}], clip=0.0, norm_group=None, lr=1e-3), PipeAdamW)


def test_missing_bitsandbytes_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RuntimeError, match=r"train.optimizer: adamw8bit needs bitsandbytes: pip install"):
        build_optimizer("adamw8bit", [{"params": [_param()]}], clip=0.0, norm_group=None, lr=1e-3)


def test_planner_counts_the_8bit_moments():
    assert optimizer_bytes_per_param("fp32", 0, False, 1, "adamw") == 8
    assert optimizer_bytes_per_param("fp32", 0, False, 1, "adamw8bit") == 2
    assert optimizer_bytes_per_param("bf16", 0, False, 1, "adamw8bit") == 10  # + fp32 master and gradient buffer
    assert optimizer_bytes_per_param("bf16", 1, False, 2, "adamw8bit") == 5
    assert optimizer_bytes_per_param("bf16", 1, True, 2, "adamw8bit") == 0


# --- real launches ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("optim")
    eight = ("train.optimizer=adamw8bit", "train.save_every=1")
    runs = {"pp1_8bit": train(tmp, "pp1_8bit", 1, 1, gas=2, data=tiny_data, steps=STEPS, extra=eight),
            "pp1_adamw": train(tmp, "pp1_adamw", 1, 1, gas=2, data=tiny_data, steps=STEPS,
                               extra=("train.save_every=1",))}
    train(tmp, "pp2_8bit", 2, 2, gas=2, data=tiny_data, steps=STEPS, extra=eight, stop_at=3)  # stops after step 3
    (tmp / "pp2_8bit.log").rename(tmp / "pp2_8bit_first.log")
    runs["pp2_8bit"] = train(tmp, "pp2_8bit", 2, 2, gas=2, data=tiny_data, steps=STEPS, extra=eight)  # resumes
    return runs


@pytest.mark.process
def test_8bit_adamw_pp1_equals_pp2_with_a_resume_in_between(opt_runs: dict[str, Path]):
    one, two = losses(opt_runs["pp1_8bit"]), losses(opt_runs["pp2_8bit"])
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) / abs(a) <= 1e-5, (one, two)
    assert "resumed from" in opt_runs["pp2_8bit"].with_suffix(".log").read_text()
    assert "optimizer: adamw8bit, PipeAdamW8bit" in opt_runs["pp1_8bit"].with_suffix(".log").read_text()
    assert one != losses(opt_runs["pp1_adamw"])  # another optimizer, another course


def _optimizer_state_bytes(run: Path) -> int:
    tag = run / f"global_step{STEPS}"
    files = {*tag.glob("mp_rank_*"), *tag.glob("*optim*")}
    assert files, f"no optimizer state files in {tag}"
    return sum(f.stat().st_size for f in files)


@pytest.mark.process
def test_8bit_optimizer_state_files_are_at_most_0_4_of_adamws(opt_runs: dict[str, Path]):
    ratio = _optimizer_state_bytes(opt_runs["pp1_8bit"]) / _optimizer_state_bytes(opt_runs["pp1_adamw"])
    assert ratio <= 0.4, ratio
