"""The tiny Qwen2.5-VL demo's data side: its recipe's ids match the builtin processor, every generated shapes sample
(images, pairs, multi-turn, videos) fits its max_txt_len, and a collated micro-batch runs through transformers' own
Qwen2.5-VL model built from the recipe's hf_config (every placeholder gets its visual features, the loss is finite)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lavis.config.schema import DataConfig, DatasetConfig
from lavis.data import shapes
from lavis.data.conversation import IGNORE_INDEX
from lavis.data.datasets import StepSampler, load_records
from lavis.data.step_loader import StepLoader
from lavis.vlm.collate import MEDIA_IMAGE, MEDIA_VIDEO, VLMCollator, VLMPipeBatch
from lavis.vlm.data import build_vlm_data, processor_ref
from lavis.vlm.data_config import VLMDataConfig
from lavis.vlm.processor import VLMConversationDataset
from lavis.vlm.processor_files import load_processor, shapes_processor, write_shapes_processor

from .conftest import REPO

RECIPE = REPO / "lavis/projects/demo/shapes_qwen2_5_vl.yaml"


@pytest.fixture(scope="module")
def recipe() -> dict[str, Any]:
    return yaml.safe_load(RECIPE.read_text())


@pytest.fixture(scope="module")
def processor() -> Any:
    return shapes_processor()


def test_recipe_special_ids_are_the_builtin_processors(recipe: dict[str, Any], processor: Any) -> None:
    hf = recipe["model"]["vlm"]["hf_config"]
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    assert {k: hf[k] for k in ids} == ids
    assert (hf["text_config"]["pad_token_id"], hf["text_config"]["eos_token_id"]) == (tok.pad_token_id,
                                                                                      tok.eos_token_id)
    assert len(tok) <= hf["text_config"]["vocab_size"]
    assert recipe["data"]["vlm"]["processor"] == "builtin:shapes"
    VLMDataConfig(**recipe["data"]["vlm"])  # the budget keys are valid


def test_builtin_processor_keeps_chat_markers_whole_as_its_saved_copy_does(tmp_path: Path, processor: Any) -> None:
    # The demo BPE already holds <|im_start|> / <|im_end|> / <|endoftext|>; as plain vocabulary entries the in-memory
    # tokenizer split them into characters (trained on those, while the exported processor reads one id).
    text = "<|im_start|>user\nHi<|im_end|>\n<|vision_start|><|endoftext|>"
    ids = processor(text=[text])["input_ids"][0]
    tok = processor.tokenizer
    markers = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|endoftext|>"]
    assert [i for i in ids if i in tok.convert_tokens_to_ids(markers)] == tok.convert_tokens_to_ids(markers)
    assert tok.convert_tokens_to_ids("<") not in ids, tok.convert_ids_to_tokens(ids)
    loaded = AutoProcessor.from_pretrained(write_shapes_processor(tmp_path / "proc"))
    assert loaded(text=[text])["input_ids"][0] == ids


def test_builtin_processor_saves_and_loads(tmp_path: Path, processor: Any) -> None:
    loaded = AutoProcessor.from_pretrained(write_shapes_processor(tmp_path / "proc"))
    assert type(loaded).__name__ == "Qwen2_5_VLProcessor"
    text = "What colour is the shape?"
    assert loaded.tokenizer.encode(text) == processor.tokenizer.encode(text)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    assert loaded.chat_template == processor.chat_template
    assert type(load_processor(str(tmp_path / "proc"))).__name__ == "Qwen2_5_VLProcessor"
    with pytest.raises(FileNotFoundError, match="no processor_config.json"):
        load_processor(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_processor(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory, recipe: dict[str, Any],
                 processor: Any) -> VLMConversationDataset:
    root = tmp_path_factory.mktemp("shapes")
    ann = shapes.generate_dataset(root, num_single=6, num_multi_turn=6, num_pairs=4, num_videos=4, seed=3)
    ds = DatasetConfig(ann_path=str(ann), vis_root=str(root))
    data = recipe["data"]
    cfg = DataConfig(train=[ds], max_txt_len=data["max_txt_len"], pad_to_multiple_of=data["pad_to_multiple_of"])
    return VLMConversationDataset(load_records(ds), processor, cfg, VLMDataConfig(**data["vlm"]))


def test_every_demo_sample_fits_and_trains_its_answers(demo_dataset: VLMConversationDataset) -> None:
    kinds = set()
    for i in range(len(demo_dataset)):
        s = demo_dataset[i, 0]
        assert len(s.input_ids) <= demo_dataset.data.max_txt_len
        assert (s.labels != IGNORE_INDEX).sum() > 0
        kinds.add((len(s.image_grid_thw), len(s.video_grid_thw)))
        for t, h, w in s.image_grid_thw.tolist():
            assert (t, h, w) == (1, 8, 8)  # 224 px, square: scaled into 112 x 112 = 12544 px, 16 visual tokens
        for t, h, w in s.video_grid_thw.tolist():
            assert (t, h, w) == (2, 8, 8)  # 4 frames at 4 fps -> 2 temporal patches
    assert kinds == {(1, 0), (2, 0), (0, 1)}


def test_collated_demo_batch_runs_through_transformers_qwen2_5_vl(demo_dataset: VLMConversationDataset,
                                                                  recipe: dict[str, Any], processor: Any) -> None:
    hf = dict(recipe["model"]["vlm"]["hf_config"])
    hf.pop("model_type")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf)).eval()
    collate = VLMCollator(pad_id=processor.tokenizer.pad_token_id, max_txt_len=demo_dataset.data.max_txt_len,
                          pad_to_multiple_of=demo_dataset.data.pad_to_multiple_of)
    batch = collate([demo_dataset[i, 0] for i in range(len(demo_dataset))])
    assert isinstance(batch, VLMPipeBatch)
    x = batch.inputs
    rows = torch.split(x.pixels, x.grid_thw.prod(-1).tolist())
    image, video = x.media_kind == MEDIA_IMAGE, x.media_kind == MEDIA_VIDEO
    assert image.any() and video.any()
    pick = [i for i, k in enumerate(x.media_kind.tolist())]
    with torch.no_grad():
        out = model(input_ids=x.input_ids_BL, attention_mask=x.mask_BL, labels=batch.labels_BL,
                    mm_token_type_ids=torch.tensor(processor.create_mm_token_type_ids(x.input_ids_BL.tolist())),
                    pixel_values=torch.cat([rows[i] for i in pick if image[i]]), image_grid_thw=x.grid_thw[image],
                    pixel_values_videos=torch.cat([rows[i] for i in pick if video[i]]),
                    video_grid_thw=x.grid_thw[video], second_per_grid_ts=x.second_per_grid[video])
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(hf["text_config"]["vocab_size"])) < 1.0  # random init: about ln(vocab)


def test_step_loader_streams_vlm_micro_batches(demo_dataset: VLMConversationDataset, processor: Any) -> None:
    """The shared sampler and StepLoader drive the VLM dataset and collator (what build_data wires for model.vlm)."""
    dataset, collate = build_vlm_data(demo_dataset.records, demo_dataset.data, demo_dataset.budget, None, processor)
    assert collate.pad_id == processor.tokenizer.pad_token_id == 0
    sampler = StepSampler([len(dataset)], [1.0], seed=1, micro_batch_size=4, grad_accum_steps=2, dp_rank=0,
                          dp_size=1, length_of=dataset.num_tokens)
    loader = StepLoader(dataset, sampler, collate, grad_accum_steps=2, micro_batch_size=4, dp_rank=0, dp_size=1,
                        on_bad_sample="raise")
    try:
        batches = list(loader.next_step(0) or [])
    finally:
        loader.close()
    assert len(batches) == 2 and all(isinstance(b, VLMPipeBatch) for b in batches)
    for b in batches:
        x = b.inputs
        assert x.input_ids_BL.shape[0] == 4 and x.pixels.shape[0] == int(x.grid_thw.prod(-1).sum())
    assert processor_ref(VLMDataConfig(processor="builtin:shapes"), "/m") == "builtin:shapes"
    assert processor_ref(VLMDataConfig(), "/m") == "/m"
    with pytest.raises(ValueError, match="needs data.vlm.processor"):
        processor_ref(VLMDataConfig(), None)


def test_step_tokens_count_the_workers_samples_without_processing_them_again(
        demo_dataset: VLMConversationDataset, processor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With data.num_workers >= 1 the processor runs in the workers; the step's token count (rank 0's metrics row)
    reads the fetched samples' lengths, so each sample goes through the processor once."""
    from collections import Counter

    from lavis.vlm import processor as vlm_processor

    calls = tmp_path / "calls.txt"
    real = vlm_processor.encode_sample

    def counted(*args: Any, **kwargs: Any) -> Any:
        with calls.open("a") as f:  # the workers are other processes: count through a file
            f.write(f"{args[5]}\n")  # the record id
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm_processor, "encode_sample", counted)
    dataset, collate = build_vlm_data(demo_dataset.records, demo_dataset.data, demo_dataset.budget, None, processor)
    sampler = StepSampler([len(dataset)], [1.0], seed=1, micro_batch_size=2, grad_accum_steps=2, dp_rank=0, dp_size=1)
    loader = StepLoader(dataset, sampler, collate, grad_accum_steps=2, micro_batch_size=2, dp_rank=0, dp_size=1,
                        on_bad_sample="raise", num_workers=1)
    try:
        batches = list(loader.next_step(0) or [])
        tokens = loader.step_tokens(0)
    finally:
        loader.close()
    step_ids = [dataset.records[i].id for mb in sampler.step_keys(0) for rank in mb for i, _ in rank]
    made = Counter(calls.read_text().split())
    assert all(made[rid] == 1 for rid in step_ids), made  # each once (in the worker), none again for the count
    assert tokens == sum(int(b.inputs.mask_BL.sum()) for b in batches) > 0
