"""The ``model.vlm`` section: a transformers VLM directory (Qwen2.5-VL / Qwen3-VL) trained under the pipeline.

Kept free of torch and of the rest of ``lavis.vlm`` so ``lavis.config.schema`` can hold it as a field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lavis.lora_config import VLMLoRAConfig

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
"""``model_type`` values of the directories this section reads."""


@dataclass
class VLMConfig:
    path: str | None = None
    """A transformers directory (``config.json``, ``model.safetensors`` or sharded ``model-*.safetensors`` + index).
    None = random init from ``hf_config`` (tiny from-scratch models)."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``path``'s ``config.json`` (nested: ``{"text_config": {"num_hidden_layers": 2}}``), or the whole
    config (with ``model_type``) when there is no ``path``."""
    freeze_vision: bool = True
    """Vision tower (patch embedding, position embedding, blocks) frozen."""
    freeze_merger: bool = False
    """Patch merger (and Qwen3-VL's DeepStack mergers) frozen."""
    freeze_llm: bool = False
    """Token embeddings, decoder blocks, final norm and LM head frozen."""
    vision_blocks_per_layer: int = 1
    """Vision blocks per pipeline layer-list entry (a large tower spans stages in groups of this size)."""
    attn_implementation: str = "sdpa"
    """transformers attention implementation of every piece (``sdpa`` or ``eager``)."""
    init_seed: int = 0
    """Seed of the random init when there is no ``path`` (every stage draws the whole model's weights from it)."""
    lora: VLMLoRAConfig | None = None
    """Low-rank adapters (peft) on the linear layers of the language model's decoder blocks, over frozen base
    weights (needs ``freeze_llm: true``; the tower and the merger still follow ``freeze_vision`` /
    ``freeze_merger``). None = no adapters."""
    quantize: Literal["nf4", "int8"] | None = None
    """QLoRA: hold the frozen decoder-block weights quantized with bitsandbytes (4-bit NF4 or 8-bit; compute in
    bf16). CUDA only; needs ``lora``."""

    def __post_init__(self) -> None:
        if self.path is None and self.hf_config.get("model_type") not in FAMILIES:
            raise ValueError(f"model.vlm needs `path` (a transformers directory) or hf_config.model_type in {FAMILIES} "
                             f"(got {self.hf_config.get('model_type')!r})")
        if self.vision_blocks_per_layer < 1:
            raise ValueError(f"model.vlm.vision_blocks_per_layer must be >= 1 (got {self.vision_blocks_per_layer})")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"model.vlm.attn_implementation must be sdpa or eager (got {self.attn_implementation!r})")
        if self.lora is not None and not self.freeze_llm:
            raise ValueError("model.vlm.lora trains adapters over the frozen language model: set model.vlm.freeze_llm: "
                             "true (the vision tower and merger still follow freeze_vision / freeze_merger)")
        if self.quantize is not None and self.lora is None:
            raise ValueError(f"model.vlm.quantize: {self.quantize} holds frozen weights quantized, which only makes "
                             "sense with adapters: set model.vlm.lora (or remove quantize)")
