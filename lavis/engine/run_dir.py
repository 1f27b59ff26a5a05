"""The run directory's rules: one run at a time (a lock), where a run resumes from, and what a resume may change.

- **Lock.** Rank 0 holds an exclusive ``flock`` on ``<output_dir>/.lock`` for the whole run; the file names the
  holder (pid, host, start time). The kernel releases the lock when the process dies, so a lock left by a dead run is
  detected (the file is there, the lock is free), reported with its pid/host, and taken over. A second run on the
  same directory fails at once naming the holder. (``flock`` is per host: on a shared network filesystem, give
  each run its own ``--output-dir``.)
- **Resume point.** ``latest`` names the checkpoint to resume from (``--resume-from global_stepN`` picks another).
  A directory that holds checkpoints but no usable ``latest`` is refused with the list of checkpoints found: the
  trainer never starts from scratch over a run's history.
- **What a resume may change.** :func:`config_changes` compares the checkpoint's saved config with the new one. The
  model (shapes, template, frozen/trainable sets, adapters), the tokenizer, and the keys that fix the data order or
  the optimizer state layout (seed, micro-batch, precision, ZeRO, offload, optimizer) must not change, nor the
  global batch (micro-batch x accumulation x replicas: on another replica count the accumulation is derived,
  :func:`resume_grad_accum`): the resume is refused, listing every difference, before anything is written.
  Everything else (learning rate, warmup, min lr, max_steps, save cadence, data files, logging, the stage and
  replica count, whose optimizer state ``lavis.engine.relayout`` re-maps) takes effect from the resumed step, and
  each change is printed.
- **What the data may change.** A checkpoint records each training dataset's record count and content fingerprint
  (``lavis_meta.json`` ``data``). :func:`data_changes` compares them with the data this run reads: a dataset whose
  file (same path and format) changed in place would change the data order silently, so the resume is refused
  naming it, before anything is written, unless ``train.allow_data_change`` (then a note is printed).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lavis.config.old_keys import upgrade_config
from lavis.data.tokenizer import load_tokenizer
from lavis.engine.checkpoint import LATEST_FILE, META_FILE, TAG_PREFIX, load_meta, tag_dirs
from lavis.predecessors.checkpoints import resume_advice

if TYPE_CHECKING:
    from lavis.data.tokenizer import AnyTokenizer

LOCK_FILE = ".lock"

# Model keys that name where weights are read from, not what the model is: moving files is allowed (with a note).
WEIGHT_PATH_KEYS = frozenset({
    "model.vision.checkpoint", "model.qformer.checkpoint", "model.llm.path", "model.checkpoint", "model.llm.tokenizer",
})
# Train keys that fix the data order or the optimizer state's layout.
FIXED_TRAIN_KEYS = frozenset({
    "train.seed", "train.batch.micro_batch_size", "train.precision", "train.optim.zero_stage",
    "train.optim.offload_optimizer", "train.optim.optimizer",
})
GAS_KEY = "train.batch.grad_accum_steps"
"""Not fixed itself: the global batch (micro-batch x accumulation x replicas) is, and :func:`resume_grad_accum`
derives the accumulation that keeps it on the resuming layout (refusing any other value) before the configs are
compared."""


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message says why and the ways forward (a user error: one
    ``error:`` line, exit status 1)."""


class RunLock:
    """Exclusive lock on ``<output_dir>/.lock``, held by rank 0 for the whole run."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_FILE
        self.fh: Any = None
        self.stale: str | None = None  # the previous holder's description, when its lock was left behind

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise RunDirError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to end, stop it, or pass "
                f"another --output-dir") from None
        fh.seek(0)
        previous = fh.read().strip()
        if previous:
            self.stale = previous
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is None:
            return
        self.path.unlink(missing_ok=True)  # a clean exit leaves no lock file; a crash leaves one (reported later)
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()
        self.fh = None


def list_checkpoints(output_dir: Path) -> list[str]:
    """Complete checkpoints (with our metadata) in step order."""
    tags = tag_dirs(output_dir)
    return [p.name for p in tags if (p / META_FILE).is_file()]


def find_resume_tag(output_dir: Path, *, require: bool, resume_from: str | None) -> str | None:
    """The checkpoint tag this run resumes from, or None for a fresh start; refuses to start over a run's history."""
    refuse_predecessor_dir(output_dir, resume_from)
    if resume_from is not None:
        tag = Path(resume_from).name
        if not (output_dir / tag / META_FILE).is_file():
            found = list_checkpoints(output_dir)
            raise RunDirError(f"--resume-from {resume_from}: {output_dir / tag / META_FILE} not found; complete "
                              f"checkpoints in {output_dir}: {', '.join(found) or 'none'}")
        return tag
    latest = output_dir / LATEST_FILE
    found = list_checkpoints(output_dir)
    if latest.is_file():
        tag = latest.read_text().strip()
        if (output_dir / tag / META_FILE).is_file():
            return tag
        problem = f"{latest} names {tag!r}, which is not a complete checkpoint ({output_dir / tag / META_FILE} missing)"
    elif found:
        problem = f"{output_dir} holds checkpoints but no `latest` file"
    elif require:
        raise RunDirError(f"--resume: no checkpoint in {output_dir} (no `latest` file and no {TAG_PREFIX}N directory)")
    else:
        return None
    newest = found[-1] if found else f"{TAG_PREFIX}N"
    raise RunDirError(
        f"{problem}. Checkpoints found: {', '.join(found) or 'none'}. Nothing was changed. To continue, pass "
        f"--resume-from {newest} (or another one listed); to start a new run, pass another --output-dir.")


