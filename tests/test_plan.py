"""The stage planner is a pure function: optimal against brute force, respects memory, explains failures."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from lavis.config.load import load_config
from lavis.pipeline.plan import (
    LayerCost,
    Workload,
    check_partition,
    format_plan,
    layer_costs,
    layer_of_plain_key,
    layer_table,
    plan_stages,
    stage_memory_bytes,
)

from .conftest import DEMO_CFG, PRETRAIN_CFG

WORK = Workload(tokens=1024, seq_len=512, images=2)


def costs_from(flops: list[float], params: list[int] | None = None) -> list[LayerCost]:
    params = params or [1] * len(flops)
    return [LayerCost(i, "block", p, p, f, 0.0) for i, (f, p) in enumerate(zip(flops, params))]


def brute_force(flops: list[float], stages: int) -> float:
    n = len(flops)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        b = [0, *cuts, n]
        best = min(best, max(sum(flops[b[i]:b[i + 1]]) for i in range(stages)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    n, s = rng.randint(3, 10), rng.randint(1, 4)
    s = min(s, n)
    flops = [rng.uniform(0.1, 10) for _ in range(n)]
    parts = plan_stages(costs_from(flops), s, WORK)
    assert parts[0] == 0 and parts[-1] == n and len(parts) == s + 1
    assert all(b > a for a, b in zip(parts, parts[1:]))
    got = max(sum(flops[parts[i]:parts[i + 1]]) for i in range(s))
    assert got == pytest.approx(brute_force(flops, s))


def test_memory_limit_moves_boundaries_and_failure_is_explained() -> None:
    # A heavy first layer: compute alone would put layers 0-1 together, memory forbids it.
    cs = costs_from([1, 1, 1, 1], params=[100, 100, 1, 1])
    free = plan_stages(cs, 2, WORK)
    assert free == [0, 2, 4]
    limited = plan_stages(cs, 2, WORK, memory_limit_bytes=1700)  # {0}: 1600 B, {1,2,3}: 1632 B, {0,1}: 3200 B
    assert limited == [0, 1, 4]
    with pytest.raises(ValueError, match="fits"):
        plan_stages(cs, 2, WORK, memory_limit_bytes=10)
    with pytest.raises(ValueError, match="reduce --num-stages"):
        plan_stages(cs, 5, WORK)


def test_in_flight_activations_weigh_on_early_stages() -> None:
    cs = [LayerCost(0, "block", 0, 0, 1.0, 10.0)]
    assert stage_memory_bytes(cs, 0, 4, WORK, 12) == 40.0  # 1F1B: stage 0 holds 4 micro-batches
    assert stage_memory_bytes(cs, 3, 4, WORK, 12) == 10.0


def test_cost_model_counts_demo_parameters_exactly() -> None:
    from lavis.data.tokenizer import load_tokenizer
    from lavis.model.llm import llm_hf_config
    from lavis.model.mllm import MultimodalLM

    for path in (DEMO_CFG, PRETRAIN_CFG):
        cfg = load_config(path)
        hf = llm_hf_config(cfg.model.llm)
        dims = {k: getattr(hf, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size")}
        costs = layer_costs(cfg.model, dims, WORK)
        model = MultimodalLM(cfg.model, load_tokenizer("builtin:shapes").token_id("<|extra_0|>"))
        model.apply_trainable()
        assert sum(c.params for c in costs) == sum(p.numel() for p in model.parameters())
        assert sum(c.trainable_params for c in costs) == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert [c.index for c in costs] == list(range(hf.num_hidden_layers + 3))
        text = format_plan(plan_stages(costs, 2, WORK), costs, WORK)
        assert text.count("\n") == 2 and "trainable" in text


def test_layer_table_maps_names_both_ways() -> None:
    table = layer_table(3)
    assert [e.kind for e in table] == ["embed", "block", "block", "block", "norm", "head"]
    assert table[2].to_plain("layer.mlp.up_proj.weight") == "llm_model.model.layers.1.mlp.up_proj.weight"
    assert layer_of_plain_key(table, "llm_model.lm_head.weight") == (5, "lm_head.weight")
    assert layer_of_plain_key(table, "query_tokens") == (0, "query_tokens")
    assert layer_of_plain_key(table, "llm_model.model.embed_tokens.weight") == (0, "embed_tokens.weight")
    with pytest.raises(KeyError):
        table[1].to_plain("bogus.weight")


def test_user_partition_is_validated() -> None:
    assert check_partition([0, 2, 5], 5, 2) == [0, 2, 5]
    for bad in ([0, 5], [1, 2, 5], [0, 3, 3, 5], [0, 2, 6]):
        with pytest.raises(ValueError, match="partition"):
            check_partition(bad, 5, len(bad) - 1 if len(bad) > 2 else 2)


def test_cost_model_counts_full_size_qwen7b_layout_exactly() -> None:
    """EVA ViT-g (39 blocks) + BLIP-2 Q-Former + Qwen-7B dimensions, built on the meta device (no memory)."""
    import torch

    from lavis.model.llm import llm_hf_config
    from lavis.model.mllm import MultimodalLM

    llm = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "tie_word_embeddings": False}
    cfg = load_config(None, [f"model.llm.hf_config={llm}".replace("'", '"'), "model.llm.frozen=true"])
    assert (cfg.model.vision.depth, cfg.model.vision.width, cfg.model.qformer.num_query_tokens) == (39, 1408, 32)
    hf = llm_hf_config(cfg.model.llm)
    dims = {k: getattr(hf, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "vocab_size")}
    costs = layer_costs(cfg.model, dims, WORK)
    with torch.device("meta"):
        model = MultimodalLM(cfg.model, placeholder_id=151646)
    model.apply_trainable()
    n_vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual_encoder."))
    # docs/FORMATS.md section 1: 39 x (4*1408^2 + 2*1408*6144 + 8*1408 + 6144) + patch (3*14^2*1408 + 1408)
    # + pos_embed 257*1408 + cls 1408
    assert n_vit == 39 * 25_248_768 + 829_312 + 361_856 + 1_408 == 985_894_528
    assert sum(c.params for c in costs) == sum(p.numel() for p in model.parameters())
    assert sum(c.trainable_params for c in costs) == 768 * 4096 + 4096  # pretrain: only llm_proj trains


def test_checkpointed_blocks_keep_only_their_inputs() -> None:
    cfg = load_config(DEMO_CFG)
    dims = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 512}
    full = layer_costs(cfg.model, dims, WORK)
    some = layer_costs(cfg.model, dims, replace(WORK, checkpointed_blocks=frozenset({0, 2})))
    every = layer_costs(cfg.model, dims, replace(WORK, activation_checkpointing=True))
    blocks = [c.index for c in full if c.kind == "block"]
    for j, idx in enumerate(blocks):
        assert some[idx].act_bytes == (every[idx].act_bytes if j in (0, 2) else full[idx].act_bytes)
    assert every[blocks[0]].act_bytes < full[blocks[0]].act_bytes
