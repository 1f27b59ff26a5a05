"""The pipeline's layer list for a transformers VLM, built from transformers' own modules.

``[PatchEmbed] [VisionBlocks] x ceil(depth / g) [MergerEmbed] [DecoderBlock] x L [FinalNorm] [LMHead]``

What travels (DeepSpeed pipes tuples of tensors; the one float tensor of each tuple takes part in autograd, the
rest are int64, see ``lavis.pipeline.stage_io``):

- stage 0's input (``batch[0]``), :class:`lavis.vlm.collate.VLMStageInputs` (what ``VLMCollator`` yields):
  ``(pixels [Np, C*T*P*P] float, grid_thw [n, 3], media_kind [n] (``MEDIA_IMAGE`` / ``MEDIA_VIDEO``),
  second_per_grid [n] float (video seconds per temporal patch; images 1.0), input_ids [B, L], mask [B, L])``;
  rows of ``pixels`` / ``grid_thw`` are all images in sequence order, then all videos.
- inside the vision tower, :class:`VisionIO`: ``(vis [Np, Dv * (1 + k)], grid_thw, media_kind, input_ids, mask,
  pos [3, B, L])``: the M-RoPE positions are computed once, in the first layer, by the family's own
  ``get_rope_index``; ``k`` DeepStack features (Qwen3-VL) collected so far are concatenated to the patch states.
- after the merger, :class:`TextIO`: ``(hidden [B, L, D * (1 + k)], mask, pos)``: DeepStack feature ``s`` is zero
  except at the visual positions and is added to the output of decoder layer ``s``, which drops it from the tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from lavis.pipeline.plan import LayerEntry
from lavis.vlm.arch import RopeIndex, family_of
from lavis.vlm.collate import MEDIA_IMAGE, MEDIA_VIDEO, VLMStageInputs


class VisionIO(NamedTuple):
    vis: torch.Tensor
    grid_thw: torch.Tensor
    media_kind: torch.Tensor
    input_ids_BL: torch.Tensor
    mask_BL: torch.Tensor
    pos_3BL: torch.Tensor


class TextIO(NamedTuple):
    hidden_BLD: torch.Tensor
    mask_BL: torch.Tensor
    pos_3BL: torch.Tensor


def _held(module: nn.Module, device: torch.device) -> nn.Module:
    """Weightless helpers (rotary tables) live outside the module tree (precision casts never round them); moved
    to the data's device on first use."""
    return module if module.inv_freq.device == device else module.to(device)


