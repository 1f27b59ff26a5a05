"""Open-ended video QA (MSVD-QA / MSRVTT-QA / ActivityNet-QA style) from JSON lines, scored by string match.

Scores: ``exact`` (the normalised reply equals the normalised answer; VQA normalisation) and ``contains`` (the
normalised answer occurs in the normalised reply as whole words). The GPT-judged accuracy/score those benchmarks
usually report is NOT reproduced here: it needs a proprietary judge model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.eval.common import Prompt, Sample, fmt, media_path, need, read_jsonl
from lavis.eval.vqa import normalize_answer

PROMPT = Prompt("{question}\nAnswer the question using a single word or phrase.", "video-qa-v1")


def load(data: Path, images: Path | None, prompt: Prompt) -> list[Sample]:
    """One record per line: ``{"id" (or "question_id"), "video", "question", "answer"}``; ``video`` relative to
    ``--images``."""
    out = []
    for i, r in enumerate(read_jsonl(data)):
        where = f"{data} record {i + 1}"
        rid = r.get("id", r.get("question_id", i))
        out.append(Sample(str(rid), fmt(prompt.template, where, question=need(r, "question", where)),
                          [media_path(images, need(r, "video", where), where)], video=True,
                          gold={"answer": str(need(r, "answer", where))}, where=where))
    return out


def contains(reply: str, answer: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(answer)}(?!\S)", reply) is not None if answer else False


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    exact = hit = 0
    for r in rows:
        pred, gold = normalize_answer(r["prediction"]), normalize_answer(r["gold"]["answer"])
        exact += pred == gold
        hit += contains(pred, gold)
    n = len(rows)
    return {"exact": exact / n if n else 0.0, "contains": hit / n if n else 0.0, "count": n,
            "note": "string match only; GPT-judged scores are not reproduced"}
