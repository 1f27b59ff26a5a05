"""BLIP-2 Q-Former, query-only, from transformers' ``Blip2QFormerModel``.

Query-only forward as in LAVIS with ``qformer_text_input=False``: LayerNorm(query_tokens) -> dropout -> per layer
self-attention, cross-attention to the image features on every ``cross_attention_freq``-th layer (0, 2, ...), and
the ``*_query`` feed-forward. The text branch (word/position embeddings, text FFN, LM head) is not built.
LAVIS checkpoint names differ from transformers' (``Qformer.bert.encoder.layer.0.attention.self.query`` vs
``qformer.encoder.layer.0.attention.attention.query``); ``lavis.weights.vision`` renames them.
Numerics as LAVIS (bert-base): post-LN, LayerNorm eps 1e-12, exact (erf) GELU (transformers' ``"gelu"``); with an
all-ones image mask the additive-mask constant (LAVIS -10000) plays no part.
"""

from __future__ import annotations

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from lavis.config.schema import QFormerConfig

QFORMER_LN_EPS = 1e-12
"""bert-base-uncased ``layer_norm_eps``, used by every Q-Former LayerNorm in LAVIS."""


def qformer_hf_config(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        layer_norm_eps=QFORMER_LN_EPS,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=encoder_width,
        use_qformer_text_input=False,
    )


def build_qformer(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerModel:
    return Blip2QFormerModel(qformer_hf_config(cfg, encoder_width))


def build_query_tokens(cfg: QFormerConfig) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))


def qformer_queries(
    qformer: Blip2QFormerModel, query_tokens: torch.Tensor, image_feats_NPW: torch.Tensor
) -> torch.Tensor:
    """``[N, num_query, hidden]`` query outputs for ``N`` images (or frames)."""
    n = image_feats_NPW.shape[0]
    out = qformer(
        query_embeds=query_tokens.expand(n, -1, -1),
        encoder_hidden_states=image_feats_NPW,
        encoder_attention_mask=torch.ones(image_feats_NPW.shape[:2], dtype=torch.long, device=image_feats_NPW.device),
    )
    return out.last_hidden_state