class PatchEmbedPipe(nn.Module):
    """Patches -> vision width (Qwen3-VL: plus the learned position embedding resampled to each grid); Qwen2.5-VL
    permutes them into attention windows here. Also computes the M-RoPE positions once."""

    def __init__(self, hf: PretrainedConfig, cached: bool = False) -> None:
        super().__init__()
        v = hf.vision_config
        self.hf, self.fam = hf, family_of(hf)
        self.cached = cached
        """``data.feature_cache``: stage 0 reads the merger's cached outputs; only the positions are computed."""
        if cached:
            pass
        elif self.fam.windowed:
            self.patch_embed = Qwen2_5_VisionPatchEmbed(v.patch_size, v.temporal_patch_size, v.in_channels,
                                                        v.hidden_size)
        else:
            self.patch_embed = Qwen3VLVisionPatchEmbed(v)
            self.pos_embed = nn.Embedding(v.num_position_embeddings, v.hidden_size)
        self.rope_index = RopeIndex(hf)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> VisionIO:
        pixels, grid, kind, second_per_grid, ids_BL, mask_BL = VLMStageInputs(*inputs)
        check_placeholders(self.hf, grid, kind, ids_BL)
        images, videos = grid[kind == MEDIA_IMAGE], grid[kind == MEDIA_VIDEO]
        pos = self.rope_index(ids_BL, mask_BL, images if len(images) else None, videos if len(videos) else None,
                              second_per_grid[kind == MEDIA_VIDEO] if len(videos) else None)
        if self.cached:  # [tokens, D * (1 + k)]: the merged tokens (and DeepStack features) of lavis.vlm.feature_cache
            return VisionIO(pixels, grid, kind, ids_BL, mask_BL, pos)
        return VisionIO(self.embed(pixels, grid), grid, kind, ids_BL, mask_BL, pos)

    def embed(self, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Patches -> vision width (Qwen2.5-VL: in window order)."""
        vis = self.patch_embed(pixels)
        v = self.hf.vision_config
        if self.fam.windowed:
            window_index, _ = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
            vis = permute_windows(vis, window_index, v.spatial_merge_size)
        else:
            idx, weights = get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=int(v.num_position_embeddings**0.5), mode="bilinear", align_corners=True,
                spatial_merge_size=v.spatial_merge_size)
            vis = vis + (self.pos_embed(idx) * weights[:, :, None]).sum(1).to(vis.dtype)
        return vis


def permute_windows(x: torch.Tensor, window_index: torch.Tensor, merge: int) -> torch.Tensor:
    """Qwen2.5-VL's ``permute_input_for_window_attn``: merge units (``merge^2`` consecutive rows) in window order."""
    unit = merge * merge
    return x.reshape(x.shape[0] // unit, unit, -1)[window_index].reshape(x.shape[0], -1)


class VisionBlocksPipe(nn.Module):
    """Vision blocks ``first .. first + count - 1``; Qwen3-VL's DeepStack blocks append a copy of their output."""

    def __init__(self, hf: PretrainedConfig, first: int, count: int, cached: bool = False) -> None:
        super().__init__()
        self.hf, self.fam = hf, family_of(hf)
        self.first = first
        self.cached = cached
        """``data.feature_cache``: no blocks; the cached features pass through."""
        v = hf.vision_config
        self.blocks = nn.ModuleList(self.fam.vision_block(v) for _ in range(0 if cached else count))
        with torch.device("cpu"):  # also when the layer is built on the meta device
            self._rotary = [self.fam.vision_rotary(v)]

    def forward(self, io: tuple[torch.Tensor, ...]) -> VisionIO:
        vis, grid, kind, ids_BL, mask_BL, pos = io
        if self.cached:
            return VisionIO(vis, grid, kind, ids_BL, mask_BL, pos)
        v = self.hf.vision_config
        width = v.hidden_size
        main, extras = vis[:, :width], [vis[:, width:]] if vis.shape[1] > width else []
        rotary = self._rotary[0] = _held(self._rotary[0], vis.device)
        cos_sin = rotary(main, get_vision_position_ids(grid, v.spatial_merge_size))
        cu_full, max_full = get_vision_attention_seqlens(grid, v)
        cu_win = max_win = None
        if self.fam.windowed:
            window_index, cu_win = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
            max_win = get_max_seqlen(cu_win, v)
            cos_sin = tuple(permute_windows(t, window_index, v.spatial_merge_size) for t in cos_sin)
        for i, block in enumerate(self.blocks):
            index = self.first + i
            full = not self.fam.windowed or index in v.fullatt_block_indexes
            main = block(main, cu_seqlens=cu_full if full else cu_win, max_seqlen=max_full if full else max_win,
                         position_embeddings=cos_sin)
            if self.fam.deepstack and index in v.deepstack_visual_indexes:
                extras.append(main)
        return VisionIO(torch.cat([main, *extras], dim=1) if extras else main, grid, kind, ids_BL, mask_BL, pos)


class MergerEmbedPipe(nn.Module):
    """Patch merger (Qwen2.5-VL: back from window order) and Qwen3-VL's DeepStack mergers, then the token
    embeddings with the visual tokens written at the image / video placeholders."""

    def __init__(self, hf: PretrainedConfig, cached: bool = False) -> None:
        super().__init__()
        self.hf, self.fam = hf, family_of(hf)
        v, t = hf.vision_config, hf.text_config
        self.cached = cached
        """``data.feature_cache``: no mergers; the input already holds their outputs (:meth:`merge`)."""
        if cached:
            pass
        elif self.fam.windowed:
            self.merger = self.fam.merger(dim=v.out_hidden_size, context_dim=v.hidden_size,
                                          spatial_merge_size=v.spatial_merge_size)
        else:
            self.merger = self.fam.merger(v, use_postshuffle_norm=False)
            self.deepstack_merger_list = nn.ModuleList(
                self.fam.merger(v, use_postshuffle_norm=True) for _ in v.deepstack_visual_indexes)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, t.pad_token_id)

    def forward(self, io: tuple[torch.Tensor, ...]) -> TextIO:
        vis, grid, kind, ids_BL, mask_BL, pos = io
        embeds = self.embed_tokens(ids_BL)
        if vis.shape[0] == 0:
            return TextIO(embeds, mask_BL, pos)
        merged = vis if self.cached else self.merge(vis, grid)
        d = self.hf.text_config.hidden_size
        hidden = [self.place(embeds if s == 0 else torch.zeros_like(embeds), merged[:, s * d:(s + 1) * d], grid, kind,
                             ids_BL) for s in range(merged.shape[1] // d)]
        return TextIO(torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0], mask_BL, pos)

    def merge(self, vis: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``[tokens, D * (1 + k)]``: the merged visual tokens in grid order, then (Qwen3-VL) the ``k`` DeepStack
        features, each merged by its own merger (what ``data.feature_cache`` stores per image / clip)."""
        v = self.hf.vision_config
        width = v.hidden_size
        merged = self.merger(vis[:, :width].contiguous())
        order = None
        if self.fam.windowed:
            window_index, _ = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
            order = torch.argsort(window_index)
            merged = merged[order]
        out = [merged]
        if self.fam.deepstack:
            for slot, block in enumerate(sorted(v.deepstack_visual_indexes)):
                feats = vis[:, width * (1 + slot): width * (2 + slot)].contiguous()
                out.append(self.deepstack_merger_list[v.deepstack_visual_indexes.index(block)](feats))
        return torch.cat(out, dim=1) if len(out) > 1 else merged

    def place(self, base_BLD: torch.Tensor, tokens: torch.Tensor, grid: torch.Tensor, kind: torch.Tensor,
              ids_BL: torch.Tensor) -> torch.Tensor:
        """``tokens`` (all items' merged tokens, grid order) written over ``base_BLD`` at the placeholders: image
        items' tokens at the image token in order, video items' at the video token (``masked_scatter``, as
        transformers does)."""
        sizes = (grid.prod(-1) // self.hf.vision_config.spatial_merge_size**2).tolist()
        parts = torch.split(tokens, sizes)
        out = base_BLD
        check_placeholders(self.hf, grid, kind, ids_BL)
        for code, token_id in ((MEDIA_IMAGE, self.hf.image_token_id), (MEDIA_VIDEO, self.hf.video_token_id)):
            rows = [p for p, k in zip(parts, kind.tolist()) if k == code]
            if rows:
                mask = (ids_BL == token_id).unsqueeze(-1)
                out = out.masked_scatter(mask, torch.cat(rows).to(out.dtype))
        return out


def check_placeholders(hf: PretrainedConfig, grid: torch.Tensor, kind: torch.Tensor, ids_BL: torch.Tensor) -> None:
    """The batch holds as many image / video placeholders as the grids give merged tokens."""
    merge = hf.vision_config.spatial_merge_size
    tokens = (grid.prod(-1) // merge**2).tolist()
    for code, token_id, what in ((MEDIA_IMAGE, hf.image_token_id, "image"), (MEDIA_VIDEO, hf.video_token_id, "video")):
        n_feat = sum(n for n, k in zip(tokens, kind.tolist()) if k == code)
        n_ids = int((ids_BL == token_id).sum())
        if n_ids != n_feat:
            raise ValueError(f"{what} placeholders in the batch: {n_ids}, {what} tokens from the vision tower: "
                             f"{n_feat} (each {what} needs grid_t*grid_h*grid_w/{merge**2} placeholders; was the "
                             "text made by the model's own processor?)")


class DecoderBlockPipe(nn.Module):
    """One transformers decoder layer with the M-RoPE positions that travel; adds the next DeepStack feature (if
    one is still in the tuple) to its output. ``recompute``: the layer runs under non-reentrant
    ``torch.utils.checkpoint`` (``train.parallel.activation_checkpoint_blocks``), keeping only its input for backward.
    The class name is what ``train.parallel.activation_checkpoint_interval`` checkpoints (``checkpointable_layers``)."""

    def __init__(self, hf: PretrainedConfig, index: int, recompute: bool = False) -> None:
        super().__init__()
        self.hf, self.fam = hf, family_of(hf)
        t = hf.text_config
        self.text = t
        self.index = index
        self.recompute = recompute
        self.layer = self.fam.decoder_layer(t, index)
        layer_types = getattr(t, "layer_types", None)
        self.sliding = bool(layer_types) and layer_types[index] == "sliding_attention"
        with torch.device("cpu"):  # also when the layer is built on the meta device
            self._rotary = [self.fam.text_rotary(config=t)]

    def forward(self, io: tuple[torch.Tensor, ...]) -> TextIO:
        hidden, mask_BL, pos = io
        d = self.text.hidden_size
        h = hidden[..., :d]
        make_mask = create_sliding_window_causal_mask if self.sliding else create_causal_mask
        attn_mask = make_mask(config=self.text, inputs_embeds=h, attention_mask=mask_BL, cache=None,
                              position_ids=None)
        rotary = self._rotary[0] = _held(self._rotary[0], h.device)
        cos, sin = rotary(h, pos)
        if self.recompute and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self._block, h, attn_mask, cos, sin, use_reentrant=False)
        else:
            out = self._block(h, attn_mask, cos, sin)
        if hidden.shape[-1] > d:  # the next DeepStack feature belongs to this layer
            out = torch.cat([out + hidden[..., d:2 * d], hidden[..., 2 * d:]], dim=-1)
        return TextIO(out, mask_BL, pos)

    def _block(self, h: torch.Tensor, attn_mask: torch.Tensor | None, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        out = self.layer(h, attention_mask=attn_mask, position_ids=None, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


class FinalNormPipe(nn.Module):
    def __init__(self, hf: PretrainedConfig) -> None:
        super().__init__()
        t = hf.text_config
        self.norm = family_of(hf).text_norm(t.hidden_size, eps=t.rms_norm_eps)

    def forward(self, io: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask_BL, _ = io
        return self.norm(hidden), mask_BL


class LMHeadPipe(nn.Module):
    """Last layer: logits ``[B, L, V]``; the loss is ``lavis.model.mllm.lm_loss`` (labels not pre-shifted), as for
    every family."""

    def __init__(self, hf: PretrainedConfig) -> None:
        super().__init__()
        t = hf.text_config
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)

    def forward(self, io: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.lm_head(io[0])


def vision_groups(hf: PretrainedConfig, per_layer: int) -> list[tuple[int, int]]:
    """(first block, count) of each vision layer-list entry."""
    depth = hf.vision_config.depth
    return [(i, min(per_layer, depth - i)) for i in range(0, depth, per_layer)]


def layer_classes(hf: PretrainedConfig, per_layer: int = 1, recompute_blocks: frozenset[int] = frozenset(),
                  cached: bool = False) -> list[tuple[type[nn.Module], tuple]]:
    """The layer list as ``(class, args)``: what the family's ``pipeline_layers`` hands the pipeline
    (``lavis.vlm.family``) and what :func:`build_layers` instantiates in one process. ``recompute_blocks``: decoder
    blocks recomputed in backward; ``cached``: ``data.feature_cache`` (the vision layers and the mergers hold nothing
    and pass the cached features on; the list keeps its length, so layer indices, checkpoints and exports are those
    of the full model)."""
    out: list[tuple[type[nn.Module], tuple]] = [(PatchEmbedPipe, (hf, cached))]
    out += [(VisionBlocksPipe, (hf, first, count, cached)) for first, count in vision_groups(hf, per_layer)]
    out.append((MergerEmbedPipe, (hf, cached)))
    out += [(DecoderBlockPipe, (hf, j, j in recompute_blocks)) for j in range(hf.text_config.num_hidden_layers)]
    out += [(FinalNormPipe, (hf,)), (LMHeadPipe, (hf,))]
    return out


def meta_built(cls: type[nn.Module], *args: object, **kwargs: object) -> nn.Module:
    """``cls(*args)`` with its parameters allocated but not initialised (no random init is drawn for weights that
    are read next)."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    return module.to_empty(device="cpu")


def build_layers(hf: PretrainedConfig, per_layer: int = 1, meta: bool = True,
                 recompute_blocks: frozenset[int] = frozenset(), cached: bool = False) -> list[nn.Module]:
    """Every layer, in one process (tests, converters, chat)."""
    make = meta_built if meta else (lambda cls, *args: cls(*args))
    return [make(cls, *args) for cls, args in layer_classes(hf, per_layer, recompute_blocks, cached)]


def layer_table(hf: PretrainedConfig, per_layer: int = 1) -> list[LayerEntry]:
    """Which published weight names each layer holds (``visual.*``, ``model.*``, ``lm_head.*``, the layout of the
    released directories)."""
    table = [LayerEntry(0, "vision", (("patch_embed.", "visual.patch_embed."), ("pos_embed.", "visual.pos_embed.")))]
    for first, count in vision_groups(hf, per_layer):
        table.append(LayerEntry(len(table), "vision",
                                tuple((f"blocks.{i}.", f"visual.blocks.{first + i}.") for i in range(count))))
    table.append(LayerEntry(len(table), "embed", (
        ("merger.", "visual.merger."), ("deepstack_merger_list.", "visual.deepstack_merger_list."),
        ("embed_tokens.", "model.embed_tokens."))))
    for j in range(hf.text_config.num_hidden_layers):
        table.append(LayerEntry(len(table), "block", (("layer.", f"model.layers.{j}."),)))
    table.append(LayerEntry(len(table), "norm", (("norm.", "model.norm."),)))
    table.append(LayerEntry(len(table), "head", (("lm_head.", "lm_head."),)))
    return table


def tied_embedding(table: list[LayerEntry]) -> tuple[tuple[int, str], tuple[int, str]]:
    """``((layer, parameter), (layer, parameter))`` of the token embedding and the LM head, which
    ``tie_word_embeddings`` makes one weight (``LavisPipelineModule.tie_weights``)."""
    embed = next(e.index for e in table if e.kind == "embed")
    head = next(e.index for e in table if e.kind == "head")
    return (embed, "embed_tokens.weight"), (head, "lm_head.weight")


def run_layers(layers: list[nn.Module], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The plain reassembly: every layer in order in one process (what the pipeline computes, stage by stage)."""
    x: object = inputs
    for layer in layers:
        x = layer(x)
    assert isinstance(x, torch.Tensor)
    return x

