"""The private DeepSpeed attributes lavis touches (lavis/engine/ds_compat.py) still exist with the shape we use.

A DeepSpeed upgrade that removes or changes one fails here with the attribute named, before a launch test fails in a
less obvious way. The accessors are also exercised on a real one-stage PipelineModule (gloo, world size 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lavis.engine import ds_compat


def test_checked_version_is_installed() -> None:
    assert deepspeed.__version__ == ds_compat.CHECKED_VERSION, (
        f"deepspeed {deepspeed.__version__} is installed but lavis/engine/ds_compat.py was checked against "
        f"{ds_compat.CHECKED_VERSION}: re-check docs/PIPELINE.md section 9, then bump CHECKED_VERSION and setup.py")


@pytest.mark.parametrize("req", ds_compat.REQUIREMENTS, ids=lambda r: f"{r.owner.rsplit('.', 1)[1]}.{r.name}")
def test_requirement_holds(req: ds_compat.Requirement) -> None:
    problem = ds_compat._problem(req)
    assert problem is None, problem


def test_deepspeed_calls_what_we_override() -> None:
    assert ds_compat.problems() == []


def test_a_changed_signature_is_named() -> None:
    wrong = ds_compat.Requirement(ds_compat.PIPE_MODULE, "_set_bounds", "method", "test", ("self", "begin", "end"))
    gone = ds_compat.Requirement(ds_compat.PIPE_MODULE, "_no_such_thing", "instance_attr", "test")
    assert "_set_bounds" in ds_compat._problem(wrong) and "parameters changed" in ds_compat._problem(wrong)
    assert "_no_such_thing" in ds_compat._problem(gone)


class _Plus(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), float(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w


class _Manual(deepspeed.pipe.PipelineModule):
    def _partition_layers(self, method: str = "uniform") -> None:
        ds_compat.set_stage_bounds(self, [0, 3])


@pytest.fixture(scope="module")
def one_stage() -> Iterator[_Manual]:
    from lavis.engine.distributed import init_distributed

    created = not dist.is_initialized()
    saved = dict(os.environ)
    init_distributed()  # a one-process group: it sets RANK, WORLD_SIZE, ... which later launches must not inherit
    try:
        yield _Manual([_Plus(0), lambda x: x * 2, _Plus(2)], num_stages=1, partition_method="uniform")
    finally:
        if created:
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.process
def test_accessors_on_a_real_pipeline_module(one_stage: _Manual, tmp_path: Path) -> None:
    pipe = one_stage
    assert pipe.parts == [0, 3] and ds_compat.pipe_stage(pipe) == 0 and ds_compat.local_start(pipe) == 0
    layers = ds_compat.local_layers(pipe)
    assert sorted(layers) == [0, 2] and layers[2].w.detach().item() == 2.0  # the lambda (layer 1) is not a module
    assert dist.get_world_size(ds_compat.pipe_parallel_group(pipe)) == 1
    (tmp_path / "layer_02-model_states.pt").write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in ds_compat.layer_files(pipe, str(tmp_path), 2)] == ["layer_02-model_states.pt"]
