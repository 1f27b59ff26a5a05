"""Templates, labels, truncation, collate and the step-indexed sampler."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch

from lavis.config.schema import Config, DatasetConfig
from lavis.data.collate import Collator, PipeBatch, StageInputs
from lavis.data.conversation import IGNORE_INDEX, ChatTemplate, SampleError, encode_chatml, encode_prompt, truncate
from lavis.data.datasets import ConversationDataset, StepSampler, load_records
from lavis.data.tokenizer import ENDOFTEXT, IM_END, IM_START, load_tokenizer

from .conftest import byte_level_tokenizer

NQ = 8


@pytest.fixture(scope="module")
def tpl() -> ChatTemplate:
    return ChatTemplate(load_tokenizer("builtin:shapes"), "You are a helpful assistant.", "<|extra_0|>", NQ, 4)


CONV = [{"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": "A red circle."}]


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
        + "<|extra_0|>" * NQ
        + "</Img>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
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
    batch = Collator(pad, 128, 16)(samples)
    (pixels, ids, mask), labels = batch.inputs, batch.labels_BL
    longest = max(len(s.input_ids) for s in samples)
    assert ids.shape[1] == -(-longest // 16) * 16 and ids.shape == labels.shape == mask.shape
    assert pixels.shape[0] == sum(s.pixels_NCHW.shape[0] for s in samples)
    assert int(mask.sum()) == sum(len(s.input_ids) for s in samples)
    assert bool((labels[mask == 0] == IGNORE_INDEX).all()) and bool((ids[mask == 0] == pad).all())
    (_, ids_fixed, _), _ = Collator(pad, 128, 16, fixed_length=True)(samples)
    assert ids_fixed.shape[1] == 128
    # augmentation is a function of the sample seed: same key, same pixels
    assert torch.equal(ds[(0, 7)].pixels_NCHW, ds[(0, 7)].pixels_NCHW)


def test_collated_batch_is_the_tuple_deepspeed_reads(tiny_cfg: Config, tpl: ChatTemplate) -> None:
    """The named batch is what DeepSpeed's pipeline engine indexes (``batch[0]`` on the first stage, a tuple of
    tensors; ``batch[1]`` labels on the last), survives a DataLoader worker's pickling, and the first layer reads
    DeepSpeed's plain-tuple copy of the inputs back by name."""
    ds = ConversationDataset(load_records(tiny_cfg.data.train[0]), tpl, tiny_cfg.data, 64)
    batch = Collator(tpl.special_ids().pad, 128, 16)([ds[(i, 0)] for i in range(2)])
    assert isinstance(batch, PipeBatch) and isinstance(batch, tuple) and isinstance(batch.inputs, StageInputs)
    assert batch[0] is batch.inputs and batch[1] is batch.labels_BL
    assert isinstance(batch[0], tuple) and all(torch.is_tensor(x) for x in batch[0]) and torch.is_tensor(batch[1])
    assert batch.inputs.media.shape[0] == 2 and batch.inputs.mask_BL.dtype == torch.long
    again = pickle.loads(pickle.dumps(batch))
    assert type(again) is PipeBatch and torch.equal(again.inputs.input_ids_BL, batch.inputs.input_ids_BL)
    plain = tuple(x.clone() for x in batch[0])  # what PipelineEngine._exec_load_micro_batch hands the first stage
    assert torch.equal(StageInputs(*plain).mask_BL, batch.inputs.mask_BL)


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
    kw = {"seed": 3, "micro_batch_size": 4, "grad_accum_steps": 2}
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


# --------------------------------------------------------------------------------------- LLaMA-family templates

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<|extra_0|>"]


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level tokenizer without merges (one id per byte) plus LLaMA-style specials: ids are easy to predict."""
    return byte_level_tokenizer(LLAMA_SPECIALS)


def _T(tok, text: str) -> list[int]:
    """Expected ids of plain text: one id per byte (the byte-level alphabet's id for it)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    table = {c: i for i, c in enumerate(alphabet)}
    mapped = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]
    return [table[c] for c in mapped]


