"""Terminal chat: interactive (as in the predecessors), one-shot and batch modes; one :class:`ChatSession` over
the stateless :class:`ChatEngine`.

Interactive: enter image or video paths one per line, ``:f`` to finish, then chat; answers stream token by token.
``:img PATH`` attaches more media mid-conversation (``:img`` alone lists what is attached); a question may say
where each attached file goes with a marker (``<image>``, ``<ImageHere>`` or ``<Img><ImageHere></Img>``, one per
file), else the files go before it; ``:help`` lists every command. ``:conf key=value`` values are parsed
as Python literals (``ast.literal_eval``) and type-checked, never evaluated.

Ctrl-C while an answer is streaming stops that answer (the partial answer stays in the history, marked
``[stopped]``); a second Ctrl-C during the same answer abandons it at once. Ctrl-C at the prompt discards the line;
pressing it again on an empty prompt (or ``:q``, or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import signal
import sys
from dataclasses import asdict, fields
from pathlib import Path

from lavis.chat.engine import (
    ChatEngine,
    GenerationSettings,
    MediaMarkerError,
    add_model_arguments,
    device_from_args,
    place_media,
    set_seed,
)
from lavis.chat.session import ChatSession
from lavis.config.presets import preset_path
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER
from lavis.data.media import MediaError

HELP = """Commands:
  :help / :h               show this help
  :exit / :quit / :q       leave (also Ctrl-D, or Ctrl-C twice at the prompt)
  :clear / :cl             clear the screen
  :clear-his / :clh        (or :clear-history) forget the conversation (and pending media), then enter image paths again
  :history / :his          show the conversation
  :img [PATH ...]          attach image(s) or a video to the next question; without paths: list what is attached
  :video PATH              attach a video to the next question
  :f                       finish entering paths and chat
  :seed [N]                show or set the random seed (matters when sampling)
  :conf [key=value ...]    show or change generation settings, e.g. :conf do_sample=True temperature=0.7
  :reset-conf              restore the default generation settings
