"""What a weight file gave the model: loaded / missing / unexpected / ignored (with reason) / shape-mismatched.

Every loader returns one :class:`FileReport` per file it read. Nothing is dropped silently: a key the model does not
want is either ``unexpected`` (an error) or ``ignored`` with a stated reason (an explicit, documented ignore-list).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShapeMismatch:
    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.key}: file {list(self.file_shape)} vs model {list(self.model_shape)} ({mismatch_hint(self)})"


def mismatch_hint(m: ShapeMismatch) -> str:
    """A likely cause, from which dimension differs (e.g. a 13B checkpoint on a 7B model)."""
    f, w = m.file_shape, m.model_shape
    if len(f) != len(w):
        return "different tensor rank: the file is for another architecture"
    diff = [i for i, (a, b) in enumerate(zip(f, w)) if a != b]
    if "embed" in m.key or "wte" in m.key or "lm_head" in m.key:
        if diff == [0]:
            return "vocabulary size differs: another tokenizer / model family, or a resized embedding"
    if "pos_embed" in m.key:
        return "position-embedding length differs: another image size (interpolate) or patch size"
    return ("hidden / intermediate width differs: the file is for another model size "
            "(for example a 13B or 14B checkpoint on a 7B config); check --model-type / model.llm.path")


@dataclass
class FileReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Model keys this file should provide but does not."""
    unexpected: list[str] = field(default_factory=list)
    """File keys that map to nothing in the model and are not on an ignore-list."""
    ignored: dict[str, str] = field(default_factory=dict)
    """File key -> why it is deliberately not loaded."""
    mismatched: list[ShapeMismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Facts worth printing (e.g. 'position embedding interpolated 16x16 -> 32x32')."""

    def unplaced(self, key: str, reason: str | None) -> None:
        """A file key that maps to nothing in the model: ignored with ``reason``, or unexpected when there is none."""
        if reason is not None:
            self.ignored[key] = reason
        else:
            self.unexpected.append(key)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (f"{self.path}: {len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} "
                f"unexpected, {len(self.ignored)} ignored, {len(self.mismatched)} shape-mismatched")

    def format(self, limit: int = 20) -> str:
        lines = [self.summary()]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            for k in keys[:limit]:
                lines.append(f"  {title}: {k}")
            if len(keys) > limit:
                lines.append(f"  ... {len(keys) - limit} more {title}")
        reasons: dict[str, int] = {}
        for reason in self.ignored.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in reasons.items():
            lines.append(f"  ignored {n}: {reason}")
        for m in self.mismatched[:limit]:
            lines.append(f"  shape mismatch: {m.describe()}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise ValueError("weights do not fit the model:\n" + self.format())


WRAPPERS = ("model", "module", "state_dict")
"""Top-level entries that hold the weights: LAVIS / MiniGPT-4 savers (``model``), DeepSpeed (``module``), others."""


def unwrap(obj: Mapping[str, Any], report: FileReport) -> Mapping[str, Any]:
    """The state dict inside a saver's wrapper (noted in ``report``, with the entries not read), else ``obj``."""
    for wrapper in WRAPPERS:
        if isinstance(obj.get(wrapper), Mapping):
            others = sorted(str(k) for k in obj if k != wrapper)
            report.notes.append(f"weights read from the {wrapper!r} entry"
                                + (f"; other top-level entries not read: {', '.join(others)}" if others else ""))
            return obj[wrapper]
    return obj
