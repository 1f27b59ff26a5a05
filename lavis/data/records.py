"""Compact, shared annotation records: byte offsets into the raw JSON / JSONL text, parsed per sample on access.

A Python list of parsed records costs about 2 KB per record in every rank, and grows in every loader worker as
reference counting touches (and so copies) its pages; 558k LLaVA-Pretrain records are over 1 GB per process.
Instead, each annotation file gets one index, built once and then memory-mapped: an ``int64 [n, 4]`` array of
``(first byte, end byte, position, ordinal)`` per record (position: the record's index in a JSON list, or its
1-based line in JSONL; ordinal: its index among the file's records). A record is read by slicing the memory-mapped
annotation file and parsing that one JSON value. Both maps are shared through the page cache by every rank and worker
of a node, so the per-process cost is the page tables of the pages touched.

The index is validated when built: every record is parsed once and converted (``parse_record``), so a malformed
record fails at start-up with the same ``file:index`` / ``file:line`` message as before, and a written index
means the file (same path and content) and format were clean. It lives in ``$LAVIS_RECORD_INDEX_DIR`` (default
``~/.cache/lavis/records``), named after the file's absolute path, format and content: the file's bytes are hashed
(BLAKE2b, in chunks; DATA.md gives the cost) each time it is opened, so an edit of any kind (same size, mtime put
back) gets a new index, and the run says which file it rebuilt; the stale index is deleted. The hash is also the
file's content fingerprint (``RecordStore.digest``) that checkpoints record. Building takes a file lock, so the
ranks of a node build it once (the others wait and map it). A record that no longer decodes (the file was edited
after it was opened) raises :class:`RecordsChangedError` naming the file, the record's ordinal and byte offset.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from lavis.data.formats import read_annotation_text

if TYPE_CHECKING:
    from lavis.data.datasets import Record

INDEX_VERSION = 3
Parse = Callable[[Any, str, int], "Record"]
"""``(raw record, where, index) -> Record`` (``datasets.parse_record`` bound to the dataset's config); ``index`` is the
record's ordinal in the file."""


def index_dir() -> Path:
    return Path(os.environ.get("LAVIS_RECORD_INDEX_DIR") or Path.home() / ".cache" / "lavis" / "records")


def file_digest(path: Path) -> str:
    """BLAKE2b (128 bit) of the file's bytes, read in chunks (memory stays flat for any file size)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def bytes_digest(data: bytes) -> str:
    """The :func:`file_digest` of a file holding ``data``."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class RecordsChangedError(ValueError):
    """A record no longer decodes: its annotation file changed after its index was built."""


class RecordStore(Sequence["Record"]):
    """The records of one annotation file (or, after ``+``, several), indexable and iterable like a list."""

    def __init__(self, path: Path, spans: np.ndarray, parse: Parse, jsonl: bool, digest: str = "") -> None:
        self.path, self.spans, self.parse, self.jsonl = path, spans, parse, jsonl
        self.digest = digest
        """:func:`file_digest` of the file as indexed (its content fingerprint)."""
        self._map: mmap.mmap | None = None

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> list[Record]: ...

    def __getitem__(self, i: int | slice) -> Record | list[Record]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records in {self.path})")
        start, end, pos, ordinal = (int(x) for x in self.spans[i])
        try:
            raw = json.loads(self._bytes()[start:end])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordsChangedError(
                f"{self.path}: record {ordinal} ({'line' if self.jsonl else 'index'} {pos}, bytes {start}-{end}) no "
                f"longer decodes ({e}): the file changed after it was opened; restart to re-read it (its index is "
                "rebuilt)") from e
        return self.parse(raw, f"{self.path}:{pos}", ordinal)

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def _bytes(self) -> mmap.mmap:
        if self._map is None:  # per process: opened on first access (after a loader worker forked or unpickled)
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}

    def __add__(self, other: Sequence[Record]) -> Sequence[Record]:
        return ConcatRecords([self, other])

    def __radd__(self, other: Sequence[Record]) -> Sequence[Record]:
        return self if isinstance(other, list) and not other else ConcatRecords([other, self])


class ConcatRecords(Sequence["Record"]):
    """Several record sequences end to end (the trainer's dataset over ``data.train``; ``+`` of stores builds one)."""

    def __init__(self, parts: list[Sequence[Record]]) -> None:
        self.parts = [p for part in parts for p in (part.parts if isinstance(part, ConcatRecords) else [part])]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][i - int(self.starts[k])]

    def __iter__(self) -> Iterator[Record]:
        for p in self.parts:
            yield from p

    def __add__(self, other: Sequence[Record]) -> Sequence[Record]:
        return ConcatRecords([self, other])

    def __radd__(self, other: Sequence[Record]) -> Sequence[Record]:
        return self if isinstance(other, list) and not other else ConcatRecords([other, self])


