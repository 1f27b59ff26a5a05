"""The chat-template table: every template renders from it, MiniGPT-4's layouts are token-identical to MiniGPT-4
(LLaMA's real sentencepiece model), Qwen3 / LLaMA-3 render their documented text with their real special-token ids,
and stop sequences / answer cut / context window follow the predecessor."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from lavis.data.conversation import (
    IGNORE_INDEX,
    SYSTEM_PROMPTS,
    ChatTemplate,
    encode_conversation,
    encode_prompt,
)
from lavis.data.templates import TEMPLATES

from .conftest import byte_level_tokenizer

LLAMA_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama_tokenizer.model"
needs_llama = pytest.mark.skipif(not LLAMA_MODEL.is_file(), reason=f"LLaMA tokenizer not found at {LLAMA_MODEL}")
CONV2 = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
         {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Grey."}]
ALL_SPECIALS = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<think>",
                "</think>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]


@pytest.fixture(scope="module")
def byte_tok():
    return byte_level_tokenizer(ALL_SPECIALS)


@pytest.fixture(scope="module")
def llama_tok():
    from lavis.data.tokenizer import load_tokenizer

    return load_tokenizer(str(LLAMA_MODEL))


def test_schema_template_names_are_the_table() -> None:
    from lavis.config.schema import LLMConfig

    hint = typing.get_type_hints(LLMConfig)["template"]
    assert set(typing.get_args(hint)) == set(TEMPLATES) and set(SYSTEM_PROMPTS) == set(TEMPLATES)
    from lavis.config.load import ConfigError, from_dict

    def text(segs: tuple | None) -> str:
        return "".join(seg.text for seg in segs or ())

    for name, spec in TEMPLATES.items():  # the fields each part of a template may use
        assert "{query}" in text(spec.user) and "{answer}" in text(spec.answer), name
        assert "{query}" in text(spec.first_user or spec.user), name
        others = text(spec.begin) + text(spec.assistant) + text(spec.last_assistant) + text(spec.answer)
        assert "{system}" not in others + text(spec.user) and "{query}" not in others, name
        assert spec.stop_tokens or spec.stop_texts, name
    assert from_dict(LLMConfig, {"template": "qwen3", "hf_config": {"model_type": "qwen3"}}, source="t").template == (
        "qwen3")

    with pytest.raises(ConfigError, match="template"):
        from_dict(LLMConfig, {"template": "alpaca", "hf_config": {"model_type": "qwen2"}}, source="t")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_prompt_is_a_prefix_of_training(byte_tok, name: str) -> None:
    """Whatever the rules, a chat prompt is the training rendering up to where the last answer starts, answers are
    trained, and the media run sits between the template's media_open/media_close."""
    tpl = ChatTemplate(byte_tok, SYSTEM_PROMPTS[name] or "Be brief.", "<|extra_0|>", 4, 2, name=name)
    for mode in ("mpp", "assistant"):
        enc = encode_conversation(CONV2, tpl, record_id="p", label_mode=mode)
        prompt = encode_prompt([("<image>\nWhat is it?", "A cat."), ("Colour?", None)], tpl)
        assert enc.input_ids[:len(prompt)] == prompt and len(prompt) < len(enc.input_ids)
        trained = byte_tok.decode([t for t in enc.labels[len(prompt):] if t != IGNORE_INDEX])
        assert trained.startswith("Grey.") or trained.startswith(" Grey.")
        assert enc.input_ids.count(byte_tok.token_id("<|extra_0|>")) == 4 and enc.num_media == 1
    media = tpl.spec.media_open + tpl.placeholder * tpl.num_query + tpl.spec.media_close
    assert tpl.stop_sequences() and media in byte_tok.decode(enc.input_ids, skip_special_tokens=False)


