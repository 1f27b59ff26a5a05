"""Synthetic vision weight files with the real key names and shapes (docs/FORMATS.md sections 1-2), random values.

No real weights can be downloaded here, so tests and ``lavis.inspect`` checks use these: ``eva_vit_g.pth`` (flat
LAVIS state dict; by default with the 40th EVA-CLIP-g block) and ``blip2_pretrained_flant5xxl.pth``
(``{"model": ...}``: query-only Q-Former keys, the persistent ``position_ids`` buffer, ``query_tokens``,
``ln_vision``, ``t5_proj``). ``eva_vit_file_shapes`` / ``blip2_file_shapes`` give the key -> shape layout without
allocating; the writers fill exactly that layout. Values: norm weights ~1, biases and embeddings small, matrices
N(0, 1/fan_in), so a forward through them is well scaled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lavis.config.schema import ModelConfig, VisionConfig

Shape = tuple[int, ...]
BERT_MAX_POSITIONS = 512
"""bert-base-uncased ``max_position_embeddings``: the length of ``Qformer.bert.embeddings.position_ids``."""
BERT_VOCAB = 30522
T5_XXL_HIDDEN = 4096
EVA_CLIP_G_EMBED = 1024
"""Output width of EVA-CLIP-g's projection head (``head.weight`` [1024, 1408]) [U]."""


def eva_vit_file_shapes(cfg: VisionConfig, *, extra_block: bool = True, clip_head: bool = False) -> dict[str, Shape]:
    """``eva_vit_g.pth`` layout for ``cfg``: LAVIS names, no prefix; ``extra_block`` adds block ``cfg.depth``
    (the 40th for ViT-g), ``clip_head`` adds EVA-CLIP's ``norm.*`` and ``head.*``."""
    w, grid = cfg.width, cfg.image_size // cfg.patch_size
    shapes: dict[str, Shape] = {
        "cls_token": (1, 1, w),
        "pos_embed": (1, 1 + grid * grid, w),
        "patch_embed.proj.weight": (w, 3, cfg.patch_size, cfg.patch_size),
        "patch_embed.proj.bias": (w,),
    }
    for i in range(cfg.depth + (1 if extra_block else 0)):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (w,), b + "norm1.bias": (w,),
            b + "attn.qkv.weight": (3 * w, w),
            b + "attn.q_bias": (w,), b + "attn.v_bias": (w,),
            b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "norm2.weight": (w,), b + "norm2.bias": (w,),
            b + "mlp.fc1.weight": (cfg.mlp_hidden, w), b + "mlp.fc1.bias": (cfg.mlp_hidden,),
            b + "mlp.fc2.weight": (w, cfg.mlp_hidden), b + "mlp.fc2.bias": (w,),
        }
    if clip_head:
        shapes |= {"norm.weight": (w,), "norm.bias": (w,),
                   "head.weight": (EVA_CLIP_G_EMBED, w), "head.bias": (EVA_CLIP_G_EMBED,)}
    return shapes


