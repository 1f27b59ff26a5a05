"""Run a benchmark: answer every sample (resuming from the predictions file), score, write the summary.

``<out>/predictions.jsonl`` gets one line per answered sample (``id``, ``query``, ``media``, ``prediction``,
``gold``), appended batch by batch; a run that stops part-way resumes from it and answers only the samples not in it.
It resumes only for the model that wrote it: ``<out>/predictions.identity.json`` (:mod:`lavis.eval.identity`)
records the checkpoint and config (by content) and the generation settings, and a run with another identity is
refused (a new ``--out``, or ``--overwrite`` to start over). A run without an identity (train-time evaluation) never
resumes: it starts the file over.
``<out>/summary.json`` holds the scores with everything needed to reproduce them (prompt template and version,
generation settings, files, checkpoint).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, overload

from lavis.chat.engine import ChatEngine, GenerationSettings
from lavis.eval.common import BenchmarkFileError, Prompt, Sample, check_unique_ids
from lavis.eval.generate import generate_answers
from lavis.eval.identity import identity_path, mismatch, read_identity, write_identity
from lavis.eval.tasks import Source, Task, get_task, load_samples

Generate = Callable[[Sequence[Sample], GenerationSettings, int], list[str]]


def read_predictions(path: Path, samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Rows already answered, by id; refuses a file written for other samples or another prompt."""
    if not path.is_file():
        return {}
    by_id = {s.id: s for s in samples}
    done: dict[str, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a line cut by the interruption: answer that sample again
                continue
            raise BenchmarkFileError(f"{path}:{n}: not valid JSON; delete the file to start over") from None
        s = by_id.get(row.get("id"))
        if s is None:
            raise BenchmarkFileError(f"{path}:{n}: id {row.get('id')!r} is not in this benchmark; use another --out "
                                     f"or delete the file")
        if row.get("query") != s.query:
            raise BenchmarkFileError(f"{path}:{n}: sample {s.id} was asked with another prompt; use another --out "
                                     f"or delete the file")
        done[s.id] = row
    return done


def _rewrite_clean(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _has_rows(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return any(line.strip() for line in fh)


def refuse_foreign_predictions(path: Path, identity: dict[str, Any]) -> None:
    """Raise when ``path`` holds predictions that ``identity`` (checkpoint, config, generation) did not write."""
    if not _has_rows(path):
        return
    recorded = read_identity(path)
    fix = "use a new --out, or --overwrite to start over"
    if not recorded:
        state = "is missing" if recorded is None else "is unreadable"
        raise BenchmarkFileError(f"{path} holds predictions but {identity_path(path).name}, the record of the "
                                 f"checkpoint that wrote them, {state}: they may be another model's answers; {fix}")
    if (diff := mismatch(recorded, identity)) is not None:
        raise BenchmarkFileError(f"{path} was written by another model or settings, refusing to resume from it "
                                 f"({diff}); {fix}")


def start_or_resume(path: Path, identity: dict[str, Any] | None, overwrite: bool) -> None:
    """Make ``path`` safe to resume from: kept only when ``identity`` is given, equal to the recorded one and not
    ``overwrite``; otherwise removed. The identity is recorded before the first prediction is written."""
    if identity is not None and not overwrite:
        refuse_foreign_predictions(path, identity)
    else:
        path.unlink(missing_ok=True)
        identity_path(path).unlink(missing_ok=True)
    if identity is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_identity(path, identity)


def answer_all(
    samples: Sequence[Sample], generate: Generate, settings: GenerationSettings, batch_size: int, path: Path,
    progress: bool = True, identity: dict[str, Any] | None = None, overwrite: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Every sample's row (in order) and how many were generated now (the rest came from ``path``, resumed only
    when written under the same ``identity``; see :func:`start_or_resume`)."""
    check_unique_ids(samples)
    start_or_resume(path, identity, overwrite)
    done = read_predictions(path, samples)
    _rewrite_clean(path, [done[s.id] for s in samples if s.id in done])  # drops a half-written last line
    todo = [s for s in samples if s.id not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="eval", unit="sample", file=sys.stderr,
                   dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as fh:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for s, pred in zip(chunk, generate(chunk, settings, batch_size), strict=True):
                row = {"id": s.id, "query": s.query, "media": s.media, "prediction": pred, "gold": s.gold}
                done[s.id] = row
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [done[s.id] for s in samples], len(todo)


@overload
def full_identity(model: dict[str, Any], settings: GenerationSettings) -> dict[str, Any]: ...
@overload
def full_identity(model: None, settings: GenerationSettings) -> None: ...
@overload
def full_identity(model: dict[str, Any] | None, settings: GenerationSettings) -> dict[str, Any] | None: ...
def full_identity(model: dict[str, Any] | None, settings: GenerationSettings) -> dict[str, Any] | None:
    """The model's identity (:func:`lavis.eval.identity.model_identity`) with the generation settings."""
    return None if model is None else {**model, "generation": asdict(settings)}


def task_settings(task: Task, max_new_tokens: int | None) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens or task.max_new_tokens)


def evaluate(
    task: Task, samples: Sequence[Sample], generate: Generate, out: Path, *, settings: GenerationSettings,
    batch_size: int, prompt: Prompt, meta: dict[str, Any], progress: bool = True,
    identity: dict[str, Any] | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Answer, score and write ``summary.json``; returns the summary. ``identity``: the model's (see
    :func:`answer_all`); without one nothing is resumed."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ident = full_identity(identity, settings)
    rows, generated = answer_all(samples, generate, settings, batch_size, out / "predictions.jsonl", progress,
                                 identity=ident, overwrite=overwrite)
    scores = task.score(rows)
    summary = {
        "task": task.name, "main_metric": task.main_metric(scores), "scores": scores, "samples": len(rows),
        "generated_now": generated, "prompt": {"template": prompt.template, "version": prompt.version},
        "generation": asdict(settings), "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 2),
        **meta, "identity": ident,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The scalar scores as a two-column table, the main metric first."""
    scores = summary["scores"]
    flat: dict[str, Any] = {}
    for k, v in scores.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, dict):
                    flat.update({f"{k}.{k2}.{k3}": v3 for k3, v3 in v2.items()})
                else:
                    flat[f"{k}.{k2}"] = v2
        else:
            flat[k] = v
    main = summary["main_metric"]
    keys = [main] + [k for k in flat if k != main]
    width = max(len(k) for k in keys)
    lines = [f"{summary['task']} ({summary['samples']} samples, prompt {summary['prompt']['version']})"]
    for k in keys:
        v = flat[k]
        lines.append(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def run_task(
    engine: ChatEngine, task_name: str, src: Source, out: Path, *, prompt: str | None = None, batch_size: int = 8,
    limit: int | None = None, max_new_tokens: int | None = None, meta: dict[str, Any] | None = None,
    progress: bool = True, identity: dict[str, Any] | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Everything ``python -m lavis.eval`` does after loading the model: read the benchmark, answer (resuming from
    ``out/predictions.jsonl`` when it was written under the same ``identity``), score, write ``out/summary.json``;
    returns the summary. ``prompt`` replaces the task's template (recorded as version "custom")."""
    task = get_task(task_name)
    tpl = Prompt(prompt, "custom") if prompt else task.prompt
    samples, notes = load_samples(task, src, out, tpl)
    if limit is not None:
        samples = samples[:limit]
    settings = task_settings(task, max_new_tokens)
    info = {"data": str(src.data), "images": None if src.images is None else str(src.images),
            "annotations": None if src.annotations is None else str(src.annotations), "split": src.split,
            "limit": limit, **notes, **(meta or {})}
    return evaluate(task, samples, lambda ss, st, bs: generate_answers(engine, ss, st, bs), out, settings=settings,
                    batch_size=batch_size, prompt=tpl, meta=info, progress=progress, identity=identity,
                    overwrite=overwrite)
