"""The language model: a transformers decoder (Qwen2 / Qwen3 / LLaMA family), built from config, no remote code.

Every supported family has the same module layout, which the pipeline and the converters rely on:
``model.embed_tokens``, ``model.layers[i]`` (decoder blocks), ``model.norm``, ``model.rotary_emb`` and ``lm_head``.
The pipeline builds single blocks from the classes found here, never the whole LLM on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lavis.config.schema import LLMConfig


def llm_hf_config(cfg: LLMConfig) -> PretrainedConfig:
    """The transformers config: ``path``'s config.json updated by ``hf_config``, or ``hf_config`` alone."""
    overrides = dict(cfg.hf_config)
    if cfg.path is not None:
        if not (Path(cfg.path) / "config.json").is_file():
            raise FileNotFoundError(f"model.llm.path={cfg.path}: no config.json there (see WEIGHT.md)")
        hf = AutoConfig.from_pretrained(cfg.path)
        model_type = overrides.pop("model_type", hf.model_type)
        if model_type != hf.model_type:
            raise ValueError(f"model.llm.hf_config.model_type={model_type!r} but {cfg.path} is {hf.model_type!r}")
        for k, v in overrides.items():
            setattr(hf, k, v)
    else:
        model_type = overrides.pop("model_type")
        hf = AutoConfig.for_model(model_type, **overrides)
    hf._attn_implementation = cfg.attn_implementation
    if getattr(hf, "tie_word_embeddings", False):
        raise ValueError(
            "model.llm: tied input/output embeddings are not supported by the pipeline yet; "
            "set model.llm.hf_config.tie_word_embeddings=false"
        )
    return hf


def build_llm(hf: PretrainedConfig) -> nn.Module:
    model = AutoModelForCausalLM.from_config(hf, attn_implementation=hf._attn_implementation)
    _check_layout(model)
    return model


@dataclass(frozen=True)
class DecoderParts:
    """The classes one pipeline layer needs to build its piece of the LLM."""

    block: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]


def decoder_parts(hf: PretrainedConfig) -> DecoderParts:
    """Find the block / norm / rotary classes of ``hf``'s family by building it on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, attn_implementation=hf._attn_implementation)
    _check_layout(model)
    inner = model.model
    return DecoderParts(block=type(inner.layers[0]), norm=type(inner.norm), rotary=type(inner.rotary_emb))


def _check_layout(model: nn.Module) -> None:
    inner = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, n)]
    if missing or not hasattr(model, "lm_head"):
        raise ValueError(
            f"{type(model).__name__} lacks the decoder layout the pipeline needs "
            f"(model.embed_tokens/layers/norm/rotary_emb, lm_head); missing: {missing or ['lm_head']}"
        )
