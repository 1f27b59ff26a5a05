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
import os
import shlex
import signal
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lavis.chat.engine import (
    GenerationSettings,
    MediaMarkerError,
    add_model_arguments,
    device_from_args,
    place_media,
    set_seed,
)
from lavis.chat.loading import load_engine
from lavis.chat.session import ChatSession
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
    p.add_argument("--out", help="JSONL output of --batch: {\"id\", \"line\", \"answer\"} per line (never one of "
                                 "the inputs)")
    p.add_argument("--resume", action="store_true",
                   help="--batch: keep the answers already in --out (checked to be this input's) and answer the rest")
    p.add_argument("--skip-bad", action="store_true",
                   help="--batch: report bad lines (number and reason) and answer the others instead of stopping")
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
    if (args.resume or args.skip_bad) and not args.batch:
        parser.error("--resume and --skip-bad belong to --batch")
    if args.batch:
        check_output_not_input(Path(args.out), {"--batch": args.batch, "--cfg-path": args.cfg_path,
                                                "-c": args.checkpoint_path})
    try:
        set_seed(args.seed)
        engine = load_engine(args, device_from_args(args), args.options)
    except (ValueError, OSError) as e:  # an input error (config, checkpoint, model type, device): README says 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    session = ChatSession(engine, GenerationSettings(max_new_tokens=args.max_new_tokens))
    if args.batch:
        return run_batch(session, Path(args.batch), Path(args.out), resume=args.resume, skip_bad=args.skip_bad)
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


