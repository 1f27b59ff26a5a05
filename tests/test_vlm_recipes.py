"""The Qwen2.5-VL / Qwen3-VL recipes plan before any download: the published config shapes
(``lavis/vlm/published.py``) stand in for a ``model.vlm.path`` without ``config.json``, every recipe loads strictly
and its planner table fits its own cards. Pure: no weights, no model built (except on the meta device)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from lavis import plan
from lavis.config.load import load_config
from lavis.vlm.arch import hf_config_source, read_hf_config
from lavis.vlm.config import VLMConfig
from lavis.vlm.published import PUBLISHED_VLM_CONFIGS

from .conftest import REPO

MODEL_CARD_BILLIONS = {  # the parameter counts the Hub's model pages show (rounded: compared within 0.5%)
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29, "Qwen/Qwen2.5-VL-32B-Instruct": 33.5,
    "Qwen/Qwen2.5-VL-72B-Instruct": 73.4, "Qwen/Qwen3-VL-2B-Instruct": 2.13, "Qwen/Qwen3-VL-4B-Instruct": 4.44,
    "Qwen/Qwen3-VL-8B-Instruct": 8.77, "Qwen/Qwen3-VL-32B-Instruct": 33.4,
}
RECIPES = {  # recipe -> GPUs it is written for
    "qwen2_5_vl/sft_8x24g": 8, "qwen2_5_vl/sft_lora_2x24g": 2, "qwen3_vl/sft_lora_2x24g": 2,
}
HAS_VLM_LORA = "lora" in {f.name for f in fields(VLMConfig)}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_VLM_CONFIGS))
def test_published_shapes_have_the_model_cards_parameter_counts(hub_id: str) -> None:
    assert set(PUBLISHED_VLM_CONFIGS) == set(MODEL_CARD_BILLIONS)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**PUBLISHED_VLM_CONFIGS[hub_id]))
    count = sum(p.numel() for p in model.parameters())  # tied embeddings counted once, as the Hub counts them
    assert abs(count / 1e9 / MODEL_CARD_BILLIONS[hub_id] - 1) < 0.005, count


def test_a_path_without_config_json_reads_the_published_shape_named_like_it(tmp_path: Path) -> None:
    spec = VLMConfig(path=str(tmp_path / "Qwen2.5-VL-7B-Instruct"), hf_config={"text_config": {"num_hidden_layers": 2}})
    hf = read_hf_config(spec)
    assert (hf.model_type, hf.text_config.hidden_size, hf.vision_config.depth, hf.image_token_id) == (
        "qwen2_5_vl", 3584, 32, 151655)
    assert hf.text_config.num_hidden_layers == 2  # hf_config still overrides
    assert hf_config_source(spec) == (f"the published shape of Qwen/Qwen2.5-VL-7B-Instruct ({spec.path} holds no "
                                      "config.json yet)")
    q3 = read_hf_config(VLMConfig(path="Qwen/Qwen3-VL-8B-Instruct"))
    assert (q3.text_config.hidden_size, q3.vision_config.deepstack_visual_indexes) == (4096, [8, 16, 24])

    own = tmp_path / "Qwen2.5-VL-3B-Instruct"  # a directory's own config.json wins over the table
    own.mkdir()
    raw = {**PUBLISHED_VLM_CONFIGS["Qwen/Qwen2.5-VL-3B-Instruct"], "num_hidden_layers": 3}
    (own / "config.json").write_text(json.dumps(raw))
    assert read_hf_config(VLMConfig(path=str(own))).text_config.num_hidden_layers == 3
    assert hf_config_source(VLMConfig(path=str(own))) == f"{own}/config.json"

    with pytest.raises(FileNotFoundError, match=r"model.vlm.path=.*my-vlm: no config.json there .* name the directory"):
        read_hf_config(VLMConfig(path=str(tmp_path / "my-vlm")))


def test_every_vlm_recipe_directory_is_listed() -> None:
    found = {f"{p.parent.name}/{p.stem}" for d in ("qwen2_5_vl", "qwen3_vl")
             for p in (REPO / "lavis/projects" / d).glob("*.yaml")}
    assert found == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_vlm_recipe_loads_strictly_and_plans_within_its_cards(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "lavis/projects" / f"{recipe}.yaml"
    if "lora" in recipe and not HAS_VLM_LORA:
        pytest.skip("model.vlm.lora is not in this tree's schema yet")
    cfg = load_config(path)
    assert cfg.model.vlm is not None and not (Path(cfg.model.vlm.path or "") / "config.json").exists()
    gpus = RECIPES[recipe]
    assert cfg.train.parallel.num_stages == gpus and cfg.train.parallel.gpu_memory_gib is not None
    assert cfg.train.parallel.gpu_memory_gib <= 24
    spec, where = plan.model_spec(cfg)
    assert where.startswith("the published shape of Qwen/")
    verdict = plan.assess(cfg, spec, 1, cfg.train.parallel.gpu_memory_gib)
    assert verdict.fits and len(verdict.stage_gib) == gpus, verdict.stage_gib
    trainable = sum(c.trainable_params for c in verdict.plan.costs)
    assert trainable > (7 * 10**9 if "lora" not in recipe else 10**7)
    assert plan.main(["--cfg-path", str(path)]) == 0
    assert "fits: every stage" in capsys.readouterr().out