@needs_llama
def test_minigpt4_vicuna_stage2_golden(llama_tok) -> None:
    """MiniGPT-4 stage 2: BOS, then '###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: '
    split at <ImageHere> with each side tokenised on its own, 32 image slots, then tokenize(answer + '###');
    only the answer and '###' are labelled."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    tpl = ChatTemplate(llama_tok, SYSTEM_PROMPTS["minigpt4_vicuna"], "<unk>", 32, 4, name="minigpt4_vicuna")
    assert tpl.system_prompt == ""
    conv = [{"role": "user", "content": "<image> Describe this image in detail."},
            {"role": "assistant", "content": "A red circle on a white background."}]
    enc = encode_conversation(conv, tpl, record_id="g")
    before, after = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: ".split(
        "<ImageHere>")
    prompt = [sp.bos_id(), *sp.encode(before), *[0] * 32, *sp.encode(after)]
    answer = sp.encode("A red circle on a white background.###")
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert encode_prompt([(conv[0]["content"], None)], tpl) == prompt
    # the demo template with an empty system prompt is one token off: 'detail.###' is '.', '##', '#' where
    # 'detail. ###' is '.', '▁###'
    v0 = ChatTemplate(llama_tok, "", "<unk>", 32, 4, name="vicuna_v0")
    assert len(encode_prompt([(conv[0]["content"], None)], v0)) == len(prompt) + 1


@needs_llama
def test_minigpt4_llama2_demo_and_training_golden(llama_tok) -> None:
    """MiniGPT-4's LLaMA-2 demo: system + '<s>[INST] ' + '<Img><ImageHere></Img> ' + question + ' [/INST] ', split at
    <ImageHere>, BOS on the first segment only; with system '' its stage-2 training layout '[INST] {} [/INST] ' +
    answer + '</s>'."""
    import sentencepiece as spm

    from lavis.data.conversation import IMAGE_MARKER

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    sys_ = SYSTEM_PROMPTS["minigpt4_llama2"]
    assert sys_.startswith("Give the following image: <Img>ImageContent</Img>.")
    tpl = ChatTemplate(llama_tok, sys_, "<unk>", 64, 4, name="minigpt4_llama2")
    query = IMAGE_MARKER + tpl.spec.media_sep + "What is this?"  # the chat engine's turn layout
    ours = encode_prompt([(query, None)], tpl)
    first, second = (sys_ + "<s>[INST] <Img><ImageHere></Img> What is this? [/INST] ").split("<ImageHere>")
    sys_part, inst = first.split("<s>")  # the tokenizer turns "<s>" text into its id
    assert ours == [1, *sp.encode(sys_part), 1, *sp.encode(inst), *[0] * 64, *sp.encode(second)]
    train = ChatTemplate(llama_tok, "", "<unk>", 64, 4, name="minigpt4_llama2")
    enc = encode_conversation([{"role": "user", "content": "<image> Describe this image in detail."},
                               {"role": "assistant", "content": "A dog."}], train, record_id="t")
    before, after = "[INST] <Img><ImageHere></Img> Describe this image in detail. [/INST] ".split("<ImageHere>")
    prompt = [1, *sp.encode(before), *[0] * 64, *sp.encode(after)]
    assert enc.input_ids == prompt + sp.encode("A dog.") + [2]
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + sp.encode("A dog.") + [2]


@needs_llama
def test_stop_sequences_and_answer_cut_with_llama_vocabulary(llama_tok) -> None:
    from lavis.chat.stops import answer_text, context_start, first_stop, stopping_criteria

    v0 = ChatTemplate(llama_tok, SYSTEM_PROMPTS["vicuna_v0"], "<unk>", 32, 4, name="vicuna_v0")
    assert v0.stop_sequences() == [[835], [2277, 29937], [2]]  # MiniGPT-4's two '###' encodings, then </s>
    assert v0.stop_token_ids() == [835, 2]
    for name in ("llama2", "vicuna_v1_1"):
        assert ChatTemplate(llama_tok, "", "<unk>", 32, 4, name=name).stop_sequences() == [[2]]
    # MiniGPT-4's demo stops its LLaMA-2 answers at '###' as well (demo.py's stop_words_ids [835], [2277, 29937])
    assert ChatTemplate(llama_tok, "", "<unk>", 64, 4, name="minigpt4_llama2").stop_sequences() == [
        [835], [2277, 29937], [2]]
    crit = stopping_criteria(v0)
    answer = llama_tok.encode("A red circle.###")
    assert answer[-2:] == [2277, 29937]
    for n in range(1, len(answer)):
        assert bool(crit(torch.tensor([answer[:n]]), None)[0]) is (n == len(answer))
    assert bool(crit(torch.tensor([[263, 835]]), None)[0]) and not crit(torch.tensor([[263, 2277]]), None)[0]
    batch = crit(torch.tensor([[263, 2277, 29937], [263, 263, 263]]), None)
    assert batch.tolist() == [True, False]
    # the answer text as MiniGPT-4 cuts it: before '###', after 'Assistant:', stripped
    assert first_stop(answer + [29871], v0.stop_sequences()) == len(answer) - 2
    assert answer_text(v0, answer + llama_tok.encode("Human: more")) == "A red circle."
    assert v0.cut_answer(" Assistant: A dog.###Human: x") == "A dog."
    chatml_like = ChatTemplate(llama_tok, "", "<unk>", 32, 4, name="llama2")
    assert chatml_like.cut_answer(" Assistant: A dog. ") == "Assistant: A dog."  # no cut rule outside MiniGPT-4
    # MiniGPT-4's context window: prompt + answer within max_length by dropping the oldest prompt embeddings
    assert v0.spec.max_length == 2000 and TEMPLATES["chatml"].max_length is None
    assert context_start(1900, 300, 2000) == 200 and context_start(1000, 300, 2000) == 0
    assert context_start(5000, 300, None) == 0


def _tokenizer_json(tmp_path: Path, specials: dict[int, str]) -> Path:
    """A byte-level tokenizer.json whose special tokens sit at their real ids (filler pieces below them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    first = min(specials)
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"filler{i}": i for i in range(len(alphabet), first)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for idx in range(first, max(specials) + 1):
        assert tok.add_special_tokens([specials.get(idx, f"<|reserved_{idx}|>")]) == 1
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_qwen3_renders_its_chat_template_text_with_real_ids(tmp_path: Path) -> None:
    from lavis.data.tokenizer import load_tokenizer

    path = _tokenizer_json(tmp_path, {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                                      151655: "<|image_pad|>", 151667: "<think>", 151668: "</think>"})
    tok = load_tokenizer(str(path))
    tpl = ChatTemplate(tok, SYSTEM_PROMPTS["qwen3"], "<|image_pad|>", 4, 2, name="qwen3")
    enc = encode_conversation(CONV2, tpl, record_id="q3", label_mode="assistant")
    run = "<|image_pad|>" * 4
    text = (f"<|im_start|>user\n<Img>{run}</Img>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
            "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nGrey.<|im_end|>\n")
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == text and enc.input_ids == tok.encode(text)
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=False) == (
        "A cat.<|im_end|>Grey.<|im_end|>")
    prompt = encode_prompt([("Hi", None)], tpl)
    assert tok.decode(prompt, skip_special_tokens=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with_sys = ChatTemplate(tok, "Be brief.", "<|image_pad|>", 4, 2, name="qwen3")
    assert tok.decode(encode_prompt([("Hi", None)], with_sys), skip_special_tokens=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert tpl.stop_sequences() == [[151645], [151643]]


def test_llama3_renders_its_chat_template_text_with_real_ids(tmp_path: Path) -> None:
    from lavis.data.tokenizer import load_tokenizer

    path = _tokenizer_json(tmp_path, {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                                      128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
                                      128009: "<|eot_id|>"})
    tok = load_tokenizer(str(path))
    tpl = ChatTemplate(tok, "Be brief. ", "<|reserved_128002|>", 2, 2, name="llama3")
    conv = [{"role": "user", "content": " <image>What is it? "}, {"role": "assistant", "content": " A cat. "}]
    enc = encode_conversation(conv, tpl, record_id="l3")
    run = "<|reserved_128002|>" * 2
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief. <|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n<Img>{run}</Img>What is it?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>")
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == text and enc.input_ids == tok.encode(text)
    assert [t for t in enc.labels if t != IGNORE_INDEX] == tok.encode("A cat.") + [128009]
    no_sys = ChatTemplate(tok, SYSTEM_PROMPTS["llama3"], "<|reserved_128002|>", 2, 2, name="llama3")
    assert tok.decode(encode_prompt([("Hi", None)], no_sys), skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tpl.stop_sequences() == [[128009], [128001]]
