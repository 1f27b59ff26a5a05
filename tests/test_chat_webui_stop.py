"""Web UI callbacks with two browser sessions over one engine: each session's stop button ends only its own answer;
refused uploads in the upload folder are deleted. Runs the demo architecture randomly initialised (no training)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest

from lavis.chat.engine import ChatEngine, GenerationSettings
from lavis.chat.webui import Session, WebChat

from .conftest import DEMO_CFG

LONG = 60  # tokens: the random model never ends on its own before that


@pytest.fixture(scope="module")
def web() -> WebChat:
    return WebChat(ChatEngine.from_files(DEMO_CFG, None, device="cpu"))


def test_stop_in_one_session_leaves_the_other_running(web: WebChat) -> None:
    a, b = Session(), Session()
    knobs = (LONG, "greedy", 1.0, 1.0, 3)
    full = web.engine.generate([web.engine.make_turn("Describe it.", [])], GenerationSettings(max_new_tokens=LONG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request
        stream_a = web.respond("Describe it.", a, *knobs)
        next(stream_a)  # a's question shown
        next(stream_a)  # a's first piece: a is generating now
        web.stop(b)  # b's stop button while a generates: a goes on
        b_done = threading.Event()
        b_thread = threading.Thread(target=lambda: (list(web.respond("Describe it.", b, *knobs)), b_done.set()))
        b_thread.start()  # b waits for the model while a generates
        *_, (shown_a, a, _, _) = stream_a
        assert not a.turns[0].stopped and a.turns[0].answer == full.text and shown_a[-1]["content"] == full.text

        stream_a = web.regenerate(a, *knobs)
        b_thread.join(timeout=600)
        assert b_done.is_set() and not b.turns[0].stopped and b.turns[0].answer == full.text
        next(stream_a)  # a's first regenerated piece
        web.stop(a)  # a's own stop: a ends early, b is untouched
        *_, (shown_a, a, _) = stream_a
    assert a.turns[0].stopped and len(a.turns[0].answer) < len(full.text)
    assert shown_a[-1]["content"].endswith(" [stopped]") and b.turns[0].answer == full.text


def test_refused_uploads_are_deleted_only_in_the_upload_folder(web: WebChat, tmp_path: Path) -> None:
    uploads, mine = tmp_path / "uploads", tmp_path / "mine"
    uploads.mkdir()
    mine.mkdir()
    chat = WebChat(web.engine, upload_dir=uploads)
    refused, kept = uploads / "notes.png", mine / "notes.png"
    for f in (refused, kept):
        f.write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chat.on_files([str(refused), str(kept)], None)
    assert not refused.exists() and kept.exists()


def test_stop_while_the_question_waits_behind_another_session_ends_it(web: WebChat) -> None:
    """b's question is sent (its stop token reserved, as the send button does before the question queues) while a
    generates; b presses stop before its question reached the model: it never runs, and a is untouched."""
    a, b = Session(), Session()
    knobs = (LONG, "greedy", 1.0, 1.0, 3)
    full = web.engine.generate([web.engine.make_turn("Describe it.", [])], GenerationSettings(max_new_tokens=LONG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request
        stream_a = web.respond("Describe it.", a, *knobs)
        next(stream_a)
        next(stream_a)  # a is generating
        b = web.reserve(b)  # b sent its question: it waits in the queue
        web.stop(b)
        *_, (shown_b, b, _, _) = web.respond("Describe it.", b, *knobs)  # its turn comes
        *_, (shown_a, a, _, _) = stream_a
    assert b.turns[0].stopped and b.turns[0].answer == "" and shown_b[-1]["content"].endswith("[stopped]")
    assert not a.turns[0].stopped and a.turns[0].answer == full.text
    assert web.waiting == {} and web.stops == {}
