"""train_pipeline.py with a fault injected: ``--poison-steps 2,3`` makes the first stage's output NaN at those
optimizer steps (1-based), as a corrupt batch would. Everything else is the real trainer."""

from __future__ import annotations

import sys

from lavis.engine.distributed import init_distributed, shutdown
from lavis.engine.errors import run_rank
from lavis.engine.hooks import Hook
from lavis.engine.trainer import parse_args, resolve_config, train


class PoisonHook(Hook):
    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.handle = None

    def before_step(self, run, step):
        if step in self.steps and run.is_first_stage:
            first = next(iter(run.pipe.local_layers().values()))
            self.handle = first.register_forward_hook(lambda m, i, out: type(out)(out[0] * float("nan"), *out[1:]))

    def after_step(self, run, step, row):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--poison-steps")
    steps = {int(s) for s in argv[i + 1].split(",")}
    args = parse_args(argv[:i] + argv[i + 2:])
    init_distributed()
    train(resolve_config(args), require_resume=args.resume, stop_at_step=args.stop_at_step, hooks=[PoisonHook(steps)])
    shutdown()


if __name__ == "__main__":
    run_rank(main)  # as train_pipeline.py: torchrun's summary quotes the root-cause rank's message
