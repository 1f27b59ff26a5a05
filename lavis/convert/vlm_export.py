"""``--hf-out DIR`` for a ``model.vlm`` run: a directory of the same class as the source (Qwen2.5-VL / Qwen3-VL).

``AutoModelForImageTextToText.from_pretrained(DIR)`` loads it: ``config.json`` and safetensors written by transformers'
own ``save_pretrained`` from the trained weights (the checkpoint's trained tensors over the source directory's, which
hold the frozen parts); the source directory's other files (processor, tokenizer, chat template, generation config)
are copied beside them so ``AutoProcessor.from_pretrained(DIR)`` loads too; a run without ``model.vlm.path`` (from
scratch) copies the processor its run directory saved (``RUN/processor``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lavis.engine.vlm_checkpoint import run_vlm_config, trained_layers, trained_model
from lavis.vlm.data import RUN_PROCESSOR_DIR

__all__ = ["WEIGHT_FILES", "export_vlm_hf", "is_vlm_run", "trained_layers"]  # trained_layers: its old home

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
"""Written by ``save_pretrained``; every other file of the source directory is copied."""


def is_vlm_run(meta: dict) -> bool:
    """``lavis_meta.json``'s config has a ``model.vlm`` section."""
    return (meta.get("config", {}).get("model") or {}).get("vlm") is not None


def export_vlm_hf(tag_dir: Path, trained: dict[str, torch.Tensor], meta: dict, out_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out_dir`` (see the module docstring); ``trained``, ``meta``: the checkpoint's
    (``lavis.engine.checkpoint.load_plain_state``)."""
    vlm = run_vlm_config(meta, tag_dir)
    if vlm is None:
        raise ValueError(f"{tag_dir}: not a model.vlm run")
    model = trained_model(vlm, trained, str(tag_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    source = Path(vlm.path) if vlm.path is not None else tag_dir.parent / RUN_PROCESSOR_DIR  # from scratch: the run's
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, out / f.name)
    return out
