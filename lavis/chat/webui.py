"""Browser chat (gradio) over :class:`ChatEngine`: images or a video, streamed answers, history, settings.

The model is loaded once in :func:`main`, never at import. The server binds 127.0.0.1 unless ``--host`` says
otherwise; a public share link is made only with ``--share``; no usage analytics are sent.

Each browser session keeps its own conversation and generation settings (:class:`Session` in a ``gr.State``), and
its stop button ends only its own answer; one stateless engine serves all of them, one answer at a time. Uploads are
decoded as soon as they arrive: a file that is not a readable image or video, or is larger than ``--max-upload-mb``,
gets a warning toast and a line in "media status", is left out and deleted. Uploads live in a temporary folder of
the server's own that is removed when it stops. Besides the UI, the endpoint ``/answer`` (one file and a question ->
the answer, no history) serves ``gradio_client``.

Files: the UI reads only files uploaded to it (gradio's upload folder, which gradio itself also enforces for file
inputs) and, with ``--allow-local-files DIR`` (repeatable or a comma list), files under DIR, which the endpoint
``/answer_local`` (a server-side path and a question) then accepts. Any other file name, for example a forged
``FileData`` path, is refused with one message that says nothing about the file (:mod:`lavis.chat.local_files`).

Stop: the stop button ends the session's running answer and every question of that session still waiting for the
model (each question takes its stop token when it is sent, before it queues).
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lavis.chat.engine import (
    VIDEO_SUFFIXES,
    Answer,
    ChatEngine,
    GenerationSettings,
    Media,
    MediaMarkerError,
    Turn,
    add_model_arguments,
    device_from_args,
    set_seed,
)
from lavis.chat.loading import load_engine
from lavis.chat.local_files import add_local_files_argument, admitted, local_dirs
from lavis.data.conversation import IMAGE_MARKER
from lavis.data.media import MediaError

if TYPE_CHECKING:
    import gradio as gr  # imported lazily at run time: the CLI and tests of the callbacks don't need it loaded

MAX_UPLOAD_MB = 200
DECODING = ("greedy", "sample", "beam search")
REFUSED = "refused: the web UI reads only files uploaded to it (or under --allow-local-files)"


@dataclass
class Session:
    """One browser session's conversation: engine turns, media for the next question, and what the chat shows."""

    turns: list[Turn] = field(default_factory=list)
    pending: list[Media] = field(default_factory=list)
    display: list[dict] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    """Names this session's stop token in :attr:`WebChat.stops` (a gr.State value must stay copyable)."""


