"""Every shipped recipe loads strictly and, at full size, plans within its own per-GPU memory limit on its GPU count.

The LLM shapes are the published ones (docs/FORMATS.md sections 5-6): the weights themselves are not needed to plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from lavis.config.load import load_config
from lavis.pipeline.plan import format_plan, plan_for_config, stage_memory_bytes

from .conftest import REPO

FULL_SIZE = {  # hidden, intermediate (Qwen v1: half of config.json's), blocks, heads, kv heads, vocab
    "Qwen7B-chat": (4096, 11008, 32, 32, 32, 151936),
    "Qwen-14B-Chat": (5120, 13696, 40, 40, 40, 152064),
    "vicuna-7b-v0": (4096, 11008, 32, 32, 32, 32000),
}
GPUS = {"pretrain_8x3090": 8, "sft_video_8x3090": 8, "pretrain_2x4090": 2, "sft_6x4090": 6, "vicuna7b_stage1": 4,
        "vicuna7b_stage2": 2, "qwen7b_pretrain_1x24g": 1, "sft_video_lora_2x24g": 2, "sft_qlora_2x24g": 2,
        "vicuna7b_stage2_lora_1x24g": 1}
RECIPES = sorted(p for d in ("qwen7b", "qwen14b", "minigpt4", "single_gpu")
                 for p in (REPO / "lavis/projects" / d).glob("*.yaml"))


def test_every_recipe_is_listed() -> None:
    assert sorted(p.stem for p in RECIPES) == sorted(GPUS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans_within_24gb_cards(recipe: Path) -> None:
    cfg = load_config(recipe)
    t = cfg.train
    gpus = GPUS[recipe.stem]
    assert gpus % t.parallel.num_stages == 0
    dp = gpus // t.parallel.num_stages
    assert t.parallel.gpu_memory_gib is not None and t.parallel.gpu_memory_gib <= 24
    h, inter, n, heads, kv, vocab = FULL_SIZE[Path(cfg.model.llm.path).name]
    dims = {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": n, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab}
    plan = plan_for_config(cfg, dims, dp)  # raises if no split fits gpu_memory_gib
    table = format_plan(plan.parts, plan.costs, plan.work, plan.optim_bytes)
    for s in range(t.parallel.num_stages):
        sl = plan.costs[plan.parts[s]:plan.parts[s + 1]]
        limit = t.parallel.gpu_memory_gib * 2**30
        assert stage_memory_bytes(sl, s, t.parallel.num_stages, plan.work, plan.optim_bytes) <= limit, table
    trains_llm = not cfg.model.llm.frozen
    assert sum(c.trainable_params for c in plan.costs) > (10**9 if trains_llm else 0)
    print(f"{recipe.stem}: parts {plan.parts}\n{table}")
