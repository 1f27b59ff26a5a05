"""cli_demo.py one-shot, batch and interactive modes on a freshly trained tiny checkpoint; entry-point --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis.chat.cli import main, parse_conf
from lavis.chat.engine import ChatEngine, GenerationSettings, plan_llm_device_map
from lavis.chat.session import ChatSession
from lavis.config.schema import Config

from .conftest import REPO


@pytest.fixture(scope="module")
def chat_args(chat_checkpoint: tuple[Path, Path]) -> list[str]:
    cfg, pth = chat_checkpoint
    return ["--cfg-path", str(cfg), "-c", str(pth), "--max-new-tokens", "8"]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli_demo.py"), *args], cwd=REPO, capture_output=True,
                          text=True, input=stdin, timeout=300, check=False)


@pytest.mark.process
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


@pytest.mark.process
def test_batch_bad_image_names_line_and_file(chat_args: list[str], tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "x", "images": [str(tmp_path / "nope.png")], "query": "hi"}) + "\n")
    proc = cli(*chat_args, "--batch", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode != 0 and "in.jsonl:1" in proc.stderr and "nope.png" in proc.stderr


@pytest.mark.process
def test_batch_checks_field_types_and_keeps_answers_before_a_failing_line(chat_args: list[str], tiny_data: Path,
                                                                          tmp_path: Path) -> None:
    img = str(tiny_data / "images/train/000000.jpg")
    src, dest = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "a", "images": [img], "query": "hi"}) + "\n" +
                   json.dumps({"id": "b", "images": img, "query": "hi"}) + "\n")
    with pytest.raises(SystemExit, match=r"in.jsonl:2: \"images\" must be a list of path strings"):
        main([*chat_args, "--batch", str(src), "--out", str(dest)])
    src.write_text(json.dumps({"id": "a", "images": [img], "query": "hi"}) + "\n" +
                   json.dumps({"id": "b", "video": ["clip.mp4"], "query": "hi"}) + "\n")
    with pytest.raises(SystemExit, match=r"in.jsonl:2: \"video\" must be a path string"):
        main([*chat_args, "--batch", str(src), "--out", str(dest)])
    assert not dest.exists()  # type errors are found before any answer
    src.write_text(json.dumps({"id": "a", "images": [img], "query": "hi"}) + "\n" +
                   json.dumps({"id": "b", "images": [str(tmp_path / "gone.png")], "query": "hi"}) + "\n")
    with pytest.raises(SystemExit, match=r"in.jsonl:2 \(id b\): .*gone.png"):
        main([*chat_args, "--batch", str(src), "--out", str(dest)])
    rows = [json.loads(ln) for ln in dest.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a"] and rows[0]["answer"]  # the answer before the failing line is kept


@pytest.mark.process
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
@pytest.mark.process
def test_entry_points_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and "usage:" in proc.stdout


@pytest.mark.process
def test_web_chat_callbacks(chat_args: list[str], tiny_data: Path, tmp_path: Path) -> None:
    from lavis.chat.webui import WebChat, build_app

    engine = ChatEngine.from_files(chat_args[1], chat_args[3], device="cpu")
    web = WebChat(engine, max_upload_mb=1, local_dirs=[tiny_data, tmp_path])  # as --allow-local-files
    bad, big = tmp_path / "notes.png", tmp_path / "big.png"
    bad.write_text("not an image")
    big.write_bytes(b"\0" * (2 * 2**20))
    img, vid = str(tiny_data / "images/train/000000.jpg"), str(next((tiny_data / "videos/train").glob("*.mp4")))
    with pytest.warns(UserWarning) as shown_warnings:  # gr.Warning outside a request: a toast in the browser
        session, status = web.on_files([img, vid, str(bad), str(big)], None)
    assert [str(w.message).split(":")[0] for w in shown_warnings] == ["notes.png", "big.png"]
    lines = status.splitlines()
    assert lines[0] == "000000.jpg: attached" and lines[1].endswith(f"attached ({engine.tpl.num_video_frames} frames)")
    assert lines[2].startswith("notes.png: not a readable image") and "big.png: 2 MB is over the 1 MB limit" in lines[3]
    assert [m.name for m in session.pending] == [img, vid]
    *_, (shown, session, box, files) = web.respond("What is in the image?", session, 8, "greedy", 1.0, 1.0, 3)
    assert [m["role"] for m in shown] == ["user", "assistant"] and shown[0]["content"][:2] == [{"path": img},
                                                                                               {"path": vid}]
    answer = session.turns[0].answer
    assert shown[1]["content"] == answer and box == "" and files is None and session.pending == []
    assert session.turns[0].media_names == [img, vid] and not hasattr(engine, "history")  # per-session
    *_, (shown, session, _) = web.regenerate(session, 8, "beam search", 1.0, 1.0, 2)
    assert len(session.turns) == 1 and shown[1]["content"] == session.turns[0].answer
    *_, (shown, session, _, _) = web.respond("And the colour?", session, 8, "sample", 0.7, 0.9, 3)
    assert len(session.turns) == 2 and len(shown) == 4
    assert web.api_answer(img, "What is in the image?") == engine.answer([img], "What is in the image?")
    assert web.clear()[:2] == ([], web.clear()[1]) and web.clear()[1].turns == []
    build_app(web)  # the gradio layout builds without a server


@pytest.mark.process
def test_stop_event_cuts_the_answer(chat_args: list[str], tiny_data: Path) -> None:
    engine = ChatEngine.from_files(chat_args[1], chat_args[3], device="cpu")
    session = ChatSession(engine, GenerationSettings(max_new_tokens=200, min_new_tokens=200))
    session.attach_image(tiny_data / "images/train/000000.jpg")
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            session.stop_event.set()

    answer = session.ask("Describe it.", on_text=on_text)
    assert session.history[-1].stopped and len(pieces) <= 4 and answer == "".join(pieces).strip()
    full = session.regenerate()  # not stopped: runs to min_new_tokens
    assert not session.history[-1].stopped and len(full) > len(answer)


@pytest.mark.parametrize("argv, message", [
    (["--model-type", "no_such_model"], "unknown --model-type 'no_such_model'"),
    (["--cfg-path", "{cfg}", "--load-8bit", "--cpu-only"], "--load-8bit needs a CUDA GPU"),
    (["--cfg-path", "{cfg}", "--llm_device_map", "auto", "--cpu-only"], "spreads the LLM over several CUDA GPUs"),
    (["--cfg-path", "{cfg}", "--llm_device_map", "auto", "--load-8bit"], "cannot be combined"),
])
def test_clear_errors_before_loading(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    from .conftest import DEMO_CFG

    assert main([a.replace("{cfg}", str(DEMO_CFG)) for a in argv]) == 1  # input errors: status 1 (README)
    assert message in capsys.readouterr().err


def test_model_type_and_cfg_path_exclusive(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--model-type", "x", "--cfg-path", "y.yaml"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--query", "hi"])
    assert "one of the arguments --cfg-path --model-type --model-dir is required" in capsys.readouterr().err


def test_device_map_plan(tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate's planner over 3 (pretend) GPUs: blocks spread, embeddings on GPU 0, refusal when too small."""
    import torch

    from lavis.model.llm import build_llm, llm_hf_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # planning only; nothing is moved
    llm = build_llm(llm_hf_config(tiny_cfg.model.llm))
    layer = sum(p.numel() * 4 for p in llm.model.layers[0].parameters())
    embed = sum(p.numel() * 4 for p in llm.model.embed_tokens.parameters())
    dmap = plan_llm_device_map(llm, {0: 3 * layer, 1: 3 * layer, 2: 3 * layer}, torch.float32,
                               reserve_first=layer)
    assert dmap["model.embed_tokens"] == 0 and len(set(dmap.values())) >= 2, dmap
    assert all(isinstance(d, int) for d in dmap.values())
    with pytest.raises(ValueError, match="does not fit on 2 GPU"):
        plan_llm_device_map(llm, {0: layer, 1: layer}, torch.float32, reserve_first=embed // 2)


def test_vicuna0_chat_prompt_is_minigpt4s(tmp_path: Path) -> None:
    """MiniGPT-4's demo (Vicuna v0): ``{sys}###Human: <Img><ImageHere></Img> {q}###Assistant: ``, split at
    ``<ImageHere>``, each segment tokenised by sentencepiece on its own, BOS first, 32 image slots between."""
    import types

    import sentencepiece as spm

    from lavis.chat.engine import ChatEngine, Media
    from lavis.data.conversation import IMAGE_MARKER, SYSTEM_PROMPTS, ChatTemplate, encode_prompt
    from lavis.data.tokenizer import load_tokenizer
    from lavis.testing.synthetic import write_sentencepiece

    model_file = write_sentencepiece(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    tpl = ChatTemplate(tok, SYSTEM_PROMPTS["vicuna_v0"], "<unk>", 32, 4, name="vicuna_v0")
    image = Media(IMAGE_MARKER, torch.zeros(1, 3, 2, 2), "x.png")
    turn = ChatEngine.make_turn(types.SimpleNamespace(tpl=tpl), "What is this?", [image])
    ours = encode_prompt([(turn.query, None)], tpl)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    before, after = (SYSTEM_PROMPTS["vicuna_v0"] + "###Human: <Img><ImageHere></Img> What is this?###Assistant: "
                     ).split("<ImageHere>")
    assert ours == [sp.bos_id(), *sp.encode(before), *[tok.token_id("<unk>")] * 32, *sp.encode(after)]
