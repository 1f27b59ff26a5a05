"""LoRA / QLoRA (``model.llm.lora``, ``model.llm.quantize``): adapters per decoder block, training under the
pipeline, checkpoints, resume, converters (merged ``.pth``, merged transformers directory, peft adapter directory)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from lavis.config.load import load_config
from lavis.config.schema import LoRAConfig, ModelConfig
from lavis.model.llm import decoder_parts, qwen_v1_to_qwen2_config
from lavis.model.lora import is_adapter_key
from lavis.pipeline.layers import DecoderBlockPipe

from .conftest import REPO, data_options, losses, train, train_stopped_and_resumed

LORA_CFG = REPO / "lavis/projects/demo/shapes_lora.yaml"
ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# Frozen vision and Q-Former, no embedding training: only adapters and the projection train.
ADAPTERS_ONLY = ("model.vision.frozen=true", "model.qformer.frozen=true", "model.llm.lora.train_embeddings=false",
                 "model.llm.lora.targets=[q_proj,v_proj,down_proj]", "model.llm.lora.r=8", "data.num_workers=0")
STEPS = 5
PROJ, ADAPTERS = 128 * 128 + 128, 2 * (8 * 256 + 8 * 256 + 8 * 640)


def _tiny(model_type: str) -> PretrainedConfig:
    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                tie_word_embeddings=False)
    if model_type == "qwen_v1":  # a Qwen v1 config.json, read into transformers' Qwen2 as for Qwen-7B/14B-Chat
        hf = qwen_v1_to_qwen2_config({"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 96,
                                      "num_hidden_layers": 2, "vocab_size": 64, "seq_length": 64})
    else:
        hf = AutoConfig.for_model(model_type, num_key_value_heads=2, **dims)
    hf._attn_implementation = "sdpa"
    return hf


@pytest.mark.parametrize("family", ["qwen2", "qwen_v1", "llama"])
def test_all_linear_adapts_every_linear_layer_of_each_family(family: str) -> None:
    hf = _tiny(family)
    block = DecoderBlockPipe(hf, decoder_parts(hf), 1, seed=5, std=0.02, lora=LoRAConfig(r=4, targets="all-linear"))
    adapted = sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in block.named_parameters() if ".lora_A" in n})
    assert adapted == ALL
    # Seeded per block: the same block index and seed give identical adapters, another seed other ones.
    again = DecoderBlockPipe(hf, decoder_parts(hf), 1, seed=5, std=0.02, lora=LoRAConfig(r=4, targets="all-linear"))
    other = DecoderBlockPipe(hf, decoder_parts(hf), 1, seed=6, std=0.02, lora=LoRAConfig(r=4, targets="all-linear"))
    a, b, c = (dict(m.state_dict()) for m in (block, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "layer.self_attn.q_proj.lora_A.default.weight"
    assert not torch.equal(a[key], c[key])
    assert not a["layer.self_attn.q_proj.lora_B.default.weight"].any()  # a fresh adapter changes nothing


def test_unknown_target_is_refused_with_the_valid_names() -> None:
    hf = _tiny("qwen2")
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no linear layer.*valid names: \['down_proj'"):
        DecoderBlockPipe(hf, decoder_parts(hf), 0, seed=1, std=0.02, lora=LoRAConfig(targets=["q_proj", "c_attn"]))


def test_lora_config_rules(tiny_cfg) -> None:
    llm = tiny_cfg.model.llm
    with pytest.raises(ValueError, match="set model.llm.frozen: true"):
        replace(llm, lora=LoRAConfig(), frozen=False)
    with pytest.raises(ValueError, match="set model.llm.lora"):
        replace(llm, frozen=True, quantize="nf4")
    with pytest.raises(ValueError, match="all-linear"):
        LoRAConfig(targets="everything")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_quantize_without_cuda_is_refused_at_start(tiny_data: Path) -> None:
    from lavis.engine.pipe_module import layer_specs
    from lavis.model.llm import llm_hf_config

    cfg = load_config(LORA_CFG, [*data_options(tiny_data), "model.llm.quantize=nf4"])
    hf = llm_hf_config(cfg.model.llm)
    with pytest.raises(RuntimeError, match="quantize: nf4 needs a CUDA GPU"):
        layer_specs(cfg.model, hf, decoder_parts(hf), placeholder_id=5)


def test_planner_counts_adapters_exactly_and_quantized_weights(tiny_data: Path) -> None:
    from lavis.model.llm import llm_hf_config
    from lavis.pipeline.plan import LLM_DIMS, plan_for_config, stage_memory_bytes

    cfg = load_config(LORA_CFG, [*data_options(tiny_data), *ADAPTERS_ONLY])
    hf = llm_hf_config(cfg.model.llm)
    plan = plan_for_config(cfg, {k: getattr(hf, k) for k in LLM_DIMS}, 1)
    block = DecoderBlockPipe(hf, decoder_parts(hf), 0, 1, 0.02, lora=cfg.model.llm.lora)
    real = sum(p.numel() for n, p in block.named_parameters() if is_adapter_key(n))
    blocks = [c for c in plan.costs if c.kind == "block"]
    assert all(c.trainable_params == real for c in blocks)
    assert blocks[0].params == sum(p.numel() for p in block.parameters())
    assert [c.trainable_params for c in plan.costs if c.kind in ("norm", "head")] == [0, 0]
    q = replace(cfg, model=replace(cfg.model, llm=replace(cfg.model.llm, quantize="nf4")))
    qplan = plan_for_config(q, {k: getattr(hf, k) for k in LLM_DIMS}, 1)
    mem = [stage_memory_bytes(p.costs[1:2], 0, 1, p.work, p.optim_bytes) for p in (plan, qplan)]
    assert mem[1] < mem[0]


# --- real launches ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lora")
    kw = dict(data=tiny_data, steps=STEPS, cfg=LORA_CFG, extra=ADAPTERS_ONLY)
    return {"pp1": train(tmp, "pp1", 1, 1, gas=2, **kw),
            "pp2": train_stopped_and_resumed(tmp, "pp2", 2, 2, gas=2, **kw)}  # stops after step 3, resumes to 5


@pytest.mark.process
def test_pp1_pp2_same_losses_with_a_resume_in_between(lora_runs: dict[str, Path]) -> None:
    """PP2 (stopped after step 3 with a checkpoint, then resumed) gives the uninterrupted PP1 run's losses: the
    partition does not change the adapters' init, and resume restores adapters, optimizer and data order."""
    pp1, pp2 = losses(lora_runs["pp1"]), losses(lora_runs["pp2"])
    assert len(pp1) == len(pp2) == STEPS
    for a, b in zip(pp1, pp2):
        assert abs(a - b) / abs(a) <= 1e-5, (pp1, pp2)
    assert pp2[-1] < pp2[0]  # it learns
    assert "resumed from" in lora_runs["pp2"].with_suffix(".log").read_text()
    # Counted and printed at start, per stage: llm_proj (128 x 128 + 128) and rank-8 adapters on q/v (8 x 256 each)
    # and down_proj (8 x 640) of 2 blocks; nothing else trains.
    log = (lora_runs["pp2"].with_suffix(".log")).read_text()
    counts = re.findall(r"\[stage (\d)\] trainable parameters: ([\d,]+)(?: \(LoRA adapters ([\d,]+)\))?", log)
    assert sorted(int(s) for s, _, _ in counts) == [0, 1]
    assert sum(int(n.replace(",", "")) for _, n, _ in counts) == PROJ + ADAPTERS
    assert sum(int(a.replace(",", "") or 0) for _, _, a in counts) == ADAPTERS


