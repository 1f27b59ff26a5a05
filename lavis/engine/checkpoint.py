"""Checkpoints: DeepSpeed's files plus our metadata, an atomic ``latest``, keep-last-K, resume.

Layout of ``output_dir`` (docs/FORMATS.md section 8)::

    config.yaml  metrics.jsonl  tokenizer.json  latest
    global_step{N}/layer_XX-model_states.pt  (trainable weights of layer XX, DeepSpeed)
                  mp_rank_SS_model_states.pt  (optimizer / scheduler state of stage SS, DeepSpeed)
                  lavis_meta.json             (layer table, partition, model config, tokenizer, step)

Saving order: every rank writes its DeepSpeed files under the new tag (``save_latest=False``), all ranks meet at
a barrier, then rank 0 writes ``lavis_meta.json`` and only then replaces ``latest`` atomically (write a temporary
file, ``os.replace``). A crash at any point leaves ``latest`` naming the previous complete checkpoint. Frozen
weights are not saved: they come from the base weights (or the seeded init) the config names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lavis.pipeline.plan import LayerEntry

META_FILE = "lavis_meta.json"
LATEST_FILE = "latest"
TAG_PREFIX = "global_step"


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


def save(engine: Any, output_dir: Path, step: int, meta: dict[str, Any], keep_last: int,
         protected: set[str] | frozenset[str] = frozenset()) -> Path:
    """Collective: every rank calls it. Returns the tag directory. Rotation keeps the last ``keep_last`` checkpoints
    and every tag in ``protected``."""
    tag = f"{TAG_PREFIX}{step}"
    engine.save_checkpoint(str(output_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    tag_dir = output_dir / tag
    if dist.get_rank() == 0:
        write_atomic(tag_dir / META_FILE, json.dumps({**meta, "step": step, "tag": tag}, indent=1))
        tok = output_dir / meta["tokenizer"]
        if tok.is_file():
            shutil.copy2(tok, tag_dir / tok.name)
        write_atomic(output_dir / LATEST_FILE, tag)
        _prune(output_dir, keep_last, keep={tag, *protected})
    dist.barrier()
    return tag_dir


def _prune(output_dir: Path, keep_last: int, keep: set[str]) -> None:
    for p in tag_dirs(output_dir)[:-keep_last]:
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
