"""Held-out evaluation during training (``train.eval``) and keeping the best checkpoint (``train.save_best``).

* Held-out loss: the first ``train.eval.max_samples`` records of ``train.eval.data``, read with the eval transform
  and no augmentation, cut into full micro-batches of ``train.micro_batch_size`` (micro-batch i goes to
  data-parallel replica i mod D; a tail that fills no micro-batch on every replica is left out, the count printed),
  run through DeepSpeed's ``PipelineEngine.eval_batch`` on every stage. The value is the mean of
  the micro-batches' token-mean losses, as the training loss is.
* Benchmarks (``train.eval.generate``): rank 0 gathers the full model from all stages (one extra full copy of
  the weights on its device), loads it into the plain model and scores ``train.eval.benchmarks`` with ``lavis.eval``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lavis.config.schema import Config
from lavis.data.collate import Collator, PipeBatch
from lavis.data.conversation import ChatTemplate
from lavis.data.datasets import ConversationDataset, Record, load_records
from lavis.engine.hooks import Hook
from lavis.pipeline.plan import LayerEntry, layers_to_plain


def held_out_records(cfg: Config) -> list[Record]:
    """The first ``max_samples`` records of ``train.eval.data``, datasets in order."""
    records: list[Record] = []
    for d in cfg.train.eval.data:
        records += load_records(d)
        if len(records) >= cfg.train.eval.max_samples:
            break
    return records[:cfg.train.eval.max_samples]


def micro_batch_keys(num_records: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> tuple[
        list[list[tuple[int, int]]], int]:
    """This replica's micro-batches of ``(record index, seed 0)`` keys and how many records are used in all.

    Micro-batch i holds records ``[i*m, (i+1)*m)`` and goes to replica ``i % D``. Only full micro-batches are used
    (the pipeline's inter-stage buffers may be sized by the first one) and every replica must run the same number,
    so up to ``m * D - 1`` trailing records are left out; the returned count says how many are evaluated (the
    trainer prints it)."""
    full = num_records // micro_batch_size
    usable = full - full % dp_size
    if usable == 0:
        raise ValueError(f"train.eval: {num_records} held-out records do not fill one micro-batch of "
                         f"{micro_batch_size} per data-parallel replica ({dp_size}); raise train.eval.max_samples "
                         f"or add records")
    mine = [[(k, 0) for k in range(i * micro_batch_size, (i + 1) * micro_batch_size)]
            for i in range(dp_rank, usable, dp_size)]
    return mine, usable * micro_batch_size


def build_eval_batches(
    cfg: Config, tpl: ChatTemplate, *, first: bool, last: bool, dp_rank: int, dp_size: int,
) -> tuple[list[PipeBatch] | None, int, int]:
    """(this rank's collated micro-batches or None on middle stages, micro-batches per replica, records used).

    The first stage gets images and ids, the last stage the labels (media not decoded), as in training."""
    records = held_out_records(cfg)
    if not records:
        raise ValueError("train.eval.data holds no records")
    keys, used = micro_batch_keys(len(records), cfg.train.micro_batch_size, dp_rank, dp_size)
    if not (first or last):
        return None, len(keys), used
    ds = ConversationDataset(records, tpl, cfg.data, cfg.model.vision.image_size, train=False, load_media=first,
                             label_mode=cfg.data.label_mode)
    collate = Collator(tpl.special_ids().pad, cfg.data.max_txt_len, cfg.data.pad_to_multiple_of,
                       cfg.data.fixed_length)
    return [collate([ds[k] for k in mb]) for mb in keys], len(keys), used


def eval_loss(engine: Any, batches: Sequence[PipeBatch] | None, num_micro_batches: int) -> float:
    """Collective (every rank): the mean loss of the micro-batches through DeepSpeed's ``eval_batch`` (all stages;
    averaged over data-parallel replicas; the same value returned on every rank). The engine goes back to train
    mode at the next ``train_batch``."""
    data_iter: Iterator[PipeBatch] | None = iter(batches) if batches is not None else None
    loss = engine.eval_batch(data_iter, num_micro_batches=num_micro_batches)
    return float(loss)


# --- benchmarks through the plain model on rank 0 --------------------------------------------------------------------
def gather_plain_state(pipe: Any, table: list[LayerEntry], dp_rank: int) -> dict[str, torch.Tensor] | None:
    """Collective: every stage (its first data-parallel replica) sends its layers' full state (frozen weights
    included) to rank 0, which returns the plain-model state dict; other ranks return None."""
    mine = {}
    if dp_rank == 0:
        mine = {i: {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
                for i, layer in pipe.local_layers().items()}
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:  # not rank 0
        return None
    states = {i: sd for part in gathered for i, sd in part.items()}
    return layers_to_plain(table, states)


def score_benchmarks(cfg: Config, tpl: ChatTemplate, state: dict[str, torch.Tensor], out: Path,
                     step: int) -> dict[str, float]:
    """Rank 0: load ``state`` into the plain model (fp32 on CPU, or the first GPU) and score every benchmark of
    ``train.eval.benchmarks`` on at most ``max_samples`` samples; returns ``{"eval_<name>_<metric>": value}`` for
    every scalar score. Predictions and summaries go to ``out/eval/step<N>/<name>/``."""
    from lavis.chat.engine import ChatEngine
    from lavis.eval.runner import run_task
    from lavis.eval.tasks import Source
    from lavis.model.mllm import MultimodalLM

    e = cfg.train.eval
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = MultimodalLM(cfg.model, tpl.placeholder_id)
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
    """Whether ``value`` beats ``best`` for ``train.save_best_mode`` (``auto``: min for losses, else max)."""
    if best is None:
        return True
    lower = mode == "min" or (mode == "auto" and "loss" in metric)
    return value < best if lower else value > best


# --- the training hook -----------------------------------------------------------------------------------------------
BEST_FILE = "best"


class TrainEvalHook(Hook):
    """``train.eval`` and ``train.save_best`` as a trainer hook.

    ``after_step``: on every ``train.eval.every``-th step, the held-out loss (all ranks) and, with ``generate``,
    benchmark scores (rank 0) are added to the metrics row. ``after_save``: when the checkpoint's step had an
    evaluation and ``train.save_best``'s metric beat the best so far, its tag is kept from pruning and written to
    ``<output_dir>/best`` (``{"tag", "step", "metric", "value"}``); the previous best is released to pruning.
    """

    def __init__(self) -> None:
        self.batches: list[PipeBatch] | None = None
        self.num_micro = 0
        self.last: tuple[int, dict[str, float]] | None = None
        self.best: float | None = None
        self.best_tag: str | None = None

    def on_start(self, run: Any) -> None:
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
        if run.cfg.train.save_best and best.is_file():  # a resumed run keeps competing against its best
            import json

            rec = json.loads(best.read_text())
            if rec.get("metric") == run.cfg.train.save_best and (Path(run.out) / rec["tag"]).is_dir():
                self.best, self.best_tag = float(rec["value"]), rec["tag"]
                run.protected_tags.add(rec["tag"])

    def after_step(self, run: Any, step: int, row: dict[str, Any] | None) -> None:
        e = run.cfg.train.eval
        if not e.every or step % e.every:
            return
        metrics: dict[str, float] = {}
        if e.data:
            metrics["eval_loss"] = eval_loss(run.engine, self.batches, self.num_micro)
        if e.generate:
            state = gather_plain_state(run.pipe, run.table, self.dp_rank)
            if state is not None:
                metrics.update(score_benchmarks(run.cfg, run.tpl, state, Path(run.out), step))
        self.last = (step, metrics)
        if row is not None:
            row.update(metrics)
        if run.rank == 0:
            from tqdm import tqdm

            # tqdm.write prints above the trainer's progress bar without breaking it
            tqdm.write(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)

    def after_save(self, run: Any, step: int, tag_dir: Path) -> None:
        metric = run.cfg.train.save_best
        if metric is None or self.last is None or self.last[0] != step:
            return
        if metric not in self.last[1]:
            if run.rank == 0 and self.last[1]:
                raise KeyError(f"train.save_best: {metric!r} is not among the evaluation metrics "
                               f"{sorted(self.last[1])}")
            return
        value = self.last[1][metric]
        if not better(value, self.best, metric, run.cfg.train.save_best_mode):
            return
        if self.best_tag is not None:
            run.protected_tags.discard(self.best_tag)
        self.best, self.best_tag = value, tag_dir.name
        run.protected_tags.add(tag_dir.name)
        if run.rank == 0:
            import json

            from lavis.engine.checkpoint import write_atomic

            write_atomic(Path(run.out) / BEST_FILE,
                         json.dumps({"tag": tag_dir.name, "step": step, "metric": metric, "value": value}))

    def on_end(self, run: Any) -> None:
        self.batches = None


def config_hooks(cfg: Config) -> list[Hook]:
    """The hooks the config asks for: :class:`TrainEvalHook` when ``train.eval.every`` is set."""
    return [TrainEvalHook()] if cfg.train.eval.every else []