@pytest.mark.process
def test_checkpoint_holds_only_adapters_and_projection(lora_runs: dict[str, Path]) -> None:
    tag = lora_runs["pp2"] / f"global_step{STEPS}"
    keys = set()
    for f in sorted(tag.glob("layer_*-model_states.pt")):
        keys |= {f"{f.name[:8]}:{k}" for k in torch.load(f, weights_only=True)}
    assert keys == {"layer_00:llm_proj.weight", "layer_00:llm_proj.bias"} | {
        f"layer_0{1 + j}:layer.{m}.{p}_proj.lora_{ab}.default.weight"
        for j in range(2) for m, p in (("self_attn", "q"), ("self_attn", "v"), ("mlp", "down")) for ab in "AB"}


def _probe(cfg: ModelConfig, placeholder_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 20), generator=g)
    ids[0, 2:2 + cfg.qformer.num_query_tokens] = placeholder_id
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return pixels, ids, torch.ones_like(ids)


@pytest.mark.process
def test_converters_merged_pth_and_peft_directory(lora_runs: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    from lavis.chat.engine import load_model
    from lavis.convert.lora_export import without_lora
    from lavis.convert.pipe_to_pth import cli
    from lavis.data.tokenizer import load_tokenizer
    from lavis.model import mllm
    from lavis.weights.release import check_against_model

    run = lora_runs["pp2"]
    pth = tmp_path / "unfreeze_llm_model.pth"
    builds: list[object] = []  # the LLM's transformers config, built once per conversion (the run's ModelSpec)
    monkeypatch.setattr(mllm, "llm_hf_config", lambda *a, real=mllm.llm_hf_config: builds.append(1) or real(*a))
    cli("model", "", ["--ckpt-dir", str(run), "--out", str(pth), "--hf-out", str(tmp_path / "peft")])
    assert len(builds) == 1
    adapters = torch.load(pth, weights_only=True)
    assert sorted(k for k in adapters if not is_adapter_key(k)) == ["llm_proj.bias", "llm_proj.weight"]
    assert len(adapters) == 2 + 12 and sum(v.numel() for v in adapters.values()) == PROJ + ADAPTERS
    cli("model", "", ["--ckpt-dir", str(run), "--out", str(pth), "--merge-lora", "--hf-out", str(tmp_path / "hf"),
                      "--hf-dtype", "fp32"])
    assert (tmp_path / "lora_unfreeze_llm_model.pth").is_file() and len(builds) == 2

    cfg = load_config(run / "config.yaml")
    tok = load_tokenizer(str(run / "tokenizer.json"))
    placeholder = tok.token_id(cfg.model.llm.image_placeholder)
    cpu = torch.device("cpu")
    with_adapters = load_model(cfg, tmp_path / "lora_unfreeze_llm_model.pth", tok, cpu, torch.float32)
    base = load_model(cfg, None, tok, cpu, torch.float32)
    plain = without_lora(cfg)
    merged_state = torch.load(pth, weights_only=True)
    check_against_model(merged_state, plain.model, placeholder)  # every key fits the plain model's shapes
    merged = load_model(plain, pth, tok, cpu, torch.float32)
    merged.llm_model.load_state_dict({k[len("llm_model."):]: v for k, v in merged_state.items()
                                      if k.startswith("llm_model.")}, strict=True)  # the whole LLM, strictly
    pixels, ids, mask = _probe(cfg.model, placeholder)
    with torch.no_grad():
        want = with_adapters(pixels, ids, mask)
        assert not torch.allclose(base(pixels, ids, mask), want, atol=1e-4)  # the adapters trained
        torch.testing.assert_close(merged(pixels, ids, mask), want, rtol=1e-5, atol=1e-5)

        # peft adapter directory onto the base LLM (the plain model's, no adapters)
        plain_base = load_model(plain, None, tok, cpu, torch.float32)
        peft_llm = PeftModel.from_pretrained(plain_base.llm_model, str(tmp_path / "peft")).eval()
        embeds = with_adapters.embed(pixels, ids)
        torch.testing.assert_close(peft_llm(inputs_embeds=embeds, attention_mask=mask).logits, want,
                                   rtol=1e-5, atol=1e-5)

        from transformers import AutoModelForCausalLM  # merged transformers directory

        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(inputs_embeds=embeds, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_block_holds_bitsandbytes_layers_under_bnb_aware_adapters(kind: str) -> None:
    """What a QLoRA stage builds before it moves to its GPU (where bitsandbytes quantizes): bitsandbytes linear
    layers, frozen, wrapped by peft's bitsandbytes LoRA layers (so merging dequantizes), still loadable by name."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as peft_bnb

    hf = _tiny("qwen2")
    block = DecoderBlockPipe(hf, decoder_parts(hf), 0, 1, 0.02, lora=LoRAConfig(r=4, targets="all-linear"),
                             quantize=kind)
    want = (peft_bnb.Linear4bit, bnb.nn.Linear4bit) if kind == "nf4" else (peft_bnb.Linear8bitLt, bnb.nn.Linear8bitLt)
    q = block.layer.self_attn.q_proj
    assert isinstance(q, want[0]) and isinstance(q.base_layer, want[1])
    assert not q.base_layer.weight.requires_grad
    w = block.state_dict(keep_vars=True)["layer.self_attn.q_proj.base_layer.weight"]
    with torch.no_grad():
        w.copy_(torch.full_like(w, 0.5))  # what the stage's weight loader does with the base file's tensor
    assert torch.equal(q.base_layer.weight.data, torch.full_like(w, 0.5))


def test_qwen_v1_base_weights_load_into_adapted_stages_and_chain_equals_plain(tmp_path: Path) -> None:
    """Base weights from a (synthetic, real names and layout) Qwen v1 directory land under peft's ``base_layer`` in
    each stage's adapted blocks; the plain model (chat's loader) gets the same adapters, so the chained stages
    equal it."""
    from lavis.config.presets import preset_path
    from lavis.engine.pipe_module import layer_specs
    from lavis.model.llm import llm_hf_config
    from lavis.model.lora import model_targets
    from lavis.model.mllm import MultimodalLM
    from lavis.pipeline.layers import load_layer_weights
    from lavis.pipeline.plan import layer_table
    from lavis.testing.synthetic import TINY_OPTIONS, write_preset
    from lavis.weights.base import stream_into

    write_preset("qwen7b_chat", tmp_path, num_layers=2, vision_depth=1, tiny=True)
    cfg = load_config(preset_path("qwen7b_chat"), [
        *TINY_OPTIONS, "model.vision.depth=1", f"model.llm.path={tmp_path / 'cache/ckpt/Qwen7B-chat'}",
        f"model.vision.checkpoint={tmp_path / 'cache/ckpt/eva/eva_vit_g.pth'}",
        f"model.qformer.checkpoint={tmp_path / 'cache/ckpt/blip2/blip2_pretrained_flant5xxl.pth'}",
        f"model.llm.tokenizer={tmp_path / 'cache/ckpt/Qwen7B-chat'}",
        "model.llm.frozen=true", "model.llm.lora.targets=all-linear", "model.llm.lora.r=4"])
    hf = llm_hf_config(cfg.model.llm)
    specs = layer_specs(cfg.model, hf, decoder_parts(hf), 151646)
    table = layer_table(hf.num_hidden_layers)
    layers = {i: s.build() for i, s in enumerate(specs)}
    for part in ({0, 1}, {2, 3, 4}):  # two stages, each loading only its own layers
        load_layer_weights(cfg.model, {i: layers[i] for i in part}, table)
    plain = MultimodalLM(cfg.model, 151646)
    plain.init_weights(cfg.model.init_seed)
    stream_into(cfg.model, model_targets(plain, cfg.model))
    q_base = layers[2].layer.self_attn.q_proj.base_layer.weight
    c_attn = None
    for shard in (tmp_path / "cache/ckpt/Qwen7B-chat").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            if "transformer.h.1.attn.c_attn.weight" in f.keys():
                c_attn = f.get_tensor("transformer.h.1.attn.c_attn.weight")
    assert c_attn is not None and torch.equal(q_base, c_attn[:c_attn.shape[0] // 3])  # Q third of block 1's c_attn
    assert torch.equal(q_base, plain.llm_model.model.layers[1].self_attn.q_proj.base_layer.weight)
    # the same adapters on both sides; give them a nonzero B so they matter
    with torch.no_grad():
        for j, block in enumerate([layers[1].layer, layers[2].layer]):
            mine = dict(block.named_parameters())
            theirs = dict(plain.llm_model.model.layers[j].named_parameters())
            assert sorted(mine) == sorted(theirs)
            for n, p in mine.items():
                if ".lora_A." in n:
                    assert torch.equal(p, theirs[n]), n  # seeded alike whatever builds the block
                if ".lora_B." in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(j))
                    theirs[n].copy_(p)
    plain.eval()
    ids = torch.tensor([[151644, 872, 198] + [151646] * 32 + [3838, 374, 151645]])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = plain(pixels, ids, torch.ones_like(ids))
        x = (pixels, ids, torch.ones_like(ids))
        for i in sorted(layers):
            x = layers[i].eval()(x)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
