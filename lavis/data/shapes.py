"""Generator of the embedded "shapes" demo dataset, written in the canonical conversation format.

Every image is 224x224 RGB on a white background with one filled circle, square or upright triangle in one of four
jittered colours. The dataset mixes four kinds of samples, all answered by deterministic functions of the drawn specs:

* single image, one question ("What is in the image?" -> "A red circle."),
* single image, a 2-3 exchange conversation (colour, then shape, optionally a yes/no follow-up),
* two images compared ("Are the two shapes the same colour?"),
* a short video of the shape moving in a straight line ("What is happening in the video?").

Records look like ``{"id": ..., "images": [...], "conversations": [{"role": "user", "content": "<image>\\n..."}, ...]}``
(or ``"video": ...`` with a ``<video>`` marker); media paths are relative to the dataset directory. Generation only
uses the ``random.Random`` passed in or seeded here, so a seed fully determines the annotation file.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lavis.data.templates import IMAGE_MARKER, VIDEO_MARKER

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 180, 25),
    "blue": (25, 25, 230),
    "yellow": (230, 210, 25),
}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

IMAGE_SIZE = 224
JITTER = 20
MIN_SIZE_FRAC = 0.25
MAX_SIZE_FRAC = 0.60
TRIANGLE_ASPECT = (0.8, 1.15)
"""Triangle height range as a factor of the equilateral height ``side * sqrt(3) / 2``."""
BACKGROUND = (255, 255, 255)
JPEG_QUALITY = 92

DESCRIBE_QUESTIONS: tuple[str, ...] = (
    "What is in the image?",
    "Describe the image.",
    "What shape and colour do you see?",
    "What do you see in this picture?",
    "Which shape is shown, and in what colour?",
    "Can you describe the shape in the image?",
)
COLOUR_QUESTIONS: tuple[str, ...] = (
    "What colour is the shape?",
    "What is the colour of the shape?",
    "Which colour is it?",
)
SHAPE_QUESTIONS: tuple[str, ...] = ("And what shape is it?", "What shape is it?", "Which shape is it?")
FOLLOW_UP_DESCRIBE: tuple[str, ...] = ("Describe it in one sentence.", "Can you sum that up?")
SAME_SHAPE_QUESTIONS: tuple[str, ...] = (
    "Do the two images show the same shape?",
    "Are the shapes in the two images the same?",
)
SAME_COLOUR_QUESTIONS: tuple[str, ...] = (
    "Are the two shapes the same colour?",
    "Do the two shapes have the same colour?",
)
DESCRIBE_BOTH_QUESTIONS: tuple[str, ...] = ("Describe both images.", "What is in the two images?")
VIDEO_QUESTIONS: tuple[str, ...] = (
    "What is happening in the video?",
    "Describe the video.",
    "What does the shape do in the video?",
)

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_MOTION = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down"}
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE)

VIDEO_MAX_SIZE_FRAC = 0.40
"""Video shapes are at most this fraction of the frame so that the motion covers a visible distance."""
VIDEO_MIN_TRAVEL_FRAC = 0.15


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to redraw one image exactly.

    Attributes:
        shape: One of :data:`SHAPES`.
        colour: One of the keys of :data:`COLOURS`.
        rgb: The jittered fill colour actually drawn.
        size: Circle diameter or square/triangle side, in pixels.
        cx: Horizontal centre of the shape's bounding box, in pixels (continuous coordinates, image spans [0, W]).
        cy: Vertical centre of the shape's bounding box.
        aspect: Triangle height as a factor of ``size * sqrt(3) / 2``; 1.0 for circles and squares.
    """

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    size: int
    cx: float
    cy: float
    aspect: float = 1.0

    @property
    def height(self) -> int:
        """Height of the shape's bounding box in pixels (``size`` except for triangles)."""
        if self.shape == "triangle":
            return max(1, round(self.aspect * self.size * math.sqrt(3) / 2))
        return self.size


def _clamp(value: int) -> int:
    return max(0, min(255, value))


def _size_range(image_size: int, max_size_frac: float) -> tuple[int, int]:
    lo = math.ceil(MIN_SIZE_FRAC * image_size)
    hi = math.floor(min(max_size_frac, MAX_SIZE_FRAC) * image_size)
    return lo, max(lo, hi)


