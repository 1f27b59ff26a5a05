"""The training hook of ``train.eval`` and ``train.checkpoint.save_best`` (see :mod:`lavis.engine.evaluation` for the
held-out loss): every ``train.eval.every`` steps the held-out loss and, with ``train.eval.generate``, benchmark
scores from the chat engine and ``lavis.eval``; the best checkpoint is kept from pruning. It scores with chat and
eval, so it sits on the eval floor, above engine: ``train_pipeline.py`` hands :func:`config_hooks` to
``lavis.engine.trainer.main``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from lavis.chat.engine import ChatEngine
from lavis.config.schema import Config
from lavis.data.collate import PipeBatch
from lavis.data.conversation import ChatTemplate
from lavis.engine.checkpoint import write_atomic
from lavis.engine.evaluation import build_eval_batches, eval_loss, gather_plain_state
from lavis.engine.hooks import Hook
from lavis.eval.runner import run_task
from lavis.eval.tasks import Source
from lavis.model.mllm import MultimodalLM
from lavis.model.spec import ModelSpec

if TYPE_CHECKING:
    from lavis.engine.trainer import Run


def score_benchmarks(cfg: Config, tpl: ChatTemplate, state: dict[str, torch.Tensor], out: Path,
                     step: int, spec: ModelSpec | None = None) -> dict[str, float]:
    """Rank 0: load ``state`` into the plain model (fp32 on CPU, or the first GPU) and score every benchmark of
    ``train.eval.benchmarks`` on at most ``max_samples`` samples; returns ``{"eval_<name>_<metric>": value}`` for
    every scalar score. Predictions and summaries go to ``out/eval/step<N>/<name>/``."""
    e = cfg.train.eval
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = MultimodalLM(cfg.model, tpl.placeholder_id, spec)
    model.load_state_dict(state, strict=True)  # the gathered stages must give exactly the plain model
    model = model.to(device=device, dtype=torch.float32).eval()
    engine = ChatEngine(model, tpl, cfg.model.vision.image_size, device, cfg.data.video_fps)
    metrics: dict[str, float] = {}
    for b in e.benchmarks:
        name = b.name or b.task
        src = Source(Path(b.data), None if b.images is None else Path(b.images),
                     None if b.annotations is None else Path(b.annotations), b.split)
        summary = run_task(engine, b.task, src, out / "eval" / f"step{step}" / name, prompt=b.prompt,
                           batch_size=e.batch_size, limit=e.max_samples, progress=False, meta={"train_step": step})
        for k, v in summary["scores"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "count":
                metrics[f"eval_{name}_{k}"] = float(v)
    del engine, model
    return metrics


def better(value: float, best: float | None, metric: str, mode: str) -> bool:
    """Whether ``value`` beats ``best`` for ``train.checkpoint.save_best_mode`` (``auto``: min for losses, else max)."""
    if best is None:
        return True
    lower = mode == "min" or (mode == "auto" and "loss" in metric)
    return value < best if lower else value > best


# --- the training hook -----------------------------------------------------------------------------------------------
BEST_FILE = "best"


class TrainEvalHook(Hook):
    """``train.eval`` and ``train.checkpoint.save_best`` as a trainer hook.

    ``after_step``: on every ``train.eval.every``-th step, the held-out loss (all ranks) and, with ``generate``,
    benchmark scores (rank 0) are added to the metrics row. ``after_save``: when the checkpoint's step had an
    evaluation and ``train.checkpoint.save_best``'s metric beat the best so far, its tag is kept from pruning and
    written to ``<output_dir>/best`` (``{"tag", "step", "metric", "value"}``); the previous best is released to pruning.
    """

    def __init__(self) -> None:
        self.batches: list[PipeBatch] | None = None
        self.num_micro = 0
        self.last: tuple[int, dict[str, float]] | None = None
        self.best: float | None = None
        self.best_tag: str | None = None

    def on_start(self, run: Run) -> None:
        e = run.cfg.train.eval
        if not e.every:
            return
        grid = run.engine.grid
        self.dp_rank, dp_size = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
        if e.data:
            first, last = run.is_first_stage, run.is_last_stage
            self.batches, self.num_micro, used = build_eval_batches(run.cfg, run.tpl, first=first, last=last,
                                                                    dp_rank=self.dp_rank, dp_size=dp_size)
            if run.rank == 0:
                print(f"held-out eval: {used} records in {self.num_micro * dp_size} micro-batches every {e.every} "
                      f"steps", file=sys.stderr, flush=True)
        best = Path(run.out) / BEST_FILE
        if run.cfg.train.checkpoint.save_best and best.is_file():  # a resumed run keeps competing against its best
            rec = json.loads(best.read_text())
            if rec.get("metric") == run.cfg.train.checkpoint.save_best and (Path(run.out) / rec["tag"]).is_dir():
                self.best, self.best_tag = float(rec["value"]), rec["tag"]
                run.protected_tags.add(rec["tag"])

    def after_step(self, run: Run, step: int, row: dict[str, Any] | None) -> None:
        e = run.cfg.train.eval
        if not e.every or step % e.every:
            return
        metrics: dict[str, float] = {}
        if e.data:
            metrics["eval_loss"] = eval_loss(run.engine, self.batches, self.num_micro)
        if e.generate:
            state = gather_plain_state(run.pipe, run.table, self.dp_rank)
            if state is not None:
                metrics.update(score_benchmarks(run.cfg, run.tpl, state, Path(run.out), step, run.spec))
        self.last = (step, metrics)
        if row is not None:
            row.update(metrics)
        if run.rank == 0:
            # tqdm.write prints above the trainer's progress bar without breaking it
            tqdm.write(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)

    def after_save(self, run: Run, step: int, tag_dir: Path) -> None:
        metric = run.cfg.train.checkpoint.save_best
        if metric is None or self.last is None or self.last[0] != step:
            return
        if metric not in self.last[1]:
            if run.rank == 0 and self.last[1]:
                raise KeyError(f"train.checkpoint.save_best: {metric!r} is not among the evaluation metrics "
                               f"{sorted(self.last[1])}")
            return
        value = self.last[1][metric]
        if not better(value, self.best, metric, run.cfg.train.checkpoint.save_best_mode):
            return
        if self.best_tag is not None:
            run.protected_tags.discard(self.best_tag)
        self.best, self.best_tag = value, tag_dir.name
        run.protected_tags.add(tag_dir.name)
        if run.rank == 0:
            write_atomic(Path(run.out) / BEST_FILE,
                         json.dumps({"tag": tag_dir.name, "step": step, "metric": metric, "value": value}))

    def on_end(self, run: Run) -> None:
        self.batches = None


def config_hooks(cfg: Config) -> list[Hook]:
    """The hooks the config asks for: :class:`TrainEvalHook` when ``train.eval.every`` is set."""
    return [TrainEvalHook()] if cfg.train.eval.every else []
