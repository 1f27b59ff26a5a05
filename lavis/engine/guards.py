"""Per-step guards every rank agrees on: non-finite loss/gradients and preemption signals.

After each optimizer step all ranks join one small ``all_reduce(MAX)`` over a two-flag tensor (this rank saw a
non-finite loss or gradient norm; this rank received SIGTERM/SIGINT), so every stage takes the same decision at
the same step and no rank waits in a collective the others never reach.

Non-finite steps never change the weights: the optimizer skips an update whose global gradient norm is not finite
(DeepSpeed's bf16 and ZeRO optimizers do it themselves; :class:`lavis.engine.optim.PipeAdamW` does it in fp32), and
the learning-rate schedule does not advance for a skipped step (DeepSpeed's rule for overflow steps). By default
the run stops at the first such step; ``train.max_nonfinite_steps: N`` lets it skip up to N of them.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the message names the step and what to try."""


@dataclass
class StepVerdict:
    nonfinite: bool
    """Some rank saw a non-finite loss or gradient norm at this step."""
    stop: bool
    """Some rank was asked to stop (SIGTERM/SIGINT): finish this step, save, exit 0."""


def is_finite(value: float | torch.Tensor | None) -> bool:
    if value is None:
        return True
    return math.isfinite(float(value))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def agree(nonfinite: bool, stop: bool) -> StepVerdict:
    """Collective: every rank calls it once per step, at the same point of the loop."""
    flags = torch.tensor([float(nonfinite), float(stop)], device=_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return StepVerdict(bool(flags[0] > 0), bool(flags[1] > 0))


def trainable_weights_finite(module: nn.Module) -> bool:
    """Collective: whether every trainable parameter on every rank is finite (checked before a checkpoint)."""
    bad = any(not torch.isfinite(p.detach()).all() for p in module.parameters() if p.requires_grad)
    flag = torch.tensor([float(bad)], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag[0] > 0)


def nonfinite_advice(step: int, loss: float | None, grad_norm: float | None, lr: float, precision: str) -> str:
    return (f"step {step}: non-finite training values (loss {loss}, gradient norm {grad_norm}); the weights were not "
            f"updated at this step. Try a lower train.lr (now {lr:.3g}), "
            + ("train.precision: bf16 instead of fp16 (fp16 overflows easily), " if precision == "fp16" else "")
            + "data.on_bad_sample: skip if one batch is to blame, or train.max_nonfinite_steps: N to skip up to N "
              "such steps")


class StopSignal:
    """SIGTERM/SIGINT handler: the first signal asks the run to stop after the current step (with a checkpoint);
    a second one exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] second {name}: exiting now, without a "
                  "checkpoint of the current step", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] {name} received: finishing the current "
              "optimizer step, then saving a checkpoint and exiting (send it again to exit at once)",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.received is not None