def sample_spec(
    rng: random.Random,
    image_size: int = IMAGE_SIZE,
    *,
    shape: str | None = None,
    colour: str | None = None,
    max_size_frac: float = MAX_SIZE_FRAC,
) -> ShapeSpec:
    """Draws a random shape specification.

    Args:
        rng: Source of randomness (the only one used).
        image_size: Side of the square image in pixels.
        shape: Force this shape instead of sampling it.
        colour: Force this colour name instead of sampling it (the RGB value is still jittered).
        max_size_frac: Upper bound of the size as a fraction of the width (capped at 0.60).

    Returns:
        A spec whose shape lies fully inside the image.

    Raises:
        ValueError: If ``shape`` or ``colour`` is unknown.
    """
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    shape = shape if shape is not None else rng.choice(SHAPES)
    colour = colour if colour is not None else rng.choice(tuple(COLOURS))
    rgb = tuple(_clamp(c + rng.randint(-JITTER, JITTER)) for c in COLOURS[colour])
    size = rng.randint(*_size_range(image_size, max_size_frac))
    aspect = rng.uniform(*TRIANGLE_ASPECT) if shape == "triangle" else 1.0
    spec = ShapeSpec(shape, colour, rgb, size, 0.0, 0.0, aspect)  # type: ignore[arg-type]
    cx = rng.uniform(size / 2, image_size - size / 2)
    cy = rng.uniform(spec.height / 2, image_size - spec.height / 2)
    return replace(spec, cx=cx, cy=cy)


def bbox(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Inclusive pixel bounding box ``(x0, y0, x1, y1)`` of the drawn shape, clipped into the image."""
    w, h = spec.size, spec.height
    x0 = min(max(0, round(spec.cx - w / 2)), image_size - w)
    y0 = min(max(0, round(spec.cy - h / 2)), image_size - h)
    return x0, y0, x0 + w - 1, y0 + h - 1


def draw(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Renders a spec as an RGB image (no anti-aliasing, so every shape pixel has exactly ``spec.rgb``).

    Raises:
        ValueError: If the shape is unknown or does not fit into the image.
    """
    if spec.shape not in SHAPES:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    if spec.size > image_size or spec.height > image_size:
        raise ValueError(f"shape of size {spec.size}x{spec.height} does not fit into a {image_size}px image")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    x0, y0, x1, y1 = bbox(spec, image_size)
    if spec.shape == "circle":
        canvas.ellipse((x0, y0, x1, y1), fill=spec.rgb)
    elif spec.shape == "square":
        canvas.rectangle((x0, y0, x1, y1), fill=spec.rgb)
    else:
        canvas.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=spec.rgb)
    return image


def answer(spec: ShapeSpec) -> str:
    """The canonical description, e.g. ``"A red circle."``."""
    return f"A {spec.colour} {spec.shape}."


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """Extracts the colour and the shape named in free text.

    Matching is case-insensitive on whole words (plural shapes count). A slot is None when nothing matches or when
    several different values appear (e.g. "a red or blue circle" -> ``(None, "circle")``).

    Returns:
        ``(colour, shape)``.
    """
    colours = {m.lower() for m in _COLOUR_RE.findall(text)}
    shapes = {m.lower() for m in _SHAPE_RE.findall(text)}
    return (colours.pop() if len(colours) == 1 else None, shapes.pop() if len(shapes) == 1 else None)


def _colour_answer(spec: ShapeSpec) -> str:
    return f"{spec.colour.capitalize()}."


def _shape_answer(spec: ShapeSpec) -> str:
    return f"A {spec.shape}."


def _verdict(match: bool) -> str:
    """The closing word of every yes/no answer. Answers name what the image shows first and end with the verdict
    ("It is a circle, so no."): the tiny model then decides by comparing the attribute it has just named (which it
    learns early: VQA 1.00) with the one asked, a text-only step. Answers that opened with the verdict ("No, it is a
    circle.") made it decide before looking: POPE-style F1 0.68 while it named the attribute right, e.g. "No, it is a
    triangle." to "Is it a triangle?". POPE's rule reads "no" anywhere in the first sentence, so these still score."""
    return "yes" if match else "no"


