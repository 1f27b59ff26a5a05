"""``python -m lavis.engine.launch``: torchrun (same arguments) that ends a preempted job with exit status 0.

    python -m lavis.engine.launch --nproc_per_node 2 train_pipeline.py --cfg-path CFG.yaml --num-stages 2

torchrun itself, on SIGTERM or SIGINT, raises ``SignalException`` in its agent: it forwards the signal to the ranks,
waits at most 30 s, SIGKILLs whatever is left and exits with status 1 and a traceback, even when every rank saved
its checkpoint and exited 0. A scheduler that signals the whole job (the ranks and the launcher) therefore always
sees a failed job. This launcher is torchrun with one change, the handler of those two signals:

- the first SIGTERM/SIGINT is forwarded to the ranks once; the agent keeps monitoring them, so when they finish the
  step, save and exit 0, the job exits 0 (a rank that fails still fails the job, as under torchrun);
- repeated SIGTERMs within ``guards.SIGNAL_GRACE_S`` of the first are the same request (not forwarded again);
- a later SIGTERM, a second SIGINT, and SIGHUP/SIGQUIT keep torchrun's own handling (forward, wait, kill, exit 1).
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

from lavis.engine.guards import SIGNAL_GRACE_S


class ForwardOnce:
    """The launcher's SIGTERM/SIGINT handler (see the module docstring)."""

    def __init__(self, grace_s: float = SIGNAL_GRACE_S) -> None:
        self.grace_s = grace_s
        self.first: tuple[int, float] | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        from torch.distributed.elastic.multiprocessing import SignalException

        sig = signal.Signals(signum)
        if sig not in (signal.SIGTERM, signal.SIGINT) or self._forces_exit(sig):
            raise SignalException(f"launcher got signal {sig.name}", sigval=sig)  # torchrun's own handling
        if self.first is not None:
            return
        self.first = (sig, time.monotonic())
        ranks = _forward(sig)
        print(f"launcher: {sig.name} received, forwarded to {ranks} rank process(es): they finish the current step, "
              "save a checkpoint and exit 0", file=sys.stderr, flush=True)

    def _forces_exit(self, sig: signal.Signals) -> bool:
        if self.first is None:
            return False
        first_sig, at = self.first
        return (sig == signal.SIGINT and first_sig == signal.SIGINT) or time.monotonic() - at > self.grace_s


def _forward(sig: signal.Signals) -> int:
    """Send ``sig`` to this process's children (torchrun's workers: the ranks); returns how many got it."""
    import psutil  # a dependency of deepspeed

    sent = 0
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(sig)
            sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api

    # torchrun's agent installs this module-level handler when it starts the workers (PContext.start).
    api._terminate_process_handler = ForwardOnce()
    torchrun.main(argv)


if __name__ == "__main__":
    main()
