"""One description of the model (``lavis.model.spec.ModelSpec``) per process, from the model-family table.

The LLM's transformers config is built by ``lavis.model.llm.llm_hf_config``; only a family's ``describe`` calls it,
and each entry point describes the model once and hands the spec on. The counting tests wrap that one call and run
the entry points in this process.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from lavis import families
from lavis import plan as plan_cli
from lavis.config.load import deepspeed_config, load_config, optimizer_clips, with_values
from lavis.config.schema import Config, OptimConfig, TrainConfig
from lavis.families import FAMILIES, describe, family_named, family_of
from lavis.model import mllm
from lavis.model.spec import LLM_DIMS, ModelSpec, layer_table
from lavis.pipeline.family import Blip2Family

from .conftest import DEMO_CFG, REPO, data_options


@pytest.fixture
def hf_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every build of the LLM's transformers config in this process, by the config's ``model_type``."""
    calls: list[str] = []
    real = mllm.llm_hf_config

    def counted(*args: object, **kwargs: object) -> object:
        hf = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(hf.model_type)
        return hf

    monkeypatch.setattr(mllm, "llm_hf_config", counted)
    return calls


def test_only_the_family_describe_builds_the_llm_config():
    """A static guard beside the counts: no module of lavis/ but the family's describe calls llm_hf_config."""
    callers = []
    for path in sorted((REPO / "lavis").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "llm_hf_config":
                    callers.append(str(path.relative_to(REPO)))
    assert callers == ["lavis/model/mllm.py"]


def test_the_spec_describes_the_demo_model(tiny_cfg: Config):
    spec = describe(tiny_cfg.model)
    assert isinstance(spec, ModelSpec) and spec.family == "blip2" and family_of(tiny_cfg.model) is FAMILIES["blip2"]
    assert spec.dims == {k: getattr(spec.hf, k) for k in LLM_DIMS}
    assert spec.table == layer_table(spec.num_blocks) and len(spec.layers) == spec.num_blocks + 3
    assert spec.trains == ("vision", "qformer", "projection", "llm")  # the demo trains everything
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.family = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="model family 'nope' is not one of"):
        family_named("nope")


def test_lora_adapters_count_as_the_llm_training():
    frozen = ["model.vision.frozen=true", "model.qformer.frozen=true", "model.llm.frozen=true"]
    assert describe(load_config(DEMO_CFG, frozen).model).trains == ("projection",)
    assert describe(load_config(DEMO_CFG, [*frozen, "model.llm.lora.r=4"]).model).trains == ("projection", "llm")


@pytest.mark.parametrize("precision,optimizer,zero,ours", [
    ("fp32", "adamw", 0, True), ("bf16", "adamw", 0, False), ("bf16", "adamw_bf16", 0, True),
    ("fp32", "adamw", 1, False), ("bf16", "adamw8bit", 0, False),
])
def test_one_rule_says_who_clips(precision: str, optimizer: str, zero: int, ours: bool):
    t = TrainConfig(precision=precision,  # type: ignore[arg-type]
                    optim=OptimConfig(optimizer=optimizer, zero_stage=zero, grad_clip=0.5))  # type: ignore[arg-type]
    assert optimizer_clips(t) is ours
    assert deepspeed_config(t, 1)["gradient_clipping"] == (0.0 if ours else 0.5)  # the other one clips


def test_plan_cli_describes_once(hf_builds: list[str], capsys: pytest.CaptureFixture[str]):
    assert plan_cli.main(["--cfg-path", str(DEMO_CFG)]) == 0
    assert "fits: every stage" in capsys.readouterr().out
    assert hf_builds == ["qwen2"]


def test_plan_cli_describes_before_a_download(hf_builds: list[str]):
    """No config.json at model.llm.path yet: the published shape goes through the same single builder."""
    spec, where = plan_cli.model_spec(load_config(REPO / "lavis/projects/models/qwen7b_chat.yaml"))
    assert "published shape" in where and spec.num_blocks == 32 and hf_builds == ["qwen2"]


