"""Every private DeepSpeed attribute lavis touches, behind small named functions (docs/PIPELINE.md section 9).

DeepSpeed has no public API for explicit stage boundaries, per-layer checkpoint files, instruction timing or a
replaceable checkpoint reader, so we reach into its classes. Each such access is a function here, so an upgrade has
one file to re-check. :data:`REQUIREMENTS` lists what the functions assume, with the version it was checked against
(:data:`CHECKED_VERSION`); :func:`problems` checks it against the installed classes, and ``tests/test_ds_compat.py``
fails, naming the attribute, when an upgrade removes or changes one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

CHECKED_VERSION = "0.19.8"
"""The DeepSpeed release every requirement below was read in (setup.py pins it)."""


@dataclass(frozen=True)
class Requirement:
    owner: str
    """Dotted path of the DeepSpeed class."""
    name: str
    kind: Literal["method", "class_attr", "instance_attr"]
    """``method``: a function on the class; ``class_attr``: a class-level value; ``instance_attr``: set as
    ``self.<name> = ...`` somewhere in the class's source (or a base class's)."""
    why: str
    params: tuple[str, ...] | None = None
    """For methods: the parameter names, ``self`` included, in order."""


PIPE_MODULE = "deepspeed.runtime.pipe.module.PipelineModule"
PIPE_ENGINE = "deepspeed.runtime.pipe.engine.PipelineEngine"
DS_ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
TORCH_CKPT_ENGINE = "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine"
ZERO_OPTIMIZER = "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
BF16_OPTIMIZER = "deepspeed.runtime.bf16_optimizer.BF16_Optimizer"

REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(PIPE_MODULE, "_partition_layers", "method", "overridden for explicit stage boundaries; must be "
                "called from __init__", ("self", "method")),
    Requirement(PIPE_MODULE, "_set_bounds", "method", "sets this stage's layer range", ("self", "start", "stop")),
    Requirement(PIPE_MODULE, "_topo", "instance_attr", "this rank's pipeline coordinate"),
    Requirement(PIPE_MODULE, "global_rank", "instance_attr", "this rank, before the engine exists"),
    Requirement(PIPE_MODULE, "_grid", "instance_attr", "the pipeline process group (all-stage gradient norm)"),
    Requirement(PIPE_MODULE, "_local_start", "instance_attr", "global index of this stage's first layer"),
    Requirement(PIPE_MODULE, "forward_funcs", "instance_attr", "this stage's layers, in order"),
    Requirement(PIPE_MODULE, "ckpt_layer_path_list", "method", "layer files of a local layer (resume check)",
                ("self", "ckpt_dir", "local_layer_idx")),
    Requirement(PIPE_MODULE, "get_tied_weights_and_groups", "method", "overridden: our tied weights (tied "
                "embeddings across stages) join the gradient sum DeepSpeed's ReduceTiedGrads instruction runs",
                ("self",)),
    Requirement(PIPE_MODULE, "stage_owner", "method", "the stage that holds a layer", ("self", "layer_idx")),
    Requirement(PIPE_MODULE, "load_state_dir", "method", "overridden: non-strict per-layer load plus our check",
                ("self", "load_dir", "checkpoint_engine", "strict")),
    Requirement(PIPE_ENGINE, "_INSTRUCTION_MAP", "class_attr", "schedule instruction -> method; an instance copy "
                "times each instruction (profiling)"),
    Requirement(PIPE_ENGINE, "grid", "instance_attr", "data-parallel rank of this process"),
    Requirement(DS_ENGINE, "checkpoint_engine", "instance_attr", "replaced by the restricted reader (safe_load)"),
    Requirement(TORCH_CKPT_ENGINE, "load", "method", "overridden by safe_load.SafeCheckpointEngine",
                ("self", "path", "map_location")),
    Requirement(ZERO_OPTIMIZER, "bit16_groups", "instance_attr", "each group's model parameters (relayout)"),
    Requirement(ZERO_OPTIMIZER, "single_partition_of_fp32_groups", "instance_attr",
                "this replica's flat fp32 partition of each group (relayout)"),
    Requirement(BF16_OPTIMIZER, "bf16_groups", "instance_attr", "each group's model parameters (relayout)"),
    Requirement(BF16_OPTIMIZER, "fp32_groups_flat_partition", "instance_attr",
                "this replica's flat fp32 partition of each group (relayout)"),
)

_USED_IN_SOURCE: tuple[tuple[str, str, str], ...] = (
    (PIPE_MODULE, "__init__", "self._partition_layers("),
    (PIPE_ENGINE, "_exec_schedule", "self._INSTRUCTION_MAP["),
    (PIPE_ENGINE, "_exec_reduce_tied_grads", "self.module.get_tied_weights_and_groups()"),
)
"""(class, method, text): how DeepSpeed must use an attribute for our override / instance copy to take effect."""


def _resolve(dotted: str) -> type:
    module, _, cls = dotted.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def _class_source(cls: type) -> str:
    return "\n".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("deepspeed"))


def _problem(req: Requirement) -> str | None:
    where = f"{req.owner}.{req.name} ({req.why})"
    cls = _resolve(req.owner)
    if req.kind == "instance_attr":
        if f"self.{req.name} =" not in _class_source(cls):
            return f"{where}: no longer assigned in the class"
        return None
    if not hasattr(cls, req.name):
        return f"{where}: missing"
    value = getattr(cls, req.name)
    if req.kind == "method":
        if not callable(value):
            return f"{where}: no longer a method"
        params = tuple(inspect.signature(value).parameters)
        if req.params is not None and params != req.params:
            return f"{where}: parameters changed from {req.params} to {params}"
    elif req.kind == "class_attr" and not isinstance(value, dict):
        return f"{where}: expected a dict, found {type(value).__name__}"
    return None


def problems() -> list[str]:
    """One line per requirement the installed DeepSpeed no longer meets (empty when all hold)."""
    out = [p for p in map(_problem, REQUIREMENTS) if p is not None]
    for owner, method, text in _USED_IN_SOURCE:
        if text not in inspect.getsource(getattr(_resolve(owner), method)):
            out.append(f"{owner}.{method} no longer contains {text!r}, which our override relies on")
    return out


# --- PipelineModule ---------------------------------------------------------------------------------------------


def pipe_stage(module: Any) -> int:
    """This rank's pipeline stage (valid inside ``_partition_layers``, before DeepSpeed sets ``stage_id``)."""
    return module._topo.get_coord(module.global_rank).pipe


