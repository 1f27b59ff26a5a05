"""train_pipeline.py with a fault injected into the checkpoint save of one step (everything else is the real trainer):

- ``--stall-in-save N``: rank 0 stops inside the save of step N, right after DeepSpeed wrote its first file, and
  writes ``<output_dir>.stalled`` (naming that file) so that a test can kill the job in the middle of the save;
- ``--fsize-limit-in-save N``: from the save of step N on, rank 0 may not write files over 1 MiB (``RLIMIT_FSIZE``,
  ``SIGXFSZ`` ignored: the write fails as on a full disk).
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from pathlib import Path

from lavis.engine import ds_compat
from lavis.engine.distributed import init_distributed, shutdown
from lavis.engine.errors import run_rank
from lavis.engine.hooks import Hook
from lavis.engine.trainer import parse_args, resolve_config, train


class SaveFault(Hook):
    def __init__(self, kind: str, step: int) -> None:
        self.kind, self.step = kind, step

    def on_start(self, run):
        if run.rank != 0:
            return
        engine = ds_compat.checkpoint_engine(run.engine)
        real_save = engine.save
        marker = Path(f"{run.out}.stalled")
        tag = f"global_step{self.step}"

        def save(state_dict, path):
            if self.kind == "fsize" and tag in str(path):
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            result = real_save(state_dict, path)
            if self.kind == "stall" and tag in str(path):
                marker.write_text(str(path))
                time.sleep(3600)
            return result

        engine.save = save


def main() -> None:
    argv = sys.argv[1:]
    for flag, kind in (("--stall-in-save", "stall"), ("--fsize-limit-in-save", "fsize")):
        if flag in argv:
            i = argv.index(flag)
            fault = SaveFault(kind, int(argv[i + 1]))
            argv = argv[:i] + argv[i + 2:]
    args = parse_args(argv)
    init_distributed()
    train(resolve_config(args), require_resume=args.resume, resume_from=args.resume_from,
          stop_at_step=args.stop_at_step, hooks=[fault])
    shutdown()


if __name__ == "__main__":
    run_rank(main)
