"""Tiny Qwen2.5-VL / Qwen3-VL directories written by transformers itself, and batches for them.

The batch is built directly (ids with the right number of placeholders, random patches); the model's own processor
builds the real ones (``lavis.vlm``'s data side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, PretrainedConfig, Qwen2_5_VLConfig, Qwen3VLConfig

from lavis.vlm.arch import mm_token_types
from lavis.vlm.collate import MEDIA_IMAGE, MEDIA_VIDEO, VLMStageInputs

IMAGE_ID, VIDEO_ID, VISION_START, VISION_END = 190, 191, 192, 193
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=200, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)
SPECIAL = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=False)
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
MICRO_BATCH = 2
"""Samples per micro-batch of the pipeline training test (``tests/scripts/vlm_train.py``)."""


def tiny_hf_dict(family: str) -> dict[str, Any]:
    """A tiny config of ``family`` as a plain dict (what ``model.vlm.hf_config`` holds)."""
    if family == "qwen2_5_vl":
        return dict(model_type=family, **SPECIAL,
                    text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
                    vision_config=dict(VISION, window_size=56, fullatt_block_indexes=[1]))
    if family == "qwen3_vl":
        return dict(model_type=family, **SPECIAL,
                    text_config=dict(TEXT, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                                     "mrope_interleaved": True}),
                    vision_config=dict(VISION, num_position_embeddings=16, deepstack_visual_indexes=[0, 2]))
    raise ValueError(family)


def tiny_hf_config(family: str, tied: bool = False) -> PretrainedConfig:
    """``tied``: ``tie_word_embeddings`` (the LM head is the token embedding, as in Qwen2.5-VL-3B)."""
    raw = tiny_hf_dict(family)
    raw.pop("model_type")
    raw["tie_word_embeddings"] = tied
    return (Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen3VLConfig)(**raw)


def write_tiny_dir(path: Path, family: str, seed: int = 0, max_shard_size: str = "20KB", tied: bool = False) -> Path:
    """A random tiny model saved by transformers' ``save_pretrained`` (several shards + index)."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_hf_config(family, tied))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def sample_ids(grids: list[tuple[int, int, int]], text: list[list[int]], token: int = IMAGE_ID,
               merge: int = 2) -> list[int]:
    """``text[0] <vision_start> placeholders <vision_end> text[1] ...``: one placeholder per merged token."""
    ids = list(text[0])
    for grid, after in zip(grids, text[1:]):
        n = grid[0] * grid[1] * grid[2] // merge**2
        ids += [VISION_START, *[token] * n, VISION_END, *after]
    return ids


def two_image_batch(seed: int = 0, batch: int = 2, pad_last: int = 2) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(stage-0 inputs, labels)`` for ``batch`` samples, each with two images of different, non-square sizes
    (56x84 and 84x56 pixels: grids 4x6 and 6x4 patches); the last sample right-padded by ``pad_last`` tokens;
    labels on the text after the second image (padding -100)."""
    g = torch.Generator().manual_seed(seed)
    grids = [(1, 4, 6), (1, 6, 4)]
    rows, pix, grid = [], [], []
    for _ in range(batch):
        words = torch.randint(3, 180, (9,), generator=g).tolist()
        rows.append(sample_ids(grids, [words[:2], words[2:5], words[5:]]))
        for t, h, w in grids:
            pix.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g))
            grid.append([t, h, w])
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    if pad_last:
        ids[-1, -pad_last:] = 0
        mask[-1, -pad_last:] = 0
    labels = ids.clone()
    labels[:, : ids.shape[1] - 4] = -100
    labels[mask == 0] = -100
    n = len(grid)
    inputs = VLMStageInputs(torch.cat(pix), torch.tensor(grid), torch.full((n,), MEDIA_IMAGE), torch.ones(n), ids,
                            mask)
    return inputs, labels


def image_and_video_batch(family: str, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One sample with an image (grid 1x4x6) then a two-temporal-patch video (grid 2x4x4, 2 seconds a patch).
    Qwen3-VL's processor writes each temporal patch of a video as its own ``<vision_start> .. <vision_end>`` group
    after a timestamp (here one text token); Qwen2.5-VL's one group for the whole video."""
    g = torch.Generator().manual_seed(seed)
    ids = sample_ids([(1, 4, 6)], [[5, 6], [7]])
    if family == "qwen3_vl":
        ids += sample_ids([(1, 4, 4), (1, 4, 4)], [[], [11], [8, 9]], token=VIDEO_ID)
    else:
        ids += sample_ids([(2, 4, 4)], [[], [8, 9]], token=VIDEO_ID)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    ids_t = torch.tensor([ids])
    inputs = VLMStageInputs(pixels, grid, torch.tensor([MEDIA_IMAGE, MEDIA_VIDEO]), torch.tensor([1.0, 2.0]), ids_t,
                            torch.ones_like(ids_t))
    return inputs, ids_t.clone()


def reference_forward(model: Any, inputs: tuple[torch.Tensor, ...],
                      labels: torch.Tensor | None = None) -> Any:
    """transformers' own forward on the same batch (images / videos split back out of the stage-0 tuple)."""
    pixels, grid, kind, second_per_grid, ids, mask = VLMStageInputs(*inputs)
    sizes = grid.prod(-1).tolist()
    parts = torch.split(pixels, sizes)
    kwargs: dict[str, Any] = {}
    for code, name, grid_name in ((MEDIA_IMAGE, "pixel_values", "image_grid_thw"),
                                  (MEDIA_VIDEO, "pixel_values_videos", "video_grid_thw")):
        sel = [i for i, k in enumerate(kind.tolist()) if k == code]
        if sel:
            kwargs[name] = torch.cat([parts[i] for i in sel])
            kwargs[grid_name] = grid[sel]
    if (kind == MEDIA_VIDEO).any() and model.config.model_type == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = second_per_grid[kind == MEDIA_VIDEO]
    return model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_types(model.config, ids),
                 labels=labels, **kwargs)
