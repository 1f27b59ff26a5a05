"""The VLM data side: records -> the model's own chat template and processor output, labels on assistant turns,
native-resolution budgets, video sampling, the length check, the ShareGPT format and the dynamic-shape collate."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lavis.config.schema import DataConfig, DatasetConfig
from lavis.data.conversation import IGNORE_INDEX, ChatTemplate, SampleError, TooLongError, encode_conversation
from lavis.data.datasets import load_records
from lavis.data.shapes import write_video
from lavis.data.tokenizer import build_demo_tokenizer
from lavis.vlm.collate import MEDIA_IMAGE, MEDIA_VIDEO, VLMCollator
from lavis.vlm.conversation import to_messages
from lavis.vlm.data_config import VLMDataConfig
from lavis.vlm.processor import VLMConversationDataset, encode_sample, load_clip

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
TWO_IMAGE_TURNS = [
    {"role": "user", "content": "<image>\nWhat is in the first picture? <image> and here?"},
    {"role": "assistant", "content": "A red circle, then a blue square."},
    {"role": "user", "content": "Which is bigger?"},
    {"role": "assistant", "content": "The square."},
]


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (60, 90), "red"), Image.new("RGB", (150, 40), "blue")]


def _with_media(messages: list[dict[str, Any]], images: list[Any], videos: list[Any]) -> list[dict[str, Any]]:
    """The messages with each image / video part holding its object, as ``apply_chat_template(tokenize=True)``
    takes them."""
    out, it_img, it_vid = copy.deepcopy(messages), iter(images), iter(videos)
    for m in out:
        for part in m["content"] if isinstance(m["content"], list) else []:
            if part["type"] == "image":
                part["image"] = next(it_img)
            elif part["type"] == "video":
                part["video"] = next(it_vid)
    return out


def _trained_text(proc: Any, labels: torch.Tensor) -> str:
    return proc.tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_pixels_equal_the_processors_chat_template(family: str, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors[family]
    messages = to_messages(TWO_IMAGE_TURNS, "r1")
    s = encode_sample(proc, messages, _images(), [], VLMDataConfig(), "r1")
    ref = proc.apply_chat_template(_with_media(messages, _images(), []), tokenize=True, return_dict=True,
                                   return_tensors="pt")
    assert torch.equal(s.input_ids, ref["input_ids"][0])
    assert torch.equal(s.pixel_values, ref["pixel_values"].float())
    assert torch.equal(s.image_grid_thw, ref["image_grid_thw"])
    # native resolution: each image keeps its own aspect (grids differ, neither is square)
    factor = proc.image_processor.patch_size * 2
    assert s.image_grid_thw.tolist() == [[1, 2 * round(90 / factor), 2 * round(60 / factor)],
                                         [1, 2 * round(40 / factor), 2 * round(150 / factor)]]
    assert s.num_visual_tokens == int(s.image_grid_thw.prod(-1).sum()) // 4
    assert s.pixel_values_videos.shape[0] == 0 and s.video_grid_thw.shape == (0, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_only_on_assistant_turns(family: str, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors[family]
    system = [{"role": "system", "content": "Answer briefly."}]
    s = encode_sample(proc, to_messages(system + TWO_IMAGE_TURNS, "r1"), _images(), [], VLMDataConfig(), "r1")
    trained = s.labels != IGNORE_INDEX
    assert torch.equal(s.labels[trained], s.input_ids[trained])  # unshifted
    assert _trained_text(proc, s.labels) == "A red circle, then a blue square.<|im_end|>\nThe square.<|im_end|>\n"
    visual = (s.input_ids == proc.image_token_id) | (s.input_ids == proc.video_token_id)
    assert visual.sum() > 0 and not trained[visual].any()
    text = proc.tokenizer.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    # the role header of each assistant turn is not trained, its first answer token is
    header = proc.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    ids = s.input_ids.tolist()
    starts = [i for i in range(len(ids)) if ids[i:i + len(header)] == header]
    assert len(starts) == 2
    for i in starts:
        assert (s.labels[i:i + len(header)] == IGNORE_INDEX).all() and s.labels[i + len(header)] != IGNORE_INDEX


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_budget_keeps_aspect_within_min_and_max(family: str, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors[family]
    factor = proc.image_processor.patch_size * 2
    messages = to_messages([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], "b")
    budget = VLMDataConfig(image_min_pixels=factor * factor * 8, image_max_pixels=factor * factor * 12)
    for size in [(20, 10), (1000, 500), (300, 300)]:
        s = encode_sample(proc, messages, [Image.new("RGB", size)], [], budget, "b")
        _, h, w = s.image_grid_thw[0].tolist()
        area = (h * proc.image_processor.patch_size) * (w * proc.image_processor.patch_size)
        assert budget.image_min_pixels <= area <= budget.image_max_pixels, (size, h, w)
        if size[0] != size[1]:
            assert w > h  # wide stays wide
    big = encode_sample(proc, messages, [Image.new("RGB", (1000, 500))], [], VLMDataConfig(), "b")
    assert big.image_grid_thw.prod() > s.image_grid_thw.prod()  # the processor's own (larger) budget otherwise


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 frames of 64 x 48 at 4 fps (3 s), each frame a different shade."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, [Image.new("RGB", (64, 48), (20 * i, 0, 0)) for i in range(12)], fps=4)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_video_follows_fps_and_frame_budgets(family: str, clip_path: Path, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors[family]
    messages = to_messages([{"role": "user", "content": "<video>What happens?"},
                            {"role": "assistant", "content": "It darkens."}], "v")
    at_2fps = load_clip(clip_path, proc, VLMDataConfig(video_fps=2.0))
    assert at_2fps[0].shape == (6, 48, 64, 3) and at_2fps[1].fps == 4.0
    s = encode_sample(proc, messages, [], [at_2fps], VLMDataConfig(), "v")
    assert s.video_grid_thw[0, 0] == 3  # 6 frames / temporal patch 2
    assert s.pixel_values_videos.shape[0] == int(s.video_grid_thw.prod())
    assert _trained_text(proc, s.labels) == "It darkens.<|im_end|>\n"
    # the processor itself on the same frames (its own file loader needs torchcodec, absent here)
    direct = proc(text=[proc.apply_chat_template(messages, tokenize=False)], videos=[at_2fps[0]],
                  video_metadata=[at_2fps[1]], do_sample_frames=False, return_tensors="pt")
    assert torch.equal(s.input_ids, direct["input_ids"][0])
    if family == "qwen2_5_vl":
        assert s.second_per_grid_ts.tolist() == [pytest.approx(2 / 2.0)]
        one_fps = load_clip(clip_path, proc, VLMDataConfig(video_fps=1.0, video_min_frames=2))
        slow = encode_sample(proc, messages, [], [one_fps], VLMDataConfig(), "v")
        # seconds per temporal patch of 2 frames, at the rate the frames were actually sampled
        assert one_fps[1].sampled_fps < at_2fps[1].sampled_fps
        assert slow.second_per_grid_ts.tolist() == [pytest.approx(2 / one_fps[1].sampled_fps)]
        assert slow.video_grid_thw[0, 0] < s.video_grid_thw[0, 0]
    else:
        assert "seconds><|vision_start|>" in proc.tokenizer.decode(s.input_ids)
    few = load_clip(clip_path, proc, VLMDataConfig(video_fps=4.0, video_max_frames=4))
    assert few[0].shape[0] == 4
    tight = VLMDataConfig(video_min_pixels=28 * 28, video_max_pixels=28 * 28 * 2)
    small = encode_sample(proc, messages, [], [at_2fps], tight, "v")
    assert small.video_grid_thw[0, 1:].prod() < s.video_grid_thw[0, 1:].prod()


def test_unreadable_video_is_named(tmp_path: Path, qwen_vl_processors: dict[str, Any]) -> None:
    from lavis.data.media import MediaError

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(MediaError, match="bad.mp4"):
        load_clip(bad, qwen_vl_processors["qwen2_5_vl"], VLMDataConfig())
    with pytest.raises(MediaError, match="missing.mp4: video file not found"):
        load_clip(tmp_path / "missing.mp4", qwen_vl_processors["qwen2_5_vl"], VLMDataConfig())


def _write_dataset(root: Path, records: list[dict[str, Any]], name: str = "train.json") -> Path:
    for size, colour in (((60, 90), "red"), ((150, 40), "blue")):
        Image.new("RGB", size, colour).save(root / f"{colour}.png")
    path = root / name
    path.write_text(json.dumps(records))
    return path


def _dataset(root: Path, records: list[dict[str, Any]], proc: Any, fmt: str = "canonical",
             **data: Any) -> VLMConversationDataset:
    ds = DatasetConfig(ann_path=str(_write_dataset(root, records)), vis_root=str(root), format=fmt)
    return VLMConversationDataset(load_records(ds), proc, DataConfig(train=[ds], **data))


def test_too_long_sample_names_record_file_and_counts(tmp_path: Path, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors["qwen2_5_vl"]
    rec = {"id": "big-1", "images": ["red.png", "blue.png"], "conversations": TWO_IMAGE_TURNS}
    ds = _dataset(tmp_path, [rec], proc, max_txt_len=30)
    with pytest.raises(TooLongError) as e:
        ds[0, 0]
    msg = str(e.value)
    assert f"{tmp_path / 'train.json'}:0" in msg and "record big-1" in msg
    assert "visual" in msg and "data.max_txt_len=30" in msg and "image_max_pixels" in msg
    assert ds.num_tokens(0) == 0
    fits = _dataset(tmp_path, [rec], proc, max_txt_len=512)
    assert 30 < fits.num_tokens(0) == len(fits[0, 0].input_ids) <= 512


def test_length_policy_truncates_text_after_the_last_image(tmp_path: Path,
                                                           qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors["qwen2_5_vl"]
    rec = {"id": "t", "images": ["red.png"], "conversations": [
        {"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "word " * 40}]}
    full = _dataset(tmp_path, [rec], proc, max_txt_len=512)[0, 0]
    cut_at = len(full.input_ids) - 20
    cut = _dataset(tmp_path, [rec], proc, max_txt_len=cut_at)[0, 0]
    assert torch.equal(cut.input_ids, full.input_ids[:cut_at]) and torch.equal(cut.labels, full.labels[:cut_at])
    with pytest.raises(TooLongError, match="length_policy=drop"):
        _dataset(tmp_path, [rec], proc, max_txt_len=cut_at, length_policy="drop")[0, 0]


def test_formats_train_the_vlm(tmp_path: Path, qwen_vl_processors: dict[str, Any]) -> None:
    """LLaVA, MPP and the ShareGPT ``messages`` layout (LLaMA-Factory's mllm_demo) give the same sample."""
    proc = qwen_vl_processors["qwen3_vl"]
    canonical = {"id": "a", "images": ["red.png"], "conversations": [
        {"role": "user", "content": "<image>\nWhat shape?"}, {"role": "assistant", "content": "A circle."}]}
    llava = {"id": "a", "image": "red.png", "conversations": [
        {"from": "human", "value": "What shape?\n<image>"}, {"from": "gpt", "value": "A circle."}]}
    mpp = {"id": "a", "image": "red.png", "instruction": "<Img><ImageHere></Img>\nWhat shape?", "output": "A circle."}
    sharegpt = {"messages": [{"role": "user", "content": "<image>\nWhat shape?"},
                             {"role": "assistant", "content": "A circle."}], "images": ["red.png"]}
    want = _dataset(tmp_path, [canonical], proc)[0, 0]
    for fmt, rec in (("llava", llava), ("mpp", mpp), ("sharegpt", sharegpt)):
        got = _dataset(tmp_path, [rec], proc, fmt=fmt)[0, 0]
        assert torch.equal(got.input_ids, want.input_ids), fmt
        assert torch.equal(got.labels, want.labels) and torch.equal(got.pixel_values, want.pixel_values)


def test_sharegpt_layouts_system_and_refusals(tmp_path: Path, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors["qwen2_5_vl"]
    conversations = {"id": "s", "system": "Be terse.", "conversations": [
        {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}], "images": "red.png"}
    s = _dataset(tmp_path, [conversations], proc, fmt="sharegpt")[0, 0]
    assert proc.tokenizer.decode(s.input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    assert _trained_text(proc, s.labels) == "Red.<|im_end|>\n"
    tool = {"messages": [{"role": "user", "content": "hi"}, {"role": "function_call", "content": "{}"}]}
    with pytest.raises(ValueError, match=r"train.json:0: turn 1 is a tool turn"):
        _dataset(tmp_path, [tool], proc, fmt="sharegpt")
    both = {"messages": [{"role": "user", "content": "<image><video>"}, {"role": "assistant", "content": "x"}],
            "images": ["red.png"], "videos": ["v.mp4"]}
    with pytest.raises(ValueError, match="1 images and 1 videos"):
        _dataset(tmp_path, [both], proc, fmt="sharegpt")
    markers = {"messages": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}],
               "images": ["red.png"]}
    with pytest.raises(ValueError, match="2 <image> and 0 <video> markers but 1 images"):
        _dataset(tmp_path, [markers], proc, fmt="sharegpt")


def test_conversation_shape_errors_name_the_record() -> None:
    with pytest.raises(SampleError, match="record q: turn 1 has role 'user', expected 'assistant'"):
        to_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "q")
    with pytest.raises(SampleError, match="record q: the conversation must end with an assistant turn"):
        to_messages([{"role": "user", "content": "a"}], "q")
    with pytest.raises(SampleError, match=r"turn 1 \(assistant\) contains an image/video marker"):
        to_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}], "q")