def test_pipeline_layers_and_their_weights_from_one_spec(tiny_cfg: Config, hf_builds: list[str]):
    """What build_run does per rank, without DeepSpeed: plan, layer list, layers, weights, from one describe."""
    spec = describe(tiny_cfg.model)
    fam = family_named(spec.family)
    plan = families.plan(spec, tiny_cfg, 1)
    recipes = fam.pipeline_layers(spec, tiny_cfg, placeholder_id=5)
    assert len(recipes) == len(plan.costs) == len(spec.layers)
    layers = {i: r.cls(*r.args) for i, r in enumerate(recipes)}
    fam.load_layer_weights(spec, tiny_cfg.model, layers)
    assert hf_builds == ["qwen2"]


def test_the_family_plan_equals_the_planner_default(tiny_cfg: Config):
    """The family's costs are the planner's costs: the stage plan is what it was before the family table."""
    spec = describe(tiny_cfg.model)
    two = with_values(tiny_cfg, {"train.parallel.num_stages": 2})
    from lavis.pipeline.plan import plan_for_config

    assert families.plan(spec, two, 1) == plan_for_config(two, spec.dims, 1)


def test_chat_load_describes_once(tiny_data: Path, hf_builds: list[str]):
    from lavis.chat.engine import ChatEngine

    engine = ChatEngine.from_files(DEMO_CFG, None, device="cpu", options=data_options(tiny_data))
    assert engine.tpl.placeholder_id >= 0 and hf_builds == ["qwen2"]


def test_the_plain_model_from_the_family_equals_the_direct_build(tiny_cfg: Config):
    spec = describe(tiny_cfg.model)
    built = Blip2Family().build(spec, tiny_cfg.model, 5)
    direct = mllm.MultimodalLM(tiny_cfg.model, 5)
    built.init_weights(1)
    direct.init_weights(1)
    a, b = built.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.process
def test_the_trainer_describes_once_per_process(tiny_cfg: Config, tmp_path: Path, hf_builds: list[str]):
    """build_run in this process (a one-rank group): tokenizer, plan, layers, weights, optimizer, engine."""
    import os

    import torch.distributed as dist

    from lavis.engine.distributed import init_distributed
    from lavis.engine.trainer import build_run

    cfg = with_values(tiny_cfg, {"train.output_dir": str(tmp_path / "run"), "train.parallel.num_stages": 1})
    created, saved = not dist.is_initialized(), dict(os.environ)
    init_distributed()
    try:
        run = build_run(cfg, None)
    finally:
        if created:
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    assert hf_builds == ["qwen2"] and run.spec is not None and run.table == run.spec.table


def test_feature_cache_builder_describes_once(tiny_data: Path, tmp_path: Path, hf_builds: list[str]):
    """The builder (``python -m lavis.data.cache_features``) and the pipeline layer 0 that checks the cache."""
    from lavis.features import main as build_main

    from .conftest import PRETRAIN_CFG

    opts = [*data_options(tiny_data), "data.transform.kind=eval", "data.transform.hflip=false"]
    out = tmp_path / "cache"
    assert build_main(["--cfg-path", str(PRETRAIN_CFG), "--out", str(out), "--workers", "0", "--dtype", "fp32",
                       "--options", *opts]) == 0
    assert hf_builds == ["qwen2"]
    cfg = load_config(PRETRAIN_CFG, [*opts, f"data.feature_cache={out}"])
    spec = describe(cfg.model)
    recipes = family_named(spec.family).pipeline_layers(spec, cfg, placeholder_id=3)
    recipes[0].cls(*recipes[0].args)  # layer 0 checks the cache's weights fingerprint with the same spec
    assert hf_builds == ["qwen2", "qwen2"]


@pytest.mark.process
def test_the_converter_with_hf_out_describes_once(runs: dict[str, Path], tmp_path: Path, hf_builds: list[str]):
    from lavis.convert.pipe_to_pth import cli

    cli("model", "", ["--ckpt-dir", str(runs["pp2"]), "--out", str(tmp_path / "m.pth"),
                      "--hf-out", str(tmp_path / "hf"), "--hf-dtype", "fp32"])
    assert (tmp_path / "m.pth").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert hf_builds == ["qwen2"]


# The VLM family (model.vlm): the second entry of the table, through the same interface.

VLM_RECIPE = REPO / "lavis/projects/demo/shapes_qwen2_5_vl.yaml"