def refuse_predecessor_dir(output_dir: Path, resume_from: str | None) -> None:
    """A predecessor's directory (an MPP-Qwen checkpoint directory as the output directory, its ``latest`` or
    ``--resume-from`` tag; a MiniGPT-4 output directory) is refused with the commands to use instead (a user error:
    one line, exit 1)."""
    latest = output_dir / LATEST_FILE
    tags = [resume_from or "", latest.read_text().strip() if latest.is_file() else ""]
    for d in {output_dir, *(output_dir / Path(t).name for t in tags if t)}:
        advice = resume_advice(d, META_FILE) if d.is_dir() else None
        if advice:
            raise ValueError(advice)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


@dataclass
class ConfigChanges:
    refused: list[str]
    """Differences a resume cannot accept, one line each."""
    applied: list[str]
    """Differences that take effect from the resumed step, one line each."""


def config_changes(saved: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> ConfigChanges:
    """Compare the checkpoint's config (``lavis_meta.json`` ``config``) with this run's, key by key (pure). A key the
    checkpoint's config lacks (written by an older version) counts as its default value (``defaults``)."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    for key, value in _flatten(defaults).items():
        nested = any(k.startswith(key + ".") or key.startswith(k + ".") for k in old_flat)
        if key not in old_flat and not nested:  # a section the saved config has in another shape is not absent
            old_flat[key] = value
    refused, applied = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key == "model.llm.tokenizer":  # the saved config names the run's own copy; compared by content instead
            continue
        a, b = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if a == b:
            continue
        line = f"{key}: {a!r} -> {b!r}"
        if key in WEIGHT_PATH_KEYS:
            applied.append(f"{line} (weights read from a new path: they must be the same weights)")
        elif key == GAS_KEY:
            applied.append(f"{line} (derived: the same global batch on another number of replicas)")
        elif key.startswith("model.") or key in FIXED_TRAIN_KEYS:
            refused.append(line)
        else:
            applied.append(line)
    return ConfigChanges(refused, applied)


def check_resume_config(tag_dir: Path, new_config: dict[str, Any], defaults: dict[str, Any]
                        ) -> tuple[dict[str, Any], list[str]]:
    """Read the checkpoint's metadata; refuse a resume that changes what cannot change. Returns (meta, changes)."""
    meta = load_meta(tag_dir)
    saved = upgrade_config(meta["config"], str(tag_dir), warn=False)  # a run saved with the old flat train keys
    changes = config_changes(saved, new_config, defaults)
    if changes.refused:
        raise RunDirError(
            f"cannot resume from {tag_dir} with this config: it changes what a checkpoint fixes (the model, the data "
            f"order or the optimizer state layout):\n  " + "\n  ".join(changes.refused)
            + "\nNothing was written. Use the checkpoint's config (" + str(tag_dir.parent / "config.yaml")
            + "), or start a new run with another --output-dir.")
    return meta, changes.applied


def resume_grad_accum(saved_batch: dict[str, Any], saved_dp: int, micro_batch_size: int, grad_accum_steps: int,
                      dp: int, tag_dir: Path) -> int:
    """The gradient accumulation a resume on ``dp`` replicas uses: the one that keeps the checkpoint's global batch
    (``saved_batch``: its config's ``train.batch`` section, written on ``saved_dp`` replicas), so that every step sees
    the same samples as on the old layout. The config may name the checkpoint's accumulation (it is then replaced) or
    the derived one; anything else, or a global batch that ``dp`` replicas cannot split, is refused (one line)."""
    m0, gas0 = int(saved_batch["micro_batch_size"]), int(saved_batch["grad_accum_steps"])
    total = m0 * gas0 * saved_dp
    if micro_batch_size != m0:
        return grad_accum_steps  # a changed micro-batch is refused with the other fixed keys (config_changes)
    derived, rest = divmod(total, micro_batch_size * dp)
    fixed = (f"the global batch train.batch.micro_batch_size x {GAS_KEY} x replicas is what a checkpoint fixes "
             f"({m0} x {gas0} x {saved_dp} = {total} in {tag_dir})")
    if rest or not derived:
        raise RunDirError(f"cannot resume on {dp} data-parallel replica(s): {fixed}, and {total} samples do not "
                          f"split into micro-batches of {micro_batch_size} on {dp} replicas; use a replica count "
                          f"that divides {total // micro_batch_size}, or start a new run with another --output-dir")
    if grad_accum_steps not in (gas0, derived):
        raise RunDirError(f"cannot resume with {GAS_KEY}={grad_accum_steps} on {dp} replica(s) (a global batch of "
                          f"{micro_batch_size * grad_accum_steps * dp}): {fixed}; leave {GAS_KEY} at {gas0} (it is "
                          f"derived: {derived} on {dp} replica(s)), or start a new run with another --output-dir")
    return derived


ALLOW_DATA_CHANGE = "train.allow_data_change"


def data_changes(saved: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """``(changed, notes)``: one line per dataset whose file (same ``ann_path`` and format as in the checkpoint's
    ``data``) now holds other records, and notes for what cannot be compared (pure)."""
    if saved is None:
        return [], ["the checkpoint records no data fingerprint (written by an older version): the training data "
                    "is not compared"]
    changed, notes = [], []
    for i, now in enumerate(new):
        then = saved[i] if i < len(saved) else None
        if then is None or (then.get("ann_path"), then.get("format")) != (now["ann_path"], now["format"]):
            notes.append(f"data.train.{i} ({now['ann_path']}) was not in the checkpoint's data: not compared")
        elif (then.get("records"), then.get("fingerprint")) != (now["records"], now["fingerprint"]):
            changed.append(f"data.train.{i} ({now['ann_path']}): {then.get('records')} -> {now['records']} records, "
                           f"content fingerprint {str(then.get('fingerprint'))[:12]} -> {now['fingerprint'][:12]}")
    return changed, notes


def check_resume_data(tag_dir: Path, saved: list[dict[str, Any]] | None, new: list[dict[str, Any]],
                      allow: bool) -> list[str]:
    """Refuse a resume whose training data changed in place since ``tag_dir`` (unless ``allow``); returns the
    lines to print."""
    changed, notes = data_changes(saved, new)
    if changed and not allow:
        raise RunDirError(
            f"cannot resume from {tag_dir}: the training data changed since the checkpoint was written, which "
            "changes the data order from the resumed step on:\n  " + "\n  ".join(changed)
            + f"\nNothing was written. Restore the data, or continue on the changed data with --options "
            f"{ALLOW_DATA_CHANGE}=true, or start a new run with another --output-dir.")
    return [f"{line} (continuing: {ALLOW_DATA_CHANGE}=true)" for line in changed] + notes


PROBE_TEXT = "A red circle. What is in the image? 1234 ÄÖü 漢字 <|im_start|> ###Human: [INST] \n\t x"


def tokenizer_fingerprint(tok: AnyTokenizer) -> tuple[int, tuple[int, ...]]:
    """Vocabulary size and the ids of a probe text: differs between any two tokenizers a user could mix up."""
    return tok.vocab_size, tuple(tok.encode(PROBE_TEXT))


def check_tokenizer(saved_file: Path, new_tokenizer: AnyTokenizer) -> None:
    """Refuse a resume whose tokenizer differs from the run's saved copy."""
    if not saved_file.is_file():
        return  # nothing to compare with
    if tokenizer_fingerprint(load_tokenizer(str(saved_file))) != tokenizer_fingerprint(new_tokenizer):
        raise RunDirError(f"cannot resume: this config's tokenizer ({new_tokenizer.source}) differs from the run's "
                          f"({saved_file}); resume with the run's config.yaml or start a new run with another "
                          "--output-dir. Nothing was written.")


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