CONV2 = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
         {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Grey."}]


@pytest.mark.parametrize("name", ["vicuna_v0", "vicuna_v1_1", "llama2"])
def test_llama_family_templates_golden(byte_tok, name: str) -> None:
    from lavis.data.conversation import SYSTEM_PROMPTS, encode_conversation

    tpl = ChatTemplate(byte_tok, SYSTEM_PROMPTS[name], "<|extra_0|>", 4, 2, name=name)
    S, E, P = byte_tok.token_id("<s>"), byte_tok.token_id("</s>"), byte_tok.token_id("<|extra_0|>")
    def T(s: str) -> list[int]:
        return _T(byte_tok, s)
    sys_ = SYSTEM_PROMPTS[name]
    img = [P] * 4
    if name == "vicuna_v0":  # MiniGPT-4: {sys}###Human: <Img><ImageHere></Img> q###Assistant: a###
        pieces = [([S], 0), (T(sys_ + "###Human: <Img>") + img + T("</Img>\nWhat is it?###Assistant: "), 0),
                  (T("A cat.###"), 1), (T("Human: Colour?###Assistant: "), 0), (T("Grey.###"), 1)]
    elif name == "vicuna_v1_1":  # FastChat: {sys} USER: q ASSISTANT: a</s>USER: ...
        pieces = [([S], 0), (T(sys_ + " USER: <Img>") + img + T("</Img>\nWhat is it? ASSISTANT:"), 0),
                  (T(" A cat."), 1), ([E], 1), (T("USER: Colour? ASSISTANT:"), 0), (T(" Grey."), 1), ([E], 1)]
    else:  # Meta: <s>[INST] q [/INST] a </s><s>[INST] ...
        assert sys_ == ""
        pieces = [([S], 0), (T("[INST] <Img>") + img + T("</Img>\nWhat is it? [/INST]"), 0), (T(" A cat. "), 1),
                  ([E], 1), ([S], 0), (T("[INST] Colour? [/INST]"), 0), (T(" Grey. "), 1), ([E], 1)]
    ids = [i for p, _ in pieces for i in p]
    labels = [i if trained else IGNORE_INDEX for p, trained in pieces for i in p]
    for mode in ("mpp", "assistant"):  # both modes train answer + end token in these templates
        enc = encode_conversation(CONV2, tpl, record_id="g", label_mode=mode)
        assert enc.input_ids == ids and enc.labels == labels and enc.num_media == 1
    # the chat prompt is the training sequence up to where the last answer starts
    prompt = encode_prompt([("<image>\nWhat is it?", "A cat."), ("Colour?", None)], tpl)
    assert prompt == ids[: len(ids) - len(pieces[-1][0]) - (len(pieces[-2][0]) if name != "vicuna_v0" else 0)]
    assert tpl.stop_sequences()[0] == (T("###") if name == "vicuna_v0" else [E])


def test_llama2_system_prompt_block(byte_tok) -> None:
    from lavis.data.conversation import encode_conversation

    tpl = ChatTemplate(byte_tok, "Be brief.", "<|extra_0|>", 4, 2, name="llama2")
    enc = encode_conversation(CONV[:1] + [{"role": "assistant", "content": "Red."}], tpl, record_id="s")
    text = byte_tok.decode(enc.input_ids, skip_special_tokens=False)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Img>") and text.endswith(" [/INST] Red. </s>")
    with pytest.raises(ValueError, match="unknown chat template"):
        ChatTemplate(byte_tok, "", "<|extra_0|>", 4, 2, name="alpaca")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ formats and the converter

LLAVA_PRETRAIN = [{"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
    {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}]
VCG = [{"video": "v_k_ZXmr8pmrs.mp4", "instruction": "<Img><ImageHere></Img> What is the man doing?",
        "output": "He is skiing down a slope."}]


def test_llava_pretrain_and_videochatgpt_formats(tmp_path: Path) -> None:
    (tmp_path / "lp.json").write_text(json.dumps(LLAVA_PRETRAIN))
    (tmp_path / "vcg.json").write_text(json.dumps(VCG))
    (rec,) = load_records(DatasetConfig(ann_path=str(tmp_path / "lp.json"), vis_root="root", format="llava_pretrain"))
    assert rec.id == "004539375" and rec.images == [Path("root/00453/004539375.jpg")] and rec.video is None
    assert rec.conversations == [
        {"role": "user", "content": "<image>\nRender a clear and concise summary of the photo."},  # image first
        {"role": "assistant", "content": "select luxury furniture 3 - inch gel memory foam mattress topper"}]
    (rec,) = load_records(DatasetConfig(ann_path=str(tmp_path / "vcg.json"), vis_root="v", format="videochatgpt"))
    assert rec.video == Path("v/v_k_ZXmr8pmrs.mp4") and rec.images == []
    assert rec.conversations[0] == {"role": "user", "content": "<video> What is the man doing?"}
    two = [dict(LLAVA_PRETRAIN[0], conversations=LLAVA_PRETRAIN[0]["conversations"] * 2)]
    (tmp_path / "lp2.json").write_text(json.dumps(two))
    with pytest.raises(ValueError, match=r"lp2.json:0 \(id 004539375\): a LLaVA-Pretrain record"):
        load_records(DatasetConfig(ann_path=str(tmp_path / "lp2.json"), format="llava_pretrain"))
    (tmp_path / "img.json").write_text(json.dumps([{"image": "a.jpg", "instruction": "q", "output": "a"}]))
    with pytest.raises(ValueError, match=r"img.json:0: a VideoChatGPT record needs a `video`"):
        load_records(DatasetConfig(ann_path=str(tmp_path / "img.json"), format="videochatgpt"))


def test_convert_cli_writes_canonical_jsonl(tmp_path: Path, tpl: ChatTemplate) -> None:
    from lavis.data import convert

    (tmp_path / "lp.json").write_text(json.dumps(LLAVA_PRETRAIN))
    out = tmp_path / "out" / "lp.jsonl"
    assert convert.main(["--format", "llava_pretrain", "--ann", str(tmp_path / "lp.json"), "--out", str(out)]) == 0
    (line,) = out.read_text().splitlines()
    assert json.loads(line) == {"id": "004539375", "images": ["00453/004539375.jpg"], "conversations": [
        {"role": "user", "content": "<image>\nRender a clear and concise summary of the photo."},  # image first
        {"role": "assistant", "content": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}
    # converted once == read directly: same records, same ids and labels
    direct = load_records(DatasetConfig(ann_path=str(tmp_path / "lp.json"), format="llava_pretrain"))
    again = load_records(DatasetConfig(ann_path=str(out)))
    assert [(r.id, r.images, r.conversations) for r in direct] == [(r.id, r.images, r.conversations) for r in again]
    (tmp_path / "vcg.json").write_text(json.dumps(VCG + [{"video": "x.mp4", "instruction": ["a"], "output": []}]))
    with pytest.raises(ValueError, match=r"vcg.json:1"):
        convert.main(["--format", "videochatgpt", "--ann", str(tmp_path / "vcg.json"), "--out", str(out)])
    assert convert.main(["--format", "videochatgpt", "--ann", str(tmp_path / "vcg.json"), "--out", str(out),
                         "--skip-bad"]) == 0
    assert [json.loads(ln)["video"] for ln in out.read_text().splitlines()] == ["v_k_ZXmr8pmrs.mp4"]


# ------------------------------------------------------------------------------------------- length handling


def test_long_multi_image_sample_truncates_after_the_last_image(tpl: ChatTemplate) -> None:
    from lavis.data.conversation import TooLongError, encode_conversation, fit_length

    conv = [{"role": "user", "content": "<image> first <image> second"}, {"role": "assistant", "content": "Both."},
            {"role": "user", "content": "And this? <image>"}, {"role": "assistant", "content": "A red circle. " * 40}]
    enc = encode_conversation(conv, tpl, record_id="long")
    ph = tpl.placeholder_id
    last_ph = max(i for i, t in enumerate(enc.input_ids) if t == ph)
    limit = last_ph + 20
    assert len(enc.input_ids) > limit
    cut = fit_length(enc, limit, ph, "long", "truncate")
    assert len(cut.input_ids) == len(cut.labels) == limit and cut.num_media == 3
    assert cut.input_ids.count(ph) == 3 * NQ  # every image run whole, in order
    assert cut.input_ids == enc.input_ids[:limit] and any(x != IGNORE_INDEX for x in cut.labels[last_ph:])
    with pytest.raises(TooLongError, match=rf"record long: .* > data.max_txt_len={limit} \(data.length_policy=drop\)"):
        fit_length(enc, limit, ph, "long", "drop")
    with pytest.raises(TooLongError, match="do not fit"):  # the third image's run would be cut: never split it
        fit_length(enc, last_ph - 2, ph, "long", "truncate")
    assert fit_length(enc, len(enc.input_ids), ph, "long", "drop") is enc


# ------------------------------------------------------------------------------ length grouping and padding


def test_length_grouped_sampler_is_pure_disjoint_and_grouped() -> None:
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 1500, (200,), generator=rng).tolist()
    kw = {"seed": 5, "micro_batch_size": 4, "grad_accum_steps": 3, "dp_size": 2, "length_of": lambda i: lengths[i]}
    r0 = StepSampler([200], [1.0], dp_rank=0, **kw)
    r1 = StepSampler([200], [1.0], dp_rank=1, **kw)
    plain = StepSampler([200], [1.0], dp_rank=0, **{**kw, "length_of": None})
    for step in range(4):
        keys = r0.step_keys(step)
        assert keys == r1.step_keys(step) == StepSampler([200], [1.0], dp_rank=0, start_step=step, **kw).step_keys(step)
        flat = [k for mb in keys for rank in mb for k in rank]
        # same samples (and augmentation seeds) as without grouping, just regrouped; ranks disjoint
        assert sorted(flat) == sorted(k for mb in plain.step_keys(step) for rank in mb for k in rank)
        assert len(set(flat)) == len(flat)
        lens = [lengths[i] for i, _ in flat]
        assert lens == sorted(lens, reverse=True)  # micro-batch k of rank r = sorted chunk k * D + r
    resumed = StepSampler([200], [1.0], dp_rank=1, start_step=2, **kw)
    assert _take(resumed, 3) == _take(r1, 9)[6:9]


def test_padding_efficiency() -> None:
    from lavis.data.padding import microbatches, padding_efficiency

    assert padding_efficiency([[64, 64], [128]], 64, None) == 1.0
    assert padding_efficiency([[10, 70]], 64, None) == pytest.approx(80 / 256)
    assert padding_efficiency([[10, 70]], 64, 1536) == pytest.approx(80 / 3072)
    lengths = torch.randint(50, 1000, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = {"micro_batch_size": 4, "grad_accum_steps": 8, "dp_size": 2, "steps": 8}
    plain = microbatches(lengths, group_by_length=False, **kw)
    grouped = microbatches(lengths, group_by_length=True, **kw)
    assert sorted(x for mb in plain for x in mb) == sorted(x for mb in grouped for x in mb)
    fixed, dyn, grp = (padding_efficiency(plain, 1, 1536), padding_efficiency(plain, 64, None),
                       padding_efficiency(grouped, 64, None))
    assert fixed < dyn < grp <= 1.0
