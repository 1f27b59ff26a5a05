"""Records -> training samples of a native-resolution VLM, through the model directory's own processor.

The processor (``AutoProcessor.from_pretrained(model_dir)``: Qwen2.5-VL's or Qwen3-VL's, from transformers) does
everything model-specific: the chat template renders the conversation, the image processor resizes each image to
its own size within the pixel budget (no square crop) and cuts it into patches, the video processor samples frames
by ``fps`` / frame budgets and resizes them, and the placeholder of each image / clip is expanded to its number of
visual tokens (``grid_t * grid_h * grid_w / merge^2``; Qwen3-VL adds its frame timestamps). So ``input_ids`` equal
``processor.apply_chat_template(messages, tokenize=True)`` token for token. This module adds the labels
(:mod:`lavis.vlm.conversation`), the budgets (``data.vlm``, :class:`~lavis.vlm.data_config.VLMDataConfig`), the
length check against ``data.max_txt_len`` and errors that name the record and its file.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lavis.config.schema import DataConfig
from lavis.data import media
from lavis.data.conversation import IGNORE_INDEX, SampleError, TooLongError
from lavis.data.datasets import Record, check_text_size, load_record_image
from lavis.vlm.cached_features import media_files, with_cached_features
from lavis.vlm.conversation import assistant_spans, to_messages
from lavis.vlm.data_config import VLMDataConfig

Clip = tuple[np.ndarray, Any]
"""A decoded clip: its sampled frames ``[T, H, W, 3]`` uint8 and transformers' ``VideoMetadata`` (native fps, total
frames, the sampled indices), which the processor needs for Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's
timestamps."""


@dataclass
class VLMSample:
    """One sample as the processor made it (unbatched). Rows of ``pixel_values`` are the patches of the sample's
    images in order (``image_grid_thw[i].prod()`` rows each); likewise ``pixel_values_videos`` for its clips."""

    id: str
    input_ids: torch.Tensor
    """``[L]`` int64: the chat template's tokens with each image / video placeholder expanded."""
    labels: torch.Tensor
    """``[L]`` int64, unshifted: the assistant turns' tokens, ``IGNORE_INDEX`` elsewhere (visual tokens included)."""
    pixel_values: torch.Tensor
    """``[Ni, C * T * P * P]`` float32 image patches (``Ni = 0`` without images)."""
    image_grid_thw: torch.Tensor
    """``[n_images, 3]`` int64 patch grids ``(t, h, w)``."""
    pixel_values_videos: torch.Tensor
    """``[Nv, C * T * P * P]`` float32 video patches."""
    video_grid_thw: torch.Tensor
    """``[n_videos, 3]`` int64."""
    second_per_grid_ts: torch.Tensor
    """``[n_videos]`` float32: seconds per temporal patch (Qwen2.5-VL's M-RoPE time axis; 1.0 where the processor
    gives none, as Qwen3-VL, which writes timestamps into the text instead)."""
    image_token_id: int = -1
    """The processor's ``<|image_pad|>`` id (what :attr:`num_visual_tokens` counts)."""
    video_token_id: int = -1

    @property
    def num_visual_tokens(self) -> int:
        return int(((self.input_ids == self.image_token_id) | (self.input_ids == self.video_token_id)).sum())


def patch_dim(processor: Any) -> int:
    """Width of one patch row: ``channels * temporal_patch_size * patch_size^2`` (1176 for Qwen2.5-VL)."""
    ip = processor.image_processor
    return 3 * ip.temporal_patch_size * ip.patch_size * ip.patch_size


def load_clip(path: Path, processor: Any, budget: VLMDataConfig) -> Clip:
    """Decode only the frames the video processor's own ``sample_frames`` picks under ``budget`` (fps, min/max
    frames); :class:`media.MediaError` names the file when it is missing or cannot be decoded."""
    from transformers.video_utils import load_video

    if not path.is_file():
        raise media.MediaError(f"{path}: video file not found")
    # The budgets are set on a copy of the video processor: Qwen3-VL's sample_frames reads min/max frames only from
    # the processor's attributes, Qwen2-VL's from its arguments or the attributes.
    sampler = copy.copy(processor.video_processor)
    for name, value in budget.video_sampling_kwargs().items():
        setattr(sampler, name, value)
    try:
        frames, metadata = load_video(str(path),  # type: ignore[arg-type]  # a path is a VideoInput at runtime
                                      backend=budget.video_backend, sample_indices_fn=sampler.sample_frames)
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        raise media.MediaError(f"{path}: cannot decode video with {budget.video_backend} ({type(e).__name__}: "
                               f"{e})") from e
    return np.asarray(frames), metadata


