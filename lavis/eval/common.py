"""What every benchmark task shares: a sample to answer, the prompt template, and file-reading helpers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchmarkFileError(ValueError):
    """A benchmark file does not have the layout its task reads; the message names the file, record and key."""


@dataclass
class Sample:
    """One question to ask the model.

    Attributes:
        id: Unique within the benchmark file; the predictions file is keyed by it (resume).
        query: The full text asked (the task's prompt template already applied).
        media: Image paths, or one video path when ``video``.
        video: ``media`` is one video file.
        gold: What the task's scorer needs (answers, label, category ...), copied into the predictions file.
        where: Where the sample is in the benchmark file (file and line / index), for error messages.
    """

    id: str
    query: str
    media: list[str] = field(default_factory=list)
    video: bool = False
    gold: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def check_unique_ids(samples: Sequence[Sample]) -> None:
    """Raise naming the id and both places when two samples share an id (answers and scores are keyed by it: a
    repeated id would count one answer twice and drop another)."""
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        j = seen.setdefault(s.id, i)
        if j != i:
            first, second = (samples[j].where or f"sample #{j + 1}"), (s.where or f"sample #{i + 1}")
            raise BenchmarkFileError(f"id {s.id!r} appears twice: {first} and {second}; every question id must be "
                                     f"unique (answers are keyed by it): fix the benchmark file")


@dataclass(frozen=True)
class Prompt:
    """A task's prompt template (``str.format`` fields named by the task) and its version, both written into the
    summary so that scores from different templates are never compared unknowingly."""

    template: str
    version: str


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the JSON parser keeps the last of two equal keys and drops the first without a word;
    a benchmark keyed by question id (GQA, ScienceQA) would then lose a question."""
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    first_at: dict[str, int] = {}
    for i, (k, _) in enumerate(pairs):
        if first_at.setdefault(k, i) != i:
            raise _DuplicateKey(f"key {k!r} appears twice in one object: entries {first_at[k] + 1} and {i + 1} of "
                                f"{len(pairs)}; every question id must be unique: fix the file")
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except FileNotFoundError as e:
        raise BenchmarkFileError(f"{path}: no such benchmark file") from e
    except _DuplicateKey as e:
        raise BenchmarkFileError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise BenchmarkFileError(f"{path}: not valid JSON ({e})") from e


def index_unique(records: Sequence[Any], key: str, where: str) -> dict[Any, Any]:
    """``{record[key]: record}`` for the records of ``where`` (a file and its list, e.g. ``ann.json annotations``);
    raises naming the value and both indices when two records share it."""
    out: dict[Any, Any] = {}
    first_at: dict[Any, int] = {}
    for i, r in enumerate(records):
        value = need(r, key, f"{where}[{i}]")
        if first_at.setdefault(value, i) != i:
            raise BenchmarkFileError(f"{key} {value!r} appears twice in {where}: [{first_at[value]}] and [{i}]; "
                                     f"each question needs exactly one entry: fix the file")
        out[value] = r
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (blank lines skipped); a bad line raises naming the file and line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise BenchmarkFileError(f"{path}: no such benchmark file") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BenchmarkFileError(f"{path}:{n}: not valid JSON ({e})") from e
    return rows


def need(record: dict[str, Any], key: str, where: str) -> Any:
    """``record[key]`` or a clear error naming where the record is and the missing key."""
    if not isinstance(record, dict) or key not in record:
        has = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise BenchmarkFileError(f"{where}: missing key {key!r} (has {has})")
    return record[key]


def media_path(root: Path | None, name: str, where: str) -> str:
    """``name`` resolved against ``root`` (``--images``); raises if the file is not there."""
    path = Path(name) if root is None else Path(root) / name
    if not path.is_file():
        hint = "" if root is not None else " (pass --images DIR, the directory the benchmark's images are in)"
        raise BenchmarkFileError(f"{where}: media file {path} not found{hint}")
    return str(path)


def fmt(template: str, where: str, **fields: str) -> str:
    try:
        return template.format(**fields)
    except KeyError as e:
        raise BenchmarkFileError(f"prompt template {template!r} uses field {e} this task does not provide "
                                 f"(available: {', '.join(sorted(fields))}); {where}") from e
