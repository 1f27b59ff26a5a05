"""VLM samples -> one micro-batch with dynamic shapes, in the layout the first pipeline stage of a VLM reads.

Samples differ in their number of images, clips and patches: the patches of the whole micro-batch are concatenated
(rows), the grids stacked, one ``media_kind`` / ``second_per_grid`` entry per grid. Rows are all images (sample by
sample, in each sample's order), then all clips, as transformers' models read ``pixel_values`` then
``pixel_values_videos``; the placeholders in ``input_ids`` are in the same order, so the visual tokens land in
place. Ids are right-padded with the pad id (mask 0), labels with ``IGNORE_INDEX``, to the longest sample rounded up
to ``pad_to_multiple_of`` (capped at ``max_txt_len``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from lavis.data.collate import round_up_length
from lavis.data.conversation import IGNORE_INDEX
from lavis.vlm.processor import VLMSample

MEDIA_IMAGE, MEDIA_VIDEO = 1, 2
"""``VLMStageInputs.media_kind`` values."""


class VLMStageInputs(NamedTuple):
    """What the first stage of a VLM pipeline reads (DeepSpeed's ``batch[0]``)."""

    pixels: torch.Tensor
    """``[Np, C * T * P * P]`` float32: the patches of every image, then of every clip, of the micro-batch."""
    grid_thw: torch.Tensor
    """``[n, 3]`` int64: one ``(t, h, w)`` patch grid per image / clip, rows in the order of ``pixels``."""
    media_kind: torch.Tensor
    """``[n]`` int64: :data:`MEDIA_IMAGE` or :data:`MEDIA_VIDEO` per grid."""
    second_per_grid: torch.Tensor
    """``[n]`` float32: seconds per temporal patch of a clip (Qwen2.5-VL's time axis of M-RoPE); 1.0 for images."""
    input_ids_BL: torch.Tensor
    """``[B, L]`` int64, right-padded with the pad id."""
    mask_BL: torch.Tensor
    """``[B, L]`` int64 attention mask: 1 for tokens, 0 for padding."""


class VLMPipeBatch(NamedTuple):
    """One micro-batch as the data iterator yields it: DeepSpeed reads ``batch[0]`` on the first stage and
    ``batch[1]`` on the last."""

    inputs: VLMStageInputs
    labels_BL: torch.Tensor
    """``[B, L]`` int64 unshifted labels, ``IGNORE_INDEX`` where no loss is taken."""


@dataclass(frozen=True)
class VLMCollator:
    pad_id: int
    max_txt_len: int
    pad_to_multiple_of: int = 64

    def padded_length(self, longest: int) -> int:
        return max(longest, round_up_length(longest, self.pad_to_multiple_of, self.max_txt_len))

    def __call__(self, samples: list[VLMSample]) -> VLMPipeBatch:
        if not samples:
            raise ValueError("VLMCollator needs at least one sample")
        length = self.padded_length(max(len(s.input_ids) for s in samples))
        ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
        images = [s.image_grid_thw for s in samples]
        videos = [s.video_grid_thw for s in samples]
        n_img, n_vid = sum(len(g) for g in images), sum(len(g) for g in videos)
        inputs = VLMStageInputs(
            pixels=torch.cat([s.pixel_values for s in samples] + [s.pixel_values_videos for s in samples]),
            grid_thw=torch.cat(images + videos).reshape(-1, 3),
            media_kind=torch.tensor([MEDIA_IMAGE] * n_img + [MEDIA_VIDEO] * n_vid, dtype=torch.long),
            second_per_grid=torch.cat([torch.ones(n_img)] + [s.second_per_grid_ts.float() for s in samples]),
            input_ids_BL=ids,
            mask_BL=mask,
        )
        return VLMPipeBatch(inputs, labels)
