"""The published ``config.json`` shapes of the Qwen2.5-VL and Qwen3-VL checkpoints, for planning before a download.

``python -m lavis.plan`` (and everything that reads a ``model.vlm`` recipe's config through
:func:`lavis.vlm.arch.read_hf_config`) uses the entry named like the last part of ``model.vlm.path`` when that
directory holds no ``config.json`` yet, e.g. ``model.vlm.path: weights/Qwen2.5-VL-7B-Instruct`` ->
``Qwen/Qwen2.5-VL-7B-Instruct``.

Written by hand from the published files on the Hugging Face Hub, in each file's own layout (Qwen2.5-VL's text
keys at the top level, Qwen3-VL's under ``text_config``), keeping what sets a tensor's shape or a layer's cost
(text and vision dimensions, the special token ids, ``tie_word_embeddings``, the rotary sections); generation and
dtype keys are left out. They were not diffed against a download here: diff an entry against the downloaded
``config.json`` before trusting a plan made from it (the plan of a downloaded directory reads its own file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
             "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
             "video_token_id": 151656}
_QWEN2_5_VL_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}
_QWEN2_5_VL_TEXT = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                    "max_position_embeddings": 128000, "sliding_window": 32768, "use_sliding_window": False,
                    "attention_dropout": 0.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}


def _qwen2_5_vl(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool) -> dict[str, Any]:
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **_QWEN_IDS,
            **_QWEN2_5_VL_TEXT, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "max_window_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tie, "vision_config": {**_QWEN2_5_VL_VISION, "out_hidden_size": hidden}}


def _qwen3_vl(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool, vision_depth: int,
              vision_hidden: int, vision_inter: int, deepstack: list[int]) -> dict[str, Any]:
    ids = {k: v for k, v in _QWEN_IDS.items() if k not in ("bos_token_id", "eos_token_id", "vision_token_id")}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **ids,
        "tie_word_embeddings": tie,
        "text_config": {
            "model_type": "qwen3_vl_text", "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "attention_bias": False, "attention_dropout": 0.0,
            "rope_theta": 5000000,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}},
        "vision_config": {
            "model_type": "qwen3_vl", "depth": vision_depth, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": vision_hidden, "intermediate_size": vision_inter, "num_heads": 16, "in_channels": 3,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
            "out_hidden_size": hidden, "deepstack_visual_indexes": deepstack},
    }


PUBLISHED_VLM_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, tie=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, tie=False),
    "Qwen/Qwen2.5-VL-32B-Instruct": _qwen2_5_vl(5120, 27648, 64, 40, 8, 152064, tie=False),
    "Qwen/Qwen2.5-VL-72B-Instruct": _qwen2_5_vl(8192, 29568, 80, 64, 8, 152064, tie=False),
    "Qwen/Qwen3-VL-2B-Instruct": _qwen3_vl(2048, 6144, 28, 16, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "Qwen/Qwen3-VL-4B-Instruct": _qwen3_vl(2560, 9728, 36, 32, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "Qwen/Qwen3-VL-8B-Instruct": _qwen3_vl(4096, 12288, 36, 32, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "Qwen/Qwen3-VL-32B-Instruct": _qwen3_vl(5120, 25600, 64, 64, 8, False, 27, 1152, 4304, [8, 16, 24]),
}
"""Hub id -> the published ``config.json`` (the keys that set shapes and costs)."""


def published_vlm_config(path: str) -> tuple[str, dict[str, Any]] | None:
    """The table entry for a ``model.vlm.path`` (its last part, or the hub id itself, case-insensitive), or None when
    none matches."""
    name = Path(path).name.lower()
    for hub_id, raw in PUBLISHED_VLM_CONFIGS.items():
        if name == hub_id.split("/")[1].lower() or path.lower() == hub_id.lower():
            return hub_id, raw
    return None
