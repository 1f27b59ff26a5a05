"""Samples -> one micro-batch in the pipeline's input layout (:class:`PipeBatch`), with dynamic padding.

``PipeBatch.inputs`` (:class:`StageInputs`: pixels ``[N,3,S,S]``, input_ids ``[B,L]``, attention mask ``[B,L]``)
feeds the first stage (with ``data.feature_cache``, cached features ``[N,T,C]`` in place of the pixels);
``PipeBatch.labels_BL`` feeds the loss on the last stage. Both are ``NamedTuple``s, so they are the plain tuples
DeepSpeed's pipeline engine reads by position (``batch[0]`` on the first stage, ``batch[1]`` on the last; it
rebuilds ``batch[0]`` as a plain tuple, which the first layer reads back as :class:`StageInputs`).
``L`` is the longest sample rounded up to a multiple of ``pad_to_multiple_of`` (capped at ``max_txt_len``), or
exactly ``max_txt_len`` in fixed-length mode (parity with the predecessors, which pad everything to
``max_txt_len``). Padding is on the right with the pad id and label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from lavis.data.conversation import IGNORE_INDEX
from lavis.data.datasets import Sample


class StageInputs(NamedTuple):
    """What the first pipeline stage reads: one micro-batch of media and padded token ids."""

    media: torch.Tensor
    """``[N, 3, S, S]`` pixels of the N images / video frames, or with ``data.feature_cache`` their cached features
    ``[N, T, C]``; ``N`` may be 0 (a text-only micro-batch)."""
    input_ids_BL: torch.Tensor
    """``[B, L]`` int64 token ids, right-padded with the pad id."""
    mask_BL: torch.Tensor
    """``[B, L]`` int64 attention mask: 1 for tokens, 0 for padding."""


def round_up_length(longest: int, multiple: int, max_len: int) -> int:
    """A micro-batch's padded length: ``longest`` rounded up to ``multiple`` (``data.pad_to_multiple_of``), at most
    ``max_len`` (``data.max_txt_len``)."""
    return min(max_len, -(-longest // multiple) * multiple) if multiple > 1 else longest


class PipeBatch(NamedTuple):
    """One micro-batch as the data iterator yields it to DeepSpeed's ``train_batch`` / ``eval_batch``."""

    inputs: StageInputs
    """Read by the first stage (DeepSpeed's ``batch[0]``)."""
    labels_BL: torch.Tensor
    """``[B, L]`` int64 labels (-100 where no loss is taken), read by the loss on the last stage (``batch[1]``)."""


@dataclass(frozen=True)
class Collator:
    pad_id: int
    max_txt_len: int
    pad_to_multiple_of: int = 64
    fixed_length: bool = False

    def padded_length(self, longest: int) -> int:
        if self.fixed_length:
            return self.max_txt_len
        return round_up_length(longest, self.pad_to_multiple_of, self.max_txt_len)

    def __call__(self, samples: list[Sample]) -> PipeBatch:
        longest = max(len(s.input_ids) for s in samples)
        length = max(longest, self.padded_length(longest))
        ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            ids[i, :n] = s.input_ids
            labels[i, :n] = s.labels
            mask[i, :n] = 1
        pixels = torch.cat([s.pixels_NCHW for s in samples])
        return PipeBatch(StageInputs(pixels, ids, mask), labels)
