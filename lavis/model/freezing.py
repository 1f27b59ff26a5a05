"""Which parameters train: a pure function of the plain-model parameter name and the config.

Names are the plain model's (``visual_encoder.*``, ``ln_vision.*``, ``qformer.*``, ``query_tokens``,
``llm_proj.*``, ``llm_model.*``); pipeline layers map their local names through the layer table first.
"""

from __future__ import annotations

from lavis.config.schema import ModelConfig

_GROUPS = (
    ("visual_encoder.", "vision"),
    ("ln_vision.", "vision"),
    ("qformer.", "qformer"),
    ("query_tokens", "qformer"),
    ("llm_proj.", "projection"),
    ("llm_model.", "llm"),
)


COMPONENTS = ("vision", "qformer", "projection", "llm")
"""The trainable units, as named in ``ModelConfig`` (each has a ``frozen`` flag)."""


def component_of(name: str) -> str:
    for prefix, group in _GROUPS:
        if name.startswith(prefix):
            return group
    raise KeyError(f"parameter {name!r} belongs to no known component")


_EMBEDDINGS = ("llm_model.model.embed_tokens.", "llm_model.lm_head.")


def is_trainable(name: str, cfg: ModelConfig) -> bool:
    """With ``model.llm.lora`` the LLM's adapters train (names with ``.lora_``, peft's) and its base weights stay
    frozen, except the embeddings and LM head under ``lora.train_embeddings``."""
    group = component_of(name)
    if group == "llm" and cfg.llm.lora is not None:
        return ".lora_" in name or (cfg.llm.lora.train_embeddings and name.startswith(_EMBEDDINGS))
    frozen = {
        "vision": cfg.vision.frozen,
        "qformer": cfg.qformer.frozen,
        "projection": cfg.projection.frozen,
        "llm": cfg.llm.frozen,
    }[group]
    return not frozen
