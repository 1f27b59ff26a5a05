"""Browser chat (gradio) over :class:`ChatEngine`: images or a video, streamed answers, history, settings.

The model is loaded once in :func:`main`, never at import. The server binds 127.0.0.1 unless ``--host`` says
otherwise, and a public share link is made only with ``--share``.
"""

from __future__ import annotations

import argparse
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from lavis.chat.engine import ChatEngine
from lavis.data.media import MediaError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
MAX_UPLOAD_BYTES = 200 * 2**20


class WebChat:
    """The UI's callbacks, separate from gradio so they can be called directly."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()  # one generation at a time: the engine holds one conversation

    def attach(self, files: list[str] | None) -> str:
        """Decode uploads into the next question's media; returns a status line (errors are shown, not raised)."""
        notes = []
        for f in files or []:
            path = Path(f)
            if path.stat().st_size > MAX_UPLOAD_BYTES:
                notes.append(f"{path.name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB, skipped")
                continue
            try:
                if path.suffix.lower() in VIDEO_SUFFIXES:
                    self.engine.attach_video(path)
                else:
                    self.engine.attach_image(path)
                notes.append(f"{path.name}: attached")
            except MediaError as e:
                notes.append(f"{path.name}: not usable ({e})")
        return "; ".join(notes) if notes else "no files"

    def respond(
        self, message: str, history: list[dict], files: list[str] | None, max_new_tokens: int, greedy: bool,
        temperature: float, top_p: float,
    ) -> Iterator[tuple[list[dict], str]]:
        status = self.attach(files) if files else ""
        s = self.engine.settings
        s.max_new_tokens, s.do_sample, s.temperature, s.top_p = int(max_new_tokens), not greedy, temperature, top_p
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        pieces: queue.Queue[str | None] = queue.Queue()
        errors: list[Exception] = []

        def run() -> None:
            try:
                with self.lock:
                    self.engine.ask(message, on_text=pieces.put)
            except (ValueError, RuntimeError) as e:  # shown in the chat instead of a stack trace
                errors.append(e)
            finally:
                pieces.put(None)

        threading.Thread(target=run, daemon=True).start()
        while (piece := pieces.get()) is not None:
            history[-1]["content"] += piece
            yield history, status
        if errors:
            history[-1]["content"] = f"[error: {errors[0]}]"
        yield history, status

    def clear(self) -> tuple[list[dict], str]:
        self.engine.clear()
        return [], "cleared"

    def stop(self) -> None:
        self.engine.stop_event.set()


def build_app(chat: WebChat):  # noqa: ANN201 - gradio is imported lazily
    import gradio as gr

    with gr.Blocks(title="mpp-pipe chat") as app:
        gr.Markdown("## Chat over images or a video\nUpload files, ask a question; answers stream as they are generated.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="images or a video", file_count="multiple", type="filepath")
                status = gr.Textbox(label="media status", interactive=False)
                max_new = gr.Slider(1, 1024, value=chat.engine.settings.max_new_tokens, step=1,
                                    label="max new tokens")
                greedy = gr.Checkbox(value=True, label="greedy (off: sample)")
                temperature = gr.Slider(0.05, 2.0, value=1.0, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, label="top-p")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="conversation", height=480)
                msg = gr.Textbox(label="question", placeholder="What is in the image?")
                with gr.Row():
                    send = gr.Button("send", variant="primary")
                    stop = gr.Button("stop")
                    clear = gr.Button("clear")
        inputs = [msg, chatbot, files, max_new, greedy, temperature, top_p]
        send.click(chat.respond, inputs, [chatbot, status]).then(lambda: (None, ""), None, [files, msg])
        msg.submit(chat.respond, inputs, [chatbot, status]).then(lambda: (None, ""), None, [files, msg])
        stop.click(chat.stop, None, None)
        clear.click(chat.clear, None, [chatbot, status])
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Web chat with a trained model.")
    p.add_argument("--cfg-path", required=True, help="the run's config.yaml (or a model recipe)")
    p.add_argument("-c", "--checkpoint-path", help=".pth from pipemodel2pth.py / pipe_proj2pth.py")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask gradio for a public link (off by default)")
    args = p.parse_args(argv)
    engine = ChatEngine.from_files(args.cfg_path, args.checkpoint_path, device="cpu" if args.cpu_only else "auto")
    build_app(WebChat(engine)).queue().launch(server_name=args.host, server_port=args.port, share=args.share)
