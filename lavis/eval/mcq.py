"""Multiple choice: MMBench (TSV, circular evaluation) and ScienceQA-IMG (``problems.json``).

MMBench's circular evaluation asks a question once per rotation of its options (A B C D, then B C D A as A B C D,
...); the question counts as right only if every rotation is answered right. A released TSV that already holds the
rotated copies (``index`` + k * 1,000,000) is used as it is; one that holds each question once gets its rotations
generated here (the summary says which). The letter is read from the reply by :func:`extract_choice`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import re
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.eval.common import BenchmarkFileError, Prompt, Sample, fmt, media_path, need, read_json

PROMPT = Prompt("{hint}{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
                "mcq-v1")
CIRCULAR_OFFSET = 1_000_000
"""MMBench's rotated copies of question ``i`` have indices ``i + k * 1_000_000``."""
LETTERS = string.ascii_uppercase


def extract_choice(reply: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text reply picks, or None.

    In order: the reply is a letter alone ("B", "(B)", "B."); it starts with a letter followed by ``.``, ``)`` or
    ``:``; it says "answer is B" / "Answer: B"; exactly one option's text appears in it; it starts with a letter and
    a space (not "A ", which is usually the article).
    """
    text = reply.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?[.:]?", text)
    if m and m.group(1) in options:
        return m.group(1)
    m = re.match(r"\(?([A-Z])(?:[.:)]|\)\s)", text)
    if m and m.group(1) in options:
        return m.group(1)
    m = re.search(r"answer(?:\s+is)?\s*[:\s]\s*\(?([A-Z])\)?(?![A-Za-z])", text, re.IGNORECASE)
    if m and m.group(1) in options:
        return m.group(1)
    low = text.lower()
    hits = [k for k, v in options.items() if v and v.lower() in low]
    if len(hits) == 1:
        return hits[0]
    m = re.match(r"([B-Z])\s", text)
    if m and m.group(1) in options:
        return m.group(1)
    return None


def options_block(options: dict[str, str]) -> str:
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def rotate(options: dict[str, str], answer: str, k: int) -> tuple[dict[str, str], str]:
    """The options shifted by ``k`` (the text of option k becomes A) and the answer's new letter."""
    keys, texts = list(options), list(options.values())
    n = len(keys)
    new = {keys[i]: texts[(i + k) % n] for i in range(n)}
    return new, keys[(keys.index(answer) - k) % n]


# --- MMBench ---------------------------------------------------------------------------------------------------------
def _cell(row: dict[str, str], key: str) -> str:
    v = (row.get(key) or "").strip()
    return "" if v.lower() == "nan" else v