def _is_shape_exchange(asked: str, spec: ShapeSpec) -> tuple[str, str]:
    return f"Is it a {asked}?", f"It is a {spec.shape}, so {_verdict(asked == spec.shape)}."


def _is_colour_exchange(asked: str, spec: ShapeSpec) -> tuple[str, str]:
    return f"Is it {asked}?", f"It is {spec.colour}, so {_verdict(asked == spec.colour)}."


_YES_NO_QUESTION_RE = re.compile(r"Is it (?:a )?(\w+)\?")


def names_asked_value(question: str, reply: str) -> bool | None:
    """Whether ``reply`` names the shape or colour that a single-image yes/no question ("Is it a circle?", "Is it
    red?") asks about; None when the question is not one of those or the reply names no single value of that kind.

    A reply whose verdict differs from this contradicts itself ("No, it is a circle." to "Is it a circle?").
    """
    match = _YES_NO_QUESTION_RE.fullmatch(question.strip())
    if match is None or match[1] not in (*SHAPES, *COLOURS):
        return None
    colour, shape = parse_answer(reply)
    named = shape if match[1] in SHAPES else colour
    return None if named is None else named == match[1]


def _describe_pair(a: ShapeSpec, b: ShapeSpec) -> str:
    return f"The first image shows a {a.colour} {a.shape} and the second shows a {b.colour} {b.shape}"


def compare_answer(question: str, a: ShapeSpec, b: ShapeSpec) -> str:
    """Answer to a two-image question from :data:`SAME_SHAPE_QUESTIONS`, :data:`SAME_COLOUR_QUESTIONS` or
    :data:`DESCRIBE_BOTH_QUESTIONS`.

    Raises:
        ValueError: If the question is not one of those.
    """
    if question in SAME_SHAPE_QUESTIONS:
        seen = f"Both are {_PLURALS[a.shape]}" if a.shape == b.shape else _describe_pair(a, b)
        return f"{seen}, so {_verdict(a.shape == b.shape)}."
    if question in SAME_COLOUR_QUESTIONS:
        seen = f"Both are {a.colour}" if a.colour == b.colour else _describe_pair(a, b)
        return f"{seen}, so {_verdict(a.colour == b.colour)}."
    if question in DESCRIBE_BOTH_QUESTIONS:
        return f"{_describe_pair(a, b)}."
    raise ValueError(f"not a two-image question: {question!r}")


def video_answer(spec: ShapeSpec, direction: str) -> str:
    """E.g. ``"A red circle moves to the right."``."""
    return f"A {spec.colour} {spec.shape} {_MOTION[direction]}."


def corpus() -> list[str]:
    """Every fixed string the generator can emit: all questions and every possible answer (no role words, no media
    markers). Deterministic and duplicate-free; used to train the demo tokenizer."""
    texts: list[str] = []
    texts += DESCRIBE_QUESTIONS + COLOUR_QUESTIONS + SHAPE_QUESTIONS + FOLLOW_UP_DESCRIBE
    texts += SAME_SHAPE_QUESTIONS + SAME_COLOUR_QUESTIONS + DESCRIBE_BOTH_QUESTIONS + VIDEO_QUESTIONS
    dummy = [ShapeSpec(shape, colour, COLOURS[colour], 1, 0.0, 0.0) for shape in SHAPES for colour in COLOURS]
    for spec in dummy:
        texts += [answer(spec), _colour_answer(spec), _shape_answer(spec)]
        for other in SHAPES:
            texts += _is_shape_exchange(other, spec)
        for other in COLOURS:
            texts += _is_colour_exchange(other, spec)
        texts += [video_answer(spec, d) for d in DIRECTIONS]
    for a in dummy:
        for b in dummy:
            for question in SAME_SHAPE_QUESTIONS[:1] + SAME_COLOUR_QUESTIONS[:1] + DESCRIBE_BOTH_QUESTIONS[:1]:
                texts.append(compare_answer(question, a, b))
    return list(dict.fromkeys(texts))


