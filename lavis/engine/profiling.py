"""Per-rank time spent in each pipeline instruction (forward, backward, send/recv, optimizer step...).

DeepSpeed's ``PipelineEngine`` runs its schedule through the class-level ``_INSTRUCTION_MAP``; an instance copy of
that map with timed wrappers measures every instruction without changing what runs. On CUDA each instruction is
synchronised before and after, so times are wall times of the work, not of the launch. The map is reached through
``lavis.engine.ds_compat``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from lavis.engine import ds_compat

COMPUTE = ("ForwardPass", "BackwardPass", "OptimizerStep")


class InstructionTimer:
    def __init__(self, engine: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False
        timed = {}
        for cls, fn in ds_compat.instruction_map(engine).items():
            timed[cls] = self._wrap(cls.__name__, fn)
        ds_compat.set_instruction_map(engine, timed)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(engine: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(engine, **kwargs)
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = fn(engine, **kwargs)
            sync()
            self.seconds[name] += time.perf_counter() - t0
            return out

        return run

    def compute_seconds(self) -> float:
        return sum(self.seconds.get(k, 0.0) for k in COMPUTE)
