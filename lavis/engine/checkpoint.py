"""Checkpoints: DeepSpeed's files plus our metadata, an atomic ``latest``, keep-last-K, resume.

Layout of ``output_dir`` (docs/FORMATS.md section 8)::

    config.yaml  metrics.jsonl  tokenizer.json  latest
    global_step{N}/layer_XX-model_states.pt  (trainable weights of layer XX, DeepSpeed)
                  mp_rank_SS_model_states.pt  (optimizer / scheduler state of stage SS, DeepSpeed)
                  lavis_meta.json             (layer table, partition, model config, tokenizer, step)

Saving order: every rank writes its DeepSpeed files into a temporary directory ``.saving-global_step{N}``
(``save_latest=False``), all ranks meet at a barrier, then rank 0 writes ``lavis_meta.json`` and ``checksums.json``
(a BLAKE2b digest and the size of every file), fsyncs them all, renames the directory to ``global_step{N}`` and only
then replaces ``latest`` atomically (write a temporary file, ``os.replace``). A save therefore never writes into a
directory that ``latest`` names: when ``global_step{N}`` exists already (a branch abandoned by ``--resume-from`` an
older step), the complete new directory takes its place in one rename (an atomic exchange where the filesystem
supports it). A crash at any point leaves ``latest`` naming a complete checkpoint; the next save removes the partial
temporary directory. A save that fails (a full disk) removes its temporary directory and raises
:class:`CheckpointWriteError` naming the directory and the free space. Frozen weights are not saved: they come from
the base weights (or the seeded init) the config names.

Resume and the converters check every file against ``checksums.json`` (:func:`verify_checksums`) and name a damaged
one; checkpoints written before checksums existed load with a one-line note.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lavis.pipeline.plan import LayerEntry, layers_to_plain
from lavis.weights.torch_file import load_torch_file

if TYPE_CHECKING:
    from deepspeed.runtime.pipe.engine import PipelineEngine

META_FILE = "lavis_meta.json"
LATEST_FILE = "latest"
TAG_PREFIX = "global_step"
CHECKSUM_FILE = "checksums.json"
SAVING_PREFIX = ".saving-"
"""A save in progress: DeepSpeed writes ``.saving-global_stepN``, renamed to ``global_stepN`` once complete."""
REPLACED_PREFIX = ".replaced-"
_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter", "inline_container.cc", "file write failed", "No space left")
"""How torch.save's C++ writer words a failed write (a full disk, a file size limit) in its RuntimeError."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the message names the directory."""


class ChecksumError(ValueError):
    """A checkpoint file differs from what was saved (bit-rot, a partial copy, an edit); the message names it."""


def tag_dirs(output_dir: Path) -> list[Path]:
    """``global_step{N}`` directories of ``output_dir`` (complete or not), oldest first."""
    tags = [p for p in output_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()]
    return sorted(tags, key=lambda p: int(p.name[len(TAG_PREFIX):]))


def read_latest(output_dir: str | Path) -> str | None:
    f = Path(output_dir) / LATEST_FILE
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (Path(output_dir) / tag / META_FILE).is_file():
        raise FileNotFoundError(
            f"{f} names {tag!r} but {Path(output_dir) / tag / META_FILE} is missing: the checkpoint is incomplete"
        )
    return tag


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def table_to_json(table: list[LayerEntry]) -> list[dict[str, Any]]:
    return [{"index": e.index, "kind": e.kind, "prefixes": [list(p) for p in e.prefixes]} for e in table]


def table_from_json(rows: list[dict[str, Any]]) -> list[LayerEntry]:
    return [LayerEntry(r["index"], r["kind"], tuple((a, b) for a, b in r["prefixes"])) for r in rows]


