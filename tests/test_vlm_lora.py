"""LoRA and QLoRA for a transformers VLM (``model.vlm.lora``, ``model.vlm.quantize``): the config keys and their
checks, adapters on the language model's decoder blocks only, the planner's numbers, pipeline training with 1 and 2
stages (same losses, only adapters and the merger move, resume), and ``--hf-out`` merged or as a peft adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from lavis.config.load import ConfigError, from_dict
from lavis.config.schema import Config, ModelConfig
from lavis.convert.pipe_to_pth import load_plain_state
from lavis.convert.vlm_export import modules_to_save, trained_layers
from lavis.families import describe, family_named, plan
from lavis.lora_config import VLMLoRAConfig
from lavis.model.lora import is_adapter_key
from lavis.model.mllm import lm_loss
from lavis.pipeline.plan import QUANT_BYTES, Workload, stage_memory_bytes
from lavis.testing.vlm import FAMILIES, MICRO_BATCH, reference_forward, tiny_hf_dict, two_image_batch, write_tiny_dir
from lavis.vlm.arch import read_hf_config
from lavis.vlm.config import VLMConfig
from lavis.vlm.costs import is_trainable, layer_costs
from lavis.vlm.layers import DecoderBlockPipe, build_layers, layer_table, run_layers
from lavis.vlm.lora import add_vlm_adapters_
from lavis.vlm.weights import load_stage

from .conftest import REPO, vlm_train


def _vlm(family: str = "qwen2_5_vl", **kw: object) -> dict:
    return {"model": {"vlm": {"hf_config": tiny_hf_dict(family), **kw}}}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_lora_keys_load_and_are_checked_naming_the_vlm_section() -> None:
    cfg = from_dict(Config, _vlm(freeze_llm=True, lora={"r": 4, "alpha": 8, "targets": "all-linear"}),
                    source="recipe.yaml")
    assert cfg.model.vlm is not None and cfg.model.vlm.lora == VLMLoRAConfig(r=4, alpha=8.0, targets="all-linear")
    for bad, message in (({"freeze_llm": False, "lora": {}}, "model.vlm.lora trains adapters over the frozen "
                                                              "language model: set model.vlm.freeze_llm: true"),
                         ({"freeze_llm": True, "lora": {"r": 0}}, r"model.vlm.lora.r must be >= 1 \(got 0\)"),
                         ({"freeze_llm": True, "lora": {"targets": "all"}}, "model.vlm.lora.targets: 'all' is neither"),
                         ({"freeze_llm": True, "lora": {"targets": []}}, "model.vlm.lora.targets is empty"),
                         ({"freeze_llm": True, "lora": {"rank": 4}}, "model.vlm.lora.rank"),
                         ({"freeze_llm": True, "quantize": "nf4"}, "model.vlm.quantize: nf4 holds frozen weights"),
                         ({"freeze_llm": True, "lora": {}, "quantize": "fp4"}, "model.vlm.quantize")):
        with pytest.raises(ConfigError, match=message):
            from_dict(Config, _vlm(**bad), source="recipe.yaml")
    # model.llm.lora keeps its own key in the messages
    with pytest.raises(ConfigError, match=r"model.llm.lora.r must be >= 1"):
        from_dict(Config, {"model": {"llm": {"hf_config": {"model_type": "qwen2"}, "frozen": True, "lora": {"r": 0}}}},
                  source="recipe.yaml")


def _pipeline_layers(cfg: Config) -> list:
    spec = describe(cfg.model)
    return family_named(spec.family).pipeline_layers(spec, cfg, -1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_without_cuda_before_any_layer_is_built() -> None:
    vlm = VLMConfig(hf_config=tiny_hf_dict("qwen2_5_vl"), freeze_llm=True, lora=VLMLoRAConfig(), quantize="nf4")
    with pytest.raises(RuntimeError, match="model.vlm.quantize: nf4 needs a CUDA GPU"):
        _pipeline_layers(Config(model=ModelConfig(vlm=vlm)))


def test_train_embeddings_with_tied_embeddings_is_refused() -> None:
    vlm = VLMConfig(hf_config={**tiny_hf_dict("qwen2_5_vl"), "tie_word_embeddings": True}, freeze_llm=True,
                    lora=VLMLoRAConfig(train_embeddings=True))
    with pytest.raises(ValueError, match="train_embeddings would train two copies apart"):
        _pipeline_layers(Config(model=ModelConfig(vlm=vlm)))


def _layers_with_adapters(cfg: VLMConfig) -> list[torch.nn.Module]:
    hf = read_hf_config(cfg)
    layers = build_layers(hf)
    load_stage(cfg, hf, layer_table(hf), dict(enumerate(layers)))
    add_vlm_adapters_(dict(enumerate(layers)), cfg)
    return layers


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_sit_on_the_decoder_blocks_only_and_only_they_and_the_merger_get_gradients(family: str) -> None:
    """Fresh adapters leave the logits as they were (``lora_B`` is zero); with ``requires_grad`` from the config a
    backward reaches the adapters and the merger, and no base weight; each block's adapters are seeded alike in every
    process (the same init from two builds)."""
    plain = VLMConfig(hf_config=tiny_hf_dict(family), init_seed=2)
    cfg = VLMConfig(hf_config=tiny_hf_dict(family), init_seed=2, freeze_llm=True, freeze_merger=False,
                    lora=VLMLoRAConfig(r=2, targets=["q_proj", "down_proj"]))
    hf = read_hf_config(cfg)
    table = layer_table(hf)
    layers = _layers_with_adapters(cfg)
    inputs, labels = two_image_batch(seed=4)
    with torch.no_grad():
        assert _rel(run_layers(layers, inputs), run_layers(_layers_with_adapters(plain), inputs)) == 0.0
    adapters = {table[i].to_plain(k) for i, layer in enumerate(layers) for k, _ in layer.named_parameters()
                if is_adapter_key(k)}
    blocks = hf.text_config.num_hidden_layers
    assert len(adapters) == blocks * 2 * 2  # q_proj and down_proj, lora_A and lora_B, in every decoder block
    assert all(k.startswith("model.layers.") for k in adapters)  # none in the vision tower (it has *_proj too)
    again = _layers_with_adapters(cfg)
    assert all(torch.equal(a, b) for x, y in zip(layers, again) for (n, a), (_, b) in
               zip(x.named_parameters(), y.named_parameters()) if is_adapter_key(n))
    for i, layer in enumerate(layers):
        for k, p in layer.named_parameters():
            p.requires_grad_(is_trainable(table[i].to_plain(k), cfg))
    lm_loss(run_layers(layers, inputs), labels).backward()
    with_grad = {table[i].to_plain(k) for i, layer in enumerate(layers) for k, p in layer.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    lora_b = {k for k in adapters if ".lora_B." in k}  # lora_A's gradient is zero while lora_B is
    assert lora_b <= with_grad
    assert with_grad - adapters and all(k.startswith(("visual.merger.", "visual.deepstack_merger_list."))
                                        for k in with_grad - adapters)


def test_train_embeddings_trains_the_embeddings_and_head_and_the_peft_export_saves_them_beside() -> None:
    cfg = VLMConfig(hf_config=tiny_hf_dict("qwen3_vl"), freeze_llm=True, lora=VLMLoRAConfig(train_embeddings=True))
    assert is_trainable("model.embed_tokens.weight", cfg) and is_trainable("lm_head.weight", cfg)
    assert is_trainable("model.layers.0.self_attn.q_proj.lora_A.default.weight", cfg)
    assert not is_trainable("model.layers.0.self_attn.q_proj.base_layer.weight", cfg)
    assert not is_trainable("model.norm.weight", cfg) and not is_trainable("visual.blocks.0.norm1.weight", cfg)
    assert modules_to_save(["model.embed_tokens.weight", "lm_head.weight", "visual.merger.norm.weight",
                            "visual.deepstack_merger_list.1.linear_fc1.bias"]) == [
        "lm_head", "model.language_model.embed_tokens", "model.visual.deepstack_merger_list.1", "model.visual.merger"]
    assert modules_to_save(["visual.blocks.0.norm1.weight", "visual.merger.norm.weight"]) == ["model.visual"]
    with pytest.raises(ValueError, match="model.norm.weight is neither an adapter nor"):
        modules_to_save(["model.norm.weight"])


def test_unknown_targets_are_named_with_the_vlm_key() -> None:
    cfg = VLMConfig(hf_config=tiny_hf_dict("qwen2_5_vl"), freeze_llm=True, lora=VLMLoRAConfig(targets=["qkv"]))
    with pytest.raises(ValueError, match=r"model.vlm.lora.targets \['qkv'\] match no linear layer"):
        _layers_with_adapters(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_planner_counts_adapters_and_no_gradients_or_optimizer_state_for_the_frozen_base(family: str) -> None:
    """``lavis.vlm.costs.layer_costs``: each decoder block gains ``r x (in + out)`` per targeted linear layer and
    trains only those; the stage memory grows by exactly the adapters' weights, gradients and optimizer state over
    a frozen LLM and is far below training the LLM; QLoRA holds the blocks' linear weights at the quantized size."""
    base = dict(hf_config=tiny_hf_dict(family), freeze_vision=True, freeze_merger=False)
    lora = VLMLoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"])
    frozen, adapted = VLMConfig(**base, freeze_llm=True), VLMConfig(**base, freeze_llm=True, lora=lora)
    full = VLMConfig(**base, freeze_llm=False)
    hf = read_hf_config(frozen)
    t = hf.text_config
    d, inter, head_dim = t.hidden_size, t.intermediate_size, getattr(t, "head_dim", None) or 8
    per_block = 4 * ((d + t.num_attention_heads * head_dim) + (d + t.num_key_value_heads * head_dim) + (inter + d))
    work = Workload(tokens=128, seq_len=64, images=2, param_bytes=2)
    c_frozen, c_lora, c_full = (layer_costs(hf, c, work, patches=96) for c in (frozen, adapted, full))
    for a, b in zip(c_frozen, c_lora):
        if a.kind == "block":
            assert (b.params - a.params, b.trainable_params, a.trainable_params) == (per_block, per_block, 0)
            # backward: input gradients (1x forward) plus the adapters' weight gradients (their share of the block)
            fwd_a, fwd_b = a.flops / 2, b.flops / (2 + per_block / b.params)
            assert fwd_b - fwd_a == pytest.approx(2 * per_block * work.tokens)
        else:
            assert (b.params, b.trainable_params) == (a.params, a.trainable_params)
    embed = next(c for c in c_lora if c.kind == "embed")
    assert 0 < embed.trainable_params < embed.params  # the merger trains, the token embeddings do not
    optim = 12.0
    stage = {name: stage_memory_bytes(c, 0, 1, work, optim) for name, c in
             (("frozen", c_frozen), ("lora", c_lora), ("full", c_full))}
    blocks = t.num_hidden_layers
    acts = sum(b.act_bytes - a.act_bytes for a, b in zip(c_frozen, c_lora))
    assert stage["lora"] - stage["frozen"] - acts == pytest.approx(blocks * per_block * (2 + 2 + optim))
    llm = sum(c.params for c in c_full if c.kind in ("block", "norm", "head")) + t.vocab_size * d
    assert stage["full"] - stage["frozen"] >= llm * (2 + optim)  # the whole LLM's gradients and optimizer state
    q = layer_costs(hf, VLMConfig(**base, freeze_llm=True, lora=lora, quantize="nf4"), work, patches=96)
    block, qblock = next(c for c in c_lora if c.kind == "block"), next(c for c in q if c.kind == "block")
    linear = sum(m.weight.numel() for m in build_layers(hf)[[c.kind for c in q].index("block")].modules()
                 if isinstance(m, torch.nn.Linear))
    assert qblock.weight_bytes == pytest.approx(linear * QUANT_BYTES["nf4"] + (block.params - linear) * 2)
    assert all(c.weight_bytes is None for c in q if c.kind != "block")


