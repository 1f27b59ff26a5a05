"""Which model wrote a predictions file: the checkpoint and the config, fingerprinted by content.

A benchmark run resumes from ``<out>/predictions.jsonl`` only when ``<out>/predictions.identity.json`` records the
same identity as the run asking: the checkpoint's content (size and BLAKE2b hash of the file; every file of it when it
is a directory), the config file's content and ``--options``, and the generation settings. Paths are recorded for the
message but do not decide: the same checkpoint copied elsewhere is the same model; another checkpoint at the same path
is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHUNK = 4 << 20
IDENTITY_KEYS = ("checkpoint", "config", "options", "generation")
"""What must be equal to resume (of a file fingerprint: ``size`` and ``blake2b``; ``path`` and ``stat`` only say
where it was and let an unchanged file skip hashing)."""


def file_fingerprint(path: str | Path, what: str = "file", known: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "size", "blake2b", "stat"}`` of a file, or of a directory's files (relative names and contents,
    sorted); a missing one raises naming ``what`` it is. ``known``: an earlier fingerprint; its hash is reused when
    it names the same file unchanged (same path, size, mtime, ctime, inode and device: an edit, even one that
    restores the mtime, changes the ctime; a replaced file has another inode), so a re-run does not read a large
    checkpoint again."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    resolved = str(path.resolve())
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(path)).encode() + b"\0")
            _hash_into(h, f)
        return {"path": resolved, "size": sum(f.stat().st_size for f in files), "blake2b": h.hexdigest()}
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    if known and known.get("path") == resolved and known.get("stat") == stamp and "blake2b" in known:
        return {"path": resolved, "size": st.st_size, "blake2b": known["blake2b"], "stat": stamp}
    h = hashlib.blake2b(digest_size=16)
    size = _hash_into(h, path)
    return {"path": resolved, "size": size, "blake2b": h.hexdigest(), "stat": stamp}


def _hash_into(h: Any, path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n


def model_identity(cfg_path: str | Path, options: Sequence[str], checkpoint: str | Path | None,
                   known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of the model a run evaluates: checkpoint (None: the config's own weights only), config file and
    ``--options``; ``known``: the identity recorded by an earlier run (hashes of unchanged files are reused). The
    runner adds the generation settings."""
    known = known or {}
    ckpt = None if checkpoint is None else file_fingerprint(checkpoint, "checkpoint (-c / model.checkpoint)",
                                                            known.get("checkpoint"))
    return {"checkpoint": ckpt, "config": file_fingerprint(cfg_path, "config (--cfg-path)", known.get("config")),
            "options": list(options)}


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    def strip(v: Any) -> Any:
        return {k: x for k, x in v.items() if k in ("size", "blake2b")} if isinstance(v, dict) and "blake2b" in v else v

    return {k: strip(identity.get(k)) for k in IDENTITY_KEYS}


def describe(identity: dict[str, Any], key: str) -> str:
    v = identity.get(key)
    if isinstance(v, dict) and "blake2b" in v:
        return f"{v['path']} ({v['size']} bytes, blake2b {v['blake2b'][:12]})"
    return json.dumps(v)


def mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when the two identities are the same model and settings, else what differs, naming both sides."""
    a, b = _comparable(recorded), _comparable(current)
    diffs = [f"{k}: {describe(recorded, k)} there, {describe(current, k)} now" for k in IDENTITY_KEYS if a[k] != b[k]]
    return "; ".join(diffs) or None


def identity_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + ".identity.json")


def read_identity(predictions: Path) -> dict[str, Any] | None:
    path = identity_path(predictions)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_identity(predictions: Path, identity: dict[str, Any]) -> None:
    """Atomically (write aside, then rename), before the first prediction is appended."""
    path = identity_path(predictions)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
