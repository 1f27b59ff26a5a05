"""The data budgets of a native-resolution VLM (``data.vlm``): how many pixels an image or a video frame may keep and
how a clip is sampled. Every key left ``None`` keeps the value of the model directory's own processor
(``preprocessor_config.json`` / ``video_preprocessor_config.json``), so a published directory trains as published.

Self-contained (no lavis imports) so the configuration layer can hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class VLMDataConfig:
    processor: str | None = None
    """Where the processor comes from: a directory ``AutoProcessor`` loads (a published model directory or a saved
    processor), or ``builtin:shapes`` (a Qwen2.5-VL processor over the shapes demo's 512-token BPE, built locally).
    None = the model's directory (``model.vlm.path``)."""
    image_min_pixels: int | None = None
    """Smallest image area (pixels) kept: smaller images are upscaled to it, aspect kept (the processor's
    ``size.shortest_edge``, Qwen's ``min_pixels``)."""
    image_max_pixels: int | None = None
    """Largest image area kept: larger images are downscaled to it, aspect kept (``size.longest_edge``,
    Qwen's ``max_pixels``). The visual tokens of an image are ``area / (patch * merge)^2``."""
    video_min_pixels: int | None = None
    """The video processor's ``size.shortest_edge`` (per frame for Qwen2.5-VL; per clip for Qwen3-VL)."""
    video_max_pixels: int | None = None
    """The video processor's ``size.longest_edge`` (per frame for Qwen2.5-VL; the clip's total for Qwen3-VL)."""
    video_fps: float | None = None
    """Frames sampled per second of video (the processor's ``fps``; Qwen's default 2)."""
    video_min_frames: int | None = None
    """Fewest frames sampled from a clip (the processor's ``min_frames``)."""
    video_max_frames: int | None = None
    """Most frames sampled from a clip (the processor's ``max_frames``)."""
    video_backend: Literal["pyav", "decord"] = "pyav"
    """Decoder of ``transformers.video_utils.load_video``; only the sampled frames are decoded."""

    def __post_init__(self) -> None:
        for name in ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels",
                     "video_min_frames", "video_max_frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.vlm.{name} must be an integer >= 1 or null (got {value!r})")
        if self.video_fps is not None and not self.video_fps > 0:
            raise ValueError(f"data.vlm.video_fps must be > 0 or null (got {self.video_fps!r})")
        for low, high in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels"),
                          ("video_min_frames", "video_max_frames")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"data.vlm.{low} ({lo}) must be <= data.vlm.{high} ({hi})")

    def image_size(self, base: dict[str, int]) -> dict[str, int]:
        """The image processor's ``size`` (``shortest_edge`` / ``longest_edge`` pixel areas): ``base`` (the
        processor's own) with the budgets that are set."""
        return _size(base, self.image_min_pixels, self.image_max_pixels)

    def video_size(self, base: dict[str, int]) -> dict[str, int]:
        """The video processor's ``size``: ``base`` with the video budgets that are set."""
        return _size(base, self.video_min_pixels, self.video_max_pixels)

    def video_sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the video processor's ``sample_frames`` (only those that are set)."""
        named = {"fps": self.video_fps, "min_frames": self.video_min_frames, "max_frames": self.video_max_frames}
        return {k: v for k, v in named.items() if v is not None}


def _size(base: dict[str, int], min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    size = {"shortest_edge": base["shortest_edge"], "longest_edge": base["longest_edge"]}
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"data.vlm pixel budget: min {size['shortest_edge']} > max {size['longest_edge']} (one of "
                         f"them comes from the model's processor); set both data.vlm *_min_pixels and *_max_pixels")
    return size
