"""The language model: a transformers decoder (Qwen2 / Qwen3 / LLaMA family), built from config, no remote code.

Every supported family has the same module layout, which the pipeline and the converters rely on:
``model.embed_tokens``, ``model.layers[i]`` (decoder blocks), ``model.norm``, ``model.rotary_emb`` and ``lm_head``.
The pipeline builds single blocks from the classes found here, never the whole LLM on every rank.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, Qwen2Config

from lavis.config.schema import LLMConfig

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel

    class DecoderStack(nn.Module):
        """``CausalLM.model``, as :func:`_check_layout` finds it (a type-checker view, never instantiated)."""

        embed_tokens: nn.Embedding
        layers: nn.ModuleList
        norm: nn.Module
        rotary_emb: nn.Module

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What :func:`build_llm` returns: a transformers ``*ForCausalLM`` with the layout of the module docstring
        (a type-checker view, never instantiated)."""

        model: DecoderStack
        lm_head: nn.Linear

        def get_input_embeddings(self) -> nn.Embedding: ...  # model.embed_tokens


def llm_hf_config(cfg: LLMConfig, published: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config: ``path``'s config.json updated by ``hf_config``, or ``hf_config`` alone; with
    ``published`` (a config.json's content, for planning before a download) that content where ``path`` holds no
    config.json yet. The one builder of the LLM's config: only a model family's ``describe`` calls it
    (``lavis.model.spec.ModelSpec`` carries the result to every consumer)."""
    overrides = dict(cfg.hf_config)
    if cfg.path is not None and (published is None or (Path(cfg.path) / "config.json").is_file()):
        if not (Path(cfg.path) / "config.json").is_file():
            raise FileNotFoundError(f"model.llm.path={cfg.path}: no config.json there (see WEIGHT.md)")
        raw = read_config_json(cfg.path)
        hf = qwen_v1_to_qwen2_config(raw, cfg.path) if is_qwen_v1(raw) else AutoConfig.from_pretrained(cfg.path)
        model_type = overrides.pop("model_type", hf.model_type)
        if model_type != hf.model_type:
            raise ValueError(f"model.llm.hf_config.model_type={model_type!r} but {cfg.path} is {hf.model_type!r}")
        for k, v in overrides.items():
            setattr(hf, k, v)
    elif published is not None:
        return _published_hf_config(published, overrides)
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


def _published_hf_config(raw: dict[str, Any], overrides: dict[str, Any]) -> PretrainedConfig:
    """A transformers config from a config.json's content (Qwen v1 through our key map), with ``overrides``: shapes
    for the planner only (nothing is built from it)."""
    if is_qwen_v1(raw):
        hf = qwen_v1_to_qwen2_config(raw)
    else:
        fields = {k: v for k, v in raw.items() if k != "model_type"}
        hf = AutoConfig.for_model(raw["model_type"], **fields)
    for k, v in overrides.items():
        if k != "model_type":
            setattr(hf, k, v)
    return hf


def build_llm(hf: PretrainedConfig) -> CausalLM:
    model = AutoModelForCausalLM.from_config(hf, attn_implementation=hf._attn_implementation)
    _check_layout(model)
    return cast("CausalLM", model)


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


# --- Qwen v1 (Qwen-7B/14B-Chat remote code) as transformers' native Qwen2 ------------------------------------------
# docs/FORMATS.md sections 5, 6 and 10. The key map is literal: no trust_remote_code, no pattern guessing.


def read_config_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def is_qwen_v1(raw: dict[str, Any]) -> bool:
    """A Qwen v1 remote-code config (``model_type: qwen``, ``QWenLMHeadModel``)."""
    return raw.get("model_type") == "qwen"


def _pick(raw: dict[str, Any], where: str, *names: str) -> Any:
    for n in names:
        if n in raw:
            return raw[n]
    raise KeyError(f"{where}: Qwen v1 config.json has none of {names} (see docs/FORMATS.md section 5 for both layouts)")


def qwen_v1_to_qwen2_config(raw: dict[str, Any], where: str | Path = "config.json") -> Qwen2Config:
    """Qwen v1 config.json (the Sep-2023 ``hidden_size`` layout or the Aug-2023 ``n_embd`` layout) -> Qwen2Config.

    ``intermediate_size`` is halved (v1 counts w1 and w2 together); KV heads = heads; rope theta =
    ``rotary_emb_base``; ``max_position_embeddings`` = ``seq_length`` (beyond it v1 switches on dynamic NTK and logN
    scaling at inference, which Qwen2 does not reproduce: see WEIGHT.md). Untied embeddings, no sliding window.
    """
    where = str(where)
    hidden = int(_pick(raw, where, "hidden_size", "n_embd"))
    heads = int(_pick(raw, where, "num_attention_heads", "n_head"))
    ffn = int(_pick(raw, where, "intermediate_size", "ffn_hidden_size"))
    if ffn % 2:
        raise ValueError(f"{where}: Qwen v1 intermediate size {ffn} is odd; w1/w2 are each half of it")
    kv_channels = int(raw.get("kv_channels", hidden // heads))
    if kv_channels * heads != hidden:
        raise ValueError(f"{where}: kv_channels {kv_channels} x heads {heads} != hidden {hidden}")
    if float(raw.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError(
            f"{where}: rotary_pct {raw['rotary_pct']} (partial rotary) is not supported; Qwen-7B/14B use 1.0")
    if raw.get("tie_word_embeddings", False):
        raise ValueError(f"{where}: tied embeddings; Qwen-7B/14B-Chat are untied")
    return Qwen2Config(
        vocab_size=int(_pick(raw, where, "padded_vocab_size", "vocab_size")),
        hidden_size=hidden,
        intermediate_size=ffn // 2,
        num_hidden_layers=int(_pick(raw, where, "num_hidden_layers", "n_layer")),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="silu",
        max_position_embeddings=int(_pick(raw, where, "seq_length")),
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rotary_emb_base", 10000))},
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=raw.get("bos_token_id", 151643),
        eos_token_id=raw.get("eos_token_id", 151643),
    )


QWEN_V1_TOP: dict[str, str] = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
"""transformers Qwen2 name -> Qwen v1 name, outside the blocks."""

QWEN_V1_BLOCK: dict[str, tuple[str, int | None]] = {
    "input_layernorm.weight": ("ln_1.weight", None),
    "self_attn.q_proj.weight": ("attn.c_attn.weight", 0),
    "self_attn.k_proj.weight": ("attn.c_attn.weight", 1),
    "self_attn.v_proj.weight": ("attn.c_attn.weight", 2),
    "self_attn.q_proj.bias": ("attn.c_attn.bias", 0),
    "self_attn.k_proj.bias": ("attn.c_attn.bias", 1),
    "self_attn.v_proj.bias": ("attn.c_attn.bias", 2),
    "self_attn.o_proj.weight": ("attn.c_proj.weight", None),
    "post_attention_layernorm.weight": ("ln_2.weight", None),
    "mlp.gate_proj.weight": ("mlp.w2.weight", None),  # w2 is the one passed through silu
    "mlp.up_proj.weight": ("mlp.w1.weight", None),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", None),
}
"""Per block: Qwen2 name under ``model.layers.{i}.`` -> (Qwen v1 name under ``transformer.h.{i}.``, third of
``c_attn`` rows: 0 = Q, 1 = K, 2 = V; None = the whole tensor)."""

_V1_BLOCK_INV: dict[str, list[tuple[str, int | None]]] = {}
for _ours, (_theirs, _third) in QWEN_V1_BLOCK.items():
    _V1_BLOCK_INV.setdefault(_theirs, []).append((_ours, _third))
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_V1_H_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def qwen_v1_source(hf_name: str) -> tuple[str, int | None] | None:
    """Qwen2 parameter name (``model.layers.3.mlp.gate_proj.weight``) -> (Qwen v1 file key, c_attn third)."""
    if hf_name in QWEN_V1_TOP:
        return QWEN_V1_TOP[hf_name], None
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m[2] in QWEN_V1_BLOCK:
        theirs, third = QWEN_V1_BLOCK[m[2]]
        return f"transformer.h.{m[1]}.{theirs}", third
    return None


def qwen_v1_targets(v1_name: str) -> list[tuple[str, int | None]]:
    """Qwen v1 file key -> the Qwen2 names it feeds (three for ``c_attn``), each with its row third."""
    for ours, theirs in QWEN_V1_TOP.items():
        if v1_name == theirs:
            return [(ours, None)]
    m = _V1_H_RE.fullmatch(v1_name)
    if m and m[2] in _V1_BLOCK_INV:
        return [(f"model.layers.{m[1]}.{ours}", third) for ours, third in _V1_BLOCK_INV[m[2]]]
    return []


def take_third(t: torch.Tensor, third: int | None) -> torch.Tensor:
    """Rows ``third`` of three equal blocks (c_attn's Q / K / V), or ``t`` itself."""
    if third is None:
        return t
    if t.shape[0] % 3:
        raise ValueError(f"c_attn has {t.shape[0]} rows, not divisible into Q/K/V thirds")
    n = t.shape[0] // 3
    return t[third * n:(third + 1) * n]


def to_qwen_v1_names(state: dict[str, torch.Tensor], prefix: str = "llm_model.") -> dict[str, torch.Tensor]:
    """Inverse key map for converters: our ``{prefix}model.*`` / ``{prefix}lm_head.weight`` Qwen2 names -> Qwen v1
    names (``{prefix}transformer.*``, ``{prefix}lm_head.weight``), q/k/v concatenated into ``c_attn``.

    Keys outside ``prefix`` pass through unchanged; an LLM key with no Qwen v1 counterpart (e.g. an ``o_proj`` bias)
    raises ``KeyError``.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            out[k] = v
            continue
        src = qwen_v1_source(k[len(prefix):])
        if src is None:
            raise KeyError(f"{k} has no Qwen v1 counterpart (docs/FORMATS.md section 5)")
        name, third = src
        if third is None:
            out[prefix + name] = v
        else:
            parts.setdefault(prefix + name, {})[third] = v
    for name, thirds in parts.items():
        if sorted(thirds) != [0, 1, 2]:
            raise KeyError(f"{name}: needs q, k and v; got thirds {sorted(thirds)}")
        out[name] = torch.cat([thirds[0], thirds[1], thirds[2]], dim=0)
    return out
