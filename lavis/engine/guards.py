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
import time
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
    loss: float | None = None
    """This rank's view of the step's loss (set by the trainer, quoted when the step is non-finite)."""
    grad_norm: float | None = None


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
            f"updated at this step. Try a lower train.optim.lr (now {lr:.3g}), "
            + ("train.precision: bf16 instead of fp16 (fp16 overflows easily), " if precision == "fp16" else "")
            + "data.on_bad_sample: skip if one batch is to blame, or train.max_nonfinite_steps: N to skip up to N "
              "such steps")


SIGNAL_GRACE_S = 20.0
"""Repeated SIGTERMs within this many seconds of the first count as one: a scheduler signals every process of the job
and the launcher forwards its own SIGTERM a moment later, so a rank often receives two."""


class StopSignal:
    """SIGTERM/SIGINT handler: the first signal asks the run to stop after the current step (with a checkpoint).
    Repeated SIGTERMs within :data:`SIGNAL_GRACE_S` of the first are the same request (a scheduler's SIGTERM and the
    launcher's forwarded copy); a later SIGTERM, or a second SIGINT (Ctrl-C twice), exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = SIGNAL_GRACE_S) -> None:
        self.received: int | None = None
        self.grace_s = grace_s
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers, unless a stop was requested: then this process is on its way out with its
        checkpoint written, and a copy of the signal still arriving (the launcher forwards the scheduler's SIGTERM,
        which may come after the run has stopped) must not kill it with a signal status. A Python handler would not
        do: the interpreter resets those to the default while it finalizes, so SIGTERM is ignored from here on (a
        scheduler that insists escalates to SIGKILL, which a finished run can take)."""
        if self.received is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def forces_exit(self, signum: int) -> bool:
        """Whether ``signum``, arriving after a first stop request, means "exit now" rather than the same request."""
        if self.received is None:
            return False
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            return True
        return time.monotonic() - self._first_at > self.grace_s

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        who = f"[rank {dist.get_rank() if dist.is_initialized() else 0}]"
        if self.forces_exit(signum):
            print(f"{who} second {name}: exiting now, without a checkpoint of the current step", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        if self.received is not None:
            print(f"{who} {name} again within {self.grace_s:.0f} s of the first signal: already stopping after "
                  "this step", file=sys.stderr, flush=True)
            return
        self.received, self._first_at = signum, time.monotonic()
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send SIGTERM again after {self.grace_s:.0f} s"
        print(f"{who} {name} received: finishing the current optimizer step, then saving a checkpoint and exiting "
              f"({again} to exit at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.received is not None
