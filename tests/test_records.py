"""Compact shared records (lavis.data.records): golden equality with parsing the whole file, for every format,
the same file:index / file:line errors, index reuse and rebuild, concatenation and pickling."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest

from lavis.config.schema import DatasetConfig
from lavis.data.datasets import load_records, parse_record, read_raw
from lavis.data.formats import FORMATS
from lavis.data.records import RecordsChangedError, file_digest

RECORDS = {
    "canonical": [
        {"id": "a", "images": ["x.png"], "conversations": [{"role": "user", "content": "<image>\nWhat?"},
                                                           {"role": "assistant", "content": "Ünïcødé — 形 ✓"}]},
        {"id": "b", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "c", "video": "v.mp4", "conversations": [{"role": "user", "content": "<video> go"},
                                                        {"role": "assistant", "content": "ok"}]},
    ],
    "mpp": [{"image": "a.jpg", "instruction": "<Img><ImageHere></Img> Describe ä.", "output": "A cat."},
            {"image": "b.jpg", "instruction": ["<Img><ImageHere></Img> Q1", "Q2"], "output": ["A1", "A2"]}],
    "llava": [{"id": "7", "image": "c.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                              {"from": "gpt", "value": "A dog."}]}],
    "llava_pretrain": [{"id": "004539375", "image": "00453/004539375.jpg",
                        "conversations": [{"from": "human", "value": "Summarize.\n<image>"},
                                          {"from": "gpt", "value": "select luxury furniture"}]}] * 3,
    "videochatgpt": [{"video": "v_1.mp4", "instruction": "<Img><ImageHere></Img> What happens?", "output": "Run."}],
}


@pytest.fixture(autouse=True)
def _index_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVIS_RECORD_INDEX_DIR", str(tmp_path / "index"))


def _old(ds: DatasetConfig) -> list:
    """The previous implementation: the whole file parsed into a list."""
    return [parse_record(r, where, ds, i) for i, (where, r) in enumerate(read_raw(Path(ds.ann_path)))]


@pytest.mark.parametrize("fmt", sorted(f for f, spec in FORMATS.items() if spec.one_json_file))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_same_records_as_parsing_the_whole_file(fmt: str, suffix: str, tmp_path: Path) -> None:
    if fmt not in RECORDS:
        pytest.skip(f"no golden records written for format {fmt} (added later)")
    ann = tmp_path / f"ann{suffix}"
    recs = RECORDS[fmt]
    if suffix == ".json":
        ann.write_text("[\n  " + ",\n\n  ".join(json.dumps(r, ensure_ascii=False, indent=1) for r in recs) + "\n]\n",
                       encoding="utf-8")
    else:  # blank lines count for the line numbers
        ann.write_text("\n".join(json.dumps(r, ensure_ascii=False) + ("\n" if i == 0 else "")
                                 for i, r in enumerate(recs)) + "\n", encoding="utf-8")
    ds = DatasetConfig(ann_path=str(ann), vis_root=str(tmp_path), format=fmt)
    new = load_records(ds)
    assert list(new) == _old(ds) and len(new) == len(recs)
    assert [new[i] for i in range(len(new))] == list(new) and new[-1] == list(new)[-1]
    again = load_records(ds)  # second open maps the index written by the first
    assert list(again) == list(new)
    assert pickle.loads(pickle.dumps(new))[0] == new[0]  # spawn-started loader workers


def test_errors_name_file_index_and_line(tmp_path: Path) -> None:
    good = RECORDS["canonical"][1]
    bad = {"id": "z", "conversations": []}
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([good, good, bad]))
    ds = DatasetConfig(ann_path=str(ann))
    with pytest.raises(ValueError) as new:
        load_records(ds)
    with pytest.raises(ValueError) as old:
        _old(ds)
    assert str(new.value) == str(old.value) and f"{ann}:2 (id z)" in str(new.value)
    errors: list[tuple[str, str]] = []
    assert len(load_records(ds, errors)) == 2 and errors == [(f"{ann}:2", str(old.value))]
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=f"{lines}:3 \\(id z\\)"):
        load_records(DatasetConfig(ann_path=str(lines)))
    lines.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match=f"{lines}:2: invalid JSON"):
        load_records(DatasetConfig(ann_path=str(lines)))
    for text in ("[1, 2", '{"a": 1}', "[] x"):
        ann.write_text(text)
        with pytest.raises(ValueError) as new:
            load_records(ds)
        with pytest.raises(ValueError) as old:
            _old(ds)
        assert str(new.value) == str(old.value)


def test_changed_file_gets_a_new_index_and_stores_concatenate(tmp_path: Path) -> None:
    ann = tmp_path / "a.json"
    one, two = RECORDS["canonical"][0], RECORDS["canonical"][1]
    ann.write_text(json.dumps([one]))
    ds = DatasetConfig(ann_path=str(ann), vis_root=str(tmp_path))
    assert [r.id for r in load_records(ds)] == ["a"]
    ann.write_text(json.dumps([two, one, two]))
    assert [r.id for r in load_records(ds)] == ["b", "a", "b"]
    both = sum([load_records(ds), load_records(ds)], [])  # what the trainer does with several datasets
    assert len(both) == 6 and [both[i].id for i in (0, 3, 4, 5)] == ["b", "b", "a", "b"]
    assert [r.id for r in both] == ["b", "a", "b"] * 2


def test_same_size_edit_with_restored_mtime_rebuilds_the_index_and_says_so(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """The index keys on the file's content: an in-place edit that keeps the size and puts the mtime back (as
    `cp -p`, `rsync -t` or an editor preserving times do) is seen, and the run says which file it rebuilt."""
    one, two = RECORDS["canonical"][1], dict(RECORDS["canonical"][1], id="c")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([one, two]))
    ds = DatasetConfig(ann_path=str(ann), vis_root=str(tmp_path))
    assert [r.id for r in load_records(ds)] == ["b", "c"]
    assert "rebuilt" not in capsys.readouterr().err
    st = ann.stat()
    ann.write_text(json.dumps([dict(one, id="x"), dict(two, id="y")]))  # same size, same inode
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ann.stat().st_size == st.st_size and ann.stat().st_mtime_ns == st.st_mtime_ns
    store = load_records(ds)
    assert [r.id for r in store] == ["x", "y"]
    assert capsys.readouterr().err.strip() == f"records index: {ann} changed since its index was built; rebuilt it " \
                                              "(2 records)"
    assert len(list((tmp_path / "index").glob("*.npy"))) == 1  # the stale index was deleted
    assert store.digest == file_digest(ann) and load_records(ds).digest == store.digest
    assert "rebuilt" not in capsys.readouterr().err  # unchanged since: mapped, not rebuilt


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_record_that_no_longer_decodes_names_the_file_ordinal_and_offset(suffix: str, tmp_path: Path) -> None:
    """Edited after it was opened (a running job): no bare JSONDecodeError, the file and record are named."""
    recs = [RECORDS["canonical"][1], dict(RECORDS["canonical"][1], id="c")]
    ann = tmp_path / f"a{suffix}"
    ann.write_text("[" + ", ".join(json.dumps(r) for r in recs) + "]" if suffix == ".json"
                   else "".join(json.dumps(r) + "\n" for r in recs))
    store = load_records(DatasetConfig(ann_path=str(ann)))
    assert store[0].id == "b"  # the file is mapped now
    text = ann.read_bytes()
    start = text.index(b'{"id": "c"')
    with open(ann, "r+b") as fh:  # in place, same size
        fh.seek(start)
        fh.write(b"#")
    pos = 1 if suffix == ".json" else 2
    kind = "index" if suffix == ".json" else "line"
    with pytest.raises(RecordsChangedError, match=rf"^{re.escape(str(ann))}: record 1 \({kind} {pos}, bytes {start}-"
                                                  r"\d+\) no longer decodes .*restart to re-read it"):
        store[1]