def test_budget_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="data.vlm.image_max_pixels must be an integer >= 1"):
        VLMDataConfig(image_max_pixels=0)
    with pytest.raises(ValueError, match=r"data.vlm.video_min_frames \(9\) must be <= data.vlm.video_max_frames"):
        VLMDataConfig(video_min_frames=9, video_max_frames=4)
    with pytest.raises(ValueError, match="data.vlm.video_fps must be > 0"):
        VLMDataConfig(video_fps=0)
    with pytest.raises(ValueError, match="min 5000 > max 3000"):
        VLMDataConfig(image_min_pixels=5000).image_size({"shortest_edge": 10, "longest_edge": 3000})


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_dynamic_shapes(family: str, clip_path: Path, qwen_vl_processors: dict[str, Any]) -> None:
    proc = qwen_vl_processors[family]
    two = encode_sample(proc, to_messages(TWO_IMAGE_TURNS, "a"), _images(), [], VLMDataConfig(), "a")
    clip = load_clip(clip_path, proc, VLMDataConfig(video_fps=2.0))
    vid = encode_sample(proc, to_messages([{"role": "user", "content": "<video>Go?"},
                                           {"role": "assistant", "content": "Yes."}], "b"), [], [clip],
                        VLMDataConfig(), "b")
    one = encode_sample(proc, to_messages([{"role": "user", "content": "<image>Hi"},
                                           {"role": "assistant", "content": "Hello."}], "c"),
                        [Image.new("RGB", (200, 100))], [], VLMDataConfig(), "c")
    samples = [two, vid, one]
    batch = VLMCollator(pad_id=proc.tokenizer.pad_token_id, max_txt_len=4096, pad_to_multiple_of=16)(samples)
    inputs, labels = batch
    assert batch.inputs is inputs and batch.labels_BL is labels  # a named tuple DeepSpeed indexes by position
    longest = max(len(s.input_ids) for s in samples)
    assert inputs.input_ids_BL.shape == labels.shape == (3, -(-longest // 16) * 16)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert torch.equal(inputs.input_ids_BL[i, :n], s.input_ids) and torch.equal(labels[i, :n], s.labels)
        assert (inputs.input_ids_BL[i, n:] == proc.tokenizer.pad_token_id).all()
        assert (labels[i, n:] == IGNORE_INDEX).all() and inputs.mask_BL[i].sum() == n
    # images of every sample in order, then the clips
    assert inputs.grid_thw.tolist() == two.image_grid_thw.tolist() + one.image_grid_thw.tolist() \
        + vid.video_grid_thw.tolist()
    assert inputs.media_kind.tolist() == [MEDIA_IMAGE] * 3 + [MEDIA_VIDEO]
    assert torch.equal(inputs.pixels, torch.cat([two.pixel_values, one.pixel_values, vid.pixel_values_videos]))
    assert inputs.pixels.shape[0] == int(inputs.grid_thw.prod(-1).sum())
    assert inputs.second_per_grid.tolist()[:3] == [1.0] * 3
    assert inputs.second_per_grid[3] == vid.second_per_grid_ts[0]
    # every visual placeholder in the batch has its patch rows (4 patches per merged token)
    placeholders = (inputs.input_ids_BL == proc.image_token_id) | (inputs.input_ids_BL == proc.video_token_id)
    assert int(placeholders.sum()) * 4 == inputs.pixels.shape[0]
    text_only = VLMCollator(pad_id=0, max_txt_len=64, pad_to_multiple_of=1)([
        encode_sample(proc, to_messages([{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello."}], "t"), [], [], VLMDataConfig(),
                      "t")])
    assert text_only.inputs.pixels.shape[0] == 0 and text_only.inputs.grid_thw.shape == (0, 3)


def test_webdataset_and_videochatgpt_train_the_vlm(tmp_path: Path, clip_path: Path,
                                                   qwen_vl_processors: dict[str, Any]) -> None:
    """An image read from inside a tar shard, and a raw Video-ChatGPT record whose clip the processor samples."""
    proc = qwen_vl_processors["qwen2_5_vl"]
    buf = io.BytesIO()
    Image.new("RGB", (60, 90), "red").save(buf, format="PNG")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k1.png", buf.getvalue()), ("k1.txt", b"A red rectangle.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = DatasetConfig(ann_path=str(shard), format="webdataset")
    s = VLMConversationDataset(load_records(ds), proc, DataConfig(train=[ds]))[0, 0]
    assert s.image_grid_thw.tolist() == [[1, 6, 4]] and _trained_text(proc, s.labels) == "A red rectangle.<|im_end|>\n"
    (tmp_path / "v1.mp4").write_bytes(clip_path.read_bytes())
    raw = tmp_path / "vcg.json"
    raw.write_text(json.dumps([{"video_id": "v1", "q": "What happens?", "a": "It darkens."}]))
    ds = DatasetConfig(ann_path=str(raw), vis_root=str(tmp_path), format="videochatgpt")
    v = VLMConversationDataset(load_records(ds), proc, DataConfig(train=[ds]), VLMDataConfig(video_fps=2.0))[0, 0]
    assert v.video_grid_thw[0, 0] == 3 and _trained_text(proc, v.labels) == "It darkens.<|im_end|>\n"
    assert "What happens?\n<|vision_start|><|video_pad|>" in proc.tokenizer.decode(v.input_ids)


def test_blip2_templates_refuse_a_sharegpt_system_turn_naming_the_record(tmp_path: Path) -> None:
    """What DATA.md promises for the BLIP-2 family: a system turn read by the sharegpt format is refused, not lost."""
    records = load_records(DatasetConfig(ann_path=str(_write_dataset(tmp_path, [
        {"id": "s1", "system": "Be terse.", "messages": [{"role": "user", "content": "<image>Colour?"},
                                                         {"role": "assistant", "content": "Red."}],
         "images": ["red.png"]}])), vis_root=str(tmp_path), format="sharegpt"))
    assert records[0].conversations[0] == {"role": "system", "content": "Be terse."}
    tpl = ChatTemplate(build_demo_tokenizer(), "You are a helpful assistant.", "<|extra_0|>", 8, 4)
    with pytest.raises(SampleError, match="record s1: turn 0 has role 'system', expected 'user'"):
        encode_conversation(records[0].conversations, tpl, record_id="s1")
