"""Terminal chat: interactive (as in the predecessors), one-shot and batch modes over :class:`ChatEngine`.

Interactive: enter image paths (or ``:video PATH``) one per line, ``:f`` to finish, then chat; answers stream.
Commands are listed by ``:help``. ``:conf key=value`` values are parsed as literals, never evaluated.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
from dataclasses import fields
from pathlib import Path

import torch

from lavis.chat.engine import ChatEngine, GenerationSettings
from lavis.data.media import MediaError

HELP = """Commands:
  :help / :h               show this help
  :exit / :quit / :q       leave
  :clear / :cl             clear the screen
  :clear-his / :clh        forget the conversation (and pending media)
  :history / :his          show the conversation
  :img PATH [PATH ...]     attach image(s) to the next question
  :video PATH              attach a video to the next question
  :seed [N]                show or set the random seed
  :conf [key=value ...]    show or change generation settings (e.g. :conf max_new_tokens=64 do_sample=True)
  :reset-conf              restore the default generation settings
Ctrl-C stops the current answer."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with a trained model over images or a video.")
    p.add_argument("--cfg-path", required=True, help="the run's config.yaml (or a model recipe)")
    p.add_argument("-c", "--checkpoint-path", help=".pth from pipemodel2pth.py / pipe_proj2pth.py")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable): one-shot mode with --query")
    p.add_argument("--video", help="video file: one-shot mode with --query")
    p.add_argument("--query", help="question for one-shot mode; the answer is printed on stdout")
    p.add_argument("--batch", help="JSONL input: {\"id\", \"images\": [...] | \"video\": ..., \"query\"} per line")
    p.add_argument("--out", help="JSONL output of --batch: {\"id\", \"answer\"} per line")
    p.add_argument("--cpu-only", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("-s", "--seed", type=int, default=1234, help="random seed (sampling only)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch and not args.out:
        build_parser().error("--batch needs --out")
    if (args.image or args.video) and not args.query and not args.batch:
        build_parser().error("--image/--video need --query (or omit them for interactive mode)")
    set_seed(args.seed)
    engine = ChatEngine.from_files(args.cfg_path, args.checkpoint_path, device="cpu" if args.cpu_only else "auto",
                                   options=args.options)
    engine.settings.max_new_tokens = args.max_new_tokens
    if args.batch:
        return run_batch(engine, Path(args.batch), Path(args.out))
    if args.query:
        for path in args.image:
            engine.attach_image(path)
        if args.video:
            engine.attach_video(args.video)
        print(engine.ask(args.query))
        return 0
    return interactive(engine, args.seed)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_batch(engine: ChatEngine, src: Path, dest: Path) -> int:
    from tqdm import tqdm

    lines = [(n, ln) for n, ln in enumerate(src.read_text().splitlines(), 1) if ln.strip()]
    jobs = []
    for n, ln in lines:
        try:
            job = json.loads(ln)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{src}:{n}: invalid JSON ({e.msg})") from e
        if not isinstance(job, dict) or "id" not in job or not isinstance(job.get("query"), str):
            raise SystemExit(f"{src}:{n}: each line needs \"id\" and a string \"query\"")
        jobs.append((n, job))
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "w") as fh:
        for n, job in tqdm(jobs, desc="batch", unit="q", file=sys.stderr, disable=len(jobs) < 2):
            engine.clear()
            try:
                for path in job.get("images", []):
                    engine.attach_image(path)
                if job.get("video"):
                    engine.attach_video(job["video"])
            except MediaError as e:
                raise SystemExit(f"{src}:{n} (id {job['id']}): {e}") from e
            fh.write(json.dumps({"id": job["id"], "answer": engine.ask(job["query"])}) + "\n")
    tmp.replace(dest)
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
        except (ValueError, SyntaxError):
            errors.append(f"{key}: {text!r} is not a literal value (numbers, True/False)")
            continue
        expected = {"int": int, "float": (int, float), "bool": bool}[names[key]]
        if isinstance(value, bool) and names[key] != "bool" or not isinstance(value, expected):
            errors.append(f"{key}: expected {names[key]}, got {value!r}")
            continue
        updates[key] = float(value) if names[key] == "float" else value
    if not errors:
        for k, v in updates.items():
            setattr(settings, k, v)
    return errors


def interactive(engine: ChatEngine, seed: int) -> int:
    print("Enter image paths one per line (or :video PATH), then :f to start chatting. :help for commands.")
    collecting = True
    while True:
        try:
            line = input("img> " if collecting else "you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in (":q", ":quit", ":exit"):
            return 0
        if cmd in (":h", ":help"):
            print(HELP)
        elif cmd in (":cl", ":clear"):
            print("\033[2J\033[H", end="")
        elif cmd in (":clh", ":clear-his"):
            engine.clear()
            collecting = True
            print("history cleared. Enter image paths, then :f.")
        elif cmd in (":his", ":history"):
            for i, t in enumerate(engine.history, 1):
                media = f" [{', '.join(t.media_names)}]" if t.media_names else ""
                print(f"[{i}] user{media}: {t.query}\n[{i}] assistant: {t.answer}")
            if not engine.history:
                print("(empty)")
        elif cmd == ":f":
            collecting = False
            print(f"{len(engine.pending)} media attached. Ask away.")
        elif cmd in (":img", ":video"):
            for path in rest.split() if cmd == ":img" else [rest.strip()]:
                _attach(engine, path, video=cmd == ":video")
        elif cmd == ":seed":
            if rest.strip():
                try:
                    seed = int(rest)
                except ValueError:
                    print(f"not an integer: {rest!r}")
                    continue
                set_seed(seed)
            print(f"seed: {seed}")
        elif cmd == ":conf":
            for err in parse_conf(rest.split(), engine.settings) if rest.strip() else []:
                print(f"error: {err}")
            print(engine.settings)
        elif cmd == ":reset-conf":
            engine.settings = GenerationSettings(max_new_tokens=engine.settings.max_new_tokens)
            print(engine.settings)
        elif cmd.startswith(":"):
            print(f"unknown command {cmd}; :help lists them")
        elif collecting:
            _attach(engine, line, video=Path(line).suffix.lower() in (".mp4", ".avi", ".mkv", ".mov", ".webm"))
        else:
            print("assistant: ", end="", flush=True)
            try:
                engine.ask(line, on_text=lambda s: print(s, end="", flush=True))
            except KeyboardInterrupt:
                engine.stop_event.set()
                print(" [stopped]", end="")
            print()


def _attach(engine: ChatEngine, path: str, video: bool) -> None:
    try:
        engine.attach_video(path) if video else engine.attach_image(path)
        print(f"attached {path}")
    except MediaError as e:
        print(f"error: {e}")
