"""Dataset formats, each rebuilt here from its documented layout: Video-ChatGPT's raw and training files,
MiniGPT-4's filter_cap.json, webdataset tar shards, MPP's bare <ImageHere>, LLaVA's image-first preprocessing, and the
checker naming the id of a malformed record."""

from __future__ import annotations

import io
import json
import tarfile
import typing
from pathlib import Path

import pytest
from PIL import Image

from lavis.config.load import ConfigError, from_dict
from lavis.config.schema import DataConfig, DatasetConfig
from lavis.data.datasets import ConversationDataset, load_records
from lavis.data.formats import FORMATS, MINIGPT4_ALIGN_PROMPTS, TarMember

LLAMA_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama_tokenizer.model"


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_schema_format_names_are_the_table() -> None:
    """The schema names the formats (config sits below data), FORMATS implements them: the two sets are equal, and a
    name outside them is refused at load time naming the key and every name."""
    hint = typing.get_type_hints(DatasetConfig)["format"]
    assert set(typing.get_args(hint)) == set(FORMATS)
    with pytest.raises(ConfigError, match=r"`data\.train\[0\]\.format` must be one of \['canonical', .*'sharegpt'\], "
                       r"got 'alpaca'"):
        from_dict(DatasetConfig, {"ann_path": "a.json", "format": "alpaca"}, source="r.yaml", prefix="data.train[0].")


