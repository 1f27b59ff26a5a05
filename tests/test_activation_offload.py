"""`train.parallel.activation_offload`: the saved activations of the offloaded stages' forwards go to host memory
(``torch.autograd.graph.save_on_cpu``), the planner stops counting them on the GPU, and the losses do not change."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lavis.config.load import ConfigError, load_config
from lavis.engine import pipe_module
from lavis.pipeline.plan import LayerCost, Workload, offloaded_stages, stage_memory_bytes

from .conftest import STEPS, losses, train


def test_offloaded_stages_from_the_config():
    def stages(*options: str) -> frozenset[int]:
        return offloaded_stages(load_config(None, ["train.parallel.num_stages=3", *options]).train)

    assert stages() == frozenset()
    assert stages("train.parallel.activation_offload=true") == {0, 1, 2}
    assert stages("train.parallel.activation_offload=[0]") == {0}
    assert stages("train.parallel.activation_offload=false") == frozenset()


def test_an_offload_stage_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match=r"train.parallel.activation_offload: stages \[2\] do not exist "
                                          r"\(train.parallel.num_stages is 2"):
        load_config(None, ["train.parallel.num_stages=2", "train.parallel.activation_offload=[0, 2]"])


def test_the_planner_keeps_one_micro_batch_of_activations_on_an_offloaded_stage():
    costs = [LayerCost(0, "block", 10, 10, 1.0, 1000.0)]
    plain, offload = Workload(tokens=8, seq_len=8, images=0), Workload(8, 8, 0, offloaded_stages=frozenset({0}))
    # stage 0 of 4 holds 4 micro-batches in flight under 1F1B; offloaded, only the one it computes stays
    assert stage_memory_bytes(costs, 0, 4, plain, 0) - stage_memory_bytes(costs, 0, 4, offload, 0) == 3 * 1000.0
    assert stage_memory_bytes(costs, 1, 4, plain, 0) == stage_memory_bytes(costs, 1, 4, offload, 0)


class _Recorder:
    """Stands in for save_on_cpu: counts the forwards run inside it (and still offloads, through the real one)."""

    active = 0
    entered: list[bool] = []

    def __init__(self, pin_memory: bool) -> None:
        self.real = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)

    def __enter__(self) -> None:
        _Recorder.active += 1
        self.real.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.real.__exit__(*exc)
        _Recorder.active -= 1


class _Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _Recorder.entered.append(_Recorder.active > 0)
        return (x * self.w) ** 2


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    from lavis.engine.distributed import init_distributed

    created = not dist.is_initialized()
    saved = dict(os.environ)
    init_distributed()  # a one-process group: it sets RANK, WORLD_SIZE, MASTER_ADDR, ... in os.environ
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
        os.environ.clear()  # later tests start launchers, which must not inherit RANK (they would think they are
        os.environ.update(saved)  # one rank of a launch themselves)


@pytest.mark.process
@pytest.mark.parametrize("offload, active", [(frozenset({0}), True), (frozenset({1}), False), (frozenset(), False)])
def test_the_hook_wraps_the_forward_of_the_offloaded_stages_only(
    process_group: None, monkeypatch: pytest.MonkeyPatch, offload: frozenset[int], active: bool,
):
    monkeypatch.setattr(pipe_module, "save_on_cpu", _Recorder)
    monkeypatch.setattr(_Recorder, "entered", [])
    pipe = pipe_module.LavisPipelineModule([_Square(), _Square()], [0, 2], offload_stages=offload)  # one stage: 0
    assert pipe.offload_activations is active
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    pipe(x).sum().backward()  # the saved tensors come back for backward
    assert _Recorder.entered == [active, active]
    assert torch.equal(x.grad, 4 * x.detach() ** 3)  # d/dx (x^2)^2, unchanged by the offload


@pytest.fixture(scope="module")
def offload_runs(runs: dict[str, Path], tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two offloaded runs, with the settings of the session's plain 2-stage run (conftest `runs`, GAS 4) that
    they are compared with."""
    tmp = tmp_path_factory.mktemp("offload")
    return {
        "plain": runs["pp2"],
        "offload": train(tmp, "offload", 2, 2, gas=4, data=tiny_data,
                         extra=("train.parallel.activation_offload=true",)),
        "offload0_recompute": train(tmp, "offload0_recompute", 2, 2, gas=4, data=tiny_data,
                                    extra=("train.parallel.activation_offload=[0]",
                                           "train.parallel.activation_checkpoint_interval=1")),
    }


@pytest.mark.process
@pytest.mark.parametrize("name, stages", [("offload", [0, 1]), ("offload0_recompute", [0])])
def test_activation_offload_leaves_the_losses_unchanged(offload_runs: dict[str, Path], name: str, stages: list[int]):
    plain, other = losses(offload_runs["plain"]), losses(offload_runs[name])
    assert len(plain) == len(other) == STEPS
    for a, b in zip(plain, other):
        assert abs(a - b) / abs(a) <= 1e-5, (plain, other)
    log = offload_runs[name].with_suffix(".log").read_text()
    on = [s for s in (0, 1) if f"[stage {s}] activation offload: saved activations kept in host memory" in log]
    assert on == stages
    assert "activation offload" not in offload_runs["plain"].with_suffix(".log").read_text()
