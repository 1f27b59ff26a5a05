"""GQA (testdev balanced) from its released questions file, scored by exact match as the official ``eval.py`` does.

The file maps question ids to questions: ``{"<qid>": {"imageId", "question", "answer", "types": {"structural",
"semantic", ...}, ...}}``; images are ``<imageId>.jpg`` under ``--images`` (the release's ``images/``). The official
evaluation counts a prediction right when it equals the gold answer (one lower-case word or phrase); its predictions
file holds the model's short answer, which the common converters (LLaVA's ``convert_gqa_for_eval``, MiniGPT-4's
``eval_vqa.py``) obtain from the reply by stripping it and lower-casing it, LLaVA also dropping a trailing period.
That is the GQA normalisation here: trim, lower-case, drop trailing periods, collapse inner whitespace. Accuracy is
reported overall and per structural and semantic type, as the official script does; its validity, plausibility,
consistency, grounding and distribution metrics need the choices and scene-graph files and are not computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.eval.common import BenchmarkFileError, Prompt, Sample, fmt, media_path, need, read_json

PROMPT = Prompt("{question}\nAnswer the question using a single word or phrase.", "gqa-v1")


def normalize(text: str) -> str:
    """The GQA normalisation of a reply (see the module docstring)."""
    return " ".join(text.strip().lower().rstrip(".").split())


def load(data: Path, images: Path | None, prompt: Prompt) -> list[Sample]:
    doc = read_json(data)
    if not isinstance(doc, dict) or not doc:
        raise BenchmarkFileError(f"{data}: a GQA questions file maps question ids to questions "
                                 f"({{\"<qid>\": {{\"imageId\", \"question\", \"answer\"}}}}); this is not one")
    out = []
    for qid, q in doc.items():
        where = f"{data} question {qid!r}"
        image = media_path(images, f"{need(q, 'imageId', where)}.jpg", where)
        types = q.get("types") or {}
        out.append(Sample(str(qid), fmt(prompt.template, where, question=need(q, "question", where)), [image],
                          gold={"answer": str(need(q, "answer", where)), "structural": types.get("structural", "all"),
                                "semantic": types.get("semantic", "all")}, where=where))
    return out


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``accuracy`` (exact match after :func:`normalize`, in [0, 1]) and per structural / semantic type."""
    right = [normalize(r["prediction"]) == normalize(r["gold"]["answer"]) for r in rows]
    out: dict[str, Any] = {"accuracy": sum(right) / len(right) if right else 0.0, "count": len(right)}
    for kind in ("structural", "semantic"):
        groups: dict[str, list[bool]] = {}
        for r, ok in zip(rows, right, strict=True):
            groups.setdefault(r["gold"].get(kind, "all"), []).append(ok)
        if len(groups) > 1:
            out[f"by_{kind}"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return out
