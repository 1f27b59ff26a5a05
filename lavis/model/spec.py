"""One description of the model (``ModelSpec``), resolved once per process at the entry point.

A model family (``lavis.pipeline.family``, the table ``lavis.families``) turns a config into a ``ModelSpec``: the
family's name, the model's transformers config (the BLIP-2-style family's LLM config is built by
``lavis.model.llm.llm_hf_config``, called from nowhere else; a VLM's is its directory's), its LLM's dimensions, the
pipeline's layer table (which layer holds which plain-model weights) and which components train. The trainer, the
planner, the pipeline layers, the weight readers, the converters, chat, eval, the feature cache and the tools receive
it instead of re-deriving these facts from the config. Nothing here reads a file or builds a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lavis.model.components import FIRST_LAYER_PREFIXES

LLM_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
"""The transformers config fields the cost model reads."""

LayerKind = Literal["embed", "block", "norm", "head", "vision"]


@dataclass(frozen=True)
class LayerEntry:
    index: int
    kind: LayerKind
    prefixes: tuple[tuple[str, str], ...]
    """(local name prefix, plain-model name prefix) pairs; every local key starts with exactly one."""

    def to_plain(self, local_key: str) -> str:
        for local, plain in self.prefixes:
            if local_key == local or local_key.startswith(local):
                return plain + local_key[len(local):]
        raise KeyError(f"layer {self.index} ({self.kind}) has no mapping for key {local_key!r}")

    def from_plain(self, plain_key: str) -> str | None:
        for local, plain in self.prefixes:
            if plain_key == plain or plain_key.startswith(plain):
                return local + plain_key[len(plain):]
        return None


def layer_table(num_blocks: int) -> list[LayerEntry]:
    """``[embed] [block] x num_blocks [norm] [head]`` with their plain-model weight prefixes."""
    table = [
        LayerEntry(
            0,
            "embed",
            (*((p, p) for p in FIRST_LAYER_PREFIXES), ("embed_tokens.", "llm_model.model.embed_tokens.")),
        )
    ]
    for j in range(num_blocks):
        table.append(LayerEntry(1 + j, "block", (("layer.", f"llm_model.model.layers.{j}."),)))
    table.append(LayerEntry(1 + num_blocks, "norm", (("norm.", "llm_model.model.norm."),)))
    table.append(LayerEntry(2 + num_blocks, "head", (("lm_head.", "llm_model.lm_head."),)))
    return table


def layer_of_plain_key(table: list[LayerEntry], plain_key: str) -> tuple[int, str]:
    """(layer index, local key) holding ``plain_key``."""
    for entry in table:
        local = entry.from_plain(plain_key)
        if local is not None:
            return entry.index, local
    raise KeyError(f"no pipeline layer holds {plain_key!r}")


@dataclass(frozen=True)
class ModelSpec:
    """What every consumer knows about the model, resolved once (``lavis.families.describe``).

    ``hf`` is a transformers ``PretrainedConfig`` (mutable by its own design): consumers read it and never set
    attributes on it.
    """

    family: str
    """The family's name in ``lavis.families.FAMILIES``."""
    hf: Any
    """The family's transformers config (``PretrainedConfig``): the LLM's for the BLIP-2-style family (with
    ``model.llm.hf_config`` and the attention implementation applied), the whole VLM's (``text_config``,
    ``vision_config``) for the VLM family. :attr:`llm_hf` is the language model's part either way."""
    layers: tuple[LayerEntry, ...]
    """The pipeline's layer table, in layer order."""
    trains: tuple[str, ...]
    """The components that train: the family's component names (the BLIP-2-style family's
    ``lavis.model.components.COMPONENTS``, LoRA adapters count for ``llm``; the VLM family's
    ``lavis.vlm.family.COMPONENTS``)."""

    @property
    def llm_hf(self) -> Any:
        """The language model's transformers config: ``hf`` itself, or a multimodal config's text part
        (transformers' ``get_text_config``)."""
        return self.hf.get_text_config()

    @property
    def dims(self) -> dict[str, int]:
        """The LLM dimensions the planner's cost model reads (``LLM_DIMS``)."""
        return {k: getattr(self.llm_hf, k) for k in LLM_DIMS}

    @property
    def num_blocks(self) -> int:
        """The LLM's decoder blocks."""
        return int(self.llm_hf.num_hidden_layers)

    @property
    def table(self) -> list[LayerEntry]:
        """The layer table as the list the layer-table functions take."""
        return list(self.layers)

    @property
    def llm_type(self) -> str:
        """The LLM's transformers ``model_type`` (``qwen2``, ``llama``, ...)."""
        return str(self.llm_hf.model_type)
