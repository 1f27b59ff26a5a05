"""Convert an annotation file to the canonical JSONL form (DATA.md), for users who prefer to preprocess once.

    python -m lavis.data.convert --format mpp|llava|llava_pretrain|videochatgpt|minigpt4_captions --ann IN.json \
        --out OUT.jsonl [--vis-root DIR]

Each output line is one canonical record ``{"id", "images" | "video", "conversations"}``; media paths are kept as
they are (relative to the same ``vis_root``). Records are validated exactly as training reads them (marker and file
counts, turn order); the first malformed record stops the conversion with its ``file:index`` unless
``--skip-bad`` is given, which leaves such records out and lists them. The output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lavis.config.schema import DatasetConfig, DatasetFormat
from lavis.data.datasets import parse_record
from lavis.data.formats import FORMATS, to_canonical

JSON_FORMATS = [name for name in FORMATS if name != "webdataset"]


def convert(
    ann: Path, fmt: DatasetFormat, out: Path, *, skip_bad: bool = False, vis_root: str = ""
) -> tuple[int, list[str]]:
    """Write ``out``; returns (records written, messages of the records left out)."""
    bad: list[str] = []
    lines: list[str] = []
    ds = DatasetConfig(ann_path=str(ann), vis_root=vis_root, format=fmt)
    for index, (where, raw) in enumerate(FORMATS[fmt].read(str(ann))):
        try:
            parse_record(raw, where, ds, index)  # the same validation as training
            rec = to_canonical(raw, where, index, ds)
        except ValueError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        keep = {"id": rec.get("id", where)}
        if rec.get("images"):
            keep["images"] = rec["images"] if isinstance(rec["images"], list) else [rec["images"]]
        if rec.get("video") is not None:
            keep["video"] = rec["video"]
        keep["conversations"] = rec["conversations"]
        lines.append(json.dumps(keep, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    os.replace(tmp, out)
    return len(lines), bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=JSON_FORMATS, help="format of --ann")
    p.add_argument("--ann", required=True, type=Path, help="input annotation file (JSON list or JSONL)")
    p.add_argument("--out", required=True, type=Path, help="output .jsonl")
    p.add_argument("--vis-root", default="", help="media directory (resolves Video-ChatGPT video ids to files)")
    p.add_argument("--skip-bad", action="store_true", help="leave malformed records out (listed) instead of failing")
    args = p.parse_args(argv)
    if args.out.suffix != ".jsonl":
        p.error(f"--out {args.out} must end in .jsonl")
    n, bad = convert(args.ann, args.format, args.out, skip_bad=args.skip_bad, vis_root=args.vis_root)
    for msg in bad:
        print(f"left out: {msg}", file=sys.stderr)
    print(f"wrote {n} record(s) to {args.out}" + (f"; left out {len(bad)}" if bad else ""))
    return 0


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
