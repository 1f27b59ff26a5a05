"""Rank-0 metric sinks: ``metrics.jsonl`` (always), TensorBoard (default on), wandb (optional, never required)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from lavis.config.schema import TrainConfig


class MetricsLogger:
    def __init__(self, out: Path, t: TrainConfig, run_config: dict[str, Any], start_step: int) -> None:
        self.path = out / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.tb = None
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint it resumes from.
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if t.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.wandb_project is set but wandb is not installed: pip install wandb "
                                  "(or unset train.wandb_project; TensorBoard logs are in <output_dir>/tensorboard)"
                                  ) from e
            self.wandb = wandb.init(project=t.wandb_project, dir=str(out), config=run_config, resume="allow",
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


def truncate_metrics(path: Path, step: int) -> None:
    """Keep metric rows up to ``step`` (a resumed run continues the file without duplicate steps)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    shutil.move(tmp, path)
