"""The ``lora`` section shared by ``model.llm.lora`` (BLIP-2-style models) and ``model.vlm.lora`` (transformers VLMs).

A module of its own, on a floor below both sections (``lavis.config.schema`` imports ``lavis.vlm.config``, so the VLM
section cannot import the config package), so both hold the same keys and validation; free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

LORA_ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """Low-rank adapters (``peft``) on the named linear layers of every decoder block; the base weights stay frozen."""

    section: ClassVar[str] = "model.llm.lora"
    """The config key error messages name (``model.vlm.lora`` for :class:`VLMLoRAConfig`)."""

    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scale numerator: the adapter's output is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear layers of a decoder block by their transformers names (q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj; Qwen v1 checkpoints are read into these names), or ``all-linear``."""
    train_embeddings: bool = False
    """Also train the token embeddings and the LM head fully (e.g. for new tokens)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"{self.section}.r must be >= 1 (got {self.r})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.section}.dropout must be in [0, 1) (got {self.dropout})")
        if isinstance(self.targets, str) and self.targets != LORA_ALL_LINEAR:
            raise ValueError(f"{self.section}.targets: {self.targets!r} is neither a list of layer names nor "
                             f"{LORA_ALL_LINEAR!r}")
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError(f"{self.section}.targets is empty: name layers (e.g. [q_proj, v_proj]) or all-linear")


@dataclass
class VLMLoRAConfig(LoRAConfig):
    """``model.vlm.lora``: the same keys, on the language model's decoder blocks of a transformers VLM."""

    section: ClassVar[str] = "model.vlm.lora"
