"""The tiny Qwen2.5-VL / Qwen3-VL processor directories: real Qwen vocabulary, published ids and templates."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import tiktoken
from PIL import Image
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

from lavis.data.tokenizer import QWEN_PAT_STR
from lavis.testing.synthetic_vlm import (
    CHAT_TEMPLATES,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    published_token_ids,
    qwen_vl_tokenizer,
)
from tests.conftest import QWEN_TIKTOKEN, REPO

SAMPLES = ["Hello world", "A red circle.", "你好，世界! 12345 numbers", "café naïve ✓ cafe\u0301",
           "  two  spaces\n\nand lines\t tab", "def f(x):\n    return x ** 2  # 🙂", "'s 're 've I'LL"]


def _corpus() -> list[str]:
    """Varied real text: the samples and every paragraph of the repository's docs."""
    docs = [p.read_text(encoding="utf-8") for p in sorted(REPO.glob("*.md")) + sorted((REPO / "docs").glob("*.md"))]
    return SAMPLES + [para for doc in docs for para in doc.split("\n\n") if para.strip()]


def _tiktoken_encoding(family: str) -> tiktoken.Encoding:
    """tiktoken itself over ``qwen.tiktoken`` with Qwen's split regex and ``family``'s added tokens."""
    return tiktoken.Encoding(family, pat_str=QWEN_PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(QWEN_TIKTOKEN)),
                             special_tokens=published_token_ids(family))


def test_regular_text_ids_equal_tiktoken_over_qwen_ranks(qwen_vl_processors: dict[str, object]) -> None:
    corpus = _corpus()
    assert len(corpus) > 200
    for family, proc in qwen_vl_processors.items():
        reference = _tiktoken_encoding(family)
        tok = proc.tokenizer
        for text in corpus:
            ids = tok.encode(text, add_special_tokens=False)
            assert ids == reference.encode(unicodedata.normalize("NFC", text), allowed_special="all"), (family, text)
            assert tok.decode(ids) == reference.decode(ids)
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_added_tokens_have_published_ids(family: str, qwen_vl_processors: dict[str, object]) -> None:
    proc = qwen_vl_processors[family]
    tok = proc.tokenizer
    ids = published_token_ids(family)
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    assert (ids["<|im_start|>"], ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|video_pad|>"]) == (
        151644, 151652, 151655, 151656)
    assert len(tok) == (151665 if family == "qwen2_5_vl" else 151669)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (proc.image_token_id, proc.video_token_id) == (151655, 151656)
    # special text inside a message becomes its id, never BPE pieces
    assert tok.encode("<|im_start|>user\n<|image_pad|>", add_special_tokens=False) == [151644, 872, 198, 151655]


@pytest.mark.parametrize(("family", "cls", "patch"), [("qwen2_5_vl", Qwen2_5_VLProcessor, 14),
                                                      ("qwen3_vl", Qwen3VLProcessor, 16)])
def test_auto_processor_round_trip(family: str, cls: type, patch: int,
                                   qwen_vl_processor_dirs: dict[str, Path]) -> None:
    proc = AutoProcessor.from_pretrained(qwen_vl_processor_dirs[family])
    assert type(proc) is cls
    assert proc.chat_template == CHAT_TEMPLATES[family]
    assert proc.image_processor.patch_size == patch and proc.image_processor.merge_size == 2
    assert dict(proc.image_processor.size) == {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family == "qwen2_5_vl" else ""
    assert text == (system + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    out = proc(text=[text], images=[Image.new("RGB", (60, 90), "red")], return_tensors="pt")
    factor = patch * 2
    grid = out["image_grid_thw"][0].tolist()
    assert grid == [1, 2 * round(90 / factor), 2 * round(60 / factor)]  # native size, not a square resize
    assert int((out["input_ids"] == 151655).sum()) == grid[1] * grid[2] // 4
    assert tuple(out["pixel_values"].shape) == (grid[1] * grid[2], 3 * 2 * patch * patch)


def test_qwen3_tool_template_renders(qwen_vl_processors: dict[str, object]) -> None:
    proc = qwen_vl_processors["qwen3_vl"]
    tool = {"type": "function", "function": {"name": "area", "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Area?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "area",
                                                                                  "arguments": {"r": 1}}}]},
                {"role": "tool", "content": "3.14"}]
    text = proc.apply_chat_template(messages, tools=[tool], tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<tool_call>\n{"name": "area", "arguments": {"r": 1}}\n</tool_call><|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n3.14\n</tool_response><|im_end|>\n")


def test_missing_vocabulary_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        qwen_vl_tokenizer(tmp_path / "nope.tiktoken")
