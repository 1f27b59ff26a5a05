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

from lavis import plan as plan_cli
from lavis.config.load import deepspeed_config, load_config, optimizer_clips, with_values
from lavis.config.schema import Config, OptimConfig, TrainConfig
from lavis.model import mllm
from lavis.model.spec import LLM_DIMS, ModelSpec, layer_table
from lavis.pipeline import family as families
from lavis.pipeline.family import FAMILIES, Blip2Family, describe, family_named, family_of

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