def write_video(path: Path, frames: list[Image.Image], fps: int = 4) -> None:
    """Writes frames as an MPEG-4 Part 2 ``.mp4`` (yuv420p, high bit rate so flat colours survive).

    Raises:
        ValueError: If there are no frames, sizes differ, or a side is odd (yuv420p needs even sides).
    """
    import av  # deferred: only the generator needs the encoder

    if not frames:
        raise ValueError(f"no frames to write to {path}")
    width, height = frames[0].size
    if any(frame.size != (width, height) for frame in frames):
        raise ValueError(f"all frames written to {path} must have the same size")
    if width % 2 or height % 2:
        raise ValueError(f"video frames must have even sides for yuv420p, got {width}x{height} for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        # qmax bounds the quantiser (near-lossless for flat shapes); the bit rate only leaves the encoder headroom.
        stream = container.add_stream("mpeg4", rate=Fraction(fps), options={"qmin": "2", "qmax": "4"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        stream.codec_context.gop_size = max(1, fps)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _video_frames(rng: random.Random, num_frames: int, image_size: int) -> tuple[ShapeSpec, str, list[Image.Image]]:
    spec = sample_spec(rng, image_size, max_size_frac=VIDEO_MAX_SIZE_FRAC)
    direction = rng.choice(DIRECTIONS)
    horizontal = direction in ("left", "right")
    half = (spec.size if horizontal else spec.height) / 2
    lo, hi = half, image_size - half
    travel = rng.uniform(min(VIDEO_MIN_TRAVEL_FRAC * image_size, hi - lo), hi - lo)
    start = rng.uniform(lo, hi - travel)
    if direction in ("left", "up"):
        start, travel = start + travel, -travel
    steps = max(1, num_frames - 1)
    frames = []
    for i in range(num_frames):
        pos = start + travel * i / steps
        frames.append(draw(replace(spec, cx=pos) if horizontal else replace(spec, cy=pos), image_size))
    return spec, direction, frames


MARKER_SEPARATORS = ("\n", "", " ")
"""What follows the media markers: a newline (LLaVA style), nothing (MPP-Qwen-Next's chat layout) or a space."""


def _sep(rng: random.Random) -> str:
    return rng.choice(MARKER_SEPARATORS)


def _turns(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]


SINGLE_MIX = (("describe", 0.2), ("shape", 0.4), ("colour", 0.1), ("yesno", 0.3))
"""Question kinds of single-image samples. Shape-only answers ("A circle.") give the vision tower a direct shape
signal: trained from scratch on mostly "A red circle." answers, the tiny model learned colour within 100 steps but
sat at chance on shape for 1,000+ steps (measured, batch 32); on shape-only answers it broke out after ~500-650.
Yes/no questions asked first (as POPE asks them), half about the true value: without them the model saw yes/no
questions only as follow-ups in dialogues and answered a first "Is it a ...?" mostly "No" (POPE F1 0.24). Their
answers name the shape or colour too (see :func:`_verdict`), so they add to the shape signal."""


def _asked_shape(rng: random.Random, spec: ShapeSpec) -> str:
    """The shape a yes/no question names: the true one or, with equal odds, one of the others (POPE's balance)."""
    return spec.shape if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != spec.shape])


def _asked_colour(rng: random.Random, spec: ShapeSpec) -> str:
    """The colour a yes/no question names: the true one or, with equal odds, one of the others."""
    return spec.colour if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != spec.colour])


def _yes_no_exchange(rng: random.Random, spec: ShapeSpec) -> tuple[str, str]:
    if rng.random() < 0.5:
        return _is_shape_exchange(_asked_shape(rng, spec), spec)
    return _is_colour_exchange(_asked_colour(rng, spec), spec)


def _single_exchange(rng: random.Random, spec: ShapeSpec) -> tuple[str, str]:
    kind = rng.choices([k for k, _ in SINGLE_MIX], weights=[w for _, w in SINGLE_MIX])[0]
    if kind == "yesno":
        return _yes_no_exchange(rng, spec)
    if kind == "shape":
        return rng.choice(SHAPE_QUESTIONS[1:]), _shape_answer(spec)
    if kind == "colour":
        return rng.choice(COLOUR_QUESTIONS), _colour_answer(spec)
    return rng.choice(DESCRIBE_QUESTIONS), answer(spec)


