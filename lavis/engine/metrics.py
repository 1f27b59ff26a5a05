"""Rank-0 metric sinks: ``metrics.jsonl`` (always), TensorBoard (default on), wandb (optional, never required)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from lavis.config.schema import TrainConfig


class MetricsLogger:
    def __init__(self, out: Path, t: TrainConfig, run_config: dict[str, Any], start_step: int) -> None:
        self.path = out / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.tb = None
        if t.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint it resumes from.
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if t.log.wandb_project:
            try:
                import wandb  # pyright: ignore[reportMissingImports] - optional, not in the dev extras
            except ImportError as e:
                raise ImportError("train.log.wandb_project is set but wandb is not installed: pip install wandb "
                                  "(or unset train.log.wandb_project; TensorBoard logs are in <output_dir>/tensorboard)"
                                  ) from e
            self.wandb = wandb.init(project=t.log.wandb_project, dir=str(out), config=run_config, resume="allow",
                                    id=hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16])

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A torn last line (a crash mid-write) is dropped with a warning naming the
    file; a damaged line elsewhere is an error naming file and line."""
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row with an integer `step`")
        except ValueError as e:
            if i == len(lines) - 1:
                print(f"WARNING: {path}:{i + 1}: dropping a torn last line (a crash while writing it): {ln[:80]!r}",
                      file=sys.stderr, flush=True)
                break
            raise ValueError(f"{path}:{i + 1}: damaged metrics row ({e}); fix or remove that line") from None
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep metric rows up to ``step``, the step of the checkpoint being resumed (the rows after it are recomputed).
    A fresh start (``step`` 0) never deletes an earlier file: it is kept as ``metrics.jsonl.old-N``."""
    if not path.is_file():
        return
    if step == 0:
        n = 1
        while path.with_name(f"{path.name}.old-{n}").exists():
            n += 1
        aside = path.with_name(f"{path.name}.old-{n}")
        os.replace(path, aside)
        print(f"NOTE: {path} from an earlier run without checkpoints was kept as {aside}", file=sys.stderr, flush=True)
        return
    keep = [row for row in read_metric_rows(path) if row["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    os.replace(tmp, path)
