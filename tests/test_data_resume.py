"""A resume after the training data changed is never silent: the checkpoint records each dataset's record count and
content fingerprint; an in-place edit of an annotation file is refused before anything is written (naming the file,
the counts and the option to continue), continues with ``train.allow_data_change=true``, and a checkpoint written
before fingerprints existed resumes with a note. Real 2-rank launches (2 stages: rank 0 compares, rank 1 follows)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lavis.engine.checkpoint import write_checksums
from lavis.engine.run_dir import LOCK_FILE, RunDirError, check_resume_data, data_changes

from .conftest import COMMON, DEMO_CFG, launch

pytestmark = pytest.mark.process


def _args(out: Path, data: Path, steps: int, *extra: str, stop_at: int | None = None) -> list[str]:
    stop = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
    return ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", str(steps), *stop,
            "--output-dir", str(out), "--options", *COMMON, "train.batch.grad_accum_steps=1",
            f"data.train.0.ann_path={data / 'train.json'}", f"data.train.0.vis_root={data}", *extra]


@pytest.fixture(scope="module")
def stopped(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run stopped with its checkpoint after step 1 of 3, its own copy of the data); kept pristine: tests copy."""
    root = tmp_path_factory.mktemp("data_resume")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    out = root / "run"
    launch(2, _args(out, data, 3, stop_at=1))
    assert (out / "latest").read_text() == "global_step1"
    return out, data


def _copy(stopped: tuple[Path, Path], tmp_path: Path) -> Path:
    """The run directory copied to ``tmp_path/run``; the data stays where the checkpoint says it was."""
    return Path(shutil.copytree(stopped[0], tmp_path / "run"))


def _edit_in_place(ann: Path) -> tuple[int, int]:
    """Drop the last record, keeping the file's mtime (as `cp -p` or a careful editor does); (old, new) counts."""
    st = ann.stat()
    records = json.loads(ann.read_text())
    with open(ann, "r+") as fh:  # the same file (inode), rewritten
        fh.write(json.dumps(records[:-1]))
        fh.truncate()
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))
    return len(records), len(records) - 1


def test_checkpoint_records_the_data_and_an_edit_is_refused_then_allowed(stopped: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    out, data = stopped
    ann = data / "train.json"
    meta = json.loads((out / "global_step1" / "lavis_meta.json").read_text())
    n = len(json.loads(ann.read_text()))
    assert meta["data"] == [{"ann_path": str(ann), "format": "canonical", "records": n,
                             "fingerprint": meta["data"][0]["fingerprint"]}]
    original = ann.read_bytes()
    run = _copy(stopped, tmp_path)
    try:
        old_n, new_n = _edit_in_place(ann)
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        proc = launch(2, _args(run, data, 3), check=False)
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0, log[-3000:]
        assert "error: rank 0: cannot resume from" in log, log[-3000:]  # a user error: no traceback of ours
        assert "the training data changed since the checkpoint was written" in log, log[-3000:]
        assert f"data.train.0 ({ann}): {old_n} -> {new_n} records, content fingerprint" in log, log[-3000:]
        assert "--options train.allow_data_change=true" in log and "Nothing was written" in log
        after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
        assert after == {k: v for k, v in before.items() if k.name != LOCK_FILE}  # no config.yaml, no metrics row

        proc = launch(2, _args(run, data, 3, "train.allow_data_change=true"))
        log = proc.stdout + proc.stderr
        assert f"resume: data.train.0 ({ann}): {old_n} -> {new_n} records" in log, log[-3000:]
        assert "(continuing: train.allow_data_change=true)" in log
        assert (run / "latest").read_text() == "global_step3"
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        new_meta = json.loads((run / "global_step3" / "lavis_meta.json").read_text())
        assert new_meta["data"][0]["records"] == new_n  # the next resume compares with the data it trained on
        assert new_meta["data"][0]["fingerprint"] != meta["data"][0]["fingerprint"]
    finally:
        ann.write_bytes(original)


def test_a_checkpoint_without_data_fingerprints_resumes_with_a_note(stopped: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    out, data = stopped
    run = _copy(stopped, tmp_path)
    meta_file = run / "global_step1" / "lavis_meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["data"]  # as an older version wrote it
    meta_file.write_text(json.dumps(meta))
    write_checksums(meta_file.parent)  # the edit is deliberate: the checkpoint's checksums follow it
    proc = launch(2, _args(run, data, 2))
    log = proc.stdout + proc.stderr
    assert "resume: the checkpoint records no data fingerprint (written by an older version)" in log, log[-3000:]
    assert (run / "latest").read_text() == "global_step2"


def test_data_changes_compares_only_the_same_file() -> None:
    then = [{"ann_path": "a.json", "format": "llava", "records": 3, "fingerprint": "f" * 32}]
    same = [dict(then[0])]
    assert data_changes(then, same) == ([], [])
    edited = [dict(then[0], fingerprint="e" * 32)]
    changed, notes = data_changes(then, edited)
    assert changed == ["data.train.0 (a.json): 3 -> 3 records, content fingerprint ffffffffffff -> eeeeeeeeeeee"]
    assert not notes
    moved = [dict(then[0], ann_path="b.json"), dict(then[0], ann_path="c.json")]  # a config change, printed as such
    changed, notes = data_changes(then, moved)
    assert not changed and len(notes) == 2 and "data.train.1 (c.json) was not in the checkpoint's data" in notes[1]
    with pytest.raises(RunDirError, match="train.allow_data_change=true"):
        check_resume_data(Path("run/global_step1"), then, edited, allow=False)
    assert check_resume_data(Path("run/global_step1"), then, edited, allow=True)[0].endswith(
        "(continuing: train.allow_data_change=true)")
