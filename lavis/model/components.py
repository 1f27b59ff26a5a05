"""The model's parts, in one table: each component's config section and the plain-model parameter names it owns.

``MultimodalLM`` names its parameters ``visual_encoder.*`` / ``ln_vision.*`` (vision), ``qformer.*`` /
``query_tokens`` (Q-Former), ``llm_proj.*`` (projection) and ``llm_model.*`` (LLM). Which parameters train
(``model.freezing``), which live in pipeline layer 0 (``pipeline.plan.layer_table``) and how converters describe a
run all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str
    """Its ``ModelConfig`` section (each has a ``frozen`` flag): vision, qformer, projection, llm."""
    prefixes: tuple[str, ...]
    """Plain-model parameter names that belong to it start with one of these."""


TABLE = (
    Component("vision", ("visual_encoder.", "ln_vision.")),
    Component("qformer", ("qformer.", "query_tokens")),
    Component("projection", ("llm_proj.",)),
    Component("llm", ("llm_model.",)),
)

COMPONENTS = tuple(c.name for c in TABLE)
"""The trainable units by name."""

FIRST_LAYER_PREFIXES = tuple(p for c in TABLE if c.name != "llm" for p in c.prefixes)
"""The media side (vision, Q-Former, projection), which pipeline layer 0 holds beside the token embeddings."""


def component_of(name: str) -> str:
    """The component a plain-model parameter name belongs to."""
    for c in TABLE:
        if name.startswith(c.prefixes):
            return c.name
    raise KeyError(f"parameter {name!r} belongs to no known component")