def _label_ids(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
               replacements: list[dict[str, Any]]) -> list[int]:
    """Labels from character spans of the rendered text: ``spans`` are in the text before the processor expanded
    the placeholders, ``offsets`` in the expanded text; a token is trained when its start lies in a span."""
    def expanded(pos: int) -> int:
        grow = 0
        for r in replacements:
            if r["span"][1] <= pos:
                grow += (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
        return pos + grow

    moved = [(expanded(s), expanded(e)) for s, e in spans]
    return [t if any(s <= start < e for s, e in moved) else IGNORE_INDEX for t, (start, _) in zip(ids, offsets)]


def encode_sample(processor: Any, messages: list[dict[str, Any]], images: Sequence[Image.Image],
                  clips: Sequence[Clip], budget: VLMDataConfig, record_id: str) -> VLMSample:
    """Render ``messages`` with the processor's chat template and run the processor on the text, ``images`` and
    ``clips`` (marker order) under ``budget``; labels on the assistant turns. No length limit here."""
    text, spans = assistant_spans(processor, messages, record_id)
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images"] = list(images)
        kwargs["images_kwargs"] = {"size": budget.image_size(dict(processor.image_processor.size))}
    if clips:
        kwargs["videos"] = [frames for frames, _ in clips]
        kwargs["videos_kwargs"] = {"size": budget.video_size(dict(processor.video_processor.size)),
                                   "do_sample_frames": False, "video_metadata": [meta for _, meta in clips]}
    out = processor(text=[text], return_offsets_mapping=True, return_text_replacement_offsets=True, **kwargs)
    ids = list(out["input_ids"][0])
    labels = _label_ids(ids, out["offset_mapping"][0], spans, out.get("text_replacement_offsets", [[]])[0])
    dim = patch_dim(processor)
    n_videos = len(clips)
    seconds = out.get("second_per_grid_ts")
    return VLMSample(
        id=record_id,
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pixel_values=_float_rows(out.get("pixel_values"), dim),
        image_grid_thw=_grid(out.get("image_grid_thw")),
        pixel_values_videos=_float_rows(out.get("pixel_values_videos"), dim),
        video_grid_thw=_grid(out.get("video_grid_thw")),
        second_per_grid_ts=torch.tensor(list(seconds) if seconds is not None else [1.0] * n_videos,
                                        dtype=torch.float32),
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )


def _float_rows(x: Any, dim: int) -> torch.Tensor:
    return torch.zeros(0, dim) if x is None else torch.as_tensor(x, dtype=torch.float32)


def _grid(x: Any) -> torch.Tensor:
    return torch.zeros(0, 3, dtype=torch.long) if x is None else torch.as_tensor(x, dtype=torch.long).reshape(-1, 3)


def fit_max_len(sample: VLMSample, max_len: int, policy: str, vision_end_id: int) -> VLMSample:
    """``data.max_txt_len`` (visual tokens count) under ``data.length_policy``: ``truncate`` cuts text after the
    last ``<|vision_end|>`` while an answer token is left; otherwise, and under ``drop``, :class:`TooLongError`
    stating the visual / text token counts and what to lower."""
    n = len(sample.input_ids)
    if n <= max_len:
        return sample
    visual = sample.num_visual_tokens
    why = (f"{n} tokens ({visual} visual + {n - visual} text) > data.max_txt_len={max_len}; raise data.max_txt_len "
           "or lower data.vlm.image_max_pixels / video_max_pixels / video_fps / video_max_frames")
    ends = (sample.input_ids == vision_end_id).nonzero()
    last_visual = int(ends[-1]) if len(ends) else -1
    if policy == "drop" or last_visual >= max_len:
        raise TooLongError(f"record {sample.id}: {why}" + (" (data.length_policy=drop)" if policy == "drop" else ""))
    if bool((sample.labels[:max_len] == IGNORE_INDEX).all()):
        raise TooLongError(f"record {sample.id}: {why} (after cutting to max_txt_len no answer token is left)")
    sample.input_ids, sample.labels = sample.input_ids[:max_len], sample.labels[:max_len]
    return sample


class VLMConversationDataset(torch.utils.data.Dataset):
    """Canonical records (``lavis.data.datasets.load_records``, any format of ``lavis/data/formats.py``) as
    :class:`VLMSample` s, indexable by ``(index, seed)`` like ``ConversationDataset`` (the seed is unused: the
    processor does no random augmentation). Errors name ``file:index`` and the record id."""

    def __init__(self, records: Sequence[Record], processor: Any, data: DataConfig,
                 budget: VLMDataConfig | None = None, cache: Any = None) -> None:
        """``cache``: a ``data.feature_cache`` opened by ``lavis.vlm.cached_features.open_for_data``; each sample's
        pixel rows are then its media's cached merger features."""
        self.records = records
        self.processor = processor
        self.data = data
        self.budget = budget or VLMDataConfig()
        self.cache = cache
        self.vision_end_id = int(processor.tokenizer.convert_tokens_to_ids("<|vision_end|>"))
        self._lengths: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> VLMSample:
        """The sample of record ``index`` after the length policy; ``SampleError`` / ``MediaError`` name the
        record's ``file:index`` and id."""
        r = self.records[index]
        try:
            check_text_size(r, self.data.max_txt_len)
            messages = to_messages(r.conversations, r.id)
            images = [load_record_image(p) for p in r.images]
            clips = [load_clip(r.video, self.processor, self.budget)] if r.video is not None else []
            s = encode_sample(self.processor, messages, images, clips, self.budget, r.id)
            s = fit_max_len(s, self.data.max_txt_len, self.data.length_policy, self.vision_end_id)
            if self.cache is not None:
                s = with_cached_features(s, media_files(r), r.video, self.cache,
                                         int(self.processor.image_processor.merge_size))
            self._lengths[index] = len(s.input_ids)
            return s
        except media.MediaError as e:
            raise media.MediaError(f"{r.where} (id {r.id}): {e}") from e
        except SampleError as e:
            raise type(e)(f"{r.where}: {e}") from e

    def num_tokens(self, index: int) -> int:
        """Token count after the length policy (cached); 0 for a sample that cannot be built (reported when
        fetched)."""
        if index not in self._lengths:
            try:
                self._lengths[index] = len(self.sample(index).input_ids)
            except (SampleError, media.MediaError):
                self._lengths[index] = 0
        return self._lengths[index]

    def __getitem__(self, key: tuple[int, int]) -> VLMSample:
        index, _seed = key
        return self.sample(index)