def blip2_file_shapes(cfg: ModelConfig, *, t5_proj: bool = True, text_branch: bool = False) -> dict[str, Shape]:
    """The ``model`` entry of ``blip2_pretrained_flant5xxl.pth`` for ``cfg``; ``text_branch`` adds the Q-Former text
    parts (word/position embeddings, text FFN, ``cls``) that stage-1 BLIP-2 files carry."""
    q, vw = cfg.qformer, cfg.vision.width
    h, inter = q.hidden_size, q.intermediate_size
    e = "Qformer.bert.embeddings."
    shapes: dict[str, Shape] = {
        "query_tokens": (1, q.num_query_tokens, h),
        "ln_vision.weight": (vw,), "ln_vision.bias": (vw,),
        e + "LayerNorm.weight": (h,), e + "LayerNorm.bias": (h,),
        e + "position_ids": (1, BERT_MAX_POSITIONS),
    }
    if text_branch:
        shapes |= {e + "word_embeddings.weight": (BERT_VOCAB, h),
                   e + "position_embeddings.weight": (BERT_MAX_POSITIONS, h)}

    def attention(prefix: str, kv_width: int) -> dict[str, Shape]:
        return {
            prefix + "self.query.weight": (h, h), prefix + "self.query.bias": (h,),
            prefix + "self.key.weight": (h, kv_width), prefix + "self.key.bias": (h,),
            prefix + "self.value.weight": (h, kv_width), prefix + "self.value.bias": (h,),
            prefix + "output.dense.weight": (h, h), prefix + "output.dense.bias": (h,),
            prefix + "output.LayerNorm.weight": (h,), prefix + "output.LayerNorm.bias": (h,),
        }

    for i in range(q.num_layers):
        b = f"Qformer.bert.encoder.layer.{i}."
        shapes |= attention(b + "attention.", h)
        if i % q.cross_attention_freq == 0:
            shapes |= attention(b + "crossattention.", vw)
        shapes |= {
            b + "intermediate_query.dense.weight": (inter, h), b + "intermediate_query.dense.bias": (inter,),
            b + "output_query.dense.weight": (h, inter), b + "output_query.dense.bias": (h,),
            b + "output_query.LayerNorm.weight": (h,), b + "output_query.LayerNorm.bias": (h,),
        }
        if text_branch:
            shapes |= {
                b + "intermediate.dense.weight": (inter, h), b + "intermediate.dense.bias": (inter,),
                b + "output.dense.weight": (h, inter), b + "output.dense.bias": (h,),
                b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,),
            }
    if text_branch:
        shapes |= {
            "Qformer.cls.predictions.bias": (BERT_VOCAB,),
            "Qformer.cls.predictions.transform.dense.weight": (h, h),
            "Qformer.cls.predictions.transform.dense.bias": (h,),
            "Qformer.cls.predictions.transform.LayerNorm.weight": (h,),
            "Qformer.cls.predictions.transform.LayerNorm.bias": (h,),
            "Qformer.cls.predictions.decoder.weight": (BERT_VOCAB, h),
            "Qformer.cls.predictions.decoder.bias": (BERT_VOCAB,),
        }
    if t5_proj:
        shapes |= {"t5_proj.weight": (T5_XXL_HIDDEN, h), "t5_proj.bias": (T5_XXL_HIDDEN,)}
    return shapes


def random_tensor(key: str, shape: Shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A well-scaled random value for a weight named ``key`` (int64 ``arange`` for ``position_ids``)."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    leaf = key.rsplit(".", 1)[-1]
    is_norm = any(n in key for n in ("norm", "LayerNorm", "ln_vision"))
    if is_norm and leaf == "weight":
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif leaf == "bias" or leaf in ("q_bias", "v_bias"):
        t = 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) >= 2 and leaf == "weight":
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        t = torch.randn(shape, generator=gen) / fan_in**0.5
    else:  # cls_token, pos_embed, query_tokens, temp
        t = 0.5 * torch.randn(shape, generator=gen)
    return t.to(dtype)


def _fill(shapes: dict[str, Shape], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, dtype, gen) for k, s in shapes.items()}


def write_synthetic_eva_vit(
    path: str | Path,
    cfg: VisionConfig,
    *,
    extra_block: bool = True,
    clip_head: bool = False,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> dict[str, Shape]:
    """Write a flat LAVIS-layout ``eva_vit_g.pth`` (fp16 like the released file); returns its key -> shape."""
    shapes = eva_vit_file_shapes(cfg, extra_block=extra_block, clip_head=clip_head)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(_fill(shapes, dtype, seed), path)
    return shapes


def write_synthetic_blip2(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    t5_proj: bool = True,
    text_branch: bool = False,
) -> dict[str, Shape]:
    """Write ``{"model": state_dict}`` like ``blip2_pretrained_flant5xxl.pth`` (fp32 [U]); returns its key -> shape."""
    shapes = blip2_file_shapes(cfg, t5_proj=t5_proj, text_branch=text_branch)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _fill(shapes, dtype, seed)}, path)
    return shapes
