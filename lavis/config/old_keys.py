"""The flat ``train`` keys of earlier versions, still read: ``train.lr`` is ``train.optim.lr`` now, and so on.

``train`` is split into sections (``schema.TRAIN_SECTIONS``: optim, batch, parallel, checkpoint, log). A recipe,
an ``--options`` item or a saved run (``config.yaml``, ``lavis_meta.json``) that names a key by its old flat name
is read as the new key; a recipe or ``--options`` item gets one warning line naming the new keys (stored run
configs are upgraded quietly: old run directories resume and convert as before). Keys that were validated but never
read are gone: naming one is a warning that it has no effect, not an error, so old recipes still run.

The old names are derived from the schema (every field of a section was a flat key of ``train``), never listed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from lavis.config.schema import TRAIN_SECTIONS

OLD_TRAIN_KEYS: dict[str, str] = {f.name: section for section, cls in TRAIN_SECTIONS.items()
                                  for f in dataclasses.fields(cls)}
"""Old flat name under ``train`` -> the section that holds it now."""
REMOVED_TRAIN_KEYS: dict[str, str] = {
    "log_every": "metrics are logged at every step",
}
"""Keys that were validated but never read -> why naming them changes nothing."""

_warned: set[str] = set()


def new_train_key(key: str) -> str | None:
    """``train.<old>`` -> ``train.<section>.<old>`` for a moved key; None for any other key."""
    head, _, rest = key.partition(".")
    name, dot, tail = rest.partition(".")
    if head != "train" or name not in OLD_TRAIN_KEYS:
        return None
    return f"train.{OLD_TRAIN_KEYS[name]}.{name}{dot}{tail}"


def removed_train_key(key: str) -> str | None:
    """Why ``key`` has no effect, when it is a removed ``train`` key; else None."""
    head, _, name = key.partition(".")
    return REMOVED_TRAIN_KEYS.get(name.split(".")[0]) if head == "train" else None


def upgrade_train_keys(data: Any) -> tuple[Any, list[str], list[str]]:
    """A config tree (plain dict, ``train`` at its top) with old flat ``train`` keys moved into their sections and
    removed keys dropped; returns (tree, moved old keys, removed old keys). Pure: ``data`` is not changed. A key given
    both ways (``lr`` and ``optim.lr``) is a ``ValueError`` naming both."""
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict):
        return data, [], []
    out: dict[str, Any] = {}
    moved, removed = [], []
    for key, value in train.items():
        section = OLD_TRAIN_KEYS.get(key)
        if key in REMOVED_TRAIN_KEYS:
            removed.append(f"train.{key}")
        elif section is None:  # a run-level key or a section (merged with the old keys moved into it)
            both = key in TRAIN_SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = {**out[key], **value} if both else value
        elif not isinstance(out.setdefault(section, {}), dict):
            return data, [], []  # `train.optim: 3`: not a section; the schema names the error
        elif isinstance(train.get(section), dict) and key in train[section]:
            raise ValueError(f"`train.{key}` (the old name) and `train.{section}.{key}` are both given: keep "
                             f"`train.{section}.{key}`")
        else:
            out[section] = {**out[section], key: value}
            moved.append(f"train.{key}")
    if not moved and not removed:
        return data, [], []
    return {**data, "train": out}, moved, removed


def upgrade_config(data: Any, source: str, *, warn: bool = True) -> Any:
    """:func:`upgrade_train_keys` on one config file's tree; with ``warn``, one warning line for its moved keys and
    one for its removed keys (rank 0 only, once per process)."""
    data, moved, removed = upgrade_train_keys(data)
    if warn and moved:
        pairs = ", ".join(f"{k} -> {new_train_key(k)}" for k in moved)
        warn_once(f"{source}: old flat train keys, read as their new names: {pairs} (rename them; see "
                  "docs/MIGRATING.md)")
    if warn and removed:
        warn_once(f"{source}: {', '.join(removed)} has no effect (removed: "
                  f"{'; '.join(removed_train_key(k) or '' for k in removed)}); delete it")
    return data


def upgrade_option_key(key: str) -> str | None:
    """An ``--options`` key by its new name (warning once when it was old); None for a removed key (warned)."""
    why = removed_train_key(key)
    if why is not None:
        warn_once(f"--options {key}: has no effect (removed: {why}); leave it out")
        return None
    new = new_train_key(key)
    if new is None:
        return key
    warn_once(f"--options {key}: old flat train key, read as {new} (use the new name)")
    return new


def warn_once(line: str) -> None:
    """One ``warning:`` line on stderr, from rank 0 only (every rank loads the config), once per process."""
    if line in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add(line)
    print(f"warning: {line}", file=sys.stderr, flush=True)
