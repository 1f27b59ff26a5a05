"""Templates, labels, truncation, collate and the step-indexed sampler."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from lavis.config.schema import Config, DatasetConfig
from lavis.data.collate import Collator
from lavis.data.conversation import IGNORE_INDEX, ChatTemplate, SampleError, encode_chatml, encode_prompt, truncate
from lavis.data.datasets import ConversationDataset, StepSampler, load_records
from lavis.data.tokenizer import ENDOFTEXT, IM_END, IM_START, load_tokenizer

NQ = 8


@pytest.fixture(scope="module")
def tpl() -> ChatTemplate:
    return ChatTemplate(load_tokenizer("builtin:shapes"), "You are a helpful assistant.", "<|extra_0|>", NQ, 4)


CONV = [{"role": "user", "content": "<image>\nWhat is in the image?"}, {"role": "assistant", "content": "A red circle."}]


def test_demo_tokenizer_round_trip_and_specials(tpl: ChatTemplate) -> None:
    tok = tpl.tokenizer
    for text in ["A red circle.", "What is happening in the video?", "unseen wörds & ünïcode ✓"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [tok.token_id(IM_START)]
    assert tok.vocab_size <= 512 and len({tok.token_id(t) for t in (ENDOFTEXT, IM_START, IM_END)}) == 3


def test_chatml_rendering_and_mpp_labels(tpl: ChatTemplate) -> None:
    tok = tpl.tokenizer
    enc = encode_chatml(CONV, tpl, record_id="r0")
    assert len(enc.input_ids) == len(enc.labels) and enc.num_media == 1
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<Img>"
        + "<|extra_0|>" * NQ + "</Img>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
    )
    s, e, nl = tok.token_id(IM_START), tok.token_id(IM_END), tok.encode("\n")
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    # MPP / QwenLM finetune.py: im_start, im_end and the newline of every turn, plus the answer.
    assert trained == [s, e, *nl, s, e, *nl, s, *tok.encode("A red circle."), e, *nl]
    assert sum(t == tpl.placeholder_id for t in enc.input_ids) == NQ


def test_assistant_only_labels(tpl: ChatTemplate) -> None:
    tok = tpl.tokenizer
    enc = encode_chatml(CONV, tpl, record_id="r0", label_mode="assistant")
    assert [t for t in enc.labels if t != IGNORE_INDEX] == [*tok.encode("A red circle."), tok.token_id(IM_END)]


def test_multi_turn_video_and_prompt_match_training(tpl: ChatTemplate) -> None:
    conv = [{"role": "user", "content": "<video>\nDescribe the video."}, {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done."}]
    enc = encode_chatml(conv, tpl, record_id="v")
    assert enc.num_media == 4 and sum(t == tpl.placeholder_id for t in enc.input_ids) == 4 * NQ
    prompt = encode_prompt([("<video>\nDescribe the video.", "Ok."), ("And?", None)], tpl)
    # The chat prompt is the training sequence up to the last answer.
    assert enc.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("conv,match", [
    ([{"role": "assistant", "content": "x"}], "expected 'user'"),
    ([{"role": "user", "content": "q"}], "end with an assistant"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "string"),
])
def test_bad_conversations_name_the_record(tpl: ChatTemplate, conv: list, match: str) -> None:
    with pytest.raises(SampleError, match=f"record bad.*{match}|{match}"):
        encode_chatml(conv, tpl, record_id="bad")


def test_truncation_never_splits_an_image_run(tpl: ChatTemplate) -> None:
    long_answer = " ".join(["A red circle."] * 40)
    conv = [{"role": "user", "content": "<image><image>\nDescribe both images."},
            {"role": "assistant", "content": long_answer}]
    enc = encode_chatml(conv, tpl, record_id="long")
    last_ph = max(i for i, t in enumerate(enc.input_ids) if t == tpl.placeholder_id)
    cut = truncate(enc, last_ph + 10, tpl.placeholder_id, "long")
    assert len(cut.input_ids) == last_ph + 10 and sum(t == tpl.placeholder_id for t in cut.input_ids) == 2 * NQ
    with pytest.raises(SampleError, match="max_txt_len"):
        truncate(enc, last_ph - 3, tpl.placeholder_id, "long")  # would cut the second image's run


def test_records_validate_marker_counts(tmp_path: Path) -> None:
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"id": "x1", "images": ["a.jpg", "b.jpg"], "conversations": CONV}]))
    with pytest.raises(ValueError, match=r"a.json:0 \(id x1\).*1 <image>.*2 images"):
        load_records(DatasetConfig(ann_path=str(ann)))
    with pytest.raises(FileNotFoundError, match="DATA.md"):
        load_records(DatasetConfig(ann_path=str(tmp_path / "missing.json")))


def test_collate_dynamic_and_fixed_padding(tiny_cfg: Config, tiny_data: Path, tpl: ChatTemplate) -> None:
    ds = ConversationDataset(load_records(tiny_cfg.data.train[0]), tpl, tiny_cfg.data, 64)
    samples = [ds[(i, 7)] for i in range(5)]
    pad = tpl.tokenizer.token_id(ENDOFTEXT)
    (pixels, ids, mask), labels = Collator(pad, 128, 16)(samples)
    longest = max(len(s.input_ids) for s in samples)
    assert ids.shape[1] == -(-longest // 16) * 16 and ids.shape == labels.shape == mask.shape
    assert pixels.shape[0] == sum(s.pixels_NCHW.shape[0] for s in samples)
    assert int(mask.sum()) == sum(len(s.input_ids) for s in samples)
    assert bool((labels[mask == 0] == IGNORE_INDEX).all()) and bool((ids[mask == 0] == pad).all())
    (_, ids_fixed, _), _ = Collator(pad, 128, 16, fixed_length=True)(samples)
    assert ids_fixed.shape[1] == 128
    # augmentation is a function of the sample seed: same key, same pixels
    assert torch.equal(ds[(0, 7)].pixels_NCHW, ds[(0, 7)].pixels_NCHW)


def test_label_only_dataset_matches_full_dataset(tiny_cfg: Config, tpl: ChatTemplate) -> None:
    recs = load_records(tiny_cfg.data.train[0])
    full = ConversationDataset(recs, tpl, tiny_cfg.data, 64)
    labels_only = ConversationDataset(recs, tpl, tiny_cfg.data, 64, load_media=False)
    for i in range(len(recs)):
        a, b = full[(i, 1)], labels_only[(i, 1)]
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert b.pixels_NCHW.shape[0] == 0


def _take(sampler: StepSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_a_function_of_the_step() -> None:
    kw = dict(seed=3, micro_batch_size=4, grad_accum_steps=2)
    a = StepSampler([50], [1.0], dp_rank=0, dp_size=1, **kw)
    assert _take(a, 12) == _take(StepSampler([50], [1.0], dp_rank=0, dp_size=1, **kw), 12)  # first == last stage
    resumed = StepSampler([50], [1.0], dp_rank=0, dp_size=1, start_step=3, **kw)
    assert _take(resumed, 4) == _take(a, 10)[6:10]
    # DP ranks split each step's samples without overlap and cover the same set as one rank with 2x GAS.
    r0 = StepSampler([50], [1.0], dp_rank=0, dp_size=2, seed=3, micro_batch_size=4, grad_accum_steps=1)
    r1 = StepSampler([50], [1.0], dp_rank=1, dp_size=2, seed=3, micro_batch_size=4, grad_accum_steps=1)
    one = {i for mb in _take(a, 2) for i, _ in mb}
    assert {i for mb in _take(r0, 1) + _take(r1, 1) for i, _ in mb} == one
    # every record appears once per epoch; weights repeat a dataset
    epoch = {a.index_at(p) for p in range(50)}
    assert epoch == set(range(50))
    assert StepSampler([10, 20], [2.0, 0.5], dp_rank=0, dp_size=1, **kw).epoch_len == 30


def test_mpp_and_llava_formats_become_canonical(tmp_path: Path, tpl: ChatTemplate) -> None:
    mpp = [{"image": "a.jpg", "instruction": "<Img><ImageHere></Img> What is it?", "output": "A cat."},
           {"image": "b.jpg", "instruction": ["<Img><ImageHere></Img>Colour?", "Shape?"], "output": ["Red.", "Round."]},
           {"video": "v.mp4", "instruction": "<Img><ImageHere></Img> What happens?", "output": "It moves."}]
    llava = [{"id": "000001", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Brown."}]}]
    (tmp_path / "mpp.json").write_text(json.dumps(mpp))
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    recs = load_records(DatasetConfig(ann_path=str(tmp_path / "mpp.json"), vis_root=str(tmp_path), format="mpp"))
    assert recs[0].conversations == [{"role": "user", "content": "<image> What is it?"},
                                     {"role": "assistant", "content": "A cat."}]
    assert recs[0].images == [tmp_path / "a.jpg"] and recs[0].id.endswith("mpp.json:0")
    assert [t["content"] for t in recs[1].conversations] == ["<image>Colour?", "Red.", "Shape?", "Round."]
    assert recs[2].video == tmp_path / "v.mp4" and recs[2].conversations[0]["content"] == "<video> What happens?"
    # MPP's <Img><ImageHere></Img> renders back to exactly the text MPP-Qwen builds
    enc = encode_chatml(recs[0].conversations, tpl, record_id="m")
    assert "<Img>" + "<|extra_0|>" * NQ + "</Img> What is it?" in tpl.tokenizer.decode(enc.input_ids, False)
    (rec,) = load_records(DatasetConfig(ann_path=str(tmp_path / "llava.json"), format="llava"))
    assert rec.id == "000001" and [t["role"] for t in rec.conversations] == ["user", "assistant"] * 2
    bad = [{"image": "a.jpg", "instruction": ["q1", "q2"], "output": ["a1"]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json:0.*equal-length"):
        load_records(DatasetConfig(ann_path=str(tmp_path / "bad.json"), format="mpp"))
