"""model.vlm training options: activation recomputation (same gradients, planner counts it), tied embeddings trained
across stages (the embedding on stage 0, the head on the last stage, kept equal), and a video sample through the
trainer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from lavis.config.load import load_config
from lavis.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig
from lavis.convert.pipe_to_pth import load_plain_state
from lavis.convert.vlm_export import trained_layers
from lavis.data.cache_features import CacheError, FeatureCache
from lavis.data.datasets import StepSampler, load_records
from lavis.families import describe, family_named, plan
from lavis.model.mllm import lm_loss
from lavis.pipeline.plan import Workload
from lavis.testing.vlm import (
    FAMILIES,
    MICRO_BATCH,
    image_and_video_batch,
    reference_forward,
    tiny_hf_dict,
    two_image_batch,
    write_tiny_dir,
)
from lavis.vlm.arch import read_hf_config, reference_model
from lavis.vlm.collate import MEDIA_VIDEO, VLMStageInputs
from lavis.vlm.config import VLMConfig
from lavis.vlm.costs import layer_costs
from lavis.vlm.data import build_vlm_data
from lavis.vlm.feature_cache import build_vlm_cache, check_model, item_features, vision_layers
from lavis.vlm.feature_cache import main as cache_main
from lavis.vlm.layers import build_layers, layer_table, run_layers
from lavis.vlm.weights import load_stage

from .conftest import REPO, data_options, launch, losses, vlm_train
from .test_vlm_demo_training import OPTIONS, RECIPE, STEPS


def _layers(family: str, recompute: frozenset[int] = frozenset()) -> list[torch.nn.Module]:
    cfg = VLMConfig(hf_config=tiny_hf_dict(family))
    hf = read_hf_config(cfg)
    layers = build_layers(hf, recompute_blocks=recompute)
    load_stage(cfg, hf, layer_table(hf), dict(enumerate(layers)))
    return layers


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_decoder_blocks_give_the_same_loss_and_gradients(family: str) -> None:
    """``activation_checkpoint_blocks``: the chosen decoder blocks run under non-reentrant recomputation; the loss and
    every gradient equal the plain layers' (an image + a video, DeepStack features crossing the blocks)."""
    inputs, labels = image_and_video_batch(family)
    grads = []
    for recompute in (frozenset(), frozenset({0, 2})):
        layers = _layers(family, recompute)
        assert [getattr(layer, "recompute", False) for layer in layers].count(True) == len(recompute)
        loss = lm_loss(run_layers(layers, inputs), labels)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for layer in layers for p in layer.parameters()]))
    (plain_loss, plain), (loss, got) = grads
    assert loss == plain_loss
    assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_the_planner_counts_recomputed_blocks() -> None:
    cfg = VLMConfig(hf_config=tiny_hf_dict("qwen2_5_vl"), freeze_vision=False)
    hf = read_hf_config(cfg)
    base = Workload(tokens=2 * 64, seq_len=64, images=4)
    plain = layer_costs(hf, cfg, base, patches=96)
    some = layer_costs(hf, cfg, Workload(**{**base.__dict__, "checkpointed_blocks": frozenset({1})}), patches=96)
    every = layer_costs(hf, cfg, Workload(**{**base.__dict__, "activation_checkpointing": True}), patches=96)
    blocks = [i for i, c in enumerate(plain) if c.kind == "block"]
    vision = [i for i, c in enumerate(plain) if c.kind == "vision"][1:]
    d = hf.text_config.hidden_size
    assert [some[i].act_bytes for i in blocks] == [plain[blocks[0]].act_bytes, base.tokens * d * 2.0,
                                                   plain[blocks[2]].act_bytes]
    assert all(every[i].act_bytes == base.tokens * d * 2.0 < plain[i].act_bytes for i in blocks)
    assert all(every[i].act_bytes < plain[i].act_bytes for i in vision)
    assert [c.flops for c in every] == [c.flops for c in plain]
    run = Config(model=ModelConfig(vlm=cfg), train=TrainConfig(parallel=ParallelConfig(
        activation_checkpoint_blocks=[0, 1, 2])))
    assert plan(describe(run.model), run, dp=1).work.checkpointed_blocks == frozenset({0, 1, 2})
    bad = Config(model=ModelConfig(vlm=cfg),
                 train=TrainConfig(parallel=ParallelConfig(activation_checkpoint_blocks=[3])))
    with pytest.raises(ValueError, match=r"activation_checkpoint_blocks \[3\]"):
        plan(describe(bad.model), bad, dp=1)


def _launch(directory: Path, stages: int, partition: str, out: Path, options: list[str]) -> list[float]:
    result = out / f"losses{stages}.json"
    vlm_train(directory, stages, partition, result, 4, *options)
    return json.loads(result.read_text())["losses"]


def _layer_tensor(run: Path, layer: int, key: str) -> torch.Tensor:
    tag = run / (run / "latest").read_text().strip()
    return torch.load(tag / f"layer_{layer:02d}-model_states.pt", map_location="cpu", weights_only=True)[key]