def save(engine: PipelineEngine, output_dir: Path, step: int, meta: dict[str, Any], keep_last: int,
         protected: set[str] | frozenset[str] = frozenset()) -> Path:
    """Collective: every rank calls it. Returns the tag directory. Rotation keeps the last ``keep_last`` checkpoints
    and every tag in ``protected``. See the module docstring for the order of writes."""
    tag = f"{TAG_PREFIX}{step}"
    tmp_dir, tag_dir = output_dir / f"{SAVING_PREFIX}{tag}", output_dir / tag
    rank0 = dist.get_rank() == 0
    if rank0:
        _remove_leftovers(output_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(output_dir), tag=tmp_dir.name, save_latest=False, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError ("iostream error")
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in _WRITE_FAILURES):
            raise
        raise _write_failed(tag_dir, tmp_dir, e) from e
    dist.barrier()
    if rank0:
        try:
            write_atomic(tmp_dir / META_FILE, json.dumps({**meta, "step": step, "tag": tag}, indent=1))
            tok = output_dir / meta["tokenizer"] if meta["tokenizer"] else None  # None: the run keeps a processor
            if tok is not None and tok.is_file():
                shutil.copy2(tok, tmp_dir / tok.name)
            write_checksums(tmp_dir)
        except OSError as e:
            raise _write_failed(tag_dir, tmp_dir, e) from e
        replace_dir(tmp_dir, tag_dir)
        write_atomic(output_dir / LATEST_FILE, tag)
        _prune(output_dir, keep_last, keep={tag, *protected}, step=step)
    dist.barrier()
    return tag_dir