def open_records(path: Path, fmt: str, parse: Parse, errors: list[tuple[str, str]] | None = None,
                 key: str = "") -> RecordStore:
    """The records of ``path`` from its index (built and validated on first use, and again whenever the file's
    content changed). With ``errors``, malformed records are appended as ``(where, message)`` and left out (no
    index is written for such a file); without, the first one raises its ``ValueError``. ``key``: what else the
    validation depended on (the dataset's config)."""
    if not path.is_file():
        read_annotation_text(path)  # raises the error naming the file (missing, a directory)
    jsonl = path.suffix == ".jsonl"
    base = hashlib.sha256(f"{path.resolve()}|{fmt}|{INDEX_VERSION}|{key}".encode()).hexdigest()[:24]
    digest = file_digest(path)
    folder = index_dir()
    idx = folder / f"{base}-{digest}.npy"
    if not idx.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{base}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait, then map its file
            if not idx.is_file():
                data = read_annotation_text(path).encode("utf-8")  # the file's own bytes, once known to be UTF-8
                digest = bytes_digest(data)  # what is indexed (the file may have changed since it was hashed)
                idx = folder / f"{base}-{digest}.npy"
                spans, bad = _scan(path, data, jsonl, parse, errors)
                if bad:
                    return RecordStore(path, spans, parse, jsonl, digest)
                tmp = folder / f".{base}.{os.getpid()}.npy"
                np.save(tmp, spans)
                os.replace(tmp, idx)
                _drop_stale_indexes(folder, base, idx, path, len(spans))
    return RecordStore(path, np.load(idx, mmap_mode="r"), parse, jsonl, digest)


def _drop_stale_indexes(folder: Path, base: str, current: Path, path: Path, count: int) -> None:
    """Delete the indexes of the file's earlier contents (a process that maps one keeps its copy) and say so."""
    stale = [p for p in folder.glob(f"{base}-*.npy") if p != current]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        print(f"records index: {path} changed since its index was built; rebuilt it ({count} records)",
              file=sys.stderr, flush=True)


def _scan(path: Path, data: bytes, jsonl: bool, parse: Parse, errors: list[tuple[str, str]] | None
          ) -> tuple[np.ndarray, int]:
    """``(spans [n, 4] of the good records, number of bad ones)`` of ``data`` (the bytes of ``path``); raises on
    the first bad one without ``errors``."""
    # Syntax first (the whole file), then records, so errors come in the order parsing the whole file gives them.
    spans = [(start, end, pos) for start, end, pos, _ in (_jsonl_spans if jsonl else _json_list_spans)(path, data)]
    keep: list[tuple[int, int, int, int]] = []
    bad = 0
    for ordinal, (start, end, pos) in enumerate(spans):
        try:
            parse(json.loads(data[start:end]), f"{path}:{pos}", ordinal)
        except ValueError as e:
            if errors is None:
                raise
            errors.append((f"{path}:{pos}", str(e)))
            bad += 1
            continue
        keep.append((start, end, pos, ordinal))
    return np.array(keep, dtype=np.int64).reshape(-1, 4), bad


def _jsonl_spans(path: Path, data: bytes) -> Iterator[tuple[int, int, int, Any]]:
    start = 0
    for n, line in enumerate(data.split(b"\n"), 1):
        end = start + len(line)
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from e
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason})") from e
            yield start, end, n, value
        start = end + 1


def _json_list_spans(path: Path, data: bytes) -> Iterator[tuple[int, int, int, Any]]:
    """Top-level elements of a JSON list with their byte spans (``json``'s decoder, element by element)."""
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    ascii_only = len(text) == len(data)
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        _raise_like_json_loads(path, text)
    pos = _skip_ws(text, pos + 1)
    byte_pos, char_pos = 0, 0  # running char -> byte offset for non-ASCII files

    def to_bytes(c: int) -> int:
        nonlocal byte_pos, char_pos
        if ascii_only:
            return c
        byte_pos += len(text[char_pos:c].encode("utf-8"))
        char_pos = c
        return byte_pos

    i = 0
    if text.startswith("]", pos):
        _check_trailing(path, text, pos + 1)
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            _raise_like_json_loads(path, text)
        yield to_bytes(pos), to_bytes(end), i, value
        i += 1
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            _check_trailing(path, text, pos + 1)
            return
        else:
            _raise_like_json_loads(path, text)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _check_trailing(path: Path, text: str, pos: int) -> None:
    if _skip_ws(text, pos) != len(text):
        _raise_like_json_loads(path, text)


def _raise_like_json_loads(path: Path, text: str) -> None:
    """The error messages of parsing the whole file at once (``datasets.read_raw``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
    raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