def test_videochatgpt_raw_instruction_file(tmp_path: Path) -> None:
    """``{video_id, q, a}``: the <video> marker after the question in even records, before it in odd ones (as
    Video-ChatGPT's converter writes its training file); the clip is the first existing <id>.<ext>."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "v_a.mkv").write_bytes(b"")
    (videos / "v_b.mp4").write_bytes(b"")
    ann = _write(tmp_path / "VideoInstruct100K.json", [
        {"video_id": "v_a", "q": "What happens?", "a": "A man skis."},
        {"video_id": "v_b", "q": "Where is it?", "a": "On a slope."},
        {"video_id": "v_c", "q": "Who?", "a": "Nobody."}])
    recs = load_records(DatasetConfig(ann_path=str(ann), vis_root=str(videos), format="videochatgpt"))
    assert [r.id for r in recs] == ["v_a", "v_b", "v_c"]
    assert [r.video for r in recs] == [videos / "v_a.mkv", videos / "v_b.mp4", videos / "v_c.mp4"]  # c is missing
    assert recs[0].conversations == [{"role": "user", "content": "What happens?\n<video>"},
                                     {"role": "assistant", "content": "A man skis."}]
    assert recs[1].conversations[0]["content"] == "<video>\nWhere is it?"
    only_webm = DatasetConfig(ann_path=str(ann), vis_root=str(videos), format="videochatgpt",
                              video_extensions=["webm", "mp4"])
    assert load_records(only_webm)[1].video == videos / "v_b.mp4"
    bad = _write(tmp_path / "bad.json", [{"video_id": "v_a", "q": "x"}])
    with pytest.raises(ValueError, match=r"bad.json:0 \(id v_a\): a raw Video-ChatGPT record needs"):
        load_records(DatasetConfig(ann_path=str(bad), format="videochatgpt"))


@pytest.mark.parametrize("fmt", ["videochatgpt", "llava"])
def test_videochatgpt_training_file(tmp_path: Path, fmt: str) -> None:
    """Video-ChatGPT's training file: LLaVA conversations with a ``video`` naming its feature file (``.pkl``); read
    as videochatgpt or llava, the video is kept (resolved to the clip) and the marker stays where it is."""
    (tmp_path / "v_a.webm").write_bytes(b"")
    ann = _write(tmp_path / "video_chatgpt_training.json", [
        {"id": "v_a", "video": "v_a.pkl", "conversations": [
            {"from": "human", "value": "What happens?\n<video>"}, {"from": "gpt", "value": "A man skis."}]}])
    (rec,) = load_records(DatasetConfig(ann_path=str(ann), vis_root=str(tmp_path), format=fmt))
    assert rec.video == tmp_path / "v_a.webm" and rec.images == []
    assert rec.conversations[0] == {"role": "user", "content": "What happens?\n<video>"}


def test_minigpt4_captions_stage2_golden(tmp_path: Path) -> None:
    """filter_cap.json -> one of MiniGPT-4's four alignment prompts + the caption; with the minigpt4_vicuna template
    and LLaMA's tokenizer the ids are MiniGPT-4's stage-2 sequence."""
    ann = _write(tmp_path / "filter_cap.json", {"annotations": [
        {"image_id": "2", "caption": "The image shows a red circle."},
        {"image_id": 17, "caption": "A blue square."}]})
    recs = load_records(DatasetConfig(ann_path=str(ann), vis_root=str(tmp_path / "image"), format="minigpt4_captions"))
    assert [r.id for r in recs] == ["2", "17"] and recs[0].images == [tmp_path / "image" / "2.jpg"]
    assert all(r.conversations[0]["content"] in MINIGPT4_ALIGN_PROMPTS for r in recs)
    assert recs[1].conversations[1] == {"role": "assistant", "content": "A blue square."}
    again = load_records(DatasetConfig(ann_path=str(ann), format="minigpt4_captions"))
    assert [r.conversations for r in again] == [r.conversations for r in recs]  # a pure function of the record
    with pytest.raises(ValueError, match=r"filter_cap.json: expected MiniGPT-4's"):
        load_records(DatasetConfig(ann_path=str(_write(tmp_path / "filter_cap.json", [])), format="minigpt4_captions"))
    if not LLAMA_MODEL.is_file():
        pytest.skip(f"LLaMA tokenizer not found at {LLAMA_MODEL}")
    import sentencepiece as spm

    from lavis.data.conversation import IGNORE_INDEX, SYSTEM_PROMPTS, ChatTemplate, encode_conversation
    from lavis.data.tokenizer import load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    tpl = ChatTemplate(load_tokenizer(str(LLAMA_MODEL)), SYSTEM_PROMPTS["minigpt4_vicuna"], "<unk>", 32, 4,
                       name="minigpt4_vicuna")
    enc = encode_conversation(recs[0].conversations, tpl, record_id="2")
    prompt = recs[0].conversations[0]["content"].replace("<image>", "<Img><ImageHere></Img>")
    before, after = f"###Human: {prompt} ###Assistant: ".split("<ImageHere>")
    head = [1, *sp.encode(before), *[0] * 32, *sp.encode(after)]
    assert enc.input_ids == head + sp.encode("The image shows a red circle.###")
    assert enc.labels[:len(head)] == [IGNORE_INDEX] * len(head)


def _image_bytes(color: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format=fmt)
    return buf.getvalue()


def _shard(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_index_and_decode(tmp_path: Path) -> None:
    """Shards of <key>.jpg + <key>.json (MiniGPT-4 stage 1 / CC-SBU) or <key>.png + <key>.txt (img2dataset); an
    index of (shard, member) is built once; images are read by seek when fetched; a sample without a caption is a
    malformed record naming shard:key."""
    from lavis.data.check import check_datasets
    from lavis.data.conversation import ChatTemplate
    from lavis.data.tokenizer import load_tokenizer

    shards = tmp_path / "cc_sbu"
    shards.mkdir()
    _shard(shards / "00000.tar", {
        "00000/000000000.jpg": _image_bytes((250, 0, 0), "JPEG"),
        "00000/000000000.json": json.dumps({"caption": "a red card", "url": "http://x"}).encode(),
        "00000/000000001.png": _image_bytes((0, 0, 250), "PNG"),
        "00000/000000001.txt": b"a blue card"})
    _shard(shards / "00001.tar", {"000000002.jpg": _image_bytes((0, 250, 0), "JPEG"),
                                  "000000002.json": json.dumps({"url": "no caption"}).encode()})
    ds = DatasetConfig(ann_path=str(shards / "{00000..00001}.tar"), format="webdataset")
    errors: list[tuple[str, str]] = []
    recs = load_records(ds, errors)
    assert [r.id for r in recs] == ["00000/000000000", "00000/000000001"]
    assert recs[0].conversations == [{"role": "user", "content": "<image>"},
                                     {"role": "assistant", "content": "a red card"}]
    assert recs[1].conversations[1]["content"] == "a blue card"
    assert isinstance(recs[0].images[0], TarMember) and recs[0].images[0].shard == shards / "00000.tar"
    ((where, msg),) = errors
    assert where.endswith("00001.tar:000000002") and "(id 000000002): sample has no caption" in msg
    with pytest.raises(ValueError, match="no caption"):
        load_records(ds)  # training stops at a malformed record
    assert [r.id for r in load_records(DatasetConfig(ann_path=str(shards / "00000.tar"), format="webdataset"))] == [
        r.id for r in recs]
    tpl = ChatTemplate(load_tokenizer("builtin:shapes"), "", "<|extra_0|>", 4, 2)
    data = DataConfig(train=[ds], max_txt_len=64)
    sample = ConversationDataset(recs, tpl, data, 28, train=False)[(1, 0)]
    assert sample.pixels_NCHW.shape == (1, 3, 28, 28)
    assert sample.pixels_NCHW[0, 2].mean() > sample.pixels_NCHW[0, 0].mean()  # the blue image, decoded from the tar
    report = check_datasets([ds], tpl, data, workers=1, progress=False)
    assert [(f.id, f.reason) for f in report.findings] == [("000000002", "malformed")] and report.num_records == 3
    with pytest.raises(FileNotFoundError, match="shard"):
        load_records(DatasetConfig(ann_path=str(shards / "{00000..00002}.tar"), format="webdataset"))


def test_mpp_bare_imagehere_and_llava_image_first(tmp_path: Path) -> None:
    mpp = _write(tmp_path / "mpp.json", [
        {"image": "a.jpg", "instruction": "<ImageHere> What is it?", "output": "A cat."},
        {"image": ["a.jpg", "b.jpg"], "instruction": "<Img><ImageHere></Img> and <ImageHere> same?", "output": "No"}])
    recs = load_records(DatasetConfig(ann_path=str(mpp), format="mpp"))
    assert recs[0].conversations[0]["content"] == "<image> What is it?"
    assert recs[1].conversations[0]["content"] == "<image> and <image> same?" and len(recs[1].images) == 2
    llava = _write(tmp_path / "llava.json", [{"id": "9", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}])
    (rec,) = load_records(DatasetConfig(ann_path=str(llava), format="llava"))
    assert [t["content"] for t in rec.conversations] == ["<image>\nWhat is it?", "A cat.", "Colour?", "Grey."]
    (kept,) = load_records(DatasetConfig(ann_path=str(llava), format="llava", image_first=False))
    assert kept.conversations[0]["content"] == "What is it?\n<image>"


def test_checker_names_the_id_of_malformed_records(tmp_path: Path) -> None:
    from lavis.data.check import check_datasets

    ann = _write(tmp_path / "mpp.json", [
        {"id": "rec-7", "image": "a.jpg", "instruction": ["q"], "output": []},
        {"id": "rec-8", "image": "a.jpg", "instruction": "no marker", "output": "a"},
        {"instruction": 3, "output": "a"}])
    report = check_datasets([DatasetConfig(ann_path=str(ann), format="mpp")], None, DataConfig(), progress=False)
    assert [(f.id, f.reason) for f in report.findings] == [
        ("rec-7", "malformed"), ("rec-8", "marker_count"), ("?", "malformed")]
    assert "mpp.json:0 (id rec-7): malformed" in report.format()
