"""`python -m lavis.bench --compare predecessor`: both sides run on the tiny config and the report compares them;
the predecessor's float additive inter-stage mask computes the same blocks as our padding mask.

Not a timed test: nothing here asserts that one side is faster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis.bench import _side_by_side, apply_variant, parse_args, variants
from lavis.config.load import load_config
from lavis.model.llm import decoder_parts, llm_hf_config
from lavis.pipeline.layers import DecoderBlockPipe, LMHeadPipe
from lavis.pipeline.stage_io import float_additive_mask

from .conftest import PRETRAIN_CFG, REPO


def test_predecessor_side_is_the_predecessors_configuration() -> None:
    cfg = load_config(PRETRAIN_CFG, ["train.parallel.num_stages=2"])
    pred = apply_variant(cfg, "predecessor", None)
    assert pred.data.fixed_length and not pred.data.group_by_length
    p = pred.train.parallel
    assert p.activation_checkpoint_blocks == [0, 1] and p.inter_stage_mask == "float_additive"
    assert p.partition == [0, 3, 5]  # equal layer counts: 3 + 2 of the 5 layers (DeepSpeed's uniform split)
    ours = apply_variant(cfg, "ours", None)
    assert not ours.data.fixed_length and ours.data.group_by_length and ours.train.parallel.partition is None


def test_optimizer_and_offload_sides_change_only_their_keys() -> None:
    cfg = load_config(PRETRAIN_CFG, ["train.parallel.num_stages=2", "train.precision=bf16"])
    args = parse_args(["--cfg-path", str(PRETRAIN_CFG), "--compare", "optimizers"])
    assert variants(args) == ["adamw", "adamw8bit", "paged_adamw8bit", "adamw_bf16"]
    sides = {v: apply_variant(cfg, v, None).train for v in variants(args)}
    assert {v: (t.optim.optimizer, t.precision) for v, t in sides.items()} == {
        "adamw": ("adamw", "fp32"), "adamw8bit": ("adamw8bit", "fp32"), "paged_adamw8bit": ("paged_adamw8bit", "fp32"),
        "adamw_bf16": ("adamw_bf16", "bf16")}  # against fp32 AdamW; adamw_bf16 needs bf16 weights
    assert all(t.parallel.num_stages == 2 and t.batch.micro_batch_size == cfg.train.batch.micro_batch_size
               for t in sides.values())
    args = parse_args(["--cfg-path", str(PRETRAIN_CFG), "--compare", "activation_offload"])
    assert [apply_variant(cfg, v, None).train.parallel.activation_offload for v in variants(args)] == [False, True]


def test_side_by_side_lines_give_each_sides_step_time_ratio_and_memory() -> None:
    def rep(step: float, gib: float) -> dict:
        return {"step_time_s": step, "stages": [{"stage": 0, "peak_memory_gib": gib, "memory_kind": "host RSS"}]}

    result: dict = {}
    lines = _side_by_side({"adamw": rep(2.0, 1.5), "adamw8bit": rep(3.0, 1.25)}, "adamw", result)
    assert result["step_time_ratio"] == {"adamw": 1.0, "adamw8bit": 1.5}
    assert "1.50x" in lines[2] and "stage 0 1.25 GiB (host RSS)" in lines[2]


def test_float_additive_mask_gives_the_padding_masks_block_output() -> None:
    cfg = load_config(PRETRAIN_CFG)
    hf = llm_hf_config(cfg.model.llm)
    block = DecoderBlockPipe(hf, decoder_parts(hf), 0, 1, 0.1)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    hidden = torch.randn(2, 8, hf.hidden_size)
    a = block((hidden, mask))[0]
    fmask = float_additive_mask(mask, torch.float32)
    b = block((hidden, fmask))[0]
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :5], b[1, :5], atol=1e-5)
    # The last stage gives the float mask a (zero) gradient even without a block (DeepSpeed needs one).
    head = LMHeadPipe(hf, 2, 0.1)
    logits = head((b, fmask))
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert fmask.grad is not None


@pytest.mark.process
def test_compare_predecessor_runs_both_sides_on_the_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lavis.bench", "--cfg-path", str(PRETRAIN_CFG), "--random-init", "--synthetic-data",
           "--length-mix", "llava-instruct", "--seq-len", "128", "--steps", "2", "--warmup", "1", "--num-stages", "2",
           "--output-dir", str(out), "--compare", "predecessor", "--options", "train.batch.micro_batch_size=4",
           "train.batch.grad_accum_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rep = json.loads((out / "bench.json").read_text())
    ours, pred = rep["sides"]["ours"], rep["sides"]["predecessor"]
    assert ours["variant"] == "ours" and pred["variant"] == "predecessor"
    assert ours["measured_steps"] == pred["measured_steps"] == 2
    ratio = ours["non_pad_tokens_per_s"] / pred["non_pad_tokens_per_s"]
    assert abs(rep["useful_tokens_per_s_ratio"] - ratio) < 1e-2
    assert pred["stages"][0]["layers"] == [0, 3] and pred["stages"][1]["layers"] == [3, 5]  # uniform split
    # Fixed length pads every sample to max_txt_len: every predecessor micro-batch is 4 x 128 token slots.
    rows = [json.loads(ln) for ln in (out / "predecessor" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["padded_tokens_r0"] == 2 * 4 * 128 for r in rows)
    assert pred["padding_efficiency"] <= ours["padding_efficiency"]
    losses = [r["loss"] for r in rows]
    assert all(0 < x < 20 for x in losses), losses  # finite: the float mask's zero term must not overflow
    assert "ours vs predecessor" in proc.stdout and "stage 1 peak memory" in proc.stdout
    for side in (ours, pred):
        assert [s["stage"] for s in side["stages"]] == [0, 1] and all(s["peak_memory_gib"] > 0 for s in side["stages"])
