"""Image and video decoding plus the BLIP-2 image transforms.

Everything that touches media bytes lives here so that failures surface as :class:`MediaError` naming the file and
the reason, instead of a PIL/FFmpeg traceback deep inside a data-loader worker. Images are guarded against
decompression bombs before decoding, EXIF-rotated and converted to RGB; videos are decoded with decord and fall back
to PyAV.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 89_478_485
"""PIL's default decompression-bomb limit (width * height). Note PIL itself refuses images over twice its global
``Image.MAX_IMAGE_PIXELS`` while opening, so a larger ``max_pixels`` only helps if that global is raised too."""

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class MediaError(ValueError):
    """An image or video cannot be used; the message names the file, the reason and, where known, the fix."""


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Converts any PIL mode to RGB; transparency is composited over white, high bit depths are scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode == "F" and array.size and array.max() <= 1.0:
            array = array * 255.0  # float images conventionally hold [0, 1]
        elif mode != "F" and array.size and array.max() > 255:
            array = array / 257.0  # 16-bit range (0..65535) onto 0..255
        gray = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise MediaError(f"{path}: cannot convert image mode {mode!r} to RGB ({error})") from error


def load_image(
    path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS, *, fileobj: BinaryIO | None = None
) -> Image.Image:
    """Opens, validates and fully decodes an image as RGB.

    The declared size is checked against ``max_pixels`` before any pixel data is decoded. EXIF orientation is applied,
    and the image is loaded eagerly so truncated files fail here rather than in a later transform.

    Args:
        path: Image file.
        max_pixels: Largest accepted ``width * height``; None disables the check (PIL's own limit still applies).
        fileobj: The image bytes when they do not live in a file of their own (a tar shard member); ``path`` then
            only names it in errors.

    Returns:
        A fully loaded RGB image, detached from the file.

    Raises:
        MediaError: Missing, unreadable, truncated, oversized or unconvertible image.
    """
    path = Path(path)
    try:
        with Image.open(fileobj if fileobj is not None else path) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise MediaError(
                    f"{path}: image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                    "pixels (decompression-bomb guard); resize the file or raise max_pixels if it is trusted"
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = _to_rgb(image, path)
            image.load()
            if image is opened:
                image = image.copy()  # detach from the file handle the context manager closes
    except FileNotFoundError as error:
        raise MediaError(f"{path}: image file not found") from error
    except UnidentifiedImageError as error:
        reason = "file is empty" if path.is_file() and path.stat().st_size == 0 else "not a recognised image format"
        raise MediaError(f"{path}: cannot identify image ({reason})") from error
    except Image.DecompressionBombError as error:
        assert Image.MAX_IMAGE_PIXELS is not None  # PIL raises this error only while its limit is set
        raise MediaError(
            f"{path}: rejected by PIL's decompression-bomb guard ({error}); the limit is "
            f"{max_pixels if max_pixels is not None else 2 * Image.MAX_IMAGE_PIXELS} pixels"
        ) from error
    except (OSError, SyntaxError) as error:
        # OSError covers "image file is truncated" and decoder errors; some plugins raise SyntaxError on bad chunks.
        raise MediaError(f"{path}: cannot decode image ({error}); the file is truncated or corrupt") from error
    return image


def image_transform(
    kind: Literal["blip2_train", "eval"], image_size: int, *, min_scale: float = 0.5, hflip: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """BLIP-2 image preprocessing to a normalised float32 ``[3, image_size, image_size]`` tensor.

    Args:
        kind: ``"blip2_train"``: random resized crop (scale ``min_scale``..1, bicubic) then optional horizontal flip.
            ``"eval"``: bicubic squash to ``image_size`` x ``image_size`` (no crop) then optional flip.
        image_size: Output side in pixels.
        min_scale: Smallest crop area fraction for ``blip2_train``.
        hflip: Random horizontal flip with probability 0.5 (turn off for evaluation or left/right-sensitive data).

    Raises:
        ValueError: Unknown ``kind`` or invalid sizes.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    if kind == "blip2_train":
        steps: list[Callable] = [
            transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC)
        ]
    elif kind == "eval":
        steps = [transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
    else:
        raise ValueError(f"unknown image transform {kind!r}; expected 'blip2_train' or 'eval'")
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    return transforms.Compose(steps)


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``[0, total - 1]`` (first and last frame included).

    When the clip has fewer than ``num_frames`` frames, indices repeat, so the result always has ``num_frames``
    entries.
    """
    return [int(i) for i in np.linspace(0, total - 1, num_frames).round()]


def sample_frame_indices_fps(total: int, native_fps: float, fps: float, num_frames: int) -> list[int]:
    """``num_frames`` indices taken every ``1/fps`` seconds from the start (frame ``round(k * native_fps / fps)``).

    A clip longer than ``num_frames / fps`` seconds contributes only its beginning; a shorter one has fewer distinct
    frames, which are repeated in order (each spread evenly) so the result always has ``num_frames`` entries.
    """
    if fps <= 0 or native_fps <= 0:
        raise ValueError(f"frame rates must be > 0 (video_fps={fps}, clip {native_fps} fps)")
    step = native_fps / fps
    picks = [i for i in (round(k * step) for k in range(num_frames)) if i < total] or [0]
    if len(picks) == num_frames:
        return picks
    return [picks[int(j)] for j in np.linspace(0, len(picks) - 1, num_frames).round()]


def _indices(total: int, native_fps: float | None, num_frames: int, fps: float | None) -> list[int]:
    if fps is None:
        return sample_frame_indices(total, num_frames)
    if not native_fps:
        raise ValueError("the clip has no frame rate; sample uniformly (data.video_fps: null)")
    return sample_frame_indices_fps(total, native_fps, fps, num_frames)


def _decode_decord(path: Path, num_frames: int, fps: float | None = None) -> list[Image.Image]:
    import decord  # deferred: optional native dependency

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    total = len(reader)
    if total < 1:
        raise ValueError("decord found no frames")
    batch = reader.get_batch(_indices(total, reader.get_avg_fps(), num_frames, fps)).asnumpy()
    return [Image.fromarray(frame).convert("RGB") for frame in batch]


def _decode_pyav_pass(path: Path, indices: Sequence[int] | None) -> tuple[int, dict[int, Image.Image]]:
    """Decodes every frame in order; keeps those in ``indices`` (all if None). Returns (frames decoded, kept)."""
    import av

    wanted = set(indices) if indices is not None else None
    kept: dict[int, Image.Image] = {}
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if wanted is None or count in wanted:
                kept[count] = frame.to_image().convert("RGB")
            count += 1
            if wanted is not None and len(kept) == len(wanted):
                break
    return count, kept


def _decode_pyav(path: Path, num_frames: int, fps: float | None = None) -> list[Image.Image]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        native_fps = float(stream.average_rate) if stream.average_rate else None
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if total < 1:
        raise ValueError("PyAV found no frames")
    indices = _indices(total, native_fps, num_frames, fps)
    decoded, kept = _decode_pyav_pass(path, indices)
    if len(kept) < len(set(indices)):
        # The container's frame count was wrong: count for real, then sample again.
        if decoded < 1:
            raise ValueError("PyAV decoded no frames")
        indices = _indices(decoded, native_fps, num_frames, fps)
        _, kept = _decode_pyav_pass(path, indices)
    return [kept[i] for i in indices]


def _decoder_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [RuntimeError, OSError, ValueError, IndexError]
    try:
        from decord._ffi.base import DECORDError

        errors.append(DECORDError)
    except ImportError:
        pass
    try:
        from av.error import FFmpegError

        errors.append(FFmpegError)
    except ImportError:
        pass
    return tuple(errors)


def load_video_frames(
    path: str | Path, num_frames: int, *, backend: Literal["auto", "decord", "pyav"] = "auto",
    fps: float | None = None,
) -> list[Image.Image]:
    """Decodes ``num_frames`` RGB frames sampled uniformly over the whole clip, or at ``fps`` from its start.

    Uniform indices are ``linspace(0, total - 1, num_frames).round()``; a clip shorter than ``num_frames`` yields
    repeated frames. With ``fps`` see :func:`sample_frame_indices_fps`. ``"auto"`` tries decord and, if it fails,
    logs a warning and decodes with PyAV (sequentially, keeping only
    the sampled frames).

    Args:
        path: Video file.
        num_frames: Frames to return (>= 1).
        backend: ``"auto"``, or force ``"decord"`` / ``"pyav"``.

    Raises:
        ValueError: ``num_frames < 1`` or unknown backend.
        MediaError: Missing or empty file, or every decoder tried failed (all reasons are listed).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r}; expected 'auto', 'decord' or 'pyav'")
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: video file is empty (0 bytes); re-create or re-download it")

    decoders = {"decord": _decode_decord, "pyav": _decode_pyav}
    names = ["decord", "pyav"] if backend == "auto" else [backend]
    errors = _decoder_errors() + (ImportError,)
    reasons: list[str] = []
    for name in names:
        try:
            return decoders[name](path, num_frames, fps)
        except errors as error:
            reason = f"{name}: {type(error).__name__}: {error}".strip()
            reasons.append(reason)
            if name != names[-1]:
                logger.warning("decord failed on %s (%s); falling back to PyAV", path, reason)
    raise MediaError(f"{path}: cannot decode video ({'; '.join(reasons)})")


def video_to_tensor(
    frames: Sequence[Image.Image], transform: Callable[[Image.Image], torch.Tensor], same_augment: bool = True
) -> torch.Tensor:
    """Transforms the frames of one clip and stacks them to ``[N, 3, S, S]``.

    Args:
        frames: The clip's frames.
        transform: Per-image transform, e.g. from :func:`image_transform`. Its randomness must come from torch's RNG
            (true for torchvision transforms).
        same_augment: Give every frame the same random crop and flip (one seed drawn from torch's global RNG, then
            each frame transformed under that seed inside ``torch.random.fork_rng``). False augments every frame
            independently.

    Raises:
        ValueError: No frames.
    """
    if not frames:
        raise ValueError("video_to_tensor needs at least one frame")
    if not same_augment:
        return torch.stack([transform(frame) for frame in frames])
    seed = int(torch.randint(0, 2**62, (1,)).item())
    outputs = []
    with torch.random.fork_rng(devices=[]):
        for frame in frames:
            torch.manual_seed(seed)
            outputs.append(transform(frame))
    return torch.stack(outputs)