def _multi_turn(rng: random.Random, spec: ShapeSpec) -> list[str]:
    colour_ex = (rng.choice(COLOUR_QUESTIONS), _colour_answer(spec))
    shape_ex = (rng.choice(SHAPE_QUESTIONS[1:]), _shape_answer(spec))
    if rng.random() < 0.5:
        exchanges = [colour_ex, (rng.choice(SHAPE_QUESTIONS), shape_ex[1])]
    else:
        exchanges = [shape_ex, colour_ex]
    if rng.random() < 0.5:
        kind = rng.randrange(3)
        if kind == 0:
            exchanges.append(_is_shape_exchange(_asked_shape(rng, spec), spec))
        elif kind == 1:
            exchanges.append(_is_colour_exchange(_asked_colour(rng, spec), spec))
        else:
            exchanges.append((rng.choice(FOLLOW_UP_DESCRIBE), answer(spec)))
    return [text for exchange in exchanges for text in exchange]


def generate_dataset(
    out_dir: Path,
    *,
    num_single: int,
    num_multi_turn: int,
    num_pairs: int,
    num_videos: int,
    num_video_frames: int = 4,
    seed: int = 0,
    split: str = "train",
    progress: bool = False,
) -> Path:
    """Writes a shapes dataset: media under ``out_dir/images/{split}`` and ``out_dir/videos/{split}``, annotations in
    ``out_dir/{split}.json``.

    Samples of the four kinds are shuffled together. Media files share one running index, and a record's id is the
    index of its first media file (``train-000123`` uses ``images/train/000123.jpg`` and, for a pair, ``000124.jpg``),
    so ids are unique but not contiguous.

    Args:
        out_dir: Dataset root; created if missing.
        num_single: Single-image samples with one describe question.
        num_multi_turn: Single-image samples with 2-3 question/answer exchanges.
        num_pairs: Two-image comparison samples.
        num_videos: Video samples.
        num_video_frames: Frames per video (written at 4 fps).
        seed: Seed of the only random generator used; the annotation file is a function of it.
        split: Name used in file names, directories and ids.
        progress: Show a tqdm bar on stderr.

    Returns:
        Path of the annotation file.

    Raises:
        ValueError: If a count is negative, ``num_video_frames < 1`` or ``split`` is not a plain name.
    """
    counts = {"single": num_single, "multi": num_multi_turn, "pair": num_pairs, "video": num_videos}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"sample counts must be >= 0, got {counts}")
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or split in (".", ".."):
        raise ValueError(f"split must be a plain name (letters, digits, '_', '-', '.'), got {split!r}")
    out_dir = Path(out_dir)
    image_dir, video_dir = out_dir / "images" / split, out_dir / "videos" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    if num_videos:
        video_dir.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)
    next_index = 0

    def save_image(spec: ShapeSpec) -> str:
        nonlocal next_index
        name = f"{next_index:06d}.jpg"
        next_index += 1
        draw(spec).save(image_dir / name, quality=JPEG_QUALITY)
        return f"images/{split}/{name}"

    records: list[dict[str, Any]] = []
    iterator: Any = kinds
    if progress:
        from tqdm import tqdm

        iterator = tqdm(kinds, desc=f"shapes {split}", unit="sample")
    for kind in iterator:
        record: dict[str, Any] = {"id": f"{split}-{next_index:06d}"}
        if kind == "single":
            spec = sample_spec(rng)
            record["images"] = [save_image(spec)]
            question, reply = _single_exchange(rng, spec)
            record["conversations"] = _turns(f"{IMAGE_MARKER}{_sep(rng)}{question}", reply)
        elif kind == "multi":
            spec = sample_spec(rng)
            record["images"] = [save_image(spec)]
            texts = _multi_turn(rng, spec)
            texts[0] = f"{IMAGE_MARKER}{_sep(rng)}{texts[0]}"
            record["conversations"] = _turns(*texts)
        elif kind == "pair":
            question = rng.choice(SAME_SHAPE_QUESTIONS + SAME_COLOUR_QUESTIONS + DESCRIBE_BOTH_QUESTIONS)
            first = sample_spec(rng)
            # Balance yes/no: half of the comparisons are forced to match on the asked attribute.
            match = rng.random() < 0.5
            if question in SAME_SHAPE_QUESTIONS and match:
                second = sample_spec(rng, shape=first.shape)
            elif question in SAME_COLOUR_QUESTIONS and match:
                second = sample_spec(rng, colour=first.colour)
            else:
                second = sample_spec(rng)
            record["images"] = [save_image(first), save_image(second)]
            record["conversations"] = _turns(
                f"{IMAGE_MARKER}{IMAGE_MARKER}{_sep(rng)}{question}", compare_answer(question, first, second)
            )
        else:
            spec, direction, frames = _video_frames(rng, num_video_frames, IMAGE_SIZE)
            name = f"{next_index:06d}.mp4"
            next_index += 1
            write_video(video_dir / name, frames)
            record["video"] = f"videos/{split}/{name}"
            record["conversations"] = _turns(
                f"{VIDEO_MARKER}{_sep(rng)}{rng.choice(VIDEO_QUESTIONS)}", video_answer(spec, direction)
            )
        records.append(record)

    annotation = out_dir / f"{split}.json"
    annotation.write_text(json.dumps(records), encoding="utf-8")
    return annotation


