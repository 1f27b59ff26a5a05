"""The model-family table: ``FAMILIES`` maps a name to the one object that provides a family's pieces.

The interface (``ModelFamily``) and the BLIP-2-style family live on the pipeline floor
(``lavis.pipeline.family``); a family whose pieces sit above that floor (``lavis.vlm.family``: transformers VLM
directories) has its object there, and this module, a floor above both, holds the table. Every entry point (the
trainer's ``build_run``, ``python -m lavis.plan``, the converters, chat's model loading, eval, the feature cache
builder, bench, the GPU check, inspect) calls :func:`describe` once and hands the spec on.
"""

from __future__ import annotations

from typing import Any

from lavis.config.schema import Config, ModelConfig
from lavis.model import mllm
from lavis.model.spec import ModelSpec
from lavis.pipeline.family import Blip2Family, ModelFamily
from lavis.pipeline.plan import StagePlan, plan_for_config
from lavis.vlm.family import FAMILY as VLM_FAMILY
from lavis.vlm.family import VLMFamily

FAMILIES: dict[str, ModelFamily] = {VLM_FAMILY: VLMFamily(), mllm.FAMILY: Blip2Family()}
"""Every model family by name, in the order :func:`family_of` asks them (the default last)."""


def family_of(cfg: ModelConfig) -> ModelFamily:
    """The first family in ``FAMILIES`` that claims ``cfg``."""
    return next(f for f in FAMILIES.values() if f.claims(cfg))


def family_named(name: str) -> ModelFamily:
    """The family a ``ModelSpec`` names."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def describe(cfg: ModelConfig, published: dict[str, Any] | None = None) -> ModelSpec:
    """The model's description: what an entry point resolves once and hands to every consumer."""
    return family_of(cfg).describe(cfg, published)


def plan(spec: ModelSpec, cfg: Config, dp: int) -> StagePlan:
    """The run's stage plan from the family's layer costs (``lavis.pipeline.plan.plan_for_config``)."""
    family = family_named(spec.family)
    return plan_for_config(cfg, spec.dims, dp, costs=lambda work: family.layer_costs(spec, cfg, work))