A question may place the attached files: one marker per file (<image>, <ImageHere> or <Img><ImageHere></Img>),
e.g. "Compare <image> with <image>"; without markers they go before the question.
Ctrl-C while an answer streams stops that answer."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with a trained model over images or a video.")
    add_model_arguments(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable): one-shot mode with --query")
    p.add_argument("--video", help="video file: one-shot mode with --query")
    p.add_argument("--query", help="question for one-shot mode; the answer is printed on stdout")
    p.add_argument("--batch", help="JSONL input: {\"id\", \"images\": [...] | \"video\": ..., \"query\"} per line")
    p.add_argument("--out", help="JSONL output of --batch: {\"id\", \"answer\"} per line")
    p.add_argument("-s", "--seed", type=int, default=1234, help="random seed (matters when sampling)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch and not args.out:
        parser.error("--batch needs --out")
    if (args.image or args.video) and not args.query:
        parser.error("--image/--video need --query (or omit them for interactive mode)")
    if args.query and args.batch:
        parser.error("--query (one-shot) and --batch are separate modes; pick one")
    try:
        cfg_path = args.cfg_path or preset_path(args.model_type)
        set_seed(args.seed)
        engine = ChatEngine.from_files(cfg_path, args.checkpoint_path, device=device_from_args(args),
                                       options=args.options, load_8bit=args.load_8bit,
                                       llm_device_map=args.llm_device_map)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = ChatSession(engine, GenerationSettings(max_new_tokens=args.max_new_tokens))
    if args.batch:
        return run_batch(session, Path(args.batch), Path(args.out))
    if args.query:
        try:
            for path in args.image:
                session.attach_image(path)
            if args.video:
                session.attach_video(args.video)
        except MediaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(session.ask(args.query))
        return 0
    return Interactive(session, args.seed, args.max_new_tokens).run()


def check_batch_line(job: object) -> str | None:
    """What is wrong with one parsed ``--batch`` line (None: nothing)."""
    if not isinstance(job, dict) or "id" not in job or not isinstance(job.get("query"), str):
        return "each line needs \"id\" and a string \"query\""
    images = job.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return f"\"images\" must be a list of path strings, got {images!r}"
    if "video" in job and job["video"] is not None and not isinstance(job["video"], str):
        return f"\"video\" must be a path string, got {job['video']!r}"
    return None


def run_batch(session: ChatSession, src: Path, dest: Path) -> int:
    """Answer every line of ``src`` into ``dest``, written line by line: a failing line stops the run with an error
    naming it, and the answers before it stay in ``dest``."""
    from tqdm import tqdm

    try:
        text = src.read_text()
    except OSError as e:
        raise SystemExit(f"error: cannot read --batch file {src}: {e.strerror}") from e
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    jobs = []
    for n, ln in lines:
        try:
            job = json.loads(ln)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{src}:{n}: invalid JSON ({e.msg})") from e
        if (problem := check_batch_line(job)) is not None:
            raise SystemExit(f"{src}:{n}: {problem}")
        jobs.append((n, job))
    with open(dest, "w") as fh:
        for n, job in tqdm(jobs, desc="batch", unit="q", file=sys.stderr, disable=len(jobs) < 2):
            session.clear()
            try:
                for path in job.get("images", []):
                    session.attach_image(path)
                if job.get("video"):
                    session.attach_video(job["video"])
                answer = session.ask(job["query"])
            except (MediaError, ValueError) as e:
                raise SystemExit(f"{src}:{n} (id {job['id']}): {e}; the answers before this line are in {dest}") from e
            fh.write(json.dumps({"id": job["id"], "answer": answer}) + "\n")
            fh.flush()
    print(f"wrote {len(jobs)} answers to {dest}", file=sys.stderr)
    return 0


def parse_conf(items: list[str], settings: GenerationSettings) -> list[str]:
    """Apply ``key=value`` items with literal parsing only; returns error messages (settings untouched on error)."""
    names = {f.name: f.type for f in fields(GenerationSettings)}
    updates, errors = {}, []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            errors.append(f"unknown setting {key!r}; valid: {', '.join(names)}")
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            errors.append(f"{key}: {text!r} is not a literal value (numbers, True/False)")
            continue
        expected = {"int": int, "float": (int, float), "bool": bool}[names[key]]
        if isinstance(value, bool) and names[key] != "bool" or not isinstance(value, expected):
            errors.append(f"{key}: expected {names[key]}, got {value!r}")
            continue
        updates[key] = float(value) if names[key] == "float" else value
    merged = {**asdict(settings), **updates}
    if not errors:
        errors += _check_settings(merged)
    if not errors:
        for k, v in updates.items():
            setattr(settings, k, v)
    return errors


def _check_settings(s: dict) -> list[str]:
    errors = []
    if s["max_new_tokens"] < 1:
        errors.append(f"max_new_tokens must be >= 1, got {s['max_new_tokens']}")
    if s["min_new_tokens"] < 0:
        errors.append(f"min_new_tokens must be >= 0, got {s['min_new_tokens']}")
    if s["num_beams"] < 1:
        errors.append(f"num_beams must be >= 1, got {s['num_beams']}")
    if s["temperature"] <= 0:
        errors.append(f"temperature must be > 0, got {s['temperature']}")
    if not 0 < s["top_p"] <= 1:
        errors.append(f"top_p must be in (0, 1], got {s['top_p']}")
    if s["top_k"] < 0:
        errors.append(f"top_k must be >= 0 (0: off), got {s['top_k']}")
    if s["repetition_penalty"] <= 0:
        errors.append(f"repetition_penalty must be > 0, got {s['repetition_penalty']}")
    return errors


def show_settings(s: GenerationSettings) -> str:
    return "settings: " + " ".join(f"{k}={v}" for k, v in asdict(s).items())


class Interactive:
    """The predecessors' loop: paths until ``:f``, then questions and ``:`` commands."""

    def __init__(self, session: ChatSession, seed: int, max_new_tokens: int) -> None:
        self.session, self.seed, self.max_new_tokens = session, seed, max_new_tokens
        self.collecting = True

    def run(self) -> int:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print("Enter image or video paths one per line, then :f to start chatting. :help lists commands.")
        interrupted = False
        while True:
            try:
                line = input("img> " if self.collecting else "you> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    print()
                    return 0
                print("\n(Ctrl-C again, :q or Ctrl-D to leave)")
                interrupted = True
                continue
            interrupted = False
            if line and self.handle(line) == "quit":
                return 0

    def handle(self, line: str) -> str | None:
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        session = self.session
        if cmd in (":q", ":quit", ":exit"):
            return "quit"
        if cmd in (":h", ":help"):
            print(HELP)
        elif cmd in (":cl", ":clear"):
            print("\033[2J\033[H", end="", flush=True)
        elif cmd in (":clh", ":clear-his", ":clear-history"):
            session.clear()
            self.collecting = True
            print("history cleared. Enter image paths, then :f.")
        elif cmd in (":his", ":history"):
            self.show_history()
        elif cmd == ":f":
            self.collecting = False
            print(f"{len(session.pending)} media attached. Ask away.")
        elif cmd in (":img", ":video"):
            if not rest and cmd == ":img":
                self.show_attached()
                return None
            try:
                paths = shlex.split(rest) if cmd == ":img" else [_unquote(rest)]
            except ValueError as e:
                print(f"error: cannot parse paths ({e}); quote paths with spaces")
                return None
            if not paths or not paths[0]:
                print(f"usage: {cmd} PATH")
            for path in paths:
                self.attach(path, video=True if cmd == ":video" else None)
        elif cmd == ":seed":
            if rest:
                try:
                    self.seed = int(rest)
                except ValueError:
                    print(f"error: not an integer: {rest!r}")
                    return None
                set_seed(self.seed)
            print(f"seed: {self.seed}")
        elif cmd == ":conf":
            errors = parse_conf(rest.split(), session.settings) if rest else []
            for err in errors:
                print(f"error: {err}")
            if errors:
                print("(settings unchanged)")
            print(show_settings(session.settings))
        elif cmd == ":reset-conf":
            session.settings = GenerationSettings(max_new_tokens=self.max_new_tokens)
            print(show_settings(session.settings))
        elif cmd.startswith(":"):
            print(f"unknown command {cmd}; :help lists them")
        elif self.collecting:
            self.attach(_unquote(line), video=None)
        else:
            self.answer(line)
        return None

    def attach(self, path: str, video: bool | None) -> None:
        try:
            m = self.session.engine.load_media(path, video=video)
        except MediaError as e:
            print(f"error: {e}")
            return
        self.session.pending.append(m)
        frames = m.pixels.shape[0]
        print(f"attached {path}" + (f" ({frames} frames)" if frames > 1 or video else ""))

    def answer(self, query: str) -> None:
        session = self.session
        try:
            place_media(query, session.pending, session.engine.tpl.spec.media_sep)
        except MediaMarkerError as e:
            print(f"error: {e}")
            return

        def on_sigint(signum: int, frame: object) -> None:
            if session.stop_event.is_set():  # second Ctrl-C: give up on this answer now
                raise KeyboardInterrupt
            session.stop_event.set()

        print("assistant: ", end="", flush=True)
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            session.ask(query, on_text=lambda s: print(s, end="", flush=True))
            if session.history[-1].stopped:
                print(" [stopped]", end="")
        except KeyboardInterrupt:
            print(" [abandoned; not kept in the history]", end="")
        except (ValueError, RuntimeError) as e:  # e.g. the prompt outgrows the model's context
            print(f"\nerror: {e}", end="")
        finally:
            signal.signal(signal.SIGINT, previous)
            session.stop_event.clear()
        print(flush=True)

    def show_attached(self) -> None:
        pending = self.session.pending
        if pending:
            print(f"attached for the next question: {', '.join(m.name for m in pending)}")
        else:
            print("nothing attached for the next question; :img PATH attaches a file")

    def show_history(self) -> None:
        history = self.session.history
        for i, t in enumerate(history, 1):
            names = f" [{', '.join(t.media_names)}]" if t.media_names else ""
            stopped = " [stopped]" if t.stopped else ""
            query = t.query.replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, "")
            print(f"[{i}] user{names}: {query}\n[{i}] assistant: {t.answer}{stopped}")
        if not history:
            print("(empty)")
        if self.session.pending:
            print(f"(pending for the next question: {', '.join(m.name for m in self.session.pending)})")


def _unquote(path: str) -> str:
    """Drag-and-drop into a terminal often quotes the path."""
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        return path[1:-1]
    return path