@pytest.mark.process
def test_tied_embeddings_recomputation_and_video_train_like_one_plain_stage(tmp_path: Path) -> None:
    """A tied Qwen2.5-VL (``tie_word_embeddings``, as the 3B) trained through ``build_run`` and DeepSpeed's engine on
    micro-batches that alternate two images and an image + a video: 1 stage without recomputation, and 2 stages with
    the embedding on stage 0, the head on stage 1 and ``activation_checkpoint_interval: 1`` (vision block groups and
    decoder blocks recomputed) give the same 4 losses (fp32, rel <= 1e-5); the first is transformers' tied model's.
    The 2-stage checkpoint holds equal, trained embedding and head; its ``--hf-out`` export holds one tied tensor
    and loads in transformers with our logits."""
    directory = write_tiny_dir(tmp_path / "model", "qwen2_5_vl", tied=True)
    ref = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    assert ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
    with torch.no_grad():
        first = (float(reference_forward(ref, *two_image_batch(seed=0, batch=MICRO_BATCH)).loss)
                 + float(reference_forward(ref, *image_and_video_batch("qwen2_5_vl", seed=1)).loss)) / 2
    one = _launch(directory, 1, "0,10", tmp_path, ["video"])
    two = _launch(directory, 2, "0,6,10", tmp_path, ["video", "recompute", "save"])
    assert len(one) == 4 and all(torch.isfinite(torch.tensor(one)))
    assert abs(one[0] - first) <= 1e-5 * first
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(two, one)), (two, one)
    assert one[-1] < one[0]
    run = tmp_path / "run2"
    embed, head = _layer_tensor(run, 4, "embed_tokens.weight"), _layer_tensor(run, 9, "lm_head.weight")
    assert torch.equal(embed, head)
    assert not torch.equal(embed, ref.lm_head.weight)  # trained
    _check_tied_export(run, ref)


def _check_tied_export(run: Path, before: torch.nn.Module) -> None:
    out = run.parent / "exported"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", str(run), "--hf-out", str(out),
                           "--hf-dtype", "fp32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    keys = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys |= set(f.keys())
    assert "lm_head.weight" not in keys and any(k.endswith("embed_tokens.weight") for k in keys)
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight is exported.model.language_model.embed_tokens.weight
    tag = run / (run / "latest").read_text().strip()
    layers, _, _ = trained_layers(tag, *load_plain_state(tag))
    inputs, _ = two_image_batch(seed=99)
    with torch.no_grad():
        ours = run_layers([layer.eval() for layer in layers], inputs)
        theirs = reference_forward(exported, inputs).logits
        untrained = reference_forward(before, inputs).logits
    assert float((theirs - ours).abs().max() / ours.abs().max()) <= 1e-5
    assert float((theirs - untrained).abs().max() / untrained.abs().max()) > 1e-3