class WebChat:
    """The UI's callbacks, separate from gradio's layout so they can be called directly."""

    def __init__(self, engine: ChatEngine, max_upload_mb: int = MAX_UPLOAD_MB, max_new_tokens: int = 512,
                 upload_dir: str | Path | None = None, local_dirs: Sequence[Path] = ()) -> None:
        self.engine = engine
        self.max_upload_bytes = max_upload_mb * 2**20
        self.max_new_tokens = max_new_tokens
        self.upload_dir = None if upload_dir is None else Path(upload_dir).resolve()
        """gradio's upload folder (None: gradio's default one); refused files under it are deleted."""
        self.local_dirs = [Path(d).resolve() for d in local_dirs]
        """``--allow-local-files`` folders: readable besides the uploads."""
        self.lock = threading.Lock()  # one generation at a time: one model
        self.stops: dict[str, threading.Event] = {}
        """Session id -> the stop token of the answer that session is generating."""
        self.waiting: dict[str, list[threading.Event]] = {}
        """Session id -> stop tokens of its questions sent but not started (waiting behind other sessions)."""

    # --- uploads -------------------------------------------------------------------------------------------------
    def load_files(self, files: list[str] | None) -> tuple[list[Media], list[str]]:
        """Decode ``files``; returns the usable media and one status line per file (problems named, not raised)."""
        usable, notes = [], []
        for f in files or []:
            path = self.admit(f)
            if path is None:
                notes.append(f"{Path(f).name}: {REFUSED}, left out")
                continue
            size = path.stat().st_size if path.is_file() else 0
            if size > self.max_upload_bytes:
                notes.append(f"{path.name}: {size / 2**20:.0f} MB is over the {self.max_upload_bytes // 2**20} MB "
                             "limit, left out")
                self.discard(path)
                continue
            try:
                m = self.engine.load_media(path)
            except MediaError as e:
                kind = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
                notes.append(f"{path.name}: not a readable {kind}, left out ({str(e).removeprefix(str(path) + ': ')})")
                self.discard(path)
                continue
            usable.append(m)
            frames = f" ({m.pixels.shape[0]} frames)" if m.marker != IMAGE_MARKER else ""
            notes.append(f"{path.name}: attached{frames}")
        return usable, notes

    def admit(self, name: str) -> Path | None:
        """``name`` as a file the UI may read (an upload, or under ``--allow-local-files``), else None."""
        upload_dir = self.upload_dir
        if upload_dir is None:
            from gradio.utils import get_upload_folder

            upload_dir = Path(get_upload_folder()).resolve()
        return admitted(name, [upload_dir, *self.local_dirs])

    def discard(self, path: Path) -> None:
        """Delete a refused upload (only files in the upload folder: never a file the caller owns)."""
        if self.upload_dir is not None and path.resolve().is_relative_to(self.upload_dir):
            path.unlink(missing_ok=True)

    def on_files(self, files: list[str] | None, session: Session | None) -> tuple[Session, str]:
        """The file box changed: its current files become the next question's media."""
        import gradio as gr

        session = session or Session()
        session.pending, notes = self.load_files(files)
        for note in notes:
            if not note.endswith("attached") and "attached (" not in note:
                gr.Warning(note)
        return session, "\n".join(notes)

    # --- chat ----------------------------------------------------------------------------------------------------
    def respond(
        self, message: str, session: Session | None, max_new_tokens: float, decoding: str, temperature: float,
        top_p: float, num_beams: float,
    ) -> Iterator[tuple[list[dict], Session, str, object]]:
        """Answer ``message`` with the uploaded media; the file box empties once its files went with a question."""
        import gradio as gr

        session = session or Session()
        message = (message or "").strip()
        if not message:
            gr.Warning("Type a question first.")
            yield session.display, session, "", gr.skip()
            return
        try:
            turn = self.engine.make_turn(message, session.pending)
        except MediaMarkerError as e:  # typed markers vs uploaded files: say so, keep the question and the files
            gr.Warning(str(e))
            yield session.display, session, message, gr.skip()
            return
        attached, session.pending = session.pending, []
        session.display += [{"role": "user", "content": [*({"path": m.name} for m in attached), message]},
                            {"role": "assistant", "content": ""}]
        settings = self.settings(max_new_tokens, decoding, temperature, top_p, num_beams)
        stream = self._stream(session, [*session.turns, turn], settings)
        while True:
            try:
                yield (*next(stream), None)
            except StopIteration as done:
                result = done.value
                break
        if result is not None:
            turn.answer, turn.stopped = result
            session.turns.append(turn)
        yield session.display, session, "", None

    def regenerate(
        self, session: Session | None, max_new_tokens: float, decoding: str, temperature: float, top_p: float,
        num_beams: float,
    ) -> Iterator[tuple[list[dict], Session, str]]:
        import gradio as gr

        session = session or Session()
        if not session.turns or str(session.display[-1]["content"]).startswith("error: "):
            gr.Warning("Nothing to regenerate: ask a question first (a failed question must be asked again).")
            yield session.display, session, ""
            return
        last = session.turns[-1]
        session.display[-1] = {"role": "assistant", "content": ""}
        settings = self.settings(max_new_tokens, decoding, temperature, top_p, num_beams)
        result = yield from self._stream(session, [*session.turns[:-1], replace(last, answer=None)], settings)
        if result is not None:
            last.answer, last.stopped = result
        yield session.display, session, ""

    def _stream(
        self, session: Session, turns: list[Turn], settings: GenerationSettings
    ) -> Iterator[tuple[list[dict], Session, str]]:
        """Generate in a worker thread, yielding the growing answer; returns (answer, stopped) or None on error."""
        import gradio as gr

        pieces: queue.Queue[str | None] = queue.Queue()
        outcome: list = []
        stop = self.stops[session.id] = self.claim(session)  # a stop pressed before the lock is ours counts too

        def run() -> None:
            try:
                with self.lock:
                    if stop.is_set():  # stopped while it waited: the model is not run for it
                        outcome.append(Answer("", "cancelled", 0, 0))
                    else:
                        outcome.append(self.engine.generate(turns, settings, stop, on_text=pieces.put))
            except (ValueError, RuntimeError) as e:  # shown in the chat instead of a stack trace
                outcome.append(e)
            finally:
                if self.stops.get(session.id) is stop:
                    del self.stops[session.id]
                pieces.put(None)

        threading.Thread(target=run, daemon=True).start()
        shown = ""
        while (piece := pieces.get()) is not None:
            shown += piece
            session.display[-1] = {"role": "assistant", "content": shown}
            yield session.display, session, ""
        result = outcome[0] if outcome else RuntimeError("generation ended without a result")
        if isinstance(result, Exception):
            session.display[-1] = {"role": "assistant", "content": f"error: {result}"}
            gr.Warning(f"error: {result}")
            return None
        session.display[-1] = {"role": "assistant", "content": result.text + (" [stopped]" if result.stopped else "")}
        return result.text, result.stopped

    @staticmethod
    def settings(max_new_tokens: float, decoding: str, temperature: float, top_p: float,
                 num_beams: float) -> GenerationSettings:
        if decoding not in DECODING:
            raise ValueError(f"decoding must be one of {DECODING}, got {decoding!r}")
        return GenerationSettings(
            max_new_tokens=int(max_new_tokens), do_sample=decoding == "sample", temperature=float(temperature),
            top_p=float(top_p), num_beams=int(num_beams) if decoding == "beam search" else 1,
        )

    def reserve(self, session: Session | None) -> Session:
        """A question is sent (before it queues): it gets its stop token now, so a stop pressed while it waits
        behind another session's answer ends it too."""
        session = session or Session()
        self.waiting.setdefault(session.id, []).append(threading.Event())
        return session

    def claim(self, session: Session) -> threading.Event:
        """The stop token of the session's oldest question waiting to start (a fresh one if none was reserved)."""
        waiting = self.waiting.get(session.id)
        stop = waiting.pop(0) if waiting else threading.Event()
        if waiting == []:
            del self.waiting[session.id]
        return stop

    def stop(self, session: Session | None) -> None:
        """The stop button: ends this session's answer and its waiting questions, no other session's."""
        if session is None:
            return
        for stop in [self.stops.get(session.id), *self.waiting.get(session.id, [])]:
            if stop is not None:
                stop.set()

    def clear(self) -> tuple[list[dict], Session, None, str]:
        return [], Session(), None, ""

    def api_answer(self, file: str | None, question: str) -> str:
        """``/answer``: one image or video and a question -> the answer (greedy, no history)."""
        import gradio as gr

        if not file:
            raise gr.Error("send an image or video file")
        media, notes = self.load_files([file])
        if not media:
            raise gr.Error(notes[0].replace(", left out", ""))
        with self.lock:
            try:
                turn = self.engine.make_turn(question, media)
            except MediaMarkerError as e:
                raise gr.Error(str(e)) from None
            return self.engine.generate([turn], GenerationSettings(max_new_tokens=self.max_new_tokens)).text

    def api_answer_local(self, path: str, question: str) -> str:
        """``/answer_local`` (only with ``--allow-local-files``): a file under those folders, named by its path on
        the server, and a question -> the answer."""
        return self.api_answer(path, question)


