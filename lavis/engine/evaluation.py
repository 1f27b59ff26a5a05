"""Held-out evaluation during training (``train.eval``) and keeping the best checkpoint
(``train.checkpoint.save_best``).

* Held-out loss: the first ``train.eval.max_samples`` records of ``train.eval.data``, read with the eval transform
  and no augmentation, cut into full micro-batches of ``train.batch.micro_batch_size`` (micro-batch i goes to
  data-parallel replica i mod D; a tail that fills no micro-batch on every replica is left out, the count printed),
  run through DeepSpeed's ``PipelineEngine.eval_batch`` on every stage. The value is the mean of
  the micro-batches' token-mean losses, as the training loss is.
* Benchmarks (``train.eval.generate``): rank 0 gathers the full model from all stages (:func:`gather_plain_state`:
  one extra full copy of the weights on its device); :mod:`lavis.eval.train_hook` loads it into the plain model and
  scores ``train.eval.benchmarks`` with ``lavis.eval``. That hook, and keeping the best checkpoint, sit on the eval
  floor (they score with chat and eval); ``train_pipeline.py`` hands them to the trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from lavis.config.schema import Config
from lavis.data.collate import Collator, PipeBatch
from lavis.data.conversation import ChatTemplate
from lavis.data.datasets import ConversationDataset, Record, load_records
from lavis.model.spec import LayerEntry
from lavis.pipeline.plan import layers_to_plain

if TYPE_CHECKING:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from lavis.engine.pipe_module import LavisPipelineModule


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
    keys, used = micro_batch_keys(len(records), cfg.train.batch.micro_batch_size, dp_rank, dp_size)
    if not (first or last):
        return None, len(keys), used
    ds = ConversationDataset(records, tpl, cfg.data, cfg.model.vision.image_size, train=False, load_media=first,
                             label_mode=cfg.data.label_mode)
    collate = Collator(tpl.special_ids().pad, cfg.data.max_txt_len, cfg.data.pad_to_multiple_of,
                       cfg.data.fixed_length)
    return [collate([ds[k] for k in mb]) for mb in keys], len(keys), used


def eval_loss(engine: PipelineEngine, batches: Sequence[PipeBatch] | None, num_micro_batches: int) -> float:
    """Collective (every rank): the mean loss of the micro-batches through DeepSpeed's ``eval_batch`` (all stages;
    averaged over data-parallel replicas; the same value returned on every rank). The engine goes back to train
    mode at the next ``train_batch``."""
    data_iter: Iterator[PipeBatch] | None = iter(batches) if batches is not None else None
    loss = engine.eval_batch(data_iter, num_micro_batches=num_micro_batches)
    return float(cast(torch.Tensor, loss))


# --- benchmarks through the plain model on rank 0 --------------------------------------------------------------------
def gather_plain_state(pipe: LavisPipelineModule, table: list[LayerEntry],
                       dp_rank: int) -> dict[str, torch.Tensor] | None:
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