def test_the_demo_training_launch_trains_video_clips(tiny_data: Path) -> None:
    """``tests/test_vlm_demo_training.py``'s launch (the demo recipe on the generated shapes data, which holds mp4
    clips in the VideoChatGPT-style ``video`` field) reaches video samples within its steps: the step sampler of
    ``build_data`` picks them, and the recipe's processor turns them into video patches that the collator hands to
    stage 0 as ``MEDIA_VIDEO`` rows. So the 1-stage = 2-stage losses of that test include video samples."""
    cfg = load_config(RECIPE, [*OPTIONS, *data_options(tiny_data)])
    t = cfg.train
    records = load_records(cfg.data.train[0])
    dataset, collate = build_vlm_data(records, cfg.data, cfg.data.vlm, None)
    sampler = StepSampler([len(records)], [1.0], seed=t.seed, micro_batch_size=t.batch.micro_batch_size,
                          grad_accum_steps=t.batch.grad_accum_steps, dp_rank=0, dp_size=1, start_step=0,
                          length_of=dataset.num_tokens if cfg.data.group_by_length else None)  # as build_data
    seen = [sampler.index_at(p) for step in range(STEPS) for micro in range(t.batch.grad_accum_steps)
            for p in sampler.positions(step, micro, 0)]
    videos = [i for i in seen if records[i].video is not None]
    assert videos, "the demo launch's steps hold no video sample"
    batch = collate([dataset[(videos[0], 0)]])
    inputs = VLMStageInputs(*batch[0])
    assert (inputs.media_kind == MEDIA_VIDEO).sum() == 1
    assert inputs.pixels.shape[0] == int(inputs.grid_thw.prod(-1).sum()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_merger_features_give_the_logits_of_the_full_layers(family: str) -> None:
    """``data.feature_cache``: each image's / clip's merger outputs (and DeepStack features), computed alone, fed to
    the cached layer list (no tower, no mergers) give the full layers' logits for the same batch."""
    vlm = VLMConfig(hf_config=tiny_hf_dict(family))
    hf = read_hf_config(vlm)
    full = _layers(family)
    cached = build_layers(hf, cached=True)
    load_stage(vlm, hf, layer_table(hf), dict(enumerate(cached)))
    assert all(not list(layer.parameters()) for layer in cached[:4])  # the tower and the mergers are not built
    assert [n for n, _ in cached[4].named_parameters()] == ["embed_tokens.weight"]
    vision, _ = vision_layers(vlm)
    for inputs, _ in (two_image_batch(seed=3), image_and_video_batch(family, seed=4)):
        pixels, grid, kind, spg, ids, mask = VLMStageInputs(*inputs)
        rows, start = [], 0
        for g in grid:
            n = int(g.prod())
            rows.append(item_features(vision, pixels[start:start + n], g).flatten(1))
            start += n
        with torch.no_grad():
            want = run_layers([layer.eval() for layer in full], inputs)
            got = run_layers([layer.eval() for layer in cached], (torch.cat(rows), grid, kind, spg, ids, mask))
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def _cache_cfg(tiny_data: Path, out: Path, *extra: str) -> Config:
    return load_config(RECIPE, [*OPTIONS, *data_options(tiny_data), "model.vlm.freeze_vision=true",
                                "model.vlm.freeze_merger=true", f"data.feature_cache={out}", *extra])


def test_a_vlm_feature_cache_is_built_read_and_refused_when_it_does_not_fit(tiny_data: Path, tmp_path: Path) -> None:
    """``python -m lavis.vlm.feature_cache``'s builder over the demo recipe's shapes data (images and mp4 clips):
    the dataset's samples then carry one cached row per visual token; another budget, other weights or a trainable
    tower is refused, naming what differs."""
    out = tmp_path / "cache"
    cfg = _cache_cfg(tiny_data, out)
    assert build_vlm_cache(cfg, out, dtype="fp32") == []
    records = load_records(cfg.data.train[0])
    dataset, collate = build_vlm_data(records, cfg.data, cfg.data.vlm, None)
    plain, _ = build_vlm_data(records, replace(cfg.data, feature_cache=None), cfg.data.vlm, None)
    video = next(i for i in range(len(records)) if records[i].video is not None)
    for i in (0, video):
        s, p = dataset[(i, 0)], plain[(i, 0)]
        assert torch.equal(s.input_ids, p.input_ids) and torch.equal(s.image_grid_thw, p.image_grid_thw)
        assert s.pixel_values.shape == (int(p.image_grid_thw.prod(-1).sum()) // 4, 128)
        assert s.pixel_values_videos.shape == (int(p.video_grid_thw.prod(-1).sum()) // 4, 128)
    batch = collate([dataset[(0, 0)], dataset[(video, 0)]])
    assert batch.inputs.pixels.shape[1] == 128
    with pytest.raises(CacheError, match="budget"):
        other = _cache_cfg(tiny_data, out, "data.vlm.image_max_pixels=6272")
        build_vlm_data(records, other.data, other.data.vlm, None)
    with pytest.raises(CacheError, match="stale feature cache"):
        check_model(FeatureCache.open(out), replace(cfg.model.vlm, init_seed=1))
    with pytest.raises(ValueError, match="freeze_vision: true"):
        trained = _cache_cfg(tiny_data, out, "model.vlm.freeze_vision=false")
        spec = describe(trained.model)
        family_named(spec.family).pipeline_layers(spec, trained, -1)


@pytest.mark.process
def test_the_demo_recipe_trains_from_a_feature_cache_like_from_pixels(tiny_data: Path, tmp_path: Path) -> None:
    """The demo recipe with a frozen tower and mergers: 1 stage from pixels and 2 stages from a cache built by
    ``python -m lavis.vlm.feature_cache`` (fp32) give the same 3 losses (rel <= 1e-5) through ``train_pipeline.py``;
    the planner's table shows the tower's layers without weights."""
    frozen = ["model.vlm.freeze_vision=true", "model.vlm.freeze_merger=true"]
    cache = tmp_path / "cache"
    assert cache_main(["--cfg-path", str(RECIPE), "--out", str(cache), "--dtype", "fp32", "--options", *frozen,
                       *data_options(tiny_data)]) == 0
    runs = {}
    for stages, extra in ((1, []), (2, [f"data.feature_cache={cache}"])):
        out = tmp_path / f"pp{stages}"
        proc = launch(stages, ["--cfg-path", str(RECIPE), "--num-stages", str(stages), "--max-steps", "3",
                               "--output-dir", str(out), "--options", *OPTIONS, *frozen, *extra,
                               *data_options(tiny_data)])
        runs[stages] = (losses(out), proc.stdout + proc.stderr)
    (a, plain_log), (b, log) = runs[1], runs[2]
    assert len(a) == 3 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    assert "boundaries [0, " in log and "rank 1 (stage 1)" in log

    def loaded(text: str) -> int:  # tensors the stages read ("[stage S] random init (...): N loaded")
        return sum(int(n) for n in re.findall(r"\[stage \d\] random init \(.*?\): (\d+) loaded", text))

    vision_tensors = sum(1 for k in reference_model(read_hf_config(VLMConfig(
        hf_config=load_config(RECIPE).model.vlm.hf_config)), 0).state_dict() if ".visual." in f".{k}")
    assert vision_tensors > 0 and loaded(log) == loaded(plain_log) - vision_tensors  # no tower, no merger built