def build_app(chat: WebChat, max_new_tokens: int = 512) -> gr.Blocks:
    import gradio as gr

    # delete_cache: uploads older than an hour are removed hourly (main() also removes the whole folder on exit)
    with gr.Blocks(title="mpp-pipe chat", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        session = gr.State(None)
        gr.Markdown("## Chat over images or a video\nUpload one or several images or a video, then ask; answers "
                    "stream as they are generated. Files added later join your next question.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="images or a video", file_count="multiple", type="filepath", elem_id="files")
                status = gr.Textbox(label="media status", interactive=False, lines=2, elem_id="status")
                with gr.Accordion("generation settings", open=True):
                    decoding = gr.Radio(list(DECODING), value="greedy", label="decoding")
                    max_new = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (sample)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (sample)")
                    num_beams = gr.Slider(2, 8, value=3, step=1, label="beams (beam search)")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="conversation", height=480, elem_id="chatbot")
                msg = gr.Textbox(label="question", placeholder="What is in the image?", elem_id="question")
                with gr.Row():
                    send = gr.Button("send", variant="primary", elem_id="send")
                    stop = gr.Button("stop", elem_id="stop")
                    regen = gr.Button("regenerate", elem_id="regenerate")
                    clear = gr.Button("clear", elem_id="clear")
        knobs = [max_new, decoding, temperature, top_p, num_beams]
        files.change(chat.on_files, [files, session], [session, status], api_visibility="private")
        # reserve (not queued) gives the question its stop token the moment it is sent; the answer then queues
        for trigger in (send.click, msg.submit):
            trigger(chat.reserve, [session], [session], queue=False, api_visibility="private").then(
                chat.respond, [msg, session, *knobs], [chatbot, session, msg, files], api_visibility="private")
        regen.click(chat.reserve, [session], [session], queue=False, api_visibility="private").then(
            chat.regenerate, [session, *knobs], [chatbot, session, msg], api_visibility="private")
        stop.click(chat.stop, [session], None, queue=False, api_visibility="private")
        clear.click(chat.clear, None, [chatbot, session, files, status], api_visibility="private")
        with gr.Row(visible=False):  # the /answer endpoint's inputs and output
            api_file = gr.File(type="filepath")
            api_question = gr.Textbox()
            api_out = gr.Textbox()
        api_btn = gr.Button(visible=False)
        api_btn.click(chat.api_answer, [api_file, api_question], api_out, api_name="answer")
        if chat.local_dirs:  # a server-side path (a text, not a FileData: gradio reads no file for it)
            local_path = gr.Textbox(visible=False)
            api_btn.click(chat.api_answer_local, [local_path, api_question], api_out, api_name="answer_local")
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Web chat with a trained model (gradio).")
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=512, help="the slider's start value")
    p.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_MB, help="larger uploads are refused")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask gradio for a public link (off by default)")
    add_local_files_argument(p, "through the /answer_local endpoint")
    p.add_argument("-s", "--seed", type=int, default=1234, help="random seed (matters when sampling)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_seed(args.seed)
    try:
        readable = local_dirs(args.allow_local_files)
        engine = load_engine(args, device_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Uploads go to a folder of this server's own (gradio reads GRADIO_TEMP_DIR when imported, below), removed on exit.
    upload_dir = tempfile.mkdtemp(prefix="lavis-webui-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    print(f"uploads are kept in {upload_dir} until the server stops", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        chat = WebChat(engine, args.max_upload_mb, args.max_new_tokens, upload_dir, readable)
        app = build_app(chat, args.max_new_tokens)
        app.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                           max_file_size=f"{args.max_upload_mb}mb", show_error=True)
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through main()'s cleanup
