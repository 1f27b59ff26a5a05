"""Build a model and stream its weights in: the one loader chat, the API server, the HF exporter and inspect use."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lavis.config.schema import Config
from lavis.data.conversation import template_from_config
from lavis.data.tokenizer import AnyTokenizer
from lavis.model.lora import model_targets
from lavis.model.mllm import MultimodalLM
from lavis.model.spec import ModelSpec
from lavis.weights.base import stream_into


def load_model(
    cfg: Config, checkpoint: str | Path | None, tok: AnyTokenizer, device: torch.device, dtype: torch.dtype,
    spec: ModelSpec | None = None,
) -> MultimodalLM:
    """Construct, seed-init, load every file the config names (base weights, then ``checkpoint`` or
    ``model.checkpoint``, ours or a predecessor's) with every key accounted for; raise if any file does not fit.
    ``spec``: the entry point's description of ``cfg.model`` (described here when not given)."""
    placeholder_id = template_from_config(tok, cfg).special_ids().placeholder
    model = MultimodalLM(cfg.model, placeholder_id, spec)
    model.init_weights(cfg.model.init_seed)
    targets = model_targets(model, cfg.model)  # live parameters and persistent buffers (+ LoRA adapters)
    reports, filled = stream_into(cfg.model, targets, checkpoint=None if checkpoint is None else str(checkpoint))
    for rep in reports:
        print(rep.summary(), file=sys.stderr)
    if reports:
        print(f"{len(filled)} of {len(targets)} tensors loaded from files; the rest keep the seeded init",
              file=sys.stderr)
    return model.to(device=device, dtype=dtype).eval()