PARTITIONS = {1: "0,10", 2: "0,3,10"}


def _train(directory: Path, stages: int, out: Path, steps: int = 5, mode: str | None = None) -> dict:
    result = out / f"lora_losses{stages}{mode or ''}.json"
    vlm_train(directory, stages, PARTITIONS[stages], result, steps, *([mode] if mode else []), "lora")
    ranks = [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(stages)]
    return {**json.loads(result.read_text()), "ranks": ranks}


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b))


@pytest.mark.process
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_with_1_and_2_stages_alike_resumes_and_exports_merged_and_as_peft_adapter(
        family: str, tmp_path: Path) -> None:
    """``model.vlm.lora`` (all-linear) through the real trainer, fp32: 1 and 2 stages give the same 5 losses; only
    the adapters and the merger change, and they are exactly what is trainable and what the optimizer holds state
    for; resumed from step 3 the 2-stage run gives the same steps 4 and 5. ``pipemodel2pth.py --hf-out`` writes a
    merged transformers directory and, with ``--peft-adapter``, a peft adapter that ``PeftModel.from_pretrained``
    puts onto the source directory: both give the logits of our layers with the trained adapters."""
    directory = write_tiny_dir(tmp_path / "model", family)
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    runs = {s: _train(directory, s, tmp_path, mode="save" if s == 2 else None) for s in (1, 2)}
    base = runs[1]["losses"]
    assert len(base) == 5 and _same(runs[2]["losses"], base), (runs[2]["losses"], base)
    assert base[-1] != base[0]
    for run in runs.values():
        changed = [k for r in run["ranks"] for k in r["changed"]]
        assert changed == [k for r in run["ranks"] for k in r["trainable"]]
        assert changed == [k for r in run["ranks"] for k in r["optimizer_state"]]
        adapters = [k for k in changed if is_adapter_key(k)]
        assert len(adapters) == 3 * 7 * 2  # 3 blocks x all 7 linear layers x (lora_A, lora_B)
        assert all(k.startswith(("visual.merger.", "visual.deepstack_merger_list.")) for k in changed
                   if not is_adapter_key(k))
    assert runs[2]["ranks"][0]["changed"] == []  # stage 0: patch embedding and two vision blocks, all frozen
    (tmp_path / "lora2" / "latest").write_text("global_step3")
    resumed = _train(directory, 2, tmp_path, mode="resume")["losses"]
    assert _same(resumed, base[3:]), (resumed, base)

    (tmp_path / "lora2" / "latest").write_text("global_step5")
    run = tmp_path / "lora2"
    tag = run / "global_step5"
    layers, _, _ = trained_layers(tag, *load_plain_state(tag))
    inputs, _ = two_image_batch(seed=99, batch=MICRO_BATCH)
    source = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = run_layers([layer.eval() for layer in layers], inputs)
        untrained = reference_forward(source, inputs).logits
    assert any(isinstance(layer, DecoderBlockPipe) and any(is_adapter_key(n) for n, _ in layer.named_parameters())
               for layer in layers)
    assert _rel(untrained, ours) > 1e-3
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    for flag, out in (([], tmp_path / "merged"), (["--peft-adapter"], tmp_path / "adapter")):
        proc = subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", str(run), "--hf-out",
                               str(out), "--hf-dtype", "fp32", *flag], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged) is type(source)
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(directory) and config["r"] == 4
    peft = PeftModel.from_pretrained(source, tmp_path / "adapter").eval()
    adapted = [n for n, _ in peft.named_modules() if n.endswith(".lora_A")]
    assert adapted and all(".language_model.layers." in n for n in adapted)  # no adapter in the vision tower
    with torch.no_grad():
        assert _rel(reference_forward(merged, inputs).logits, ours) <= 1e-5
        assert _rel(reference_forward(peft, inputs).logits, ours) <= 1e-5


