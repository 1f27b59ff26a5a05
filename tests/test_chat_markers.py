"""Media markers typed in chat: the attached files go where the user types ``<image>``, ``<ImageHere>`` or
``<Img><ImageHere></Img>`` (as MPP-Qwen places them), counted against the attached files with a clear message;
without markers they go first (as before). ``:img`` alone lists the attachments."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from lavis.chat.cli import Interactive
from lavis.chat.engine import ChatEngine, GenerationSettings, Media, MediaMarkerError, place_media
from lavis.chat.session import ChatSession
from lavis.config.schema import Config
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER, encode_prompt, template_from_config
from lavis.data.tokenizer import load_tokenizer
from lavis.model.mllm import MultimodalLM

LLAMA_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama_tokenizer.model"


def _image(name: str = "a.png") -> Media:
    return Media(IMAGE_MARKER, torch.zeros(1, 3, 2, 2), name)


@pytest.mark.parametrize("typed", ["<image>", "<ImageHere>", "<Img><ImageHere></Img>", "<Img> <ImageHere> </Img>"])
def test_typed_marker_places_the_image_there(typed: str) -> None:
    assert place_media(f"Look at {typed} and say what it is.", [_image()], " ") == "Look at <image> and say what it is."
    video = Media(VIDEO_MARKER, torch.zeros(2, 3, 2, 2), "v.mp4")
    assert place_media(f"{typed} then {typed}?", [_image(), video], "") == "<image> then <video>?"


def test_without_markers_media_go_first_as_before() -> None:
    assert place_media("What is it?", [_image(), _image()], " ") == "<image><image> What is it?"
    assert place_media("What is it?", [_image()], "") == "<image>What is it?"
    assert place_media("What is it?", [], " ") == "What is it?"


@pytest.mark.parametrize(("query", "n", "message"), [
    ("Compare <image> with <ImageHere>.", 1, "2 image markers but 1 image attached"),
    ("What is <image>?", 0, "1 image marker but 0 images attached"),
    ("<image>", 2, "1 image marker but 2 images attached"),
])
def test_marker_count_must_match_the_attached_files(query: str, n: int, message: str) -> None:
    with pytest.raises(MediaMarkerError, match=message):
        place_media(query, [_image() for _ in range(n)], " ")


@pytest.mark.skipif(not LLAMA_MODEL.is_file(), reason=f"LLaMA tokenizer not found at {LLAMA_MODEL}")
def test_minigpt4_spelling_gives_the_demo_prompt_and_one_run_per_image() -> None:
    """``<Img><ImageHere></Img> What is this?`` typed with one image attached: exactly MiniGPT-4's demo prompt (the
    run is not doubled); ``<image>`` typed gives 64 placeholders, not 128 (which failed as "128 placeholder tokens
    vs 64 embeddings")."""
    from lavis.config.load import load_config
    from lavis.config.presets import preset_path

    cfg = load_config(preset_path("minigpt4_llama2"))
    tpl = template_from_config(load_tokenizer(str(LLAMA_MODEL)), cfg)
    engine = types.SimpleNamespace(tpl=tpl)
    plain = encode_prompt([(ChatEngine.make_turn(engine, "What is this?", [_image()]).query, None)], tpl)
    for typed in ("<Img><ImageHere></Img> What is this?", "<ImageHere> What is this?", "<image> What is this?"):
        ids = encode_prompt([(ChatEngine.make_turn(engine, typed, [_image()]).query, None)], tpl)
        assert ids == plain and ids.count(tpl.placeholder_id) == 64
    after = encode_prompt([(ChatEngine.make_turn(engine, "What is this? <image>", [_image()]).query, None)], tpl)
    assert after.count(tpl.placeholder_id) == 64 and after.index(tpl.placeholder_id) > plain.index(
        tpl.placeholder_id)


@pytest.fixture
def interactive(tiny_cfg: Config) -> Interactive:
    tok = load_tokenizer(tiny_cfg.model.llm.tokenizer)
    tpl = template_from_config(tok, tiny_cfg)
    model = MultimodalLM(tiny_cfg.model, tpl.placeholder_id)
    model.init_weights(0)
    engine = ChatEngine(model.eval(), tpl, tiny_cfg.model.vision.image_size, torch.device("cpu"))
    it = Interactive(ChatSession(engine, GenerationSettings(max_new_tokens=2)), 0, 2)
    it.collecting = False
    return it


def test_cli_places_typed_markers_and_lists_attachments(interactive: Interactive, tiny_data: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    img1, img2 = tiny_data / "images/train/000000.jpg", tiny_data / "images/train/000001.jpg"
    interactive.handle(":img")
    assert "nothing attached" in capsys.readouterr().out
    interactive.handle(f":img {img1}")
    interactive.handle(":img")
    out = capsys.readouterr().out
    assert f"attached for the next question: {img1}" in out and not interactive.collecting
    interactive.handle("Compare <image> with <ImageHere>.")
    out = capsys.readouterr().out
    assert "error: 2 image markers but 1 image attached" in out and "assistant:" not in out
    assert not interactive.session.history and len(interactive.session.pending) == 1  # nothing lost; ask again
    interactive.handle(f":img {img2}")
    interactive.handle("Compare <image> with <ImageHere>.")
    assert "assistant:" in capsys.readouterr().out
    turn = interactive.session.history[-1]
    assert turn.query == "Compare <image> with <image>." and turn.media_names == [str(img1), str(img2)]
    assert not interactive.session.pending
    interactive.handle("And now without markers?")  # nothing attached: plain text, as before
    assert interactive.session.history[-1].query == "And now without markers?"


def test_api_answers_400_for_markers_without_images() -> None:
    """The API server: markers typed in the text that the request's images do not match are the client's error."""
    from fastapi.testclient import TestClient

    from lavis.serve.app import ServeOptions, build_app
    from lavis.serve.scheduler import Scheduler

    from .conftest import DEMO_CFG

    engine = ChatEngine.from_files(DEMO_CFG, None, device="cpu")
    app = TestClient(build_app(engine, Scheduler(engine, max_queue=1, max_batch=1), ServeOptions()))
    res = app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "What is <image>?"}]})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["message"].startswith("1 image marker but 0 images attached")


def test_web_chat_warns_and_keeps_question_and_files(tiny_data: Path) -> None:
    from lavis.chat.webui import WebChat

    from .conftest import DEMO_CFG

    web = WebChat(ChatEngine.from_files(DEMO_CFG, None, device="cpu"), max_upload_mb=1,
                  local_dirs=[tiny_data])  # the web UI reads only uploads and --allow-local-files folders
    img = str(tiny_data / "images/train/000000.jpg")
    session, _ = web.on_files([img], None)
    with pytest.warns(UserWarning, match="2 image markers but 1 image attached"):
        *_, (shown, session, box, _) = web.respond("Compare <image> with <image>", session, 4, "greedy", 1.0, 1.0, 1)
    assert box == "Compare <image> with <image>" and [m.name for m in session.pending] == [img]
    assert not session.turns and not shown
    *_, (shown, session, box, _) = web.respond("Is <ImageHere> a circle?", session, 4, "greedy", 1.0, 1.0, 1)
    assert session.turns[0].query == "Is <image> a circle?" and session.pending == [] and box == ""
