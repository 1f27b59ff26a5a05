"""EVA ViT (BLIP-2's frozen image encoder) built from timm's ``Eva`` with LAVIS parameter names.

timm's ``Eva`` with ``qkv_fused=True`` has exactly LAVIS's parameter names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.attn.{qkv,q_bias,v_bias,proj}``, ``mlp.fc1/fc2``, ``norm1/2``), no K bias, exact
GELU, pre-norm blocks and eps 1e-6 LayerNorms, and runs attention through SDPA. BLIP-2 has no final norm after the
blocks (``ln_vision`` follows instead), so ``norm`` is disabled and the output is all tokens, cls first:
``[N, 1 + (S/P)^2, width]``.
"""

from __future__ import annotations

import torch
from timm.models.eva import Eva
from torch import nn

from lavis.config.schema import VisionConfig


def build_eva_vit(cfg: VisionConfig) -> Eva:
    return Eva(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden / cfg.width,
        qkv_fused=True,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        use_abs_pos_emb=True,
        use_rot_pos_emb=False,
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )


def vit_features(vit: Eva, pixels_NCHW: torch.Tensor) -> torch.Tensor:
    """All tokens of the last block, un-normalised: ``[N, 1 + num_patches, width]``."""
    return vit.forward_features(pixels_NCHW)


def build_ln_vision(cfg: VisionConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.width, eps=cfg.ln_vision_eps)
