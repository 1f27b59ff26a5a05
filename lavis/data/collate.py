"""Samples -> one micro-batch in the pipeline's input layout, with dynamic padding.

``batch[0] = (pixels [N,3,S,S], input_ids [B,L], attention_mask [B,L])`` feeds the first stage (with
``data.feature_cache``, cached features ``[N,T,C]`` in place of the pixels);
``batch[1] = labels [B,L]`` feeds the loss on the last stage. ``L`` is the longest sample rounded up to a multiple
of ``pad_to_multiple_of`` (capped at ``max_txt_len``), or exactly ``max_txt_len`` in fixed-length mode (parity with
the predecessors, which pad everything to ``max_txt_len``). Padding is on the right with the pad id and label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lavis.data.conversation import IGNORE_INDEX
from lavis.data.datasets import Sample

PipeBatch = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Collator:
    pad_id: int
    max_txt_len: int
    pad_to_multiple_of: int = 64
    fixed_length: bool = False

    def padded_length(self, longest: int) -> int:
        if self.fixed_length:
            return self.max_txt_len
        m = self.pad_to_multiple_of
        return min(self.max_txt_len, -(-longest // m) * m) if m > 1 else longest

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
        return (pixels, ids, mask), labels