def _vlm_cfg(*options: str) -> Config:
    from lavis.testing.vlm import tiny_hf_dict

    cfg = load_config(VLM_RECIPE, list(options))
    assert cfg.model.vlm is not None
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vlm=dataclasses.replace(cfg.model.vlm, hf_config=tiny_hf_dict("qwen3_vl"))))


def test_the_vlm_family_describes_a_model_vlm_config(hf_builds: list[str]):
    from lavis.vlm.layers import layer_table as vlm_layer_table

    cfg = _vlm_cfg("model.vlm.vision_blocks_per_layer=2", "model.vlm.freeze_merger=true")
    spec = describe(cfg.model)
    assert family_of(cfg.model) is FAMILIES["vlm"] and spec.family == "vlm" and spec.hf.model_type == "qwen3_vl"
    assert list(FAMILIES)[-1] == "blip2"  # the default is asked last
    text = spec.hf.text_config
    assert spec.dims == {k: getattr(text, k) for k in LLM_DIMS} and spec.num_blocks == text.num_hidden_layers
    assert spec.table == vlm_layer_table(spec.hf, 2)
    assert spec.trains == ("vision", "llm")  # the demo trains its tower from scratch; the option freezes the merger
    assert hf_builds == []  # the BLIP-2-style LLM config is never built for a VLM


def test_the_vlm_family_plan_is_its_costs_at_the_workloads_patches():
    """The family's plan: the vision blocks costed at merge^2 x the micro-batch's tokens (the most a sample holds)."""
    from lavis.pipeline.plan import plan_for_config, stage_plan
    from lavis.vlm.costs import layer_costs as vlm_costs

    cfg = with_values(_vlm_cfg(), {"train.parallel.num_stages": 2})
    spec = describe(cfg.model)
    got = families.plan(spec, cfg, 1)
    assert cfg.model.vlm is not None
    merge = spec.hf.vision_config.spatial_merge_size
    costs = vlm_costs(spec.hf, cfg.model.vlm, got.work, patches=got.work.tokens * merge**2)
    assert got == stage_plan(cfg.train, costs, got.work, 1) and len(got.costs) == len(spec.layers)
    assert got.work == plan_for_config(cfg, spec.dims, 1).work  # the same workload as every family's
    assert [c.kind for c in got.costs][:2] == ["vision", "vision"] and got.parts[0] == 0 and len(got.parts) == 3


def test_vlm_pipeline_layers_and_their_weights_from_one_spec():
    """What build_run does per rank for a model.vlm run, without DeepSpeed: the family's layers (allocated, not
    initialised), their weights from transformers' own init, the logits of transformers' model."""
    from lavis.engine.pipe_module import to_layer_specs
    from lavis.testing.vlm import reference_forward, two_image_batch
    from lavis.vlm.arch import reference_model
    from lavis.vlm.layers import run_layers

    cfg = _vlm_cfg("model.vlm.freeze_vision=true")
    spec = describe(cfg.model)
    fam = family_named(spec.family)
    recipes = fam.pipeline_layers(spec, cfg, placeholder_id=-1)
    assert len(recipes) == len(spec.layers) and all(r.allocate_only for r in recipes)
    layers = {i: s.build() for i, s in enumerate(to_layer_specs(recipes))}
    reports = fam.load_layer_weights(spec, cfg.model, layers)
    assert sum(len(r.loaded) for r in reports) == sum(len(m.state_dict()) for m in layers.values())
    inputs, _ = two_image_batch(seed=1)
    assert cfg.model.vlm is not None
    with torch.no_grad():
        got = run_layers([layers[i].eval() for i in range(len(layers))], inputs)
        want = reference_forward(reference_model(spec.hf, cfg.model.vlm.init_seed).eval(), inputs).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert not fam.is_trainable(cfg.model, "visual.blocks.0.attn.qkv.weight")  # the option freezes the tower
    assert fam.is_trainable(cfg.model, "visual.merger.mlp.0.weight") and fam.is_trainable(cfg.model, "lm_head.weight")


