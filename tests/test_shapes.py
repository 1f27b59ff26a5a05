"""Behavioural tests of the shapes demo-data generator."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavis.data import media, shapes
from lavis.demo.run import count_contradictions
from lavis.eval.yesno import pope_label

W = 224


def _mask(image: Image.Image) -> np.ndarray:
    """Non-background pixels (the shape), tolerant to nothing: draw() does not anti-alias."""
    return (np.asarray(image) != 255).any(axis=-1)


def test_constants() -> None:
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert list(shapes.COLOURS) == ["red", "green", "blue", "yellow"]
    assert shapes.COLOURS["red"] == (230, 25, 25)
    assert shapes.COLOURS["yellow"] == (230, 210, 25)
    assert shapes.DESCRIBE_QUESTIONS[0] == "What is in the image?"
    assert 5 <= len(shapes.DESCRIBE_QUESTIONS) <= 7


def test_spec_ranges_over_many_samples() -> None:
    rng = random.Random(123)
    specs = [shapes.sample_spec(rng) for _ in range(3000)]
    assert {s.shape for s in specs} == set(shapes.SHAPES)
    assert {s.colour for s in specs} == set(shapes.COLOURS)
    sizes = [s.size for s in specs]
    assert min(sizes) >= 0.25 * W and max(sizes) <= 0.60 * W
    assert min(sizes) < 0.27 * W and max(sizes) > 0.58 * W  # the whole range is used
    jitters = []
    for s in specs:
        base = shapes.COLOURS[s.colour]
        for c, b in zip(s.rgb, base):
            assert 0 <= c <= 255
            assert abs(c - b) <= 20
            jitters.append(c - b)
        assert s.size / 2 <= s.cx <= W - s.size / 2
        assert s.height / 2 <= s.cy <= W - s.height / 2
        x0, y0, x1, y1 = shapes.bbox(s)
        assert 0 <= x0 and 0 <= y0 and x1 <= W - 1 and y1 <= W - 1
        if s.shape == "triangle":
            assert 0.8 <= s.aspect <= 1.15
            eq = s.size * math.sqrt(3) / 2
            assert 0.8 * eq - 1 <= s.height <= 1.15 * eq + 1
        else:
            assert s.aspect == 1.0
    assert min(jitters) == -20 and max(jitters) == 20


def test_sample_spec_is_deterministic_and_constrainable() -> None:
    a = [shapes.sample_spec(random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    assert all(shapes.sample_spec(rng, shape="triangle").shape == "triangle" for _ in range(20))
    assert all(shapes.sample_spec(rng, colour="blue").colour == "blue" for _ in range(20))
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.sample_spec(rng, shape="hexagon")


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_draw_pixels(shape: str) -> None:
    rng = random.Random(shapes.SHAPES.index(shape))
    for _ in range(20):
        spec = shapes.sample_spec(rng, shape=shape)
        image = shapes.draw(spec)
        assert image.mode == "RGB" and image.size == (W, W)
        pixels = np.asarray(image)
        mask = _mask(image)
        # Every shape pixel has exactly the jittered colour, everything else is white.
        assert (pixels[mask] == spec.rgb).all()
        assert (pixels[~mask] == 255).all()
        x0, y0, x1, y1 = shapes.bbox(spec)
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
        # Corners far from the shape are background.
        for cx, cy in ((0, 0), (W - 1, 0), (0, W - 1), (W - 1, W - 1)):
            if math.hypot(cx - spec.cx, cy - spec.cy) > spec.size:
                assert tuple(pixels[cy, cx]) == (255, 255, 255)
        # The bounding-box centre is inside every shape kind.
        assert tuple(pixels[int(spec.cy), int(spec.cx)]) == spec.rgb
        if shape == "square":
            assert mask.sum() == spec.size**2
        elif shape == "circle":
            assert abs(mask.sum() / (math.pi * spec.size**2 / 4) - 1) < 0.1
            assert not mask[y0, x0] and not mask[y1, x1]  # bbox corners are outside a circle
        else:
            rows = np.nonzero(mask.any(axis=1))[0]
            top_width, bottom_width = mask[rows[0]].sum(), mask[rows[-1]].sum()
            assert top_width < bottom_width  # apex up, base down
            assert bottom_width >= spec.size - 1
            assert rows[-1] - rows[0] + 1 == spec.height


def test_draw_rejects_bad_spec() -> None:
    spec = shapes.sample_spec(random.Random(0))
    with pytest.raises(ValueError):
        shapes.draw(replace(spec, shape="star"))


def test_answer_parse_round_trip() -> None:
    for shape in shapes.SHAPES:
        for colour, rgb in shapes.COLOURS.items():
            spec = shapes.ShapeSpec(shape, colour, rgb, 60, 100.0, 100.0)
            text = shapes.answer(spec)
            assert text == f"A {colour} {shape}."
            assert shapes.parse_answer(text) == (colour, shape)
            assert shapes.parse_answer(text.upper()) == (colour, shape)
            assert shapes.parse_answer(f"I think it's a {shape}, and it is {colour}!") == (colour, shape)
    assert shapes.parse_answer("A red or blue circle.") == (None, "circle")
    assert shapes.parse_answer("A red circle next to a square.") == ("red", None)
    assert shapes.parse_answer("Yes, both are circles.") == (None, "circle")
    assert shapes.parse_answer("A reddish circular thing.") == (None, None)  # whole words only
    assert shapes.parse_answer("") == (None, None)


def test_compare_answers() -> None:
    a = shapes.ShapeSpec("circle", "red", (230, 25, 25), 60, 100.0, 100.0)
    b = shapes.ShapeSpec("square", "blue", (25, 25, 230), 60, 100.0, 100.0)
    c = shapes.ShapeSpec("circle", "blue", (25, 25, 230), 60, 100.0, 100.0)
    same_shape, same_colour = shapes.SAME_SHAPE_QUESTIONS[0], shapes.SAME_COLOUR_QUESTIONS[0]
    # What the images show first, the verdict last (shapes._verdict says why).
    assert shapes.compare_answer(same_shape, a, b) == (
        "The first image shows a red circle and the second shows a blue square, so no."
    )
    assert shapes.compare_answer(same_shape, a, c) == "Both are circles, so yes."
    assert shapes.compare_answer(same_colour, b, c) == "Both are blue, so yes."
    assert shapes.compare_answer(same_colour, a, c) == (
        "The first image shows a red circle and the second shows a blue circle, so no."
    )
    assert shapes.compare_answer(shapes.DESCRIBE_BOTH_QUESTIONS[0], b, a) == (
        "The first image shows a blue square and the second shows a red circle."
    )
    with pytest.raises(ValueError):
        shapes.compare_answer("What is in the image?", a, b)


def test_yes_no_answers_name_the_truth_then_a_verdict_the_pope_scorer_reads() -> None:
    for spec in (shapes.ShapeSpec(sh, c, rgb, 60, 100.0, 100.0) for sh in shapes.SHAPES for c, rgb in
                 shapes.COLOURS.items()):
        exchanges = [(shapes._is_shape_exchange(a, spec), a == spec.shape) for a in shapes.SHAPES]
        exchanges += [(shapes._is_colour_exchange(a, spec), a == spec.colour) for a in shapes.COLOURS]
        for (question, reply), truth in exchanges:
            assert reply.endswith(", so yes." if truth else ", so no.")
            assert pope_label(reply) == ("yes" if truth else "no"), (question, reply)
            # The reply names the true value (never the asked one when they differ), so it cannot contradict itself.
            assert shapes.names_asked_value(question, reply) is truth
    assert shapes.names_asked_value("Is it a circle?", "A square.") is False
    assert shapes.names_asked_value("Is it red?", "Yes.") is None  # names no colour
    assert shapes.names_asked_value("What is in the image?", "A red circle.") is None  # not a yes/no question


def test_contradictions_are_counted() -> None:
    rows = [
        {"query": "Is it a triangle?", "prediction": "No, it is a triangle."},  # the old demo's contradiction
        {"query": "Is it a triangle?", "prediction": "It is a circle, so yes."},
        {"query": "Is it red?", "prediction": "It is red, so no."},
        {"query": "Is it a triangle?", "prediction": "It is a triangle, so yes."},
        {"query": "Is it red?", "prediction": "It is blue, so no."},
        {"query": "Is it red?", "prediction": "No."},  # names nothing: cannot tell
    ]
    assert count_contradictions(rows) == 3


def test_yes_no_questions_are_balanced(tmp_path: Path) -> None:
    ann = shapes.generate_dataset(tmp_path, num_single=600, num_multi_turn=300, num_pairs=0, num_videos=0, seed=4)
    verdicts: dict[str, list[bool]] = {"shape": [], "colour": []}
    first_turn = 0
    for record in json.loads(ann.read_text()):
        conv = record["conversations"]
        for i in range(0, len(conv), 2):
            question = re.sub(r"^<image>[\n ]?", "", conv[i]["content"])
            if question.startswith("Is it "):
                first_turn += i == 0
                verdicts["shape" if question.startswith("Is it a ") else "colour"].append(
                    conv[i + 1]["content"].endswith("so yes."))
    assert 0.2 * 600 < first_turn < 0.4 * 600  # SINGLE_MIX asks ~30% of single images a yes/no question first
    for kind, answers in verdicts.items():
        assert len(answers) > 80, kind
        assert 0.4 < sum(answers) / len(answers) < 0.6, kind  # about the true value half of the time


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[\s\W]+", text.replace("<image>", " ").replace("<video>", " ")) if w}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("shapes")
    ann = shapes.generate_dataset(out, num_single=40, num_multi_turn=40, num_pairs=40, num_videos=8, seed=3)
    return out, json.loads(ann.read_text())


def test_generate_dataset_records(dataset: tuple[Path, list[dict]]) -> None:
    out, records = dataset
    assert (out / "train.json").is_file()
    assert len(records) == 128
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"train-\d{6}", i) for i in ids)
    kinds = {"single": 0, "multi": 0, "pair": 0, "video": 0}
    for record in records:
        conv = record["conversations"]
        assert conv and len(conv) % 2 == 0
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(isinstance(t["content"], str) and t["content"] for t in conv)
        markers = "".join(t["content"] for t in conv[1:])
        assert "<image>" not in markers and "<video>" not in markers  # markers only in the first user turn
        first = conv[0]["content"]
        if "video" in record:
            assert "images" not in record
            assert first.count("<video>") == 1 and "<image>" not in first and first.startswith("<video>")
            assert (out / record["video"]).is_file()
            assert record["video"] == f"videos/train/{record['id'][-6:]}.mp4"
            kinds["video"] += 1
            continue
        images = record["images"]
        assert first.count("<image>") == len(images) and "<video>" not in first
        rest = first[len("<image>" * len(images)):]
        assert first.startswith("<image>" * len(images)) and "<image>" not in rest
        assert rest[:1] in ("\n", " ") or rest[:1].isupper()
        assert images[0] == f"images/train/{record['id'][-6:]}.jpg"
        for rel in images:
            image = Image.open(out / rel)
            assert image.format == "JPEG" and image.size == (W, W) and image.mode == "RGB"
        if len(images) == 2:
            kinds["pair"] += 1
        elif len(conv) > 2:
            assert len(conv) in (4, 6)
            kinds["multi"] += 1
        else:
            kinds["single"] += 1
    assert kinds == {"single": 40, "multi": 40, "pair": 40, "video": 8}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix != ".json"}
    named = {r.get("video") for r in records} | {i for r in records for i in r.get("images", [])}
    assert written == named - {None}


def test_generated_answers_match_images(dataset: tuple[Path, list[dict]]) -> None:
    out, records = dataset
    singles = [r for r in records if len(r.get("images", [])) == 1 and len(r["conversations"]) == 2]
    for record in singles[:30]:
        colour, shape = shapes.parse_answer(record["conversations"][1]["content"])
        pixels = np.asarray(Image.open(out / record["images"][0]).convert("RGB"), dtype=int)
        shape_pixels = pixels[(np.abs(pixels - 255) > 60).any(axis=-1)]
        mean = shape_pixels.mean(axis=0)
        nearest = min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - mean).sum())
        # single-image questions ask for the description, the shape only or the colour only (shapes.SINGLE_MIX)
        assert colour is not None or shape is not None
        assert colour in (None, nearest) and shape in (None, *shapes.SHAPES)


def test_video_records_decode_and_move(dataset: tuple[Path, list[dict]]) -> None:
    out, records = dataset
    videos = [r for r in records if "video" in r]
    for record in videos:
        frames = media.load_video_frames(out / record["video"], 4)
        assert len(frames) == 4 and all(f.size == (W, W) and f.mode == "RGB" for f in frames)
        text = record["conversations"][1]["content"]
        pattern = r"A (red|green|blue|yellow) (circle|square|triangle) moves (to the left|to the right|up|down)\."
        assert re.fullmatch(pattern, text)
        centres, areas = [], []
        for frame in frames:
            mask = (np.abs(np.asarray(frame, dtype=int) - 255) > 80).any(axis=-1)
            ys, xs = np.nonzero(mask)
            centres.append((xs.mean(), ys.mean()))
            areas.append(mask.sum())
        assert max(areas) <= 1.15 * min(areas)  # fully inside every frame: never clipped by the border
        dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
        expected = {"to the left": (dx < -10), "to the right": (dx > 10), "up": (dy < -10), "down": (dy > 10)}
        direction = text.split(" moves ")[1].rstrip(".")
        assert expected[direction], (text, dx, dy)


def test_sample_video_motion_stays_inside() -> None:
    rng = random.Random(5)
    for _ in range(200):
        spec, direction, frames = shapes._video_frames(rng, 4, W)
        assert direction in shapes.DIRECTIONS
        for frame in frames[:: len(frames) - 1]:
            mask = _mask(frame)
            ys, xs = np.nonzero(mask)
            assert xs.min() >= 0 and xs.max() <= W - 1 and mask.sum() > 0
            assert mask.sum() >= 0.9 * _mask(frames[0]).sum()  # never clipped by the border


def test_determinism(tmp_path: Path) -> None:
    kwargs = dict(num_single=10, num_multi_turn=10, num_pairs=10, num_videos=2, seed=11)
    a = shapes.generate_dataset(tmp_path / "a", **kwargs).read_text()
    b = shapes.generate_dataset(tmp_path / "b", **kwargs).read_text()
    c = shapes.generate_dataset(tmp_path / "c", **{**kwargs, "seed": 12}).read_text()
    assert a == b and a != c
    for rel in (r["images"][0] for r in json.loads(a) if "images" in r):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert "\n" not in a  # indent=None: one line


def test_split_and_validation(tmp_path: Path) -> None:
    ann = shapes.generate_dataset(tmp_path, num_single=3, num_multi_turn=0, num_pairs=0, num_videos=0, split="val")
    assert ann == tmp_path / "val.json"
    records = json.loads(ann.read_text())
    assert all(r["id"].startswith("val-") and r["images"][0].startswith("images/val/") for r in records)
    with pytest.raises(ValueError):
        shapes.generate_dataset(tmp_path, num_single=-1, num_multi_turn=0, num_pairs=0, num_videos=0)
    with pytest.raises(ValueError):
        shapes.generate_dataset(tmp_path, num_single=1, num_multi_turn=0, num_pairs=0, num_videos=0, split="../x")


def test_corpus_covers_generated_words(tmp_path: Path) -> None:
    corpus = shapes.corpus()
    assert corpus == shapes.corpus() and len(corpus) == len(set(corpus))
    assert "What is in the image?" in corpus and "A red circle." in corpus
    vocabulary = set().union(*(_words(t) for t in corpus))
    ann = shapes.generate_dataset(tmp_path, num_single=100, num_multi_turn=200, num_pairs=300, num_videos=30, seed=1)
    texts = {t["content"] for r in json.loads(ann.read_text()) for t in r["conversations"]}
    assert set().union(*(_words(t) for t in texts)) <= vocabulary
    # Whole strings, not only words, come from the corpus.
    assert {re.sub(r"^(<image>|<video>)+[\n ]?", "", t) for t in texts} <= set(corpus)


def test_write_video_preserves_colour(tmp_path: Path) -> None:
    spec = shapes.ShapeSpec("square", "green", (40, 170, 30), 100, 112.0, 112.0)
    frames = [shapes.draw(spec)] * 4
    path = tmp_path / "v.mp4"
    shapes.write_video(path, frames)
    for backend in ("decord", "pyav"):
        decoded = media.load_video_frames(path, 4, backend=backend)
        for frame in decoded:
            centre = np.asarray(frame, dtype=int)[112, 112]
            assert np.abs(centre - np.array(spec.rgb)).max() <= 40, centre
            assert np.abs(np.asarray(frame, dtype=int)[5, 5] - 255).max() <= 40
    with pytest.raises(ValueError):
        shapes.write_video(tmp_path / "empty.mp4", [])


def test_generate_eval_images(tmp_path: Path) -> None:
    items = shapes.generate_eval_images(tmp_path, 6, seed=0)
    assert len(items) == 6
    for path, spec in items:
        assert path.suffix == ".png" and path.is_file()
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(shapes.draw(spec)))
    again = shapes.generate_eval_images(tmp_path / "again", 6, seed=0)
    assert [s for _, s in again] == [s for _, s in items]
    # Held out: a different stream from the training generator with the same seed.
    assert items[0][1] != shapes.sample_spec(random.Random(0))
