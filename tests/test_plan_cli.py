"""`python -m lavis.plan`: the stage table and whether it fits, before any download (no weights, no model built)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavis import plan
from lavis.config.load import load_config

from .conftest import REPO
from .test_recipes import RECIPES

SHIPPED = sorted([*RECIPES, *(REPO / "lavis/projects/demo").glob("*.yaml")])


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_fits_its_cards(recipe: Path, capsys: pytest.CaptureFixture[str]):
    assert plan.main(["--cfg-path", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "fits: every stage" in out and "est.mem GiB" in out


def test_14b_sft_on_6_gib_cards_does_not_fit_and_names_the_knobs_that_would(capsys: pytest.CaptureFixture[str]):
    recipe = REPO / "lavis/projects/qwen14b/sft_6x4090.yaml"
    assert plan.main(["--cfg-path", str(recipe), "--options", "train.parallel.gpu_memory_gib=6"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: stage 0 needs about" in out and "> 6 GiB" in out
    fitting = [ln for ln in out.splitlines() if ln.strip().startswith("FITS")]
    assert any("model.llm.lora" in ln for ln in fitting), out  # LoRA brings the 14B under 6 GiB per stage
    assert "published shape of qwen14b_chat" in out  # no config.json under cache/ckpt: the published shape


def test_gpu_memory_flag_and_gpus_layout(capsys: pytest.CaptureFixture[str]):
    recipe = REPO / "lavis/projects/qwen7b/pretrain_8x3090.yaml"
    assert plan.main(["--cfg-path", str(recipe), "--gpus", "8", "--gpu-memory-gib", "1"]) == 1
    assert "2 stage(s) x 4 replica(s) on 8 GPU(s) of 1 GiB" in capsys.readouterr().out
    with pytest.raises(ValueError, match="multiple"):
        plan.main(["--cfg-path", str(recipe), "--gpus", "3"])


def test_config_json_beside_the_recipe_wins_over_the_published_shape(tmp_path: Path):
    llm = tmp_path / "llm"
    llm.mkdir()
    raw = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False}
    (llm / "config.json").write_text(json.dumps(raw))
    cfg = load_config(REPO / "lavis/projects/models/vicuna0_7b.yaml", [f"model.llm.path={llm}"])
    dims, where = plan.llm_dims(cfg)
    assert dims["hidden_size"] == 256 and dims["num_hidden_layers"] == 3 and "config.json" in where


def test_an_unknown_path_without_config_json_is_a_clear_error(tmp_path: Path):
    cfg = load_config(REPO / "lavis/projects/models/vicuna0_7b.yaml", [f"model.llm.path={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="no config.json there and no shipped model config uses this path"):
        plan.llm_dims(cfg)


def test_published_shapes_equal_the_planner_dims_the_recipe_tests_use():
    dims, _ = plan.llm_dims(load_config(REPO / "lavis/projects/models/qwen7b_chat.yaml"))
    assert (dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]) == (4096, 11008, 32)


def test_knobs_name_the_smaller_optimizers_and_activation_offload_and_each_one_loads():
    cfg = load_config(REPO / "lavis/projects/qwen7b/pretrain_8x3090.yaml", ["train.precision=bf16",
                                                                             "train.optim.zero_stage=0"])
    names = [" ".join(opts) for _, opts in plan.knob_options(cfg, 8)]
    assert {"train.optim.optimizer=adamw8bit", "train.optim.optimizer=adamw_bf16",
    "train.parallel.activation_offload=true"} <= set(names)
    bf16 = load_config(REPO / "lavis/projects/qwen7b/pretrain_8x3090.yaml", ["train.precision=bf16",
                                                                              "train.optim.zero_stage=0",
                                                                              "train.optim.optimizer=adamw_bf16"])
    for _, opts in plan.knob_options(bf16, 8):  # no knob that the recipe's optimizer refuses (ZeRO-1)
        load_config(REPO / "lavis/projects/qwen7b/pretrain_8x3090.yaml",
                    ["train.precision=bf16", "train.optim.zero_stage=0", "train.optim.optimizer=adamw_bf16", *opts])


def test_benchmarks_what_fits_table_is_the_commands_output():
    """docs/BENCHMARKS.md's "What fits" table (README links it) is `python -m lavis.plan --fits-table`, cell for
    cell."""
    assert plan.fits_table(plan.DEFAULT_GPU_GIB) in (REPO / "docs/BENCHMARKS.md").read_text()
    assert "docs/BENCHMARKS.md#what-fits" in (REPO / "README.md").read_text()