def test_peft_adapter_of_a_run_without_lora_is_refused(tmp_path: Path) -> None:
    from lavis.convert.vlm_export import export_vlm_hf

    meta = {"config": _vlm(freeze_llm=False)}
    with pytest.raises(ValueError, match="not a LoRA run .model.vlm.lora is unset.: there is no adapter to write"):
        export_vlm_hf(tmp_path, {}, meta, tmp_path / "out", adapter=True)


def test_planner_offers_lora_for_a_vlm_that_trains_its_language_model_and_the_knob_loads(tmp_path: Path) -> None:
    """``python -m lavis.plan``'s knobs: a recipe training the VLM's language model is offered ``model.vlm.lora``;
    the knob's options load, and with them the planned stage memory drops (adapters instead of the LLM's gradients
    and optimizer state)."""
    from lavis import plan as plan_cli
    from lavis.config.load import load_config

    hf = tiny_hf_dict("qwen2_5_vl")  # a language model wide enough that rank-64 adapters are a small part of it
    hf["text_config"].update(hidden_size=1024, intermediate_size=2816, num_attention_heads=8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"vlm": {"hf_config": hf, "freeze_llm": False}},
                                  "train": {"parallel": {"num_stages": 2}}}))
    cfg = load_config(recipe)
    knobs = [opts for _, opts in plan_cli.knob_options(cfg, 2) if any("model.vlm.lora" in o for o in opts)]
    assert knobs == [["model.vlm.freeze_llm=true", "model.vlm.lora={r: 64, targets: all-linear}"]]
    lora = load_config(recipe, knobs[0])
    assert lora.model.vlm is not None and lora.model.vlm.lora == VLMLoRAConfig(r=64, targets="all-linear")

    def peak(c: Config) -> float:
        p = plan(describe(c.model), c, 1)
        return max(stage_memory_bytes(p.costs[lo:hi], s, len(p.parts) - 1, p.work, p.optim_bytes)
                   for s, (lo, hi) in enumerate(zip(p.parts, p.parts[1:])))

    assert peak(lora) < peak(cfg)
    done = load_config(recipe, knobs[0])
    assert not [opts for _, opts in plan_cli.knob_options(done, 2) if any("model.vlm.lora" in o for o in opts)]
