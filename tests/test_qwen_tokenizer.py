"""Qwen v1 tokenizer (tiktoken over the real qwen.tiktoken) and the ChatML rendering MPP-Qwen-Next produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from lavis.data.conversation import IGNORE_INDEX, ChatTemplate, encode_chatml, encode_prompt
from lavis.data.tokenizer import QwenTokenizer, load_tokenizer

QWEN_FILE = Path(__file__).resolve().parents[2] / "shared/data/qwen.tiktoken"
pytestmark = pytest.mark.skipif(not QWEN_FILE.is_file(), reason=f"{QWEN_FILE} (the real Qwen v1 BPE ranks) is absent")


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    t = load_tokenizer(str(QWEN_FILE))
    assert isinstance(t, QwenTokenizer)
    return t


def test_known_ids_and_round_trip(tok: QwenTokenizer) -> None:
    assert tok.encode("\n") == [198] and tok.encode("user") == [872]
    assert tok.encode("assistant") == [77091] and tok.encode("system") == [8948]
    assert tok.encode("Hello world") == [9707, 1879]
    for text in ["A red circle.", "你好，世界!", "café naïve ✓", "  two  spaces\n\nand lines"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("cafe\u0301") == tok.encode("café")  # NFC


def test_special_tokens(tok: QwenTokenizer) -> None:
    assert (tok.token_id("<|endoftext|>"), tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")) == (
        151643, 151644, 151645)
    assert tok.token_id("<|extra_0|>") == 151646 and tok.token_id("<|extra_204|>") == 151850
    assert tok.vocab_size == 151851
    assert tok.encode("<|im_start|>user") == [151644, 872]  # special text becomes the special id
    assert tok.decode([151644, 872, 151646, 198]) == "user\n"  # skip_special_tokens drops ids >= 151643


def test_chatml_prompt_matches_mpp_qwen_next(tok: QwenTokenizer) -> None:
    tpl = ChatTemplate(tok, "You are a helpful assistant.", "<|extra_0|>", 32, 32)
    ids = encode_prompt([("<image>What is in the image?", None)], tpl)
    # MPP-Qwen-Next's cli_demo on one image + this question: 63 prompt ids (docs/FORMATS.md section 5).
    assert len(ids) == 63 and ids.count(151646) == 32
    assert ids[:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]


def test_multi_turn_with_images_labels(tok: QwenTokenizer) -> None:
    tpl = ChatTemplate(tok, "You are a helpful assistant.", "<|extra_0|>", 32, 32)
    conv = [{"role": "user", "content": "<image><image>Compare them."}, {"role": "assistant", "content": "Same."},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Both are red."}]
    enc = encode_chatml(conv, tpl, record_id="q")
    assert enc.num_media == 2 and enc.input_ids.count(151646) == 64
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nBoth are red.<|im_end|>\n")
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    # QwenLM finetune.py masking: im_start / im_end / "\n" of every turn plus the two answers.
    s, e, nl = 151644, 151645, 198
    assert trained == [s, e, nl, s, e, nl, s, *tok.encode("Same."), e, nl,  # system, user 1, answer 1
                       s, e, nl, s, *tok.encode("Both are red."), e, nl]  # user 2, answer 2
