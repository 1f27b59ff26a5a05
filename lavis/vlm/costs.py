"""Per-layer costs of the VLM layer list for ``lavis.pipeline.plan``'s boundary search.

Parameter counts are exact (each layer is built on the meta device and counted). FLOPs per micro-batch: ``2 x
params x rows`` forward (rows: patches for the vision tower, tokens for the language model; merged tokens for the
merger) plus attention, ``4 x span^2 x width`` per attention segment (a vision block attends within an image or a
frame, or within Qwen2.5-VL's windows; a decoder block within a sequence); backward is 2x forward for trainable
layers, 1x for frozen ones that gradients must cross, 0 for frozen layers with nothing trainable before them (which
then keep no activations either); a decoder block with LoRA adapters (``model.vlm.lora``) 1x plus the adapters' share
(their weight gradients). Adapter parameters are counted as trainable parameters of their block (gradients, optimizer
state); with ``model.vlm.quantize`` the blocks' linear weights are held at the quantized size. Activations kept per
micro-batch: about ``(16 x width + 2 x intermediate) x 2`` bytes per row for a block, a bf16 row of the output for the
other layers; a block recomputed in backward (``Workload.activation_checkpointing``: every decoder block and vision
block group; ``Workload.checkpointed_blocks``: those decoder blocks) keeps only its input row, ``width x 2`` bytes.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from lavis.pipeline.plan import QUANT_BYTES, LayerCost, LayerEntry, Workload
from lavis.vlm.config import VLMConfig
from lavis.vlm.layers import DecoderBlockPipe, build_layers, layer_table
from lavis.vlm.lora import adapter_params, linear_weights, lora_trains


def is_trainable(plain_key: str, cfg: VLMConfig) -> bool:
    """From ``model.vlm.freeze_*``: the mergers, the rest of ``visual.*`` (the tower), everything else (the LLM);
    with ``model.vlm.lora`` the adapters (and with ``train_embeddings`` the embeddings and LM head) train."""
    by_lora = lora_trains(plain_key, cfg)
    if by_lora is not None:
        return by_lora
    if plain_key.startswith(("visual.merger.", "visual.deepstack_merger_list.")):
        return not cfg.freeze_merger
    if plain_key.startswith("visual."):
        return not cfg.freeze_vision
    return not cfg.freeze_llm


def layer_costs(hf: PretrainedConfig, cfg: VLMConfig, work: Workload, patches: int,
                grid_hw: tuple[int, int] = (32, 32), cached: bool = False) -> list[LayerCost]:
    """One :class:`LayerCost` per layer of :func:`lavis.vlm.layers.layer_table`, for a micro-batch of
    ``work.tokens`` tokens in sequences of ``work.seq_len`` and ``patches`` vision patches in images of
    ``grid_hw`` patches (the real sample's grids give the real costs). ``cached``: ``data.feature_cache`` (the
    tower and the mergers are not built: no weights, no compute)."""
    per = cfg.vision_blocks_per_layer
    table = layer_table(hf, per)
    with torch.device("meta"):
        layers = build_layers(hf, per, meta=False, cached=cached)
    v, t = hf.vision_config, hf.text_config
    merged = patches // v.spatial_merge_size**2
    image_patches = grid_hw[0] * grid_hw[1]
    windowed = getattr(v, "window_size", None) is not None and hasattr(v, "fullatt_block_indexes")
    window = (v.window_size // v.patch_size) ** 2 if windowed else image_patches
    full_blocks = set(v.fullatt_block_indexes) if windowed else set(range(v.depth))
    seqs = max(1, work.tokens // max(1, work.seq_len))

    counts, trainable, weight_bytes = [], [], []
    for i, layer in enumerate(layers):
        named = [(table[i].to_plain(k), p.numel()) for k, p in layer.named_parameters()]
        adapters = adapter_params(layer.layer, cfg) if isinstance(layer, DecoderBlockPipe) else 0
        counts.append(sum(n for _, n in named) + adapters)
        trainable.append(sum(n for k, n in named if is_trainable(k, cfg)) + adapters)
        weight_bytes.append(None)
        if isinstance(layer, DecoderBlockPipe) and cfg.quantize is not None:
            # QLoRA: the blocks' linear weights quantized; norms, biases and adapters at param_bytes
            quantized = linear_weights(layer)
            weight_bytes[-1] = quantized * QUANT_BYTES[cfg.quantize] + (counts[-1] - quantized) * work.param_bytes

    costs = []
    upstream = False  # something before this layer trains: gradients must cross it
    for i, entry in enumerate(table):
        params, train = counts[i], trainable[i]
        if entry.kind == "vision" and cached:
            fwd, act = 0.0, 0.0
        elif entry.kind == "vision" and i == 0:
            fwd, act = 2.0 * params * patches, patches * v.hidden_size * 2.0
        elif entry.kind == "vision":
            blocks = [int(plain.split(".")[2]) for _, plain in entry.prefixes]  # "visual.blocks.N."
            fwd = 2.0 * params * patches
            for b in blocks:
                span = min(window, image_patches) if b not in full_blocks else image_patches
                fwd += 4.0 * (patches // span) * span**2 * v.hidden_size
            act = patches * (v.hidden_size * 2.0 if work.activation_checkpointing
                             else (16 * v.hidden_size + 2 * v.intermediate_size) * 2.0 * len(blocks))
        elif entry.kind == "embed":
            fwd, act = 2.0 * (params - t.vocab_size * t.hidden_size) * merged, work.tokens * t.hidden_size * 2.0
        elif entry.kind == "block":
            fwd = 2.0 * params * work.tokens + 4.0 * seqs * work.seq_len**2 * t.hidden_size
            recomputed = work.activation_checkpointing or block_index(entry) in work.checkpointed_blocks
            per_row = t.hidden_size if recomputed else 16 * t.hidden_size + 2 * t.intermediate_size
            act = work.tokens * per_row * 2.0
        else:
            fwd = 2.0 * params * work.tokens
            act = work.tokens * (t.vocab_size if entry.kind == "head" else t.hidden_size) * 6.0
        bwd = 2.0 if train else (1.0 if upstream else 0.0)
        if entry.kind == "block" and cfg.lora is not None:  # input gradients, weight gradients of the adapters only
            bwd = 1.0 + train / params
        upstream = upstream or train > 0
        if bwd == 0:  # no gradient passes: autograd keeps nothing (when the layer is on stage 0, see docs/PIPELINE.md)
            act = 0.0
        costs.append(LayerCost(i, entry.kind, params, train, fwd * (1 + bwd), act, weight_bytes[i]))
    return costs


def block_index(entry: LayerEntry) -> int:
    """The decoder block index of a ``block`` entry of :func:`lavis.vlm.layers.layer_table` (``model.layers.N.``)."""
    return int(entry.prefixes[0][1].split(".")[2])
