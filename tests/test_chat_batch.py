"""cli_demo.py --batch: no output may be an input, --skip-bad reports bad lines and answers the rest, --resume answers
only what --out lacks (and only for the same input); on the demo config with random weights (no training needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis.chat.cli import check_output_not_input, run_batch
from lavis.chat.engine import ChatEngine, GenerationSettings, load_model
from lavis.chat.session import ChatSession
from lavis.config.load import load_config
from lavis.data import shapes
from lavis.data.conversation import template_from_config
from lavis.data.tokenizer import load_tokenizer

from .conftest import REPO

CFG = REPO / "lavis/projects/demo/shapes.yaml"


@pytest.fixture(scope="module")
def session() -> ChatSession:
    cfg = load_config(CFG)
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    model = load_model(cfg, None, tok, torch.device("cpu"), torch.float32)
    engine = ChatEngine(model, template_from_config(tok, cfg), cfg.model.vision.image_size, torch.device("cpu"))
    return ChatSession(engine, GenerationSettings(max_new_tokens=3))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    pairs = shapes.generate_eval_images(tmp_path_factory.mktemp("img"), 3, seed=0)
    return [str(p) for p, _ in pairs]


def job(i: str, image: str) -> str:
    return json.dumps({"id": i, "images": [image], "query": "What is in the image?"})


def rows(path: Path) -> list[dict]:
    return [json.loads(t) for t in path.read_text().splitlines() if t.strip()]


def test_failing_line_keeps_answers_and_resume_answers_only_the_rest(session: ChatSession, images: list[str],
                                                                     tmp_path: Path) -> None:
    src, dest = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    missing = str(tmp_path / "later.png")
    src.write_text("\n".join([job("a", images[0]), job("b", missing), "", job("c", images[1])]) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*q.jsonl:2 \(id b\): .*later.png.*--resume continues"):
        run_batch(session, src, dest)
    assert [(r["id"], r["line"]) for r in rows(dest)] == [("a", 1)]  # the answer before the failing line is kept
    dest.write_text(json.dumps({"id": "a", "line": 1, "answer": "KEPT"}) + "\n" + '{"id": "b", "li')  # torn line
    Path(missing).write_bytes(Path(images[2]).read_bytes())
    assert run_batch(session, src, dest, resume=True) == 0
    out = rows(dest)
    assert [(r["id"], r["line"]) for r in out] == [("a", 1), ("b", 2), ("c", 4)]
    assert out[0]["answer"] == "KEPT" and all(isinstance(r["answer"], str) for r in out)  # line 1 not asked again


def test_skip_bad_reports_each_bad_line_and_answers_the_others(session: ChatSession, images: list[str],
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, dest = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_text("\n".join([job("a", images[0]), "{not json", json.dumps({"id": "x", "images": "one.png",
                                                                            "query": "q"}),
                              job("b", str(tmp_path / "gone.png")), job("c", images[1])]) + "\n")
    with pytest.raises(SystemExit, match=r"q.jsonl:2: invalid JSON"):  # without --skip-bad: before any answer
        run_batch(session, src, dest)
    assert not dest.exists()
    assert run_batch(session, src, dest, skip_bad=True) == 0
    assert [(r["id"], r["line"]) for r in rows(dest)] == [("a", 1), ("c", 5)]
    err = capsys.readouterr().err
    summary = err[err.index("skipped 3 bad line(s)"):]
    assert "q.jsonl:2: invalid JSON" in summary and 'q.jsonl:3: "images" must be a list' in summary
    assert "q.jsonl:4 (id b): " in summary and "gone.png" in summary
    assert err.count("skipped ") == 4  # each bad line as it is met, then the summary


def test_resume_refuses_answers_of_another_input(session: ChatSession, images: list[str], tmp_path: Path) -> None:
    src, dest = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_text(job("a", images[0]) + "\n" + job("b", images[1]) + "\n")
    dest.write_text(json.dumps({"id": "zz", "line": 2, "answer": "?"}) + "\n")
    with pytest.raises(SystemExit, match=r"does not belong to --batch .*q.jsonl: its line 1 answers id 'zz' of line "
                                         r"2, but .*q.jsonl:2 has id 'b'"):
        run_batch(session, src, dest, resume=True)
    dest.write_text(json.dumps({"id": "a", "answer": "?"}) + "\n" + job("b", images[1]) + "\n")
    with pytest.raises(SystemExit, match=r"a.jsonl:1: no \"line\" and \"id\""):
        run_batch(session, src, dest, resume=True)


def test_no_output_is_an_input(images: list[str], tmp_path: Path) -> None:
    src = tmp_path / "q.jsonl"
    src.write_text(job("a", images[0]) + "\n")
    link = tmp_path / "link.jsonl"
    os.link(src, link)
    (tmp_path / "sub").mkdir()
    for out in (src, tmp_path / "sub" / ".." / "q.jsonl", link):
        with pytest.raises(SystemExit, match=r"is the --batch input file .*q.jsonl.*choose another --out"):
            check_output_not_input(out, {"--batch": str(src), "-c": None})
    check_output_not_input(tmp_path / "answers.jsonl", {"--batch": str(src)})
    src.write_text(job("a", str(tmp_path / "a.jsonl")) + "\n")  # a line's media is the output
    with pytest.raises(SystemExit, match=r"q.jsonl:1: media .*a.jsonl is the --out file"):
        run_batch(None, src, tmp_path / "a.jsonl")  # type: ignore[arg-type]  # refused before the model is used


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "--cfg-path", str(CFG), "--cpu-only",
                           "--max-new-tokens", "3", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.process
def test_cli_batch_out_is_the_input_then_skip_bad_and_resume(images: list[str], tmp_path: Path) -> None:
    """`--batch q.jsonl --out q.jsonl` used to replace the questions with the answers."""
    src = tmp_path / "q.jsonl"
    text = "\n".join([job("a", images[0]), "oops", job("b", images[1])]) + "\n"
    src.write_text(text)
    same = cli("--batch", str(src), "--out", str(src))
    assert same.returncode == 1 and "is the --batch input file" in same.stderr and src.read_text() == text
    dest = tmp_path / "a.jsonl"
    run = cli("--batch", str(src), "--out", str(dest), "--skip-bad")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "skipped 1 bad line(s)" in run.stderr and "q.jsonl:2: invalid JSON" in run.stderr
    assert [(r["id"], r["line"]) for r in rows(dest)] == [("a", 1), ("b", 3)]
    src.write_text(text.replace("oops", job("fixed", images[2])))
    again = cli("--batch", str(src), "--out", str(dest), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [(r["id"], r["line"]) for r in rows(dest)] == [("a", 1), ("fixed", 2), ("b", 3)]
    assert "wrote 3 answers" in again.stderr and "(2 kept from the earlier run)" in again.stderr