def check_batch_line(job: object, dest: Path | None = None) -> str | None:
    """What is wrong with one parsed ``--batch`` line (None: nothing); ``dest``: the output, which no line's media
    may be."""
    if not isinstance(job, dict) or "id" not in job or not isinstance(job.get("query"), str):
        return "each line needs \"id\" and a string \"query\""
    images = job.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return f"\"images\" must be a list of path strings, got {images!r}"
    if "video" in job and job["video"] is not None and not isinstance(job["video"], str):
        return f"\"video\" must be a path string, got {job['video']!r}"
    for path in [*images, *([job["video"]] if job.get("video") else [])]:
        if dest is not None and same_file(Path(path), dest):
            return f"media {path} is the --out file {dest}; answers would overwrite it"
    return None


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path (symlinks followed), or, when both exist, the
    same file on disk (hard links, bind mounts, case-insensitive file systems)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_output_not_input(out: Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output path that is one of the command's inputs (``{flag: path}``), before anything is written."""
    for flag, path in inputs.items():
        if path is not None and same_file(out, Path(path)):
            raise SystemExit(f"error: --out {out} is the {flag} input file {path}: writing the answers would destroy "
                             f"it; choose another --out")


@dataclass
class BatchLine:
    """One non-blank line of a ``--batch`` file: its number, the parsed job, or what is wrong with it."""

    line: int
    job: dict = field(default_factory=dict)
    problem: str | None = None


def read_batch_lines(src: Path, dest: Path) -> list[BatchLine]:
    try:
        text = src.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: cannot read --batch file {src}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --batch file {src} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    out = []
    for n, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            job = json.loads(ln)
        except json.JSONDecodeError as e:
            out.append(BatchLine(n, problem=f"invalid JSON ({e.msg})"))
            continue
        problem = check_batch_line(job, dest)
        out.append(BatchLine(n, job if problem is None else {}, problem))
    return out


def read_answered(dest: Path, src: Path, jobs: dict[int, dict]) -> dict[int, dict]:
    """``--resume``: the rows of ``dest`` by input line number; refuses a file that does not answer ``src``'s lines
    (another input, or a line whose id changed). A last line cut by an interruption is dropped (answered again)."""
    if not dest.is_file():
        return {}
    fix = "use another --out, or run without --resume to start over"
    try:
        lines = dest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SystemExit(f"error: --out {dest} is not UTF-8 text, so not an answers file to resume; {fix}") from None
    done: dict[int, dict] = {}
    for k, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            if k == len(lines):
                continue
            raise SystemExit(f"error: {dest}:{k}: not valid JSON, so not an answers file to resume; {fix}") from None
        if not isinstance(row, dict) or not isinstance(row.get("line"), int) or "id" not in row:
            raise SystemExit(f"error: {dest}:{k}: no \"line\" and \"id\", so not written by --batch; {fix}")
        n = row["line"]
        if n not in jobs or jobs[n].get("id") != row["id"]:
            now = f"id {jobs[n]['id']!r}" if n in jobs else "no question"
            raise SystemExit(f"error: --out {dest} does not belong to --batch {src}: its line {k} answers id "
                             f"{row['id']!r} of line {n}, but {src}:{n} has {now}; {fix}")
        done[n] = row
    return done


def _rewrite(dest: Path, rows: list[dict]) -> None:
    """Replace ``dest`` by ``rows`` atomically (a kill leaves the old file or the new one, never a mix)."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, dest)


def answer_job(session: ChatSession, job: dict) -> str:
    session.clear()
    for path in job.get("images", []):
        session.attach_image(path)
    if job.get("video"):
        session.attach_video(job["video"])
    return session.ask(job["query"])


def run_batch(session: ChatSession, src: Path, dest: Path, resume: bool = False, skip_bad: bool = False) -> int:
    """Answer every line of ``src`` into ``dest`` (``{"id", "line", "answer"}`` per line), each answer appended and
    flushed as it comes.

    Without ``skip_bad`` the first bad line stops the run with an error naming it (lines that are not valid jobs are
    found before any answer; a line whose media fail, when it is reached), and the answers before it stay in
    ``dest``. With ``skip_bad`` a bad line is reported on stderr with its number and reason, the others are answered,
    and a summary lists every skipped line. ``resume`` keeps the answers already in ``dest`` (checked to be this
    input's, by line number and id) and answers only the rest."""
    from tqdm import tqdm

    lines = read_batch_lines(src, dest)
    bad = {b.line: f"{src}:{b.line}: {b.problem}" for b in lines if b.problem is not None}
    if bad and not skip_bad:
        raise SystemExit(f"error: {next(iter(bad.values()))} (--skip-bad answers the other lines)")
    for where in bad.values():
        print(f"skipped {where}", file=sys.stderr)
    jobs = {b.line: b.job for b in lines if b.problem is None}
    done = read_answered(dest, src, jobs) if resume else {}
    if not resume and dest.is_file() and dest.stat().st_size:
        print(f"--out {dest} exists: answering every line again (--resume keeps its answers)", file=sys.stderr)
    _rewrite(dest, [done[n] for n in sorted(done)])  # a fresh file, or the resumed rows without a torn last line
    todo = [(n, job) for n, job in jobs.items() if n not in done]
    answered = 0
    with open(dest, "a", encoding="utf-8") as fh:
        for n, job in tqdm(todo, desc="batch", unit="q", file=sys.stderr, disable=len(todo) < 2):
            try:
                answer = answer_job(session, job)
            except (MediaError, ValueError) as e:
                if not skip_bad:
                    raise SystemExit(f"error: {src}:{n} (id {job['id']}): {e}; the answers before this line are in "
                                     f"{dest} (--resume continues from there, --skip-bad answers the other lines)"
                                     ) from e
                bad[n] = f"{src}:{n} (id {job['id']}): {e}"
                print(f"skipped {bad[n]}", file=sys.stderr)
                continue
            fh.write(json.dumps({"id": job["id"], "line": n, "answer": answer}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            answered += 1
    if resume and done and answered:  # answers of lines fixed since the last run go back into input order
        rows = [json.loads(t) for t in dest.read_text(encoding="utf-8").splitlines() if t.strip()]
        _rewrite(dest, sorted(rows, key=lambda r: r["line"]))
    resumed = f" ({len(done)} kept from the earlier run)" if done else ""
    print(f"wrote {answered + len(done)} answers to {dest}{resumed}", file=sys.stderr)
    if bad:
        listing = "\n".join(f"  {bad[n]}" for n in sorted(bad))
        print(f"skipped {len(bad)} bad line(s) of {src} (fix them and re-run with --resume to answer only those):\n"
              f"{listing}", file=sys.stderr)
    return 0


def parse_conf(items: list[str], settings: GenerationSettings) -> list[str]:
    """Apply ``key=value`` items with literal parsing only; returns error messages (settings untouched on error)."""
    names = {f.name: str(f.type) for f in fields(GenerationSettings)}  # annotations are strings here
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
            place_media(query, session.pending, session.engine.media_sep)
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

