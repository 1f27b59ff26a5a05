"""Tiny Qwen2.5-VL / Qwen3-VL processor directories written by transformers' own classes, for tests.

The tokenizer is the real Qwen vocabulary: the 151,643 byte-level BPE ranks of ``qwen.tiktoken`` (shared by Qwen v1,
Qwen2, Qwen2.5 and Qwen3) converted by transformers' ``TikTokenConverter`` into transformers' ``Qwen2Tokenizer`` (the
published tokenizer's pre-tokenizer regex, NFC normaliser and byte-level decoder), followed by the published added
tokens at their published ids. The chat templates are the published ones (``lavis.vlm.processor_files``). Only the
image/video pixel budgets are small, so a test image of a few dozen pixels a side gives a handful of visual tokens.

``write_qwen_vl_processor(directory, tiktoken_path, family)`` saves the directory; ``AutoProcessor.from_pretrained``
loads it back as ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen3VLProcessor
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from lavis.vlm.processor_files import (
    ADDED_TOKENS,
    CHAT_TEMPLATES,
    FAMILIES,
    QWEN_NUM_REGULAR,
    build_processor,
    build_tokenizer,
    published_token_ids,
)

__all__ = ["ADDED_TOKENS", "CHAT_TEMPLATES", "FAMILIES", "TINY_MAX_PIXELS", "TINY_MIN_PIXELS", "published_token_ids",
           "qwen_vl_processor", "qwen_vl_tokenizer", "write_qwen_vl_processor"]

TINY_MIN_PIXELS = 28 * 28 * 4
"""Smallest image the tiny processors accept before upscaling: 2 x 2 merged tokens at Qwen2.5-VL's 28 px."""
TINY_MAX_PIXELS = 28 * 28 * 64
"""Largest image before downscaling: 64 merged tokens (256 patches) at Qwen2.5-VL's 28 px."""


def qwen_vl_tokenizer(tiktoken_path: str | Path, family: str = "qwen2_5_vl") -> Qwen2Tokenizer:
    """transformers' ``Qwen2Tokenizer`` over the real Qwen ranks in ``tiktoken_path``, with ``family``'s added tokens
    at their published ids; eos ``<|im_end|>`` and pad ``<|endoftext|>`` as the published Instruct tokenizers."""
    path = Path(tiktoken_path)
    if not path.is_file():
        raise FileNotFoundError(f"Qwen vocabulary {path} not found (a qwen.tiktoken file of 151643 ranks)")
    vocab, merges = TikTokenConverter(str(path), pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(str(path))
    if len(vocab) != QWEN_NUM_REGULAR:
        raise ValueError(f"{path}: {len(vocab)} ranks, expected the Qwen vocabulary's {QWEN_NUM_REGULAR}")
    return build_tokenizer(vocab, merges, family)


def qwen_vl_processor(tiktoken_path: str | Path, family: str = "qwen2_5_vl", min_pixels: int = TINY_MIN_PIXELS,
                      max_pixels: int = TINY_MAX_PIXELS) -> Qwen2_5_VLProcessor | Qwen3VLProcessor:
    """The processor of ``family`` (tokenizer of :func:`qwen_vl_tokenizer`, published chat template, image and video
    processors with the pixel budget ``min_pixels``..``max_pixels``)."""
    return build_processor(qwen_vl_tokenizer(tiktoken_path, family), family, min_pixels, max_pixels)


def write_qwen_vl_processor(directory: str | Path, tiktoken_path: str | Path, family: str = "qwen2_5_vl",
                            min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS) -> Path:
    """Save :func:`qwen_vl_processor` into ``directory`` (created) with ``save_pretrained``; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    qwen_vl_processor(tiktoken_path, family, min_pixels, max_pixels).save_pretrained(str(out))
    return out
