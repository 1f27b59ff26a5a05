"""Real multi-process launches (torchrun, gloo on CPU): PP/DP parity with a plain-torch reference, frozen stages,
exact resume, and the converters' outputs loading strictly into the plain model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lavis.config.load import load_config
from lavis.convert.pipe_to_pth import convert
from lavis.data.collate import Collator
from lavis.data.conversation import template_from_config
from lavis.data.datasets import ConversationDataset, StepSampler, load_records
from lavis.data.tokenizer import ENDOFTEXT, load_tokenizer
from lavis.engine.optim import lr_lambda, param_groups
from lavis.model.mllm import MultimodalLM

from .conftest import COMMON, DEMO_CFG, PRETRAIN_CFG, STEPS, data_options, losses, train


def reference_losses(data: Path, gas: int, steps: int) -> list[float]:
    """The same training in one process with plain torch: MultimodalLM, AdamW, global-norm clip, same data."""
    cfg = load_config(DEMO_CFG, [*COMMON, f"train.batch.grad_accum_steps={gas}", *data_options(data)])
    t = cfg.train
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    tpl = template_from_config(tok, cfg)
    model = MultimodalLM(cfg.model, tpl.placeholder_id)
    model.init_weights(cfg.model.init_seed)
    model.apply_trainable()
    model.train()
    opt = torch.optim.AdamW(param_groups(model, t.optim.weight_decay), lr=t.optim.lr, betas=t.optim.betas,
                            weight_decay=t.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup=t.optim.warmup_steps, total=steps, lr=t.optim.lr,
                                                             min_lr=t.optim.min_lr))
    ds = ConversationDataset(load_records(cfg.data.train[0]), tpl, cfg.data, cfg.model.vision.image_size,
                             label_mode=cfg.data.label_mode)
    sampler = StepSampler([len(ds)], [1.0], seed=t.seed, micro_batch_size=t.batch.micro_batch_size,
                          grad_accum_steps=gas, dp_rank=0, dp_size=1)
    collate = Collator(tok.token_id(ENDOFTEXT), cfg.data.max_txt_len, cfg.data.pad_to_multiple_of)
    batches = iter(sampler)
    out = []
    for _ in range(steps):
        total = 0.0
        for _ in range(gas):
            (pixels, ids, mask), labels = collate([ds[k] for k in next(batches)])
            loss = model.loss(pixels, ids, mask, labels)
            (loss / gas).backward()
            total += loss.item() / gas
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(total)
    return out


@pytest.mark.process
def test_pp1_pp2_pp2xdp2_match_plain_torch(runs: dict[str, Path], tiny_data: Path) -> None:
    """fp32 with gradient clipping active: every layout gives the reference's losses (same global batch of 16)."""
    ref = reference_losses(tiny_data, gas=4, steps=STEPS)
    for name in ("pp1", "pp2", "pp1dp2", "pp2dp2"):
        got = losses(runs[name])
        assert len(got) == STEPS, name
        for a, r in zip(got, ref):
            assert abs(a - r) / abs(r) <= 1e-5, (name, got, ref)
    pp2 = losses(runs["pp2"])
    assert pp2[-1] < pp2[0]  # it learns
    rows = [json.loads(ln) for ln in (runs["pp2"] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples"] == 16 and r["tokens"] > 0 and r["grad_norm"] > 0 and r["step_time_s"] > 0 for r in rows)
    assert rows[0]["grad_norm"] > 1.0  # clipping was active in the compared steps


@pytest.mark.process
def test_run_directory_contract_and_full_model_converter(runs: dict[str, Path], tiny_data: Path) -> None:
    run = runs["pp2"]
    assert (run / "latest").read_text() == "global_step6"
    tag = run / "global_step6"
    meta = json.loads((tag / "lavis_meta.json").read_text())
    assert meta["parts"][0] == 0 and meta["parts"][-1] == len(meta["layers"]) and meta["step"] == 6
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    pth = convert(run, "model")
    assert pth == run / "unfreeze_llm_model.pth"
    state = torch.load(pth, weights_only=True)
    cfg = load_config(run / "config.yaml")
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    model = MultimodalLM(cfg.model, tok.token_id(cfg.model.llm.image_placeholder))
    model.load_state_dict(state, strict=True)  # everything trains in the demo: every key is there
    layer = torch.load(tag / "layer_00-model_states.pt", weights_only=True)
    assert torch.equal(state["llm_proj.weight"], layer["llm_proj.weight"])
    assert torch.equal(state["llm_model.model.embed_tokens.weight"], layer["embed_tokens.weight"])


@pytest.mark.parametrize(("stages", "precision", "zero", "offload", "optimizer"),
                         [(2, "fp32", 0, False, "adamw"), (3, "fp32", 0, False, "adamw"),
                          (2, "bf16", 0, False, "adamw"), (3, "bf16", 0, False, "adamw_bf16"),
                          (3, "bf16", 1, False, "adamw"), (2, "bf16", 1, True, "adamw")])
@pytest.mark.process
def test_pretrain_recipe_frozen_stages(
    tiny_data: Path, tmp_path: Path, stages: int, precision: str, zero: int, offload: bool, optimizer: str
) -> None:
    """Only the projection trains: later stages own no trainable parameter (the anchor keeps DeepSpeed happy), also
    under the bf16 AdamW without fp32 master copies (``adamw_bf16``)."""
    out = train(tmp_path, "pre", stages, stages, gas=2, data=tiny_data, steps=3, cfg=PRETRAIN_CFG,
                extra=(f"train.precision={precision}", f"train.optim.zero_stage={zero}",
                       f"train.optim.offload_optimizer={str(offload).lower()}", f"train.optim.optimizer={optimizer}"))
    log = out.with_suffix(".log").read_text()
    assert f"ZeRO stage {zero}" in log and ("offloaded to CPU" in log) == offload
    assert f"optimizer: {optimizer}, " in log
    ls = losses(out)
    assert len(ls) == 3 and all(torch.isfinite(torch.tensor(ls)))
    tag = out / "global_step3"
    assert torch.load(tag / "layer_01-model_states.pt", weights_only=True) == {}  # frozen weights are not saved
    pth = convert(out, "proj")
    assert pth == out / "model.pth"
    state = torch.load(pth, weights_only=True)
    assert set(state) == {"llm_proj.weight", "llm_proj.bias"}
    cfg = load_config(out / "config.yaml")
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    model = MultimodalLM(cfg.model, tok.token_id(cfg.model.llm.image_placeholder))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(not k.startswith("llm_proj.") for k in missing)
    before = MultimodalLM(cfg.model, tok.token_id(cfg.model.llm.image_placeholder))
    before.init_weights(cfg.model.init_seed)
    assert not torch.equal(before.llm_proj.weight, state["llm_proj.weight"].float())  # it trained


@pytest.mark.process
def test_hf_out_directory_loads_with_automodel_and_matches(runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lavis.convert.pipe_to_pth import cli

    run = runs["pp2"]
    pth, hf_dir = tmp_path / "m.pth", tmp_path / "hf"
    cli("model", "", ["--ckpt-dir", str(run), "--out", str(pth), "--hf-out", str(hf_dir), "--hf-dtype", "fp32"])
    assert {"config.json", "projector.pth", "mm_config.yaml", "tokenizer.json"} <= {p.name for p in hf_dir.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    cfg = load_config(hf_dir / "mm_config.yaml")
    tok = load_tokenizer(str(hf_dir / "tokenizer.json"))
    ours = MultimodalLM(cfg.model, tok.token_id(cfg.model.llm.image_placeholder))
    ours.load_state_dict(torch.load(pth, weights_only=True), strict=True)
    ours.eval()
    assert torch.equal(torch.load(hf_dir / "projector.pth", weights_only=True)["llm_proj.weight"],
                       ours.llm_proj.weight)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, generator=g)
    ids[0, 2:2 + cfg.model.qformer.num_query_tokens] = ours.placeholder_id
    with torch.no_grad():
        want = ours(pixels, ids, mask)
        embeds = ours.embed(pixels, ids)  # our vision side + projector, then the exported LLM alone
        got = hf(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.process
@pytest.mark.parametrize("option", ["train.parallel.activation_checkpoint_interval=1",
                         "train.parallel.activation_checkpoint_blocks=[1]"])
def test_activation_checkpointing_keeps_the_losses(runs: dict[str, Path], tiny_data: Path, tmp_path: Path,
                                                   option: str) -> None:
    """DeepSpeed's every-k recomputation and our selected-block recomputation change memory, not the math."""
    out = train(tmp_path, "ac", 2, 2, gas=4, data=tiny_data, steps=STEPS, extra=(option,))
    for a, b in zip(losses(out), losses(runs["pp2"]), strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(out), losses(runs["pp2"]))