def test_the_vlm_plain_model_is_transformers_own_with_the_tables_weights():
    from transformers import AutoModelForImageTextToText

    from lavis.vlm.weights import model_shapes, published_key

    cfg = _vlm_cfg()
    spec = describe(cfg.model)
    model = family_named(spec.family).build(spec, cfg.model, -1)
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(spec.hf)])
    shapes = {published_key(k): tuple(t.shape) for k, t in model.state_dict().items()}
    assert shapes == model_shapes(spec.hf)


@pytest.mark.parametrize("option,match", [
    ("data.feature_cache=cache", "data.feature_cache with model.vlm needs model.vlm.freeze_vision: true"),
    ("data.fixed_length=true", "data.fixed_length: not supported with model.vlm"),
])
def test_the_vlm_family_refuses_the_options_it_lacks_before_building(option: str, match: str):
    cfg = _vlm_cfg(option)
    spec = describe(cfg.model)
    with pytest.raises(ValueError, match=match):
        family_named(spec.family).pipeline_layers(spec, cfg, -1)


def test_the_vlm_family_has_no_template_of_ours():
    cfg = _vlm_cfg()
    with pytest.raises(ValueError, match="processor's own chat template"):
        FAMILIES["vlm"].template(None, cfg)  # type: ignore[arg-type]


def test_plan_cli_plans_a_vlm_recipe_through_its_family(capsys: pytest.CaptureFixture[str]):
    """``python -m lavis.plan`` on the VLM demo recipe: the family's plan, its language model's shape, and no knob
    the family refuses (model.llm LoRA); recomputation is offered."""
    assert plan_cli.main(["--cfg-path", str(VLM_RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "(model.vlm.hf_config)" in out and "fits: every stage" in out
    spec, _ = plan_cli.model_spec(load_config(VLM_RECIPE))
    assert spec.family == "vlm"
    cfg = load_config(VLM_RECIPE, ["data.max_txt_len=512"])
    knobs = " ".join(" ".join(opts) for _, opts in plan_cli.knob_options(cfg, 4))
    assert "model.llm.lora" not in knobs and "activation_checkpoint_interval=1" in knobs
    assert "train.parallel.activation_offload=true" in knobs  # the ones it takes are offered


@pytest.mark.process
def test_the_trainer_builds_a_vlm_run_through_its_family(tmp_path: Path, hf_builds: list[str],
                                                         monkeypatch: pytest.MonkeyPatch):
    """build_run + write_run_files in this process (a one-rank group) for model.vlm: one describe (one read of the
    VLM config), the family's processor saved, no BLIP tokenizer loaded and no tokenizer file in the run."""
    import os

    import torch.distributed as dist

    from lavis.engine.distributed import init_distributed
    from lavis.engine.trainer import build_run, write_run_files
    from lavis.pipeline import family as pipeline_family
    from lavis.vlm import family as vlm_family
    from lavis.vlm.data import RUN_PROCESSOR_DIR

    reads: list[str] = []
    real = vlm_family.read_hf_config

    def counted(vlm: object) -> object:
        hf = real(vlm)  # type: ignore[arg-type]
        reads.append(hf.model_type)
        return hf

    def no_tokenizer(ref: str) -> object:
        raise AssertionError(f"a model.vlm run loaded the BLIP-2-style tokenizer {ref}")

    monkeypatch.setattr(vlm_family, "read_hf_config", counted)
    monkeypatch.setattr(pipeline_family, "load_tokenizer", no_tokenizer)
    out = tmp_path / "run"
    cfg = with_values(_vlm_cfg(), {"train.output_dir": str(out), "train.parallel.num_stages": 1})
    created, saved = not dist.is_initialized(), dict(os.environ)
    init_distributed()
    try:
        run = build_run(cfg, None)
        write_run_files(run)
        meta = run.meta()
    finally:
        if created:
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    assert reads == ["qwen3_vl"] and hf_builds == [] and run.spec is not None and run.spec.family == "vlm"
    assert run.table == run.spec.table and run.text.processor is not None and run.text.tokenizer is None
    assert meta["tokenizer"] is None and meta["placeholder_id"] == run.spec.hf.image_token_id
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", RUN_PROCESSOR_DIR]  # no stray tokenizer file
    with pytest.raises(ValueError, match="train.eval.data"):
        run.tpl  # noqa: B018 - the property refuses: a VLM run has no template of ours