def _load_mmbench(data: Path, work: Path, prompt: Prompt) -> tuple[list[Sample], bool]:
    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    with open(data, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows:
        raise BenchmarkFileError(f"{data}: no rows")
    for key in ("index", "question", "answer", "image", "A", "B"):
        if key not in rows[0]:
            raise BenchmarkFileError(f"{data}: missing column {key!r} (MMBench TSV columns: index, question, hint, "
                                     f"A, B, C, D, answer, category, image)")
    img_dir = work / "mmbench_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    has_copies = any(int(r["index"]) >= CIRCULAR_OFFSET for r in rows)
    decoded: dict[int, Path] = {}
    out = []
    for n, row in enumerate(rows, 2):
        where = f"{data} line {n} (index {row['index']})"
        index = int(row["index"])
        options = {k: _cell(row, k) for k in LETTERS if _cell(row, k)}
        answer = _cell(row, "answer")
        if answer not in options:
            raise BenchmarkFileError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
        image = _cell(row, "image")
        if not image:
            raise BenchmarkFileError(f"{where}: empty image cell")
        # Rotated copies repeat the original's image or give the index of the row holding it; decode each once.
        if image.isdigit():
            if int(image) not in decoded:
                raise BenchmarkFileError(f"{where}: image cell refers to row index {image}, which has no image "
                                         f"before this row")
            path = decoded[int(image)]
        else:
            path = img_dir / f"{hashlib.sha1(image.encode()).hexdigest()[:16]}.png"
            if not path.is_file():
                try:
                    path.write_bytes(base64.b64decode(image, validate=True))
                except ValueError as e:
                    raise BenchmarkFileError(f"{where}: image cell is not base64 ({e})") from e
        decoded[index] = path
        group = index % CIRCULAR_OFFSET
        rotations = [(index, options, answer)] if has_copies else [
            (group + k * CIRCULAR_OFFSET, *rotate(options, answer, k)) for k in range(len(options))]
        hint = _cell(row, "hint")
        for idx, opts, ans in rotations:
            query = fmt(prompt.template, where, hint=hint + "\n" if hint else "", question=row["question"],
                        options=options_block(opts))
            out.append(Sample(str(idx), query, [str(path)],
                              gold={"answer": ans, "options": opts, "group": str(group),
                                    "category": _cell(row, "category") or "all"}, where=where))
    return out, not has_copies


# --- ScienceQA -------------------------------------------------------------------------------------------------------
def _load_scienceqa(data: Path, images: Path | None, split: str | None, prompt: Prompt) -> list[Sample]:
    doc = read_json(data)
    if not isinstance(doc, dict):
        raise BenchmarkFileError(f"{data}: ScienceQA problems.json maps problem ids to problems")
    out = []
    for pid, p in doc.items():
        where = f"{data} problem {pid}"
        if not p.get("image") or (split is not None and need(p, "split", where) != split):
            continue  # ScienceQA-IMG: the problems with an image (of the asked split)
        choices = need(p, "choices", where)
        options = {LETTERS[i]: str(c) for i, c in enumerate(choices)}
        answer = LETTERS[int(need(p, "answer", where))]
        image = media_path(images, f"{need(p, 'split', where)}/{pid}/{p['image']}", where)
        hint = (p.get("hint") or "").strip()
        query = fmt(prompt.template, where, hint=f"Context: {hint}\n" if hint else "",
                    question=need(p, "question", where), options=options_block(options))
        out.append(Sample(str(pid), query, [image], gold={"answer": answer, "options": options, "group": str(pid),
                                                          "category": p.get("subject") or "all"},
                          where=where))
    if not out:
        raise BenchmarkFileError(f"{data}: no problem with an image{f' in split {split!r}' if split else ''}")
    return out


def load(data: Path, images: Path | None, work: Path, prompt: Prompt, split: str | None = None) -> tuple[
        list[Sample], dict[str, Any]]:
    """Samples and notes for the summary; ``.tsv`` is MMBench, ``.json`` ScienceQA's problems.json."""
    if data.suffix.lower() == ".tsv":
        samples, generated = _load_mmbench(data, work, prompt)
        return samples, {"format": "mmbench", "rotations": "generated here" if generated else "from the file"}
    if data.suffix.lower() == ".json":
        return _load_scienceqa(data, images, split, prompt), {"format": "scienceqa"}
    raise BenchmarkFileError(f"{data}: mcq reads an MMBench .tsv or a ScienceQA problems .json")


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``accuracy``: circular (a group is right only if all its rotations are); ``single_pass_accuracy``: the first
    rotation only; ``unparsed``: replies no letter could be read from; per category circular accuracy."""
    groups: dict[str, list[bool]] = {}
    first: dict[str, bool] = {}
    category: dict[str, str] = {}
    unparsed = 0
    for r in sorted(rows, key=lambda r: int(r["id"]) if r["id"].isdigit() else r["id"]):
        g = r["gold"]
        letter = extract_choice(r["prediction"], g["options"])
        unparsed += letter is None
        ok = letter == g["answer"]
        groups.setdefault(g["group"], []).append(ok)
        first.setdefault(g["group"], ok)
        category[g["group"]] = g["category"]
    passed = {k: all(v) for k, v in groups.items()}
    by_cat: dict[str, list[bool]] = {}
    for k, ok in passed.items():
        by_cat.setdefault(category[k], []).append(ok)
    n = len(passed)
    out: dict[str, Any] = {"accuracy": sum(passed.values()) / n if n else 0.0,
                           "single_pass_accuracy": sum(first.values()) / n if n else 0.0,
                           "questions": n, "count": len(rows), "unparsed": unparsed}
    if len(by_cat) > 1:
        out["by_category"] = {k: sum(v) / len(v) for k, v in sorted(by_cat.items())}
    return out
