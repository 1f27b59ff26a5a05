"""EVA ViT (BLIP-2's frozen image encoder) built from timm's ``Eva`` with LAVIS parameter names.

timm's ``Eva`` with ``qkv_fused=True`` has exactly LAVIS's parameter names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.attn.{qkv,q_bias,v_bias,proj}``, ``mlp.fc1/fc2``, ``norm1/2``), the same
attention bias layout (``cat(q_bias, 0, v_bias)``: K has no bias; the zero K part is a non-persistent buffer), exact
(erf) GELU, pre-norm blocks and eps 1e-6 LayerNorms, and runs attention through SDPA. BLIP-2 has no final norm after
the blocks (``ln_vision``, eps 1e-5, follows instead), so ``norm`` is disabled and the output is all tokens, cls
first: ``[N, 1 + (S/P)^2, width]``. Construction is shape-only: position embeddings for another image size are
interpolated when a checkpoint is read (``lavis.weights.vision``), never in the forward.

``VisionConfig.precision == "fp16"`` reproduces LAVIS ``convert_weights_to_fp16``: the ``.weight``/``.bias`` of every
Conv2d and Linear are fp16; LayerNorms, ``cls_token``, ``pos_embed``, ``q_bias`` and ``v_bias`` stay fp32, and the
forward runs under fp16 autocast as LAVIS's ``maybe_autocast`` does (matmuls in fp16, LayerNorm and softmax in fp32,
the residual stream fp32 because ``cls_token``/``pos_embed`` are fp32), so the features come out fp32.
"""

from __future__ import annotations

import torch
from timm.models.eva import Eva
from torch import nn

from lavis.config.schema import VisionConfig


def build_eva_vit(cfg: VisionConfig) -> Eva:
    vit = Eva(
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
    if cfg.precision == "fp16":
        convert_vit_weights_to_fp16_(vit)
    return vit


def convert_vit_weights_to_fp16_(vit: nn.Module) -> None:
    """LAVIS ``convert_weights_to_fp16``: halve the weight and bias of every Conv1d/Conv2d/Linear, nothing else."""
    for m in vit.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()


def is_lavis_fp16(vit: Eva) -> bool:
    """True when the ViT holds LAVIS's mixed layout (fp16 Conv/Linear weights, fp32 ``cls_token``)."""
    cls = vit.cls_token  # None only for a ViT built without a class token, which build_eva_vit never does
    return vit.patch_embed.proj.weight.dtype == torch.float16 and cls is not None and cls.dtype == torch.float32


def vit_features(vit: Eva, pixels_NCHW: torch.Tensor) -> torch.Tensor:
    """All tokens of the last block, un-normalised: ``[N, 1 + num_patches, width]`` (fp32 in the fp16 layout)."""
    if is_lavis_fp16(vit):
        with torch.autocast(device_type=pixels_NCHW.device.type, dtype=torch.float16):
            return vit.forward_features(pixels_NCHW.half())
    return vit.forward_features(pixels_NCHW)


def build_ln_vision(cfg: VisionConfig) -> nn.LayerNorm:
    """``ln_vision`` (from the BLIP-2 checkpoint): torch's default eps 1e-5 in LAVIS, kept fp32 in the fp16 layout."""
    return nn.LayerNorm(cfg.width, eps=cfg.ln_vision_eps)
