"""Which transformers classes build each piece of a family, and the directory's config.

The modules are transformers' own (vision blocks, patch merger, DeepStack mergers, decoder layers, rotary
embeddings, ``get_rope_index``); this module only names them per ``model_type``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

from lavis.vlm.config import FAMILIES, VLMConfig
from lavis.vlm.published import PUBLISHED_VLM_CONFIGS, published_vlm_config


@dataclass(frozen=True)
class Family:
    model_type: str
    model_cls: type
    """``...ForConditionalGeneration``: builds the reference model and owns the checkpoint layout."""
    inner_cls: type
    """``...Model``: owns ``get_rope_index``."""
    vision_block: type
    merger: type
    decoder_layer: type
    text_rotary: type
    vision_rotary: type
    text_norm: type
    windowed: bool
    """Qwen2.5-VL: window attention (patches permuted into windows, full attention in ``fullatt_block_indexes``)."""
    deepstack: bool
    """Qwen3-VL: features of some vision blocks are added to the first decoder layers' outputs."""


FAMILY = {
    "qwen2_5_vl": Family("qwen2_5_vl", q25.Qwen2_5_VLForConditionalGeneration, q25.Qwen2_5_VLModel,
                         q25.Qwen2_5_VLVisionBlock, q25.Qwen2_5_VLPatchMerger, q25.Qwen2_5_VLDecoderLayer,
                         q25.Qwen2_5_VLRotaryEmbedding, q25.Qwen2_5_VLVisionRotaryEmbedding, q25.Qwen2_5_VLRMSNorm,
                         windowed=True, deepstack=False),
    "qwen3_vl": Family("qwen3_vl", q3.Qwen3VLForConditionalGeneration, q3.Qwen3VLModel, q3.Qwen3VLVisionBlock,
                       q3.Qwen3VLVisionPatchMerger, q3.Qwen3VLTextDecoderLayer, q3.Qwen3VLTextRotaryEmbedding,
                       q3.Qwen3VLVisionRotaryEmbedding, q3.Qwen3VLTextRMSNorm, windowed=False, deepstack=True),
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_hf_config(cfg: VLMConfig) -> PretrainedConfig:
    """The directory's ``config.json`` with ``model.vlm.hf_config`` merged over it (or ``hf_config`` alone), as
    the family's transformers config class, with the attention implementation set on every sub-config. A ``path``
    without ``config.json`` yet (planning before the download) reads the published shape named like it
    (:func:`published_entry`)."""
    raw: dict[str, Any] = {}
    if cfg.path is not None:
        if (Path(cfg.path) / "config.json").is_file():
            raw = AutoConfig.from_pretrained(cfg.path).to_dict()
        else:
            raw = AutoConfig.for_model(**published_entry(cfg.path)[1]).to_dict()
    text_over = cfg.hf_config.get("text_config") or {}
    if "num_hidden_layers" in text_over and "layer_types" not in text_over:  # derived from the old depth: re-derive
        (raw.get("text_config") or {}).pop("layer_types", None)
    raw = _merge(raw, cfg.hf_config)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{hf_config_source(cfg)}: model_type {model_type!r} is not a supported VLM family {FAMILIES}")
    hf = AutoConfig.for_model(**raw)
    for sub in (hf, hf.text_config, hf.vision_config):
        sub._attn_implementation = cfg.attn_implementation
    return hf


def published_entry(path: str) -> tuple[str, dict[str, Any]]:
    """The published config (``lavis/vlm/published.py``) standing in for ``path``'s missing ``config.json``."""
    found = published_vlm_config(path)
    if found is None:
        raise FileNotFoundError(
            f"model.vlm.path={path}: no config.json there and no published shape is named like it "
            f"({', '.join(PUBLISHED_VLM_CONFIGS)}); put the model's config.json there (no weights needed) or name "
            "the directory after the checkpoint")
    return found


def hf_config_source(cfg: VLMConfig) -> str:
    """Where :func:`read_hf_config` reads the shapes from, for messages (the table entry when it stands in)."""
    if cfg.path is None:
        return "model.vlm.hf_config"
    if (Path(cfg.path) / "config.json").is_file():
        return f"{cfg.path}/config.json"
    return f"the published shape of {published_entry(cfg.path)[0]} ({cfg.path} holds no config.json yet)"


def family_of(hf: PretrainedConfig) -> Family:
    return FAMILY[hf.model_type]


class RopeIndex:
    """The family's own ``get_rope_index`` (M-RoPE positions ``[3, B, L]`` from input ids and the media grids),
    bound to the config alone: it needs no weights."""

    def __init__(self, hf: PretrainedConfig) -> None:
        self.config = hf
        self._inner = family_of(hf).inner_cls

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._inner.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, input_ids_BL: torch.Tensor, mask_BL: torch.Tensor, image_grid: torch.Tensor | None,
                 video_grid: torch.Tensor | None, second_per_grid: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if second_per_grid is not None and self.config.model_type == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = second_per_grid
        pos, _ = self._inner.get_rope_index(
            self, input_ids_BL, mm_token_type_ids=mm_token_types(self.config, input_ids_BL),
            image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask_BL, **kwargs)
        return pos


def mm_token_types(hf: PretrainedConfig, input_ids_BL: torch.Tensor) -> torch.Tensor:
    """transformers' ``mm_token_type_ids``: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids_BL, dtype=torch.int32)
    types[input_ids_BL == hf.image_token_id] = 1
    types[input_ids_BL == hf.video_token_id] = 2
    return types


def reference_model(hf: PretrainedConfig, seed: int) -> nn.Module:
    """The whole transformers model, randomly initialised by transformers from ``seed`` (tiny from-scratch runs:
    every stage draws the same weights, then keeps its own)."""
    torch.manual_seed(seed)
    return family_of(hf).model_cls(hf)


def check_model_dir(path: str | Path) -> Path:
    """``--model-dir``: a transformers directory of a supported VLM family; one-line errors name the file and what
    was expected."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model-dir {path}: not a directory (a transformers VLM directory as save_pretrained "
                                f"writes it: config.json, *.safetensors, the processor's files)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: --model-dir takes a transformers VLM directory (config.json, "
                                "*.safetensors, the processor's files), e.g. a published Qwen2.5-VL / Qwen3-VL one or "
                                "the --hf-out of a run")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg}: not a JSON object ({e})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"{cfg}: model_type {model_type!r} is not a supported VLM (expected one of "
                         f"{', '.join(FAMILIES)}); a BLIP-2-style run is chatted with --cfg-path RUN/config.yaml -c "
                         "M.pth")
    return path
