"""Scan a dataset before training: every record parses, its files exist and decode, marker and file counts match,
and its token length fits ``max_txt_len``.

    python -m lavis.data.check --cfg-path CFG.yaml [--workers N]
    python -m lavis.data.check --ann FILE --vis-root DIR [--format mpp|llava|...] [--tokenizer REF] [--workers N]

Prints the number of offenders per reason, each offender as ``file:index`` (JSON record index) or ``file:line``
(JSONL line) with its id and the reason, and the token-length percentiles. Exits 1 if any record is bad, 0 if none.
Decoding runs in a thread pool (PIL, decord and PyAV release the GIL while decoding).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from lavis.config.load import load_config
from lavis.config.schema import Config, DataConfig, DatasetConfig, ModelConfig
from lavis.data import media
from lavis.data.conversation import (
    ChatTemplate,
    SampleError,
    TooLongError,
    default_image_placeholder,
    encode_conversation,
    fit_length,
    template_from_config,
)
from lavis.data.datasets import MediaRef, Record, check_text_size, load_record_image, load_records
from lavis.data.formats import FORMATS, TarMember
from lavis.data.templates import TEMPLATES
from lavis.data.tokenizer import load_tokenizer, resolve_tokenizer_ref


@dataclass
class Finding:
    where: str
    id: str
    reason: str
    message: str


@dataclass
class Report:
    findings: list[Finding]
    lengths: list[int]
    num_records: int
    max_txt_len: int

    @property
    def ok(self) -> bool:
        return not self.findings

    def format(self) -> str:
        lines = [f"checked {self.num_records} record(s): {len(self.findings)} bad"]
        if self.findings:
            counts = Counter(f.reason for f in self.findings)
            lines.append("by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            for f in self.findings:
                lines.append(f"  {f.where} (id {f.id}): {f.reason}: {f.message}")
        if self.lengths:
            q = np.percentile(np.array(self.lengths), [50, 90, 95, 99, 100])
            over = sum(n > self.max_txt_len for n in self.lengths)
            lines.append("token length (before truncation): p50 {:.0f}, p90 {:.0f}, p95 {:.0f}, p99 {:.0f}, max {:.0f}"
                         .format(*q) + f"; {over} over max_txt_len={self.max_txt_len}")
        return "\n".join(lines)


def _media_reason(error: media.MediaError, path: MediaRef, kind: str) -> str:
    text = str(error)
    if not (path.shard if isinstance(path, TarMember) else path).exists():
        return "missing_file"
    if "decompression-bomb" in text:
        return "decompression_bomb"
    return f"corrupt_{kind}"


def check_record(r: Record, tpl: ChatTemplate | None, data: DataConfig) -> tuple[list[Finding], int | None]:
    """Findings for one parsed record and its token length (None without a tokenizer)."""
    out: list[Finding] = []
    length = None
    if tpl is not None:
        try:
            check_text_size(r, data.max_txt_len)  # a huge text is reported, never tokenized whole
            enc = encode_conversation(r.conversations, tpl, record_id=r.id, label_mode=data.label_mode)
            length = len(enc.input_ids)
            fit_length(enc, data.max_txt_len, tpl.placeholder_id, r.id, data.length_policy)
        except SampleError as e:
            reason = "too_long" if length is not None or isinstance(e, TooLongError) else "malformed"
            out.append(Finding(r.where, r.id, reason, str(e).removeprefix(f"record {r.id}: ")))
    for p in r.images:
        try:
            load_record_image(p)
        except media.MediaError as e:
            out.append(Finding(r.where, r.id, _media_reason(e, p, "image"), str(e)))
    if r.video is not None:
        try:
            media.load_video_frames(r.video, data.num_video_frames, fps=data.video_fps)
        except media.MediaError as e:
            out.append(Finding(r.where, r.id, _media_reason(e, r.video, "video"), str(e)))
    return out, length


def _structural_reason(message: str) -> str:
    return "marker_count" if "markers but" in message else "malformed"


def check_datasets(datasets: list[DatasetConfig], tpl: ChatTemplate | None, data: DataConfig, *,
                   workers: int = 4, progress: bool = True) -> Report:
    """Check every record of ``datasets``; never raises for a bad record (it becomes a finding)."""
    from tqdm import tqdm

    findings: list[Finding] = []
    records: list[Record] = []
    num = 0
    for ds in datasets:
        errors: list[tuple[str, str]] = []
        recs = load_records(ds, errors, data.allow_outside_root)
        num += len(recs) + len(errors)
        records += recs
        for where, msg in errors:
            rid, text = _split(msg, where)
            findings.append(Finding(where, rid, _structural_reason(text), text))
    lengths: list[int] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda r: check_record(r, tpl, data), records)
        for found, length in tqdm(results, total=len(records), desc="check", unit="rec", disable=not progress,
                                  file=sys.stderr):
            findings += found
            if length is not None:
                lengths.append(length)
    return Report(sorted(findings, key=_sort_key), lengths, num, data.max_txt_len)


def _split(message: str, where: str) -> tuple[str, str]:
    """``(record id, message without the leading "where (id X): ")`` of a load_records error."""
    m = re.match(re.escape(where) + r"(?: \(id (.*?)\))?: (.*)", message, re.DOTALL)
    return (m.group(1) or "?", m.group(2)) if m else ("?", message)


def _sort_key(f: Finding) -> tuple[str, int]:
    file, _, pos = f.where.rpartition(":")
    return (file, int(pos)) if pos.isdigit() else (f.where, 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cfg-path", help="training recipe: checks every dataset of data.train with its settings")
    src.add_argument("--ann", help="one annotation file (JSON list or JSONL)")
    p.add_argument("--vis-root", default="", help="directory the media paths of --ann are relative to")
    p.add_argument("--format", default="canonical", choices=list(FORMATS), help="format of --ann (default canonical)")
    p.add_argument("--tokenizer", help="tokenizer for the length check (default: the recipe's; none: no length check)")
    p.add_argument("--template", default="chatml", choices=list(TEMPLATES), help="chat template (with --ann)")
    p.add_argument("--max-txt-len", type=int, help="token limit (default: the recipe's data.max_txt_len, or 512)")
    p.add_argument("--num-query", type=int, default=32, help="image tokens per image (with --ann; default 32)")
    p.add_argument("--num-video-frames", type=int, help="frames per video (default: the recipe's, or 32)")
    p.add_argument("--image-placeholder", help="placeholder token (with --ann; default: the tokenizer family's, "
                                               "e.g. <|extra_0|> for Qwen v1, <unk> for LLaMA / Vicuna)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cfg_path:
        cfg = load_config(args.cfg_path, args.options)
        if not cfg.data.train:
            raise ValueError(f"{args.cfg_path}: data.train is empty (nothing to check)")
        tok_ref = args.tokenizer or resolve_tokenizer_ref(cfg.model.llm.tokenizer, args.cfg_path)
        tok = load_tokenizer(tok_ref) if tok_ref and tok_ref.lower() != "none" else None
    else:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer and args.tokenizer.lower() != "none" else None
        placeholder = args.image_placeholder or (default_image_placeholder(tok) if tok is not None else None)
        m = ModelConfig()
        m = replace(m, llm=replace(m.llm, template=args.template,
                                   image_placeholder=placeholder or m.llm.image_placeholder),
                    qformer=replace(m.qformer, num_query_tokens=args.num_query))
        datasets = [DatasetConfig(ann_path=args.ann, vis_root=args.vis_root, format=args.format)]
        cfg = Config(model=m, data=DataConfig(train=datasets))
    updates = {}
    if args.max_txt_len is not None:
        updates["max_txt_len"] = args.max_txt_len
    if args.num_video_frames is not None:
        updates["num_video_frames"] = args.num_video_frames
    cfg = replace(cfg, data=replace(cfg.data, **updates))
    data, datasets = cfg.data, list(cfg.data.train)
    tpl = None
    if tok is not None:
        tpl = template_from_config(tok, cfg)
    else:
        print("no tokenizer (--tokenizer): token lengths are not checked", file=sys.stderr)
    report = check_datasets(datasets, tpl, data, workers=args.workers, progress=sys.stderr.isatty())
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
