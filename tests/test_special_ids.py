"""Pad, end and placeholder ids come from the tokenizer and template of the model (``ChatTemplate.special_ids``),
for every family, with the real LLaMA and Qwen v1 tokenizer files where we have them; never Qwen's
``<|endoftext|>`` literal (Meta's LLaMA ``tokenizer.model`` has no such piece)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavis.data import check
from lavis.data.conversation import ChatTemplate, default_image_placeholder
from lavis.data.tokenizer import load_tokenizer
from lavis.testing.synthetic import BPE_SPECIALS, write_bpe_tokenizer_json

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA_MODEL, QWEN_TIKTOKEN = SHARED / "llama_tokenizer.model", SHARED / "qwen.tiktoken"
needs_llama = pytest.mark.skipif(not LLAMA_MODEL.is_file(), reason=f"LLaMA tokenizer not found at {LLAMA_MODEL}")


def _llama_dir(tmp_path: Path, **files: dict) -> Path:
    """A LLaMA tokenizer directory: Meta's real ``tokenizer.model`` plus the given JSON files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.model").symlink_to(LLAMA_MODEL)
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


@needs_llama
@pytest.mark.parametrize("template", ["vicuna_v0", "minigpt4_vicuna", "minigpt4_llama2", "llama2", "vicuna_v1_1"])
def test_llama_without_pad_pads_with_eos_never_unk(template: str, tmp_path: Path) -> None:
    tok = load_tokenizer(str(LLAMA_MODEL))
    assert tok.pad_token is None
    with pytest.raises(KeyError):
        tok.token_id("<|endoftext|>")  # what the trainer used to pad with
    ids = ChatTemplate(tok, "", "<unk>", 32, 4, name=template).special_ids()
    assert (ids.pad, ids.eos, ids.placeholder) == (2, 2, 0)
    # a tokenizer_config.json naming <unk> (= the image placeholder) as pad: the pad would count as an image slot
    tok = load_tokenizer(str(_llama_dir(tmp_path, tokenizer_config={"pad_token": {"content": "<unk>"}})))
    assert tok.pad_token == "<unk>" and ChatTemplate(tok, "", "<unk>", 32, 4, name=template).special_ids().pad == 2


@needs_llama
def test_vicuna_v0_delta_pads_with_its_pad_row(tmp_path: Path) -> None:
    """FastChat's Vicuna v0 delta adds ``[PAD]`` = 32000 (prepare_llama writes it to added_tokens.json and
    special_tokens_map.json); the run directory's copy keeps it, so chat pads as training did."""
    for files in ({"added_tokens": {"[PAD]": 32000}, "special_tokens_map": {"pad_token": "[PAD]"}},
                  {"added_tokens": {"[PAD]": 32000}}):
        d = _llama_dir(tmp_path / str(len(files)), **files)
        tok = load_tokenizer(str(d))
        assert ChatTemplate(tok, "", "<unk>", 32, 4, name="vicuna_v0").special_ids().pad == 32000
        run = tmp_path / f"run{len(files)}"
        run.mkdir()
        copy = load_tokenizer(str(tok.save_to(run)))
        assert copy.pad_token == "[PAD]" and copy.token_id("[PAD]") == 32000


@pytest.mark.skipif(not QWEN_TIKTOKEN.is_file(), reason=f"{QWEN_TIKTOKEN} not found")
def test_qwen_v1_pads_with_endoftext_as_mpp() -> None:
    tok = load_tokenizer(str(QWEN_TIKTOKEN))
    ids = ChatTemplate(tok, "", "<|extra_0|>", 32, 4, name="chatml").special_ids()
    assert (ids.pad, ids.eos, ids.placeholder) == (151643, 151645, 151646)
    assert default_image_placeholder(tok) == "<|extra_0|>"


@pytest.mark.parametrize(("family", "template", "pad_file", "pad", "eos", "placeholder"), [
    ("qwen2.5_7b_instruct", "chatml", {"pad_token": "<|endoftext|>"}, "<|endoftext|>", "<|im_end|>", "<|image_pad|>"),
    ("qwen3_8b", "qwen3", {"pad_token": "<|endoftext|>"}, "<|endoftext|>", "<|im_end|>", "<|image_pad|>"),
    ("qwen3_8b", "qwen3", None, "<|im_end|>", "<|im_end|>", "<|image_pad|>"),
    ("llama3.1_8b_instruct", "llama3", None, "<|eot_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"),
])
def test_tokenizer_json_families(family: str, template: str, pad_file: dict | None, pad: str, eos: str,
                                 placeholder: str, tmp_path: Path) -> None:
    write_bpe_tokenizer_json(tmp_path, BPE_SPECIALS[family])
    if pad_file:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(pad_file))
    tok = load_tokenizer(str(tmp_path))
    assert default_image_placeholder(tok) == placeholder
    ids = ChatTemplate(tok, "", placeholder, 32, 4, name=template).special_ids()
    assert (ids.pad, ids.eos, ids.placeholder) == (tok.token_id(pad), tok.token_id(eos), tok.token_id(placeholder))


def test_demo_tokenizer_pads_with_endoftext() -> None:
    tok = load_tokenizer("builtin:shapes")
    assert ChatTemplate(tok, "", "<|extra_0|>", 32, 4).special_ids().pad == tok.token_id("<|endoftext|>")


@needs_llama
def test_wrong_placeholder_or_template_is_a_clear_error() -> None:
    tok = load_tokenizer(str(LLAMA_MODEL))
    with pytest.raises(ValueError, match=r"image_placeholder '<\|extra_0\|>' is not one token .* use '<unk>'"):
        ChatTemplate(tok, "", "<|extra_0|>", 32, 4, name="vicuna_v0").special_ids()
    with pytest.raises(ValueError, match=r"template 'llama3' ends answers with '<\|eot_id\|>', which is not a token"):
        ChatTemplate(tok, "", "<unk>", 32, 4, name="llama3").special_ids()


@needs_llama
def test_checker_with_llama_tokenizer_defaults_to_its_placeholder(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """``data.check --ann`` with a LLaMA tokenizer used to stop with a KeyError on ``<|extra_0|>`` unless
    ``--image-placeholder '<unk>'`` was given."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"id": "1", "images": ["a.jpg"], "conversations": [
        {"role": "user", "content": "<image> Describe this image in detail."},
        {"role": "assistant", "content": "A black square."}]}]))
    args = ["--ann", str(ann), "--vis-root", str(tmp_path), "--tokenizer", str(LLAMA_MODEL), "--template",
            "minigpt4_vicuna", "--workers", "1"]
    assert check.main(args) == 0
    out = capsys.readouterr().out
    assert "checked 1 record(s): 0 bad" in out
    assert check.main([*args, "--max-txt-len", "40"]) == 1  # 32 <unk> slots + text: lengths were counted
    with pytest.raises(ValueError, match="use '<unk>'"):
        check.main([*args, "--image-placeholder", "<|extra_0|>"])
