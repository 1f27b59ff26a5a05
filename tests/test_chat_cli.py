"""cli_demo.py one-shot, batch and interactive modes on a freshly trained tiny checkpoint; entry-point --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lavis.chat.cli import parse_conf
from lavis.chat.engine import GenerationSettings
from lavis.convert.pipe_to_pth import convert

from .conftest import REPO


@pytest.fixture(scope="module")
def chat_args(runs: dict[str, Path]) -> list[str]:
    run = runs["pp2"]
    pth = run / "unfreeze_llm_model.pth"
    if not pth.is_file():
        convert(run, "model")
    return ["--cfg-path", str(run / "config.yaml"), "-c", str(pth), "--max-new-tokens", "8"]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli_demo.py"), *args], cwd=REPO, capture_output=True,
                          text=True, input=stdin, timeout=300)


def test_one_shot_and_batch_agree(chat_args: list[str], tiny_data: Path, tmp_path: Path) -> None:
    img1, img2 = tiny_data / "images/train/000000.jpg", tiny_data / "images/train/000001.jpg"
    vid = next((tiny_data / "videos/train").glob("*.mp4"))
    one = cli(*chat_args, "--image", str(img1), "--query", "What is in the image?")
    assert one.returncode == 0, one.stderr[-2000:]
    jobs = [{"id": "a", "images": [str(img1)], "query": "What is in the image?"},
            {"id": "b", "images": [str(img1), str(img2)], "query": "Describe both images."},
            {"id": "c", "video": str(vid), "query": "What is happening in the video?"}]
    src, dest = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    batch = cli(*chat_args, "--batch", str(src), "--out", str(dest))
    assert batch.returncode == 0, batch.stderr[-2000:]
    rows = [json.loads(ln) for ln in dest.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and all(isinstance(r["answer"], str) for r in rows)
    assert rows[0]["answer"] == one.stdout.strip()  # greedy: same image + question, same answer


def test_batch_bad_image_names_line_and_file(chat_args: list[str], tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "x", "images": [str(tmp_path / "nope.png")], "query": "hi"}) + "\n")
    proc = cli(*chat_args, "--batch", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode != 0 and "in.jsonl:1" in proc.stderr and "nope.png" in proc.stderr


def test_interactive_session(chat_args: list[str], tiny_data: Path) -> None:
    img = tiny_data / "images/train/000000.jpg"
    script = "\n".join([str(img), "/no/such/file.png", ":f", "What is in the image?", ":his",
                        ":conf temperature=0.5", ":conf top_p=__import__('os').system('id')", ":clh", ":his", ":q"])
    proc = cli(*chat_args, stdin=script + "\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"attached {img}" in out and "error:" in out and "file.png" in out
    assert "[1] user" in out and "What is in the image?" in out
    assert "temperature=0.5" in out and "not a literal" in out and "uid=" not in out
    assert "history cleared" in out and "(empty)" in out


def test_conf_parsing_is_literal_only() -> None:
    s = GenerationSettings()
    assert parse_conf(["temperature=0.5", "max_new_tokens=12", "do_sample=True"], s) == []
    assert (s.temperature, s.max_new_tokens, s.do_sample) == (0.5, 12, True)
    errs = parse_conf(["temperature=__import__('os').system('id')", "bogus=1", "max_new_tokens=1.5"], s)
    assert len(errs) == 3 and s.temperature == 0.5 and s.max_new_tokens == 12


@pytest.mark.parametrize("script", ["train_pipeline.py", "pipe_proj2pth.py", "pipemodel2pth.py", "cli_demo.py",
                                    "webui_demo.py"])
def test_entry_points_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_web_chat_callbacks(chat_args: list[str], tiny_data: Path, tmp_path: Path) -> None:
    from lavis.chat.engine import ChatEngine
    from lavis.chat.webui import WebChat, build_app

    engine = ChatEngine.from_files(chat_args[1], chat_args[3])
    web = WebChat(engine)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    img = str(tiny_data / "images/train/000000.jpg")
    *_, (history, status) = web.respond("What is in the image?", [], [img, str(bad)], 8, True, 1.0, 1.0)
    assert "000000.jpg: attached" in status and "notes.png: not usable" in status
    assert [m["role"] for m in history] == ["user", "assistant"] and isinstance(history[1]["content"], str)
    assert engine.history[0].media_names == [img]
    assert web.clear() == ([], "cleared") and engine.history == []
    build_app(web)  # the gradio layout builds without a server
