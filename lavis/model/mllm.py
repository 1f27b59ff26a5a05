"""The plain (non-pipeline) multimodal model: ViT -> ln_vision -> Q-Former -> projection -> LLM.

Without a Q-Former (``model.qformer.enabled: false``, MiniGPT-4's LLaMA-2 model) the ViT's patch tokens, a few
concatenated per image token, go straight into the projection; ``qformer`` and ``query_tokens`` are then None.

This is the reference path: training parity tests compare the pipeline against it, and chat runs it. Module names
follow the predecessors (MiniGPT-4 / MPP-Qwen) so their checkpoints map with few renames: ``visual_encoder``,
``ln_vision``, ``query_tokens``, ``llm_proj``, ``llm_model``; the Q-Former keeps transformers' names under
``qformer``. Construction does no I/O; weights come from :meth:`MultimodalLM.init_weights` or a loader.

Shapes: B batch, L tokens, D LLM width, N images (video frames count as images), Q queries per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lavis.config.schema import ModelConfig, ProjectionConfig, QFormerConfig
from lavis.data.conversation import IGNORE_INDEX
from lavis.model.components import COMPONENTS
from lavis.model.eva_vit import build_eva_vit, build_ln_vision, vit_features
from lavis.model.freezing import component_trains, is_trainable
from lavis.model.init import init_modules_
from lavis.model.llm import build_llm, llm_hf_config
from lavis.model.qformer import build_qformer, build_query_tokens, qformer_queries
from lavis.model.spec import ModelSpec, layer_table

if TYPE_CHECKING:
    from timm.models.eva import Eva
    from transformers import Blip2QFormerModel

FAMILY = "blip2"
"""This model's family name (``lavis.families.FAMILIES``)."""


def describe(cfg: ModelConfig, published: dict[str, Any] | None = None) -> ModelSpec:
    """This family's ``ModelSpec`` of ``cfg``: the one call of ``llm_hf_config`` (``published``: see there)."""
    hf = llm_hf_config(cfg.llm, published)
    return ModelSpec(family=FAMILY, hf=hf, layers=tuple(layer_table(hf.num_hidden_layers)),
                     trains=tuple(c for c in COMPONENTS if component_trains(c, cfg)))


def build_qformer_parts(
    cfg: QFormerConfig, encoder_width: int
) -> tuple[Blip2QFormerModel | None, nn.Parameter | None]:
    """The Q-Former and its ``query_tokens``, or ``(None, None)`` when ``cfg.enabled`` is false."""
    if not cfg.enabled:
        return None, None
    return build_qformer(cfg, encoder_width), build_query_tokens(cfg)


