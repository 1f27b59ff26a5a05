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
from torch import nn

from lavis.config.load import from_dict
from lavis.config.schema import Config
from lavis.engine.checkpoint import META_FILE
from lavis.pipeline.plan import layers_to_plain
from lavis.vlm.arch import family_of, read_hf_config
from lavis.vlm.config import VLMConfig
from lavis.vlm.data import RUN_PROCESSOR_DIR
from lavis.vlm.layers import build_layers, layer_table
from lavis.vlm.weights import load_stage

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
"""Written by ``save_pretrained``; every other file of the source directory is copied."""


def is_vlm_run(meta: dict) -> bool:
    """``lavis_meta.json``'s config has a ``model.vlm`` section."""
    return (meta.get("config", {}).get("model") or {}).get("vlm") is not None


def run_vlm_config(meta: dict, tag_dir: Path) -> VLMConfig | None:
    """The run's ``model.vlm`` section (None for a BLIP-2-style run)."""
    return from_dict(Config, meta["config"], source=str(tag_dir / META_FILE)).model.vlm


def in_memory_key(published: str) -> str:
    """The released directories' names -> transformers' module names (``model.visual.*``,
    ``model.language_model.*``)."""
    if published.startswith("visual."):
        return "model." + published
    if published.startswith("model."):
        return "model.language_model." + published[len("model."):]
    return published


def trained_layers(tag_dir: Path, trained: dict[str, torch.Tensor], meta: dict,
                   ) -> tuple[list[nn.Module], list, VLMConfig]:
    """Every layer of the run's model with its weights as trained: the source's tensors, then the checkpoint's
    (``trained``: published names, ``lavis.convert.pipe_to_pth.load_plain_state``)."""
    vlm = run_vlm_config(meta, tag_dir)
    if vlm is None:
        raise ValueError(f"{tag_dir}: not a model.vlm run")
    hf = read_hf_config(vlm)
    layers = build_layers(hf, vlm.vision_blocks_per_layer)
    table = layer_table(hf, vlm.vision_blocks_per_layer)
    load_stage(vlm, hf, table, dict(enumerate(layers)))
    for entry in table:
        state = layers[entry.index].state_dict()
        with torch.no_grad():
            for key, tensor in trained.items():
                local = entry.from_plain(key)
                if local is not None:
                    if local not in state:
                        raise ValueError(f"{tag_dir}: checkpoint tensor {key} fits no weight of layer {entry.index}")
                    state[local].copy_(tensor)
    return layers, table, vlm


def export_vlm_hf(tag_dir: Path, trained: dict[str, torch.Tensor], meta: dict, out_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out_dir`` (see the module docstring); ``trained``, ``meta``: the checkpoint's, as
    :func:`trained_layers` takes them."""
    layers, table, vlm = trained_layers(tag_dir, trained, meta)
    hf = read_hf_config(vlm)
    state = layers_to_plain(table, {i: layer.state_dict() for i, layer in enumerate(layers)})
    with torch.device("meta"):
        model = family_of(hf).model_cls(hf)
    missing, unexpected = model.load_state_dict({in_memory_key(k): v for k, v in state.items()}, strict=False,
                                                assign=True)
    tied = {"lm_head.weight"} if hf.tie_word_embeddings else set()
    if tied and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise ValueError(f"{tag_dir}: tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight (a run that did not keep its tied copies equal); export from a "
                         "checkpoint of this trainer's tied-embedding training")
    if set(missing) - tied or unexpected:
        raise ValueError(f"{tag_dir}: the trained weights do not fill {type(model).__name__}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    source = Path(vlm.path) if vlm.path is not None else tag_dir.parent / RUN_PROCESSOR_DIR  # from scratch: the run's
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, out / f.name)
    return out
