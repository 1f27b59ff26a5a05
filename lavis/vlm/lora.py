"""LoRA and QLoRA for a transformers VLM (``model.vlm.lora``, ``model.vlm.quantize``): peft adapters on the linear
layers of the language model's decoder blocks, with ``lavis.model.lora``'s helpers (the BLIP-2-style models').

Adapters are injected after the base weights are loaded (:func:`add_vlm_adapters_`), so the weight readers see the
plain modules; inside a block peft's names follow (``layer.self_attn.q_proj.base_layer.weight``,
``layer.self_attn.q_proj.lora_A.default.weight``), so a checkpoint holds ``model.layers.N.self_attn.q_proj.lora_A.
default.weight``. Each block's adapters are drawn from its own seed (``model.vlm.init_seed + 1 + N``), so every
partition and the plain model start from identical adapters; ``lora_B`` starts at zero, so a fresh adapter leaves the
logits unchanged.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from lavis.model.lora import (
    add_block_adapters,
    is_adapter_key,
    quantize_block_,
    require_quantize_runtime,
    resolve_targets,
)
from lavis.vlm.config import VLMConfig
from lavis.vlm.layers import DecoderBlockPipe

EMBEDDING_KEYS = ("model.embed_tokens.", "lm_head.")
"""Published names of the token embeddings and the LM head (``lora.train_embeddings`` trains them fully)."""


def check_vlm_lora(cfg: VLMConfig, hf: PretrainedConfig) -> None:
    """Before any layer is built: ``model.vlm.quantize`` needs CUDA and bitsandbytes; ``lora.train_embeddings``
    needs untied embeddings (the LM head and the embeddings are separate layers, on different stages)."""
    if cfg.lora is not None and cfg.lora.train_embeddings and hf.tie_word_embeddings:
        raise ValueError(f"{cfg.path or 'model.vlm.hf_config'}: tie_word_embeddings is true (the LM head is the token "
                         "embedding); model.vlm.lora.train_embeddings would train two copies apart: set it false")
    require_quantize_runtime(cfg.quantize, "model.vlm.quantize")


def vlm_block_seed(cfg: VLMConfig, block_index: int) -> int:
    """The seed of decoder block ``block_index``'s adapters (offset by ``lavis.model.lora.adapter_seed``)."""
    return cfg.init_seed + 1 + block_index


def add_vlm_adapters_(layers: dict[int, nn.Module], cfg: VLMConfig) -> int:
    """In place, on the decoder blocks among ``layers`` (``{layer index: module}``, weights already loaded):
    bitsandbytes linear layers with ``quantize``, then peft adapters with ``lora``. Returns the number of adapter
    parameters added."""
    if cfg.lora is None:
        return 0
    count = 0
    for layer in layers.values():
        if not isinstance(layer, DecoderBlockPipe):
            continue
        if cfg.quantize is not None:
            quantize_block_(layer.layer, cfg.quantize)
        add_block_adapters(layer.layer, cfg.lora, vlm_block_seed(cfg, layer.index))
        count += sum(p.numel() for n, p in layer.named_parameters() if is_adapter_key(n))
    return count


def lora_trains(plain_key: str, cfg: VLMConfig) -> bool | None:
    """With ``model.vlm.lora``: True for adapter tensors and (``train_embeddings``) the embeddings and LM head; None
    where the ``freeze_*`` keys decide (and without LoRA)."""
    if cfg.lora is None:
        return None
    if is_adapter_key(plain_key):
        return True
    if cfg.lora.train_embeddings and plain_key.startswith(EMBEDDING_KEYS):
        return True
    return None


def adapter_params(block: nn.Module, cfg: VLMConfig) -> int:
    """Adapter parameters ``model.vlm.lora`` adds to one decoder block: ``r x (in + out)`` per targeted linear layer,
    counted from the block's own layers (also on the meta device; nothing is injected)."""
    if cfg.lora is None:
        return 0
    targets = set(resolve_targets(cfg.lora, block))
    return sum(cfg.lora.r * (m.in_features + m.out_features) for name, m in block.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def linear_weights(block: nn.Module) -> int:
    """Weights of every linear layer of a block (what ``quantize`` holds quantized)."""
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