def _remove_leftovers(output_dir: Path) -> None:
    """Temporary directories of saves that were killed (only one run holds the directory: they are stale)."""
    for p in [*output_dir.glob(f"{SAVING_PREFIX}*"), *output_dir.glob(f"{REPLACED_PREFIX}*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _write_failed(tag_dir: Path, tmp_dir: Path, e: BaseException) -> CheckpointWriteError:
    """Remove the partial directory and say what happened in one line (the name, the free space, `latest`)."""
    shutil.rmtree(tmp_dir, ignore_errors=True)
    output_dir = tag_dir.parent
    try:
        free_b = shutil.disk_usage(output_dir).free
        free = f"{free_b / 2**30:.2f} GiB free" if free_b >= 2**30 else f"{free_b / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    latest = output_dir / LATEST_FILE
    kept = latest.read_text().strip() if latest.is_file() else None
    return CheckpointWriteError(
        f"cannot write checkpoint {tag_dir} ({type(e).__name__}: {first}; {free} on {output_dir}): the partial "
        f"directory was removed and `latest` still names {kept or 'no checkpoint'}. Free disk space (or lower "
        "train.checkpoint.keep_last) and run the same command to resume.")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the filesystem cannot exchange
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_dir(new: Path, dst: Path) -> None:
    """Put the complete directory ``new`` at ``dst``. An existing ``dst`` (a checkpoint of an abandoned branch) is
    swapped out in one atomic exchange where the filesystem allows it (else moved aside first) and then deleted:
    ``dst`` never holds a mix of the two."""
    if not dst.exists():
        os.rename(new, dst)
    elif _exchange(new, dst):
        shutil.rmtree(new)  # now the old directory
    else:
        aside = dst.with_name(f"{REPLACED_PREFIX}{dst.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(dst, aside)
        os.rename(new, dst)
        shutil.rmtree(aside)
    _fsync_dir(dst.parent)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(tag_dir: Path) -> None:
    """``checksums.json``: size and BLAKE2b digest of every file of ``tag_dir``; every file (written by any rank of
    this machine) is fsynced first, so a checksum never describes data that a power loss could still drop."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(tag_dir.iterdir()):
        if not p.is_file() or p.name == CHECKSUM_FILE:
            continue
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        files[p.name] = {"size": p.stat().st_size, "blake2b": _digest(p)}
    write_atomic(tag_dir / CHECKSUM_FILE, json.dumps({"algorithm": "blake2b-128", "files": files}, indent=1))
    _fsync_dir(tag_dir)


def verify_checksums(tag_dir: str | Path, part: int = 0, parts: int = 1, only: Callable[[str], bool] | None = None
                     ) -> str | None:
    """Check the files of ``tag_dir`` against its ``checksums.json`` (share ``part`` of ``parts``, so that ranks
    split the reading; ``only``: the file names to check, e.g. a converter skips the optimizer state); raises
    :class:`ChecksumError` naming the first damaged or missing file. Returns a one-line note for a checkpoint saved
    before checksums were written (nothing to check), else None."""
    tag_dir = Path(tag_dir)
    manifest_file = tag_dir / CHECKSUM_FILE
    if not manifest_file.is_file():
        return f"NOTE: {tag_dir} has no {CHECKSUM_FILE} (saved by an older version): its files are not verified"
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ChecksumError(f"{manifest_file}: damaged ({type(e).__name__}: {e}); {_older_advice(tag_dir)}") from e
    for name in sorted(n for n in files if only is None or only(n))[part::parts]:
        f, want = tag_dir / name, files[name]
        if not f.is_file():
            problem = "is missing"
        elif f.stat().st_size != want["size"]:
            problem = f"has {f.stat().st_size} bytes, {want['size']} were saved (truncated or replaced)"
        elif _digest(f) != want["blake2b"]:
            problem = "does not match its checksum (damaged on disk or in a copy)"
        else:
            continue
        raise ChecksumError(f"{f} {problem} ({manifest_file}); {_older_advice(tag_dir)}")
    return None


def _older_advice(tag_dir: Path) -> str:
    older = [p.name for p in tag_dirs(tag_dir.parent) if p.name != tag_dir.name and (p / META_FILE).is_file()]
    return ("the checkpoint is damaged: restore the file from a backup, or use an older checkpoint (train with "
            f"--resume-from global_stepK, or convert that directory; complete ones here: {', '.join(older) or 'none'})")


def _prune(output_dir: Path, keep_last: int, keep: set[str], step: int) -> None:
    """Keep the last ``keep_last`` checkpoints up to ``step``. Newer tags (a branch abandoned by ``--resume-from`` an
    older step) are not counted and left alone until this run replaces them, so they never crowd out its own."""
    history = [p for p in tag_dirs(output_dir) if int(p.name[len(TAG_PREFIX):]) <= step]
    for p in history[:-keep_last]:
        if p.name not in keep:
            shutil.rmtree(p)


def load_meta(tag_dir: str | Path) -> dict[str, Any]:
    f = Path(tag_dir) / META_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: not a checkpoint written by train_pipeline.py")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e}); the checkpoint is damaged: use another global_stepN") from e
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{f}: not our checkpoint metadata (no `config`); use another global_stepN")
    return meta


def resolve_tag_dir(ckpt_dir: str | Path) -> Path:
    """``ckpt_dir`` may be a run directory (its ``latest`` is used) or one ``global_step*`` directory."""
    d = Path(ckpt_dir)
    if (d / META_FILE).is_file():
        return d
    tag = read_latest(d)
    if tag is None:
        raise FileNotFoundError(f"{d} is neither a checkpoint directory ({META_FILE}) nor a run directory (latest)")
    return d / tag


def read_meta(tag_dir: Path) -> dict:
    """``lavis_meta.json`` (``checkpoint.load_meta`` names the file when it is damaged) with the keys converters
    read."""
    meta = load_meta(tag_dir)
    missing = [k for k in ("layers", "config", "placeholder_id") if k not in meta]
    if missing:
        raise ValueError(f"{tag_dir / META_FILE}: missing {missing}; not a checkpoint written by train_pipeline.py")
    return meta


def load_plain_state(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights of a checkpoint under plain-model names (every layer file, checked against
    ``checksums.json``) and its metadata: what the converters and chat read from a run."""
    meta = read_meta(tag_dir)
    note = verify_checksums(tag_dir, only=lambda name: name == META_FILE or name.startswith("layer_"))  # the files read
    if note:
        print(note, file=sys.stderr)
    table = table_from_json(meta["layers"])
    states = {}
    for entry in table:
        f = tag_dir / f"layer_{entry.index:02d}-model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: the checkpoint in {tag_dir} is incomplete")
        states[entry.index] = load_torch_file(f, "layer file")
    return layers_to_plain(table, states), meta
