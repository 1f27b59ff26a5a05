"""Which parameters train: a pure function of the plain-model parameter name and the config.

Names are the plain model's, grouped into components by ``lavis.model.components``; pipeline layers map their local
names through the layer table first.
"""

from __future__ import annotations

from lavis.config.schema import ModelConfig
from lavis.model.components import component_of

_EMBEDDINGS = ("llm_model.model.embed_tokens.", "llm_model.lm_head.")


def component_trains(component: str, cfg: ModelConfig) -> bool:
    """Whether anything of ``component`` trains: its ``frozen`` flag, or LoRA adapters on a frozen LLM."""
    return not getattr(cfg, component).frozen or (component == "llm" and cfg.llm.lora is not None)


def is_trainable(name: str, cfg: ModelConfig) -> bool:
    """With ``model.llm.lora`` the LLM's adapters train (names with ``.lora_``, peft's) and its base weights stay
    frozen, except the embeddings and LM head under ``lora.train_embeddings``."""
    group = component_of(name)
    if group == "llm" and cfg.llm.lora is not None:
        return ".lora_" in name or (cfg.llm.lora.train_embeddings and name.startswith(_EMBEDDINGS))
    return not getattr(cfg, group).frozen