def generate_eval_images(out_dir: Path, n: int, seed: int) -> list[tuple[Path, ShapeSpec]]:
    """Writes ``n`` held-out PNG images ``out_dir/{i:06d}.png`` and returns them with their specs.

    The generator is seeded with ``f"eval-{seed}"``, so even the training seed gives a stream distinct from the one
    :func:`generate_dataset` uses.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"eval-{seed}")
    items = []
    for i in range(n):
        spec = sample_spec(rng)
        path = out_dir / f"{i:06d}.png"
        draw(spec).save(path)
        items.append((path, spec))
    return items


# --- held-out benchmark files (read by ``python -m lavis.eval``) ------------------------------------------------------
BENCH_VQA_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("describe", DESCRIBE_QUESTIONS[0]),
    ("colour", COLOUR_QUESTIONS[0]),
    ("shape", SHAPE_QUESTIONS[1]),
)
"""(answer type, question) asked in turn about the benchmark images."""


def _bench_answer(kind: str, spec: ShapeSpec) -> str:
    return {"describe": f"{spec.colour} {spec.shape}", "colour": spec.colour, "shape": spec.shape}[kind]


def write_benchmarks(out_dir: Path, n: int, seed: int) -> dict[str, Path]:
    """Held-out benchmark files about ``n`` freshly drawn images ``out_dir/images/<id>.jpg``:

    * ``vqa.json`` in TextVQA's layout (``{"data": [{"question_id", "image_id", "question", "answers"}]}``, ten
      identical lower-case human answers), one question per image cycling through :data:`BENCH_VQA_QUESTIONS`;
    * ``pope.jsonl`` in POPE's layout (``{"question_id", "image", "text", "label"}``), two questions per image
      ("Is it a <shape>?" and "Is it <colour>?"), each asking about the true value or a wrong one with equal odds.

    The generator is seeded with ``f"bench-{seed}"`` (a stream distinct from training's and
    :func:`generate_eval_images`'). Returns ``{"vqa": path, "yesno": path, "images": dir}``.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"bench-{seed}")
    vqa: list[dict[str, Any]] = []
    pope: list[dict[str, Any]] = []
    for i in range(n):
        spec = sample_spec(rng)
        image_id = f"{i:06d}"
        draw(spec).save(image_dir / f"{image_id}.jpg", quality=JPEG_QUALITY)
        kind, question = BENCH_VQA_QUESTIONS[i % len(BENCH_VQA_QUESTIONS)]
        vqa.append({"question_id": i, "image_id": image_id, "question": question,
                    "answers": [_bench_answer(kind, spec)] * 10, "answer_type": kind})
        shape = spec.shape if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != spec.shape])
        colour = spec.colour if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != spec.colour])
        pope.append({"question_id": 2 * i, "image": f"{image_id}.jpg", "text": f"Is it a {shape}?",
                     "label": "yes" if shape == spec.shape else "no"})
        pope.append({"question_id": 2 * i + 1, "image": f"{image_id}.jpg", "text": f"Is it {colour}?",
                     "label": "yes" if colour == spec.colour else "no"})
    vqa_path, pope_path = out_dir / "vqa.json", out_dir / "pope.jsonl"
    vqa_path.write_text(json.dumps({"dataset_name": "shapes", "dataset_type": "test", "data": vqa}), encoding="utf-8")
    pope_path.write_text("".join(json.dumps(r) + "\n" for r in pope), encoding="utf-8")
    return {"vqa": vqa_path, "yesno": pope_path, "images": image_dir}
