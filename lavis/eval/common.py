"""What every benchmark task shares: a sample to answer, the prompt template, and file-reading helpers."""

from __future__ import annotations

import json
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
    """

    id: str
    query: str
    media: list[str] = field(default_factory=list)
    video: bool = False
    gold: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """A task's prompt template (``str.format`` fields named by the task) and its version, both written into the
    summary so that scores from different templates are never compared unknowingly."""

    template: str
    version: str


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BenchmarkFileError(f"{path}: no such benchmark file") from e
    except json.JSONDecodeError as e:
        raise BenchmarkFileError(f"{path}: not valid JSON ({e})") from e


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
