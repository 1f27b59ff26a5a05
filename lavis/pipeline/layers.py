"""The pipeline's layer modules: ``[VisionEmbedPipe] [DecoderBlockPipe] x L [FinalNormPipe] [LMHeadPipe]``.

Each layer builds only its own piece (DeepSpeed's ``LayerSpec`` builds only the layers a stage owns) and
initialises it from its own seed (``lavis.model.init``), so every partition starts from the same weights. Local
parameter names map to the plain model's names through ``lavis.pipeline.plan.layer_table``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lavis.config.schema import LoRAConfig, ModelConfig
from lavis.data.cache_features import FROZEN_PREFIXES, FeatureCache, cache_level
from lavis.data.collate import StageInputs
from lavis.features import check_weights
from lavis.model.eva_vit import build_eva_vit, build_ln_vision
from lavis.model.init import init_modules_
from lavis.model.llm import DecoderParts
from lavis.model.lora import add_block_adapters, is_adapter_key, plain_key, quantize_block_
from lavis.model.mllm import (
    build_projection,
    build_qformer_parts,
    encode_queries,
    encode_vision,
    keep_frozen_encoders_in_eval,
    merge_media,
    project_queries,
)
from lavis.model.spec import LayerEntry, ModelSpec
from lavis.pipeline.stage_io import StageIO, float_additive_mask
from lavis.weights.base import model_shapes, stream_into
from lavis.weights.report import FileReport


class VisionEmbedPipe(nn.Module):
    """Layer 0: images -> ViT -> ln_vision -> Q-Former (or concatenated patch tokens) -> projection, written over the
    token embeddings.

    Input (the data iterator's ``PipeBatch.inputs``, :class:`~lavis.data.collate.StageInputs`): ``media`` (pixels
    ``[N,3,S,S]`` float), ``input_ids_BL`` and ``mask_BL`` (``[B,L]`` int64).
    With ``feature_cache`` (``data.feature_cache``) the frozen modules are not built (their init draws are still
    taken, on the meta device, so the rest of the layer starts identical) and ``media`` holds the cache's
    features instead of pixels: ``[N, Q, H]`` Q-Former outputs or ``[N, 1 + P, W]`` ``ln_vision`` features
    (``lavis.data.cache_features``). A cache built from other weights is refused here, at build time.
    """

    def __init__(
        self, cfg: ModelConfig, hf: PretrainedConfig, placeholder_id: int, seed: int | None,
        feature_cache: str | None = None, float_mask: bool = False, spec: ModelSpec | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.float_mask = float_mask
        """Send a float additive mask instead of the padding mask (``train.parallel.inter_stage_mask``)."""
        self.placeholder_id = placeholder_id
        self.cached: str | None = None
        skipped: list[str] = []
        if feature_cache is not None:
            self.cached = cache_level(cfg)
            check_weights(FeatureCache.open(feature_cache), cfg, spec)
            skipped = [p.rstrip(".") for p in FROZEN_PREFIXES[self.cached]]
        with torch.device("meta") if "visual_encoder" in skipped else contextlib.nullcontext():
            visual_encoder = build_eva_vit(cfg.vision)
            ln_vision = build_ln_vision(cfg.vision)
        with torch.device("meta") if "qformer" in skipped else contextlib.nullcontext():
            qformer, query_tokens = build_qformer_parts(cfg.qformer, cfg.vision.width)
        self.llm_proj = build_projection(cfg.projection, cfg.projection_in_dim, hf.hidden_size)
        self.embed_tokens = nn.Embedding(hf.vocab_size, hf.hidden_size)
        if seed is not None:
            init_modules_([visual_encoder, ln_vision, qformer, query_tokens, self.llm_proj, self.embed_tokens],
                          seed, cfg.init_std)
        if "visual_encoder" not in skipped:
            self.visual_encoder, self.ln_vision = visual_encoder, ln_vision
        if "qformer" not in skipped:
            self.qformer, self.query_tokens = qformer, query_tokens

    def train(self, mode: bool = True) -> VisionEmbedPipe:
        super().train(mode)
        if self.cached is None:
            keep_frozen_encoders_in_eval(self.cfg, self.visual_encoder, self.qformer)
        return self

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> StageIO:
        batch = StageInputs(*inputs)  # DeepSpeed hands the first stage a plain tuple
        media_in, input_ids_BL, mask_BL = batch.media, batch.input_ids_BL, batch.mask_BL
        embeds_BLD = self.embed_tokens(input_ids_BL)
        media = None
        if media_in.shape[0] > 0:
            if self.cached is None:
                feats = encode_vision(self.visual_encoder, self.ln_vision, media_in)
            else:
                feats = media_in.detach()
            if self.cached != "qformer":
                feats = encode_queries(self.qformer, self.query_tokens, feats, self.cfg.qformer.patch_concat)
            media = project_queries(self.llm_proj, feats)
        hidden_BLD = merge_media(embeds_BLD, input_ids_BL, media, self.placeholder_id)
        if self.float_mask:
            return StageIO(hidden_BLD, float_additive_mask(mask_BL, hidden_BLD.dtype))
        return StageIO(hidden_BLD, mask_BL)


class DecoderBlockPipe(nn.Module):
    """One transformers decoder block; builds its causal/padding mask and rotary table from the stage input.

    With ``lora`` the block gets peft adapters (``lavis.model.lora``) drawn from its own seed; with ``quantize`` its
    linear layers are bitsandbytes ones (quantized when the stage moves to the GPU, after its base weights are
    copied in). Base weights keep their plain names for loading (``base_layer.`` is dropped, see
    :func:`load_layer_weights`)."""

    def __init__(
        self, hf: PretrainedConfig, parts: DecoderParts, block_index: int, seed: int | None, std: float,
        recompute: bool = False, lora: LoRAConfig | None = None, quantize: str | None = None,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.block_index = block_index
        self.recompute = recompute
        """Recompute this block in backward instead of keeping its activations (non-reentrant)."""
        self.layer = parts.block(hf, layer_idx=block_index)
        # Held outside the module tree so precision casts (DeepSpeed's bf16) never round inv_freq.
        self._rotary = [parts.rotary(config=hf)]
        layer_types = getattr(hf, "layer_types", None)
        self.sliding = bool(layer_types) and layer_types[block_index] == "sliding_attention"
        if seed is not None:
            init_modules_([self.layer], seed, std)
        if quantize is not None:
            quantize_block_(self.layer, quantize)
        if lora is not None:
            add_block_adapters(self.layer, lora, block_index + 1 if seed is None else seed)

    def forward(self, io: tuple[torch.Tensor, torch.Tensor]) -> StageIO:
        hidden_BLD, mask_BL = io
        rotary = self._rotary[0]
        if rotary.inv_freq.device != hidden_BLD.device:
            self._rotary[0] = rotary = rotary.to(hidden_BLD.device)
        pos_1L = torch.arange(hidden_BLD.shape[1], device=hidden_BLD.device).unsqueeze(0)
        if mask_BL.is_floating_point():  # train.parallel.inter_stage_mask: float_additive, already [B, 1, L, L]
            attn_mask = mask_BL
        else:
            make_mask = create_sliding_window_causal_mask if self.sliding else create_causal_mask
            # No KV cache: the 4th parameter, named past_key_values before transformers 5.24 and cache since (the
            # old keyword goes in 5.40), so it is passed by position.
            attn_mask = make_mask(self.hf, hidden_BLD, mask_BL, None, position_ids=pos_1L)
        cos_sin = rotary(hidden_BLD, pos_1L)
        if self.recompute and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self._block, hidden_BLD, attn_mask, pos_1L, *cos_sin,
                                                    use_reentrant=False)
        else:
            out = self._block(hidden_BLD, attn_mask, pos_1L, *cos_sin)
        return StageIO(out, mask_BL)

    def _block(
        self, hidden_BLD: torch.Tensor, attn_mask: torch.Tensor | None, pos_1L: torch.Tensor, cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        out = self.layer(hidden_BLD, attention_mask=attn_mask, position_ids=pos_1L, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out  # older block classes return (hidden, ...)


class FinalNormPipe(nn.Module):
    def __init__(self, hf: PretrainedConfig, parts: DecoderParts, seed: int | None, std: float) -> None:
        super().__init__()
        self.norm = parts.norm(hf.hidden_size, eps=hf.rms_norm_eps)
        if seed is not None:
            init_modules_([self.norm], seed, std)

    def forward(self, io: tuple[torch.Tensor, torch.Tensor]) -> StageIO:
        hidden_BLD, mask_BL = io  # DeepSpeed delivers a plain tuple across stages
        return StageIO(self.norm(hidden_BLD), mask_BL)


class LMHeadPipe(nn.Module):
    """Last layer: hidden states -> logits ``[B, L, V]``; the engine's ``loss_fn`` turns them into the loss."""

    def __init__(self, hf: PretrainedConfig, seed: int | None, std: float) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hf.hidden_size, hf.vocab_size, bias=False)
        if seed is not None:
            init_modules_([self.lm_head], seed, std)

    def forward(self, io: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden_BLD, mask = io
        if mask.is_floating_point() and mask.requires_grad:
            # train.parallel.inter_stage_mask: float_additive: DeepSpeed requires a gradient for every float input of a
            # stage, also on a last stage without decoder blocks (a uniform split can leave it only norm and head).
            # One element times zero: a sum over the mask would overflow to -inf (its entries are the dtype's min).
            hidden_BLD = hidden_BLD + (mask.reshape(-1)[0] * 0.0).to(hidden_BLD.dtype)
        return self.lm_head(hidden_BLD)


def load_layer_weights(
    cfg: ModelConfig, layers: dict[int, nn.Module], table: list[LayerEntry], known: set[str] | None = None,
    checkpoint: str | None = None, spec: ModelSpec | None = None,
) -> list[FileReport]:
    """Read from disk only the tensors of ``layers`` (``{layer index: module}``, one stage's layers) from every file
    the config names, copy them in, and return the per-file reports (raises on any missing / unexpected /
    shape-mismatched key). Files are checked (headers) before any tensor is read; each tensor is copied in as it is
    read, so host RAM is the stage's parameters plus one tensor. Keys no configured file provides keep their seeded
    init. ``spec``: the entry point's description of ``cfg``."""
    # LoRA: base weights under their plain names (peft's ``base_layer.`` dropped); adapters are in no base file.
    targets = {table[idx].to_plain(plain_key(name)): t for idx, layer in layers.items()
               for name, t in layer.state_dict(keep_vars=True).items() if not is_adapter_key(name)}
    if known is None:
        known = set(model_shapes(cfg, spec))
    return stream_into(cfg, targets, known, checkpoint)[0]
