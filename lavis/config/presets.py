"""``--model-type NAME``: the model configs shipped in ``lavis/projects/models/NAME.yaml``.

Each is a full recipe (strictly loaded like any other) whose weight paths point into ``cache/ckpt/`` with the
predecessors' layout, so existing users' directories work as they are (WEIGHT.md).
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "projects" / "models"


def model_types() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown --model-type {name!r}; choose one of: {', '.join(model_types()) or '(none)'}")
    return path
