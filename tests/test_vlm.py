"""lavis.vlm: tiny Qwen2.5-VL and Qwen3-VL directories written by transformers itself are read with every tensor
accounted for, and the layer list (transformers' own modules, split for the pipeline) computes transformers' logits
for two images of different, non-square sizes (and an image + a video)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from lavis.config.load import ConfigError, from_dict
from lavis.config.schema import Config, DataConfig, ModelConfig
from lavis.convert.pipe_to_pth import load_plain_state
from lavis.convert.vlm_export import trained_layers
from lavis.families import describe, family_named
from lavis.model.mllm import lm_loss
from lavis.pipeline.plan import Workload, plan_stages
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
from lavis.vlm.config import VLMConfig
from lavis.vlm.costs import is_trainable, layer_costs
from lavis.vlm.layers import build_layers, layer_table, run_layers
from lavis.vlm.weights import check_directory, load_stage, published_key

from .conftest import REPO, vlm_train


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dir(tmp_path_factory.mktemp(request.param), request.param)


def _ours(path: Path, per_layer: int = 1) -> tuple[list[torch.nn.Module], VLMConfig]:
    cfg = VLMConfig(path=str(path), vision_blocks_per_layer=per_layer)
    hf = read_hf_config(cfg)
    layers = build_layers(hf, per_layer)
    load_stage(cfg, hf, layer_table(hf, per_layer), dict(enumerate(layers)))
    return [layer.eval() for layer in layers], cfg


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_every_tensor_of_a_sharded_directory_is_accounted_for(tiny_dir: Path) -> None:
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3  # really sharded
    cfg = VLMConfig(path=str(tiny_dir))
    reports = check_directory(cfg, read_hf_config(cfg))
    assert all(r.ok for r in reports)
    assert sorted(k for r in reports for k in r.loaded) == sorted(index)
    hf = read_hf_config(cfg)
    table = layer_table(hf)
    ours = {table[i].to_plain(k) for i, layer in enumerate(build_layers(hf)) for k in layer.state_dict()}
    assert ours == {published_key(k) for k in index}  # Qwen3-VL is saved with transformers' in-memory names


def _rewrite_shard(directory: Path, edit: str, key: str) -> Path:
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = directory / (index["weight_map"][key] if edit == "drop" else sorted(set(index["weight_map"].values()))[0])
    tensors = load_file(shard)
    if edit == "drop":
        del tensors[key]
        del index["weight_map"][key]
    else:
        tensors[key] = torch.zeros(2)
        index["weight_map"][key] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("family,edit,key", [
    ("qwen2_5_vl", "drop", "visual.blocks.1.attn.qkv.weight"),
    ("qwen2_5_vl", "drop", "model.layers.2.mlp.down_proj.weight"),
    ("qwen2_5_vl", "add", "visual.blocks.7.attn.qkv.weight"),
    ("qwen3_vl", "drop", "model.visual.deepstack_merger_list.1.norm.weight"),
    ("qwen3_vl", "add", "model.language_model.layers.3.mlp.up_proj.weight"),
])
def test_a_missing_or_extra_tensor_is_refused_naming_it(tmp_path: Path, family: str, edit: str, key: str) -> None:
    directory = write_tiny_dir(tmp_path / "m", family)
    shard = _rewrite_shard(directory, edit, key)
    cfg = VLMConfig(path=str(directory))
    hf = read_hf_config(cfg)
    layers = build_layers(hf)
    named = published_key(key) if edit == "drop" else key  # missing: the model's name; unexpected: the file's
    with pytest.raises(ValueError, match=f"(missing|unexpected): {named}") as e:
        load_stage(cfg, hf, layer_table(hf), {0: layers[0]})  # any stage checks the whole directory first
    assert str(directory) in str(e.value) and (edit == "drop" or shard.name in str(e.value))


def test_not_a_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json"):
        read_hf_config(VLMConfig(path=str(tmp_path)))


@pytest.mark.parametrize("per_layer", [1, 2])
def test_logits_for_two_non_square_images_equal_transformers(tiny_dir: Path, per_layer: int) -> None:
    ref = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    layers, _ = _ours(tiny_dir, per_layer)
    inputs, labels = two_image_batch()
    with torch.no_grad():
        want = reference_forward(ref, inputs, labels)
        got = run_layers(layers, inputs)
    assert got.shape == want.logits.shape
    assert _rel(got, want.logits) <= 1e-5
    assert abs(float(lm_loss(got, labels)) - float(want.loss)) <= 1e-5 * float(want.loss)


def test_an_image_and_a_video_equal_transformers(tiny_dir: Path) -> None:
    ref = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    layers, _ = _ours(tiny_dir)
    inputs, _ = image_and_video_batch(read_hf_config(VLMConfig(path=str(tiny_dir))).model_type)
    with torch.no_grad():
        assert _rel(run_layers(layers, inputs), reference_forward(ref, inputs).logits) <= 1e-5


def test_placeholder_count_must_match_the_grids(tiny_dir: Path) -> None:
    layers, _ = _ours(tiny_dir)
    pixels, grid, kind, spg, ids, mask = two_image_batch()[0]
    ids = ids.clone()
    ids[0, 3] = 5  # one image placeholder less
    with pytest.raises(ValueError, match="image placeholders in the batch: 23, image tokens from the vision tower: 24"):
        run_layers(layers, (pixels, grid, kind, spg, ids, mask))


def test_costs_place_vision_blocks_and_freezing_follows_the_config(tiny_dir: Path) -> None:
    cfg = VLMConfig(path=str(tiny_dir), freeze_vision=True, freeze_merger=False, freeze_llm=False)
    hf = read_hf_config(cfg)
    table = layer_table(hf)
    work = Workload(tokens=2 * 64, seq_len=64, images=4)
    costs = layer_costs(hf, cfg, work, patches=96)
    assert [c.kind for c in costs] == [e.kind for e in table]
    layers = build_layers(hf)
    assert [c.params for c in costs] == [sum(p.numel() for p in layer.parameters()) for layer in layers]
    assert all(c.trainable_params == 0 for c in costs if c.kind == "vision")
    assert all(c.trainable_params == c.params for c in costs if c.kind in ("block", "norm", "head"))
    assert costs[0].flops == 2.0 * costs[0].params * 96  # frozen, nothing trainable before it: forward only
    assert all(c.act_bytes == 0 for c in costs[:4])  # ... and no activations kept for a backward
    trained = layer_costs(hf, VLMConfig(path=str(tiny_dir), freeze_vision=False), work, patches=96)
    assert trained[0].flops == 3 * costs[0].flops  # trainable: backward twice the forward
    more = layer_costs(hf, cfg, work, patches=960)
    assert all(m.flops > c.flops for m, c in zip(more[1:4], costs[1:4]))  # vision blocks grow with the patches
    parts = plan_stages(costs, 3, work)
    assert parts[0] == 0 and parts[-1] == len(table) and len(parts) == 4
    assert is_trainable("visual.merger.mlp.0.weight", cfg) and not is_trainable("visual.blocks.0.norm1.weight", cfg)


PARTITIONS = {1: "0,10", 2: "0,3,10", 3: "0,2,6,10"}
"""Of the 10 layers (patch embed, 3 vision blocks, merger + embed, 3 decoder blocks, norm, head): 2 stages cut the
vision tower (a DeepStack feature of Qwen3-VL travels with the patches); 3 stages also cut between the decoder
blocks that add DeepStack features (the second one travels with the hidden states)."""


def _train(directory: Path, stages: int, out: Path, steps: int = 5, mode: str | None = None) -> dict:
    result = out / f"losses{stages}.json"
    vlm_train(directory, stages, PARTITIONS[stages], result, steps, *([mode] if mode else []))
    return json.loads(result.read_text())


@pytest.mark.process
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_training_with_1_2_3_stages_gives_the_same_losses(family: str, tmp_path: Path) -> None:
    """The real trainer's ``build_run`` (``model.vlm``) and DeepSpeed's pipeline engine on CPU (gloo), fp32: the
    first loss is transformers' loss on the same batch; 5 steps give the same losses with 1, 2 and 3 stages. The
    2-stage run's checkpoint exported with ``pipemodel2pth.py --hf-out`` loads in transformers with the logits of
    our layers holding the trained weights; resumed from its step-3 checkpoint it gives the same steps 4 and 5."""
    directory = write_tiny_dir(tmp_path / "model", family)
    (directory / "chat_template.jinja").write_text("{{ messages }}")  # a processor file: copied by the export
    ref = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():  # step 1 = micro-batches 0 and 1 (grad_accum_steps 2); DeepSpeed reports their mean
        first = sum(float(reference_forward(ref, *two_image_batch(seed=i, batch=MICRO_BATCH)).loss)
                    for i in range(2)) / 2
    runs = {s: _train(directory, s, tmp_path, mode="save" if s == 2 else None) for s in (1, 2, 3)}
    assert [runs[s]["boundaries"] for s in (1, 2, 3)] == [[int(b) for b in PARTITIONS[s].split(",")] for s in (1, 2, 3)]
    base = runs[1]["losses"]
    assert len(base) == 5 and abs(base[0] - first) <= 1e-5 * first
    for s in (2, 3):
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(runs[s]["losses"], base)), (s, runs[s], base)
    assert base[-1] != base[0]  # the weights moved
    _check_hf_export(tmp_path / "run2", directory, ref)
    (tmp_path / "run2" / "latest").write_text("global_step3")  # resume the 2-stage run from its step-3 checkpoint
    resumed = _train(directory, 2, tmp_path, mode="resume")["losses"]
    assert len(resumed) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(resumed, base[3:])), (resumed, base)


def _check_hf_export(run: Path, source: Path, before: torch.nn.Module) -> None:
    out = run.parent / "exported"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", str(run), "--hf-out", str(out),
                           "--hf-dtype", "fp32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported) is type(before)
    tag = run / (run / "latest").read_text().strip()
    layers, _, _ = trained_layers(tag, *load_plain_state(tag))
    inputs, _ = two_image_batch(seed=99)
    with torch.no_grad():
        ours = run_layers([layer.eval() for layer in layers], inputs)
        theirs = reference_forward(exported, inputs).logits
        untrained = reference_forward(before, inputs).logits
    assert _rel(theirs, ours) <= 1e-5
    assert _rel(theirs, untrained) > 1e-3  # the export holds the trained weights, not the source's


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_without_path_is_transformers_random_init(family: str) -> None:
    """``model.vlm.hf_config`` alone (tiny from-scratch models): every stage copies its layers out of the same
    transformers init drawn from ``init_seed``."""
    cfg = VLMConfig(hf_config=tiny_hf_dict(family), init_seed=3)
    hf = read_hf_config(cfg)
    layers = build_layers(hf)
    load_stage(cfg, hf, layer_table(hf), dict(enumerate(layers)))
    ref = reference_model(hf, 3).eval()
    inputs, _ = two_image_batch(seed=1)
    with torch.no_grad():
        got = run_layers([layer.eval() for layer in layers], inputs)
        assert _rel(got, reference_forward(ref, inputs).logits) <= 1e-5


def test_model_vlm_section_loads_strictly() -> None:
    cfg = from_dict(Config, {"model": {"vlm": {"hf_config": tiny_hf_dict("qwen3_vl"), "freeze_llm": True}}},
                    source="recipe.yaml")
    assert cfg.model.vlm is not None and cfg.model.vlm.freeze_llm and cfg.model.vlm.freeze_vision
    with pytest.raises(ConfigError, match="model.vlm.freez_llm"):
        from_dict(Config, {"model": {"vlm": {"path": "x", "freez_llm": True}}}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="model.vlm needs `path`"):
        from_dict(Config, {"model": {"vlm": {"hf_config": {"model_type": "llava"}}}}, source="recipe.yaml")


def _pipeline_layers(cfg: Config) -> list:
    spec = describe(cfg.model)
    return family_named(spec.family).pipeline_layers(spec, cfg, -1)


def test_options_this_family_lacks_are_refused() -> None:
    vlm = VLMConfig(hf_config=tiny_hf_dict("qwen2_5_vl"))
    with pytest.raises(ValueError, match="feature_cache with model.vlm needs model.vlm.freeze_vision: true and"):
        _pipeline_layers(Config(model=ModelConfig(vlm=vlm), data=DataConfig(feature_cache="cache")))
    frozen = VLMConfig(hf_config=tiny_hf_dict("qwen2_5_vl"), freeze_merger=True)
    with pytest.raises(ValueError, match="build it with `python -m lavis.vlm.feature_cache"):
        _pipeline_layers(Config(model=ModelConfig(vlm=frozen), data=DataConfig(feature_cache="cache")))
    with pytest.raises(ValueError, match="data.fixed_length: not supported with model.vlm"):
        _pipeline_layers(Config(model=ModelConfig(vlm=vlm), data=DataConfig(fixed_length=True)))


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_run_in_bf16(family: str) -> None:
    """DeepSpeed's bf16 mode casts the layers' parameters; pixels arrive in fp32 and the rotary tables stay fp32
    (held outside the module tree): the logits stay close to fp32's."""
    cfg = VLMConfig(hf_config=tiny_hf_dict(family))
    hf = read_hf_config(cfg)
    layers = build_layers(hf)
    load_stage(cfg, hf, layer_table(hf), dict(enumerate(layers)))
    inputs, _ = two_image_batch()
    with torch.no_grad():
        full = run_layers(layers, inputs)
        half = run_layers([layer.to(torch.bfloat16) for layer in layers], inputs)
    assert half.dtype == torch.bfloat16 and _rel(half.float(), full) < 5e-2


def test_a_video_sample_trains_every_weight(tiny_dir: Path) -> None:
    """An image + a video: the loss reaches every weight (vision blocks, mergers, DeepStack mergers, decoder) with a
    finite gradient, and one SGD step lowers it."""
    layers, _ = _ours(tiny_dir)
    inputs, labels = image_and_video_batch(read_hf_config(VLMConfig(path=str(tiny_dir))).model_type)
    params = [p for layer in layers for p in layer.parameters()]
    loss = lm_loss(run_layers(layers, inputs), labels)
    loss.backward()
    no_grad = [n for layer in layers for n, p in layer.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad
        assert float(lm_loss(run_layers(layers, inputs), labels)) < float(loss)