def concat_patches(feats_NPW: torch.Tensor, factor: int) -> torch.Tensor:
    """MiniGPT-4 without a Q-Former: drop the cls token, then concatenate each ``factor`` consecutive patch tokens
    (raster order): ``[N, 1 + P, W]`` -> ``[N, P / factor, factor * W]``."""
    patches_NPW = feats_NPW[:, 1:]
    n, p, w = patches_NPW.shape
    return patches_NPW.reshape(n, p // factor, factor * w)


def build_projection(cfg: ProjectionConfig, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def _trains(module: nn.Module | nn.Parameter) -> bool:
    params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def encode_media(
    visual_encoder: Eva,
    ln_vision: nn.Module,
    qformer: Blip2QFormerModel | None,
    query_tokens: nn.Parameter | None,
    llm_proj: nn.Module,
    pixels_NCHW: torch.Tensor,
    patch_concat: int = 0,
) -> torch.Tensor:
    """Images (or frames) -> ``[N, Q, D]`` LLM-space embeddings. Frozen parts run without autograd.
    ``qformer`` None: no Q-Former, see :func:`encode_queries`."""
    feats_NPW = encode_vision(visual_encoder, ln_vision, pixels_NCHW)
    return project_queries(llm_proj, encode_queries(qformer, query_tokens, feats_NPW, patch_concat))


def encode_vision(visual_encoder: Eva, ln_vision: nn.Module, pixels_NCHW: torch.Tensor) -> torch.Tensor:
    """Images -> ``[N, 1 + patches, W]`` ``ln_vision`` features (without autograd when both are frozen)."""
    with torch.set_grad_enabled(_trains(visual_encoder) or _trains(ln_vision)):
        w = visual_encoder.patch_embed.proj.weight
        return ln_vision(vit_features(visual_encoder, pixels_NCHW.to(w.dtype)))


def encode_queries(
    qformer: Blip2QFormerModel | None, query_tokens: nn.Parameter | None, feats_NPW: torch.Tensor, patch_concat: int = 0
) -> torch.Tensor:
    """``ln_vision`` features -> ``[N, Q, H]`` Q-Former query outputs (without autograd when frozen); with
    ``qformer`` None, ``patch_concat`` (>= 1) concatenated patch tokens per image token (:func:`concat_patches`)."""
    if qformer is None or query_tokens is None:
        if patch_concat < 1:
            raise ValueError(f"encode_queries without a Q-Former needs patch_concat >= 1 (got {patch_concat})")
        return concat_patches(feats_NPW, patch_concat)
    with torch.set_grad_enabled(_trains(qformer) or _trains(query_tokens)):
        return qformer_queries(qformer, query_tokens, feats_NPW.to(query_tokens.dtype))


def project_queries(llm_proj: nn.Module, queries_NQH: torch.Tensor) -> torch.Tensor:
    return llm_proj(queries_NQH.to(next(llm_proj.parameters()).dtype))


def merge_media(
    embeds_BLD: torch.Tensor, input_ids_BL: torch.Tensor, media_NQD: torch.Tensor | None, placeholder_id: int
) -> torch.Tensor:
    """Write the media embeddings over the placeholder positions, row-major over the batch, in image order."""
    slots_BL = input_ids_BL == placeholder_id
    num_slots = int(slots_BL.sum())
    num_media_tokens = 0 if media_NQD is None else media_NQD.shape[0] * media_NQD.shape[1]
    if num_slots != num_media_tokens:
        raise ValueError(
            f"{num_slots} image placeholder tokens in the batch but {num_media_tokens} image embeddings "
            "(images x queries); every image needs exactly one placeholder run"
        )
    if media_NQD is None or num_slots == 0:
        return embeds_BLD
    return embeds_BLD.masked_scatter(slots_BL.unsqueeze(-1), media_NQD.to(embeds_BLD.dtype))


def keep_frozen_encoders_in_eval(cfg: ModelConfig, visual_encoder: nn.Module, qformer: nn.Module | None) -> None:
    """Frozen encoders stay in eval mode (no dropout), as in LAVIS, without monkeypatching ``train``."""
    if cfg.vision.frozen:
        visual_encoder.eval()
    if cfg.qformer.frozen and qformer is not None:
        qformer.eval()


def lm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over trained (label != -100) positions; labels are not pre-shifted."""
    return F.cross_entropy(
        logits_BLV[:, :-1].flatten(0, 1).float(), labels_BL[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


class MultimodalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, placeholder_id: int, spec: ModelSpec | None = None) -> None:
        """``spec``: the entry point's description of ``cfg`` (described here when not given)."""
        super().__init__()
        self.cfg = cfg
        self.placeholder_id = placeholder_id
        self.visual_encoder = build_eva_vit(cfg.vision)
        self.ln_vision = build_ln_vision(cfg.vision)
        self.qformer, self.query_tokens = build_qformer_parts(cfg.qformer, cfg.vision.width)
        hf = (spec or describe(cfg)).hf
        self.llm_proj = build_projection(cfg.projection, cfg.projection_in_dim, hf.hidden_size)
        self.llm_model = build_llm(hf)

    def embed_components(self) -> list[nn.Module | nn.Parameter | None]:
        """Layer 0 of the pipeline, in init order (see ``lavis.pipeline.layers.VisionEmbedPipe``); None where there
        is no Q-Former."""
        return [
            self.visual_encoder,
            self.ln_vision,
            self.qformer,
            self.query_tokens,
            self.llm_proj,
            self.llm_model.model.embed_tokens,
        ]

    def init_weights(self, seed: int) -> None:
        """Per-layer seeded init, identical to what the pipeline layers do (``lavis.model.init``)."""
        std = self.cfg.init_std
        init_modules_(self.embed_components(), seed, std)
        layers = self.llm_model.model.layers
        for j, block in enumerate(layers):
            init_modules_([block], seed + 1 + j, std)
        init_modules_([self.llm_model.model.norm], seed + 1 + len(layers), std)
        init_modules_([self.llm_model.lm_head], seed + 2 + len(layers), std)

    def apply_trainable(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name, self.cfg))

    def train(self, mode: bool = True) -> MultimodalLM:
        super().train(mode)
        keep_frozen_encoders_in_eval(self.cfg, self.visual_encoder, self.qformer)
        return self

    def embed(self, pixels_NCHW: torch.Tensor, input_ids_BL: torch.Tensor) -> torch.Tensor:
        embeds_BLD = self.llm_model.get_input_embeddings()(input_ids_BL)
        media = None
        if pixels_NCHW.shape[0] > 0:
            media = encode_media(
                self.visual_encoder, self.ln_vision, self.qformer, self.query_tokens, self.llm_proj, pixels_NCHW,
                self.cfg.qformer.patch_concat,
            )
        return merge_media(embeds_BLD, input_ids_BL, media, self.placeholder_id)

    def forward(
        self, pixels_NCHW: torch.Tensor, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` through the transformers model's own forward (the independent reference)."""
        embeds = self.embed(pixels_NCHW, input_ids_BL)
        return self.llm_model(inputs_embeds=embeds, attention_mask=attention_mask_BL).logits

    def loss(
        self,
        pixels_NCHW: torch.Tensor,
        input_ids_BL: torch.Tensor,
        attention_mask_BL: torch.Tensor,
        labels_BL: torch.Tensor,
    ) -> torch.Tensor:
        return lm_loss(self.forward(pixels_NCHW, input_ids_BL, attention_mask_BL), labels_BL)
