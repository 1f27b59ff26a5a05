"""Trainer hooks: code that runs beside the training loop (evaluation, measurement) without flags in the loop.

``lavis.engine.trainer.train(cfg, hooks=[...])`` calls each hook's methods on every rank at the same point of the
loop, so a hook may run collectives (``run.engine.eval_batch``) there. Subclass :class:`Hook` and override what you
need; ``run`` is the trainer's :class:`~lavis.engine.trainer.Run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lavis.engine.trainer import Run


class Hook:
    """Something that runs beside the training loop (evaluation, measurement). Every method is called on every
    rank at the same point of the loop, so a hook may run collectives (``engine.eval_batch``) there."""

    def on_start(self, run: Run) -> None:
        """After the model, optimizer, resume and data are ready, before the first step."""

    def before_step(self, run: Run, step: int) -> None:
        """Before optimizer step ``step`` (1-based: the step about to run)."""

    def after_step(self, run: Run, step: int, row: dict[str, Any] | None) -> None:
        """After optimizer step ``step`` (1-based), before its metrics row is logged and its checkpoint saved. ``row``
        is the metrics row on rank 0 (add keys to log them) and None elsewhere."""

    def after_save(self, run: Run, step: int, tag_dir: Path) -> None:
        """After the checkpoint of step ``step`` was written and became ``latest``."""

    def on_end(self, run: Run) -> None:
        """After the last step (not after a failure)."""