def set_stage_bounds(module: Any, boundaries: list[int]) -> None:
    """Own layers ``boundaries[s]`` to ``boundaries[s+1]-1`` on stage ``s``: what ``_partition_layers`` must do
    (DeepSpeed keeps them as ``module.parts``)."""
    module.parts = list(boundaries)
    stage = pipe_stage(module)
    module._set_bounds(start=boundaries[stage], stop=boundaries[stage + 1])


def local_start(module: Any) -> int:
    """Global index of this stage's first layer."""
    return module._local_start


def local_layers(module: Any) -> dict[int, nn.Module]:
    """This stage's layers that are modules, by global layer index."""
    start = local_start(module)
    return {start + i: f for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)}


def layer_files(module: Any, load_dir: str, local_index: int) -> list[str]:
    """The checkpoint file(s) DeepSpeed reads for local layer ``local_index`` in ``load_dir``."""
    return module.ckpt_layer_path_list(load_dir, local_index)


def pipe_parallel_group(module: Any) -> Any:
    """The process group of this rank's pipeline (all its stages)."""
    return module._grid.get_pipe_parallel_group()


def data_parallel_size(module: Any) -> int:
    """How many data-parallel replicas of the pipeline run."""
    return module._grid.data_parallel_size


def stage_rank(module: Any, stage: int, replica: int) -> int:
    """The global rank of ``stage`` in data-parallel replica ``replica``."""
    return module._grid.stage_to_global(stage_id=stage, data=replica)


# --- PipelineEngine / DeepSpeedEngine -----------------------------------------------------------------------------


def instruction_map(engine: Any) -> dict[type, Callable[..., Any]]:
    """DeepSpeed's class-level schedule map: instruction class -> unbound engine method."""
    return dict(type(engine)._INSTRUCTION_MAP)


def set_instruction_map(engine: Any, mapping: dict[type, Callable[..., Any]]) -> None:
    """Give this engine instance its own map (the class's stays untouched)."""
    engine._INSTRUCTION_MAP = mapping


def data_parallel_rank(engine: Any) -> int:
    return engine.grid.get_data_parallel_rank()


def checkpoint_engine(engine: Any) -> Any:
    return engine.checkpoint_engine


def set_checkpoint_engine(engine: Any, reader: Any) -> None:
    engine.checkpoint_engine = reader


# --- ZeRO / bf16 optimizers (resume on another layout) -----------------------------------------------------------


def is_partitioned(optimizer: Any) -> bool:
    """DeepSpeed's ZeRO-1/2 or bf16 optimizer: a flat fp32 partition of each group per replica."""
    return hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_groups_flat_partition")


def model_param_groups(optimizer: Any) -> list[list[nn.Parameter]]:
    """The model parameters of each optimizer group, in the optimizer's order (DeepSpeed's wrappers keep the original
    groups beside their flat copies; a plain torch optimizer has them in ``param_groups``)."""
    for attr in ("bit16_groups", "bf16_groups"):
        if hasattr(optimizer, attr):
            return [list(g) for g in getattr(optimizer, attr)]
    return [list(g["params"]) for g in optimizer.param_groups]


def flat_partitions(optimizer: Any) -> list[Any]:
    """This replica's flat fp32 partition of each group (the base optimizer's parameters)."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return list(optimizer.single_partition_of_fp32_groups)
    return list(optimizer.fp32_groups_flat_partition)


def base_optimizer_state(optimizer: Any, flat: Any) -> dict:
    """The wrapped optimizer's state of one flat partition (empty until its first step)."""
    return optimizer.optimizer.state[flat]


def hp_fragment(param: Any) -> tuple[int, int, int] | None:
    """Where this replica's piece of ``param`` lies: (start in the parameter, start in the group's partition, numel),
    or None when the partition holds none of it. DeepSpeed links each model parameter to its piece as
    ``param._hp_mapping`` (``deepspeed.utils.mixed_precision_linkage.link_hp_params``)."""
    hp = getattr(param, "_hp_mapping", None)
    if hp is None:
        return None
    return hp.lp_fragment_address.start, hp.hp_fragment_address.start, hp.lp_fragment_address.numel
