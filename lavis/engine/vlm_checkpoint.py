"""A ``model.vlm`` run's weights as transformers' own model: what ``--hf-out`` writes and what chat answers with.

One owner for filling the family's ``...ForConditionalGeneration`` from a run: every layer of the model built from
the run's ``model.vlm`` section and loaded as the run was (the source directory, or transformers' random init from
``init_seed``), the checkpoint's trained tensors (``checkpoint.load_plain_state``) copied over it, then the layers'
weights folded into transformers' model, every key accounted for, its rotary tables computed by transformers. A LoRA
run's decoder blocks hold its adapters (peft layers over the unquantized base weights, also for QLoRA), merged into
the base weights for transformers' model unless the caller keeps them apart (``--peft-adapter``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lavis.config.load import from_dict
from lavis.config.schema import Config
from lavis.engine.checkpoint import META_FILE
from lavis.model.lora import merge_adapters_, plain_targets
from lavis.pipeline.plan import LayerEntry, layers_to_plain
from lavis.vlm.arch import family_of, read_hf_config
from lavis.vlm.config import VLMConfig
from lavis.vlm.layers import build_layers, layer_table
from lavis.vlm.lora import add_vlm_adapters_
from lavis.vlm.weights import load_stage


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
                   ) -> tuple[list[nn.Module], list[LayerEntry], VLMConfig]:
    """Every layer of the run's model with its weights as trained: the source's tensors, then the checkpoint's
    (``trained``: published names, ``lavis.engine.checkpoint.load_plain_state``)."""
    vlm = run_vlm_config(meta, tag_dir)
    if vlm is None:
        raise ValueError(f"{tag_dir}: not a model.vlm run")
    return *vlm_layers(vlm, read_hf_config(vlm), trained, str(tag_dir)), vlm


def vlm_layers(vlm: VLMConfig, hf: PretrainedConfig, trained: dict[str, torch.Tensor], where: str,
               ) -> tuple[list[nn.Module], list[LayerEntry]]:
    """The layers of ``vlm``'s model (``hf``: its config, ``read_hf_config``) loaded as a run loads them, with
    ``trained`` (published names) copied over; a tensor that fits no layer raises naming it and ``where`` (the
    checkpoint)."""
    layers = build_layers(hf, vlm.vision_blocks_per_layer)
    table = layer_table(hf, vlm.vision_blocks_per_layer)
    load_stage(vlm, hf, table, dict(enumerate(layers)))
    add_vlm_adapters_(dict(enumerate(layers)), replace(vlm, quantize=None))  # a LoRA run: its adapters
    for entry in table:
        state = layers[entry.index].state_dict()
        with torch.no_grad():
            for key, tensor in trained.items():
                local = entry.from_plain(key)
                if local is not None:
                    if local not in state:
                        raise ValueError(f"{where}: checkpoint tensor {key} fits no weight of layer {entry.index}")
                    state[local].copy_(tensor)
    return layers, table


def trained_model(vlm: VLMConfig, trained: dict[str, torch.Tensor], where: str, merge_lora: bool = True) -> Any:
    """transformers' ``...ForConditionalGeneration`` of ``vlm`` holding ``trained`` over the run's base weights
    (``trained`` empty: the model as the run started; a LoRA run's adapters merged, or with ``merge_lora=False`` left
    out: the base weights and what else trained); raises naming ``where`` unless every key of transformers' model is
    filled and every tensor placed, or if a tied-embedding run's two copies differ. (Typed ``Any``: transformers' own
    annotations of ``to`` and ``generate`` on its models do not type-check.)"""
    hf = read_hf_config(vlm)
    layers, table = vlm_layers(vlm, hf, trained, where)
    if vlm.lora is not None and merge_lora:
        for layer in layers:
            merge_adapters_(layer)
    state = layers_to_plain(table, {i: plain_targets(layer.state_dict()) for i, layer in enumerate(layers)})
    with torch.device("meta"):
        model = family_of(hf).model_cls(hf)
    missing, unexpected = model.load_state_dict({in_memory_key(k): v for k, v in state.items()}, strict=False,
                                                assign=True)
    tied = {"lm_head.weight"} if hf.tie_word_embeddings else set()
    if tied and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise ValueError(f"{where}: tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight (a run that did not keep its tied copies equal); export from a "
                         "checkpoint of this trainer's tied-embedding training")
    if set(missing) - tied or unexpected:
        raise ValueError(f"{where}: the trained weights do not fill {type(model).__name__}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    compute_buffers(model)
    return model


def compute_buffers(model: PreTrainedModel) -> None:
    """The buffers no state dict holds (the rotary tables), still on the meta device, computed by transformers' own
    ``_init_weights`` of their module (as ``from_pretrained`` does); a module that also holds weights is refused
    rather than re-initialised."""
    for name, module in model.named_modules():
        meta = [(n, b) for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{name}: buffers {[n for n, _ in meta]} were not loaded beside its weights")
        for n, b in meta:
            module.register_buffer(n, torch.empty(b.shape, dtype=b.dtype), persistent=False)
        model._init_weights(module)
