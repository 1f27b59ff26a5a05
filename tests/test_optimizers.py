"""`train.optim.optimizer`: AdamW, bitsandbytes' 8-bit AdamW and Kahan-compensated bf16 AdamW under the pipeline
(clipping, checkpoints, exact resume, the planner's bytes)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lavis.config.load import ConfigError, deepspeed_config, load_config
from lavis.engine.optim import PipeAdamW, PipeKahanAdamW, build_optimizer
from lavis.pipeline.plan import optimizer_bytes_per_param

from .conftest import COMMON, DEMO_CFG, REPO, data_options, launch, losses, train, train_stopped_and_resumed
from .test_lora import ADAPTERS, ADAPTERS_ONLY, LORA_CFG, PROJ

STEPS = 5


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.linspace(-1, 1, 8192).reshape(64, 128).clone())


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_each_optimizer_steps_and_round_trips_its_state(kind: str):
    p = _param()
    opt = build_optimizer(kind, [{"params": [p]}], clip=0.0, norm_group=None, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.cos(p.detach() * 3)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # a copy: state_dict() shares the live moment tensors
    per_param = state["state"][0]
    per_param = per_param.get("__bnb_optimizer_quant_state__", per_param)  # bitsandbytes nests its 8-bit state
    moment = per_param["exp_avg" if kind == "adamw" else "state1"]
    assert moment.dtype == (torch.float32 if kind == "adamw" else torch.uint8)
    q = torch.nn.Parameter(p.detach().clone())
    again = build_optimizer(kind, [{"params": [q]}], clip=0.0, norm_group=None, lr=1e-2, weight_decay=0.0)
    again.load_state_dict(state)
    p.grad = q.grad = torch.sin(p.detach())
    opt.step()
    again.step()
    assert torch.equal(p, q)  # the reloaded state continues exactly


def test_8bit_adamw_tracks_fp32_adamw_closely():
    a, b = _param(), _param()
    opt_a = build_optimizer("adamw", [{"params": [a]}], clip=0.0, norm_group=None, lr=1e-3, weight_decay=0.0)
    opt_b = build_optimizer("adamw8bit", [{"params": [b]}], clip=0.0, norm_group=None, lr=1e-3, weight_decay=0.0)
    for i in range(10):
        a.grad = torch.cos(a.detach() * (i + 1))
        b.grad = torch.cos(b.detach() * (i + 1))
        opt_a.step()
        opt_b.step()
    moved = (a - _param()).abs().mean()
    assert (a - b).abs().mean() < 0.05 * moved


def test_the_fp32_optimizer_is_still_pipeadamw():
    p = _param()
    assert isinstance(build_optimizer("adamw", [{"params": [p]}], clip=0.0, norm_group=None, lr=1e-3), PipeAdamW)


def test_missing_bitsandbytes_is_named(monkeypatch: pytest.MonkeyPatch):
    # Not installed: neither the package nor any of its modules (an earlier test may have imported some).
    for name in ["bitsandbytes", *(n for n in sys.modules if n.startswith("bitsandbytes."))]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match=r"train.optim.optimizer: adamw8bit needs bitsandbytes: pip install"):
        build_optimizer("adamw8bit", [{"params": [_param()]}], clip=0.0, norm_group=None, lr=1e-3)


def _small_steps(kind: str, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """``steps`` AdamW steps of lr 1e-4 on weights around 0.5 (bf16's half ulp there is ~1e-3, ten times a step)
    with noisy gradients; start and gradients are bf16 values in every run, so only the precision of the update
    differs. Returns the weights as fp32."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((0.5 + 0.05 * torch.randn(4096, generator=gen)).to(torch.bfloat16).to(dtype))
    opt = build_optimizer(kind, [{"params": [p]}], clip=0.0, norm_group=None, lr=1e-4, weight_decay=0.01)
    for _ in range(steps):
        p.grad = (0.3 + 0.5 * torch.randn(4096, generator=gen)).to(torch.bfloat16).to(dtype)
        opt.step()
    return p.detach().float()


def test_kahan_bf16_adamw_tracks_fp32_adamw_where_naive_bf16_adamw_stalls():
    start = _small_steps("adamw", 0, torch.float32)
    ref = _small_steps("adamw", 400, torch.float32)  # fp32 weights, gradients and moments
    kahan = _small_steps("adamw_bf16", 400, torch.bfloat16)
    naive = _small_steps("adamw", 400, torch.bfloat16)  # torch's AdamW on bf16 weights: every update rounded away
    moved = (ref - start).abs().mean()
    kahan_err, naive_err = (kahan - ref).abs().mean() / moved, (naive - ref).abs().mean() / moved
    # Kahan: within the weights' own bf16 resolution (~3% of the distance moved here; half an ulp is ~5% of it)
    assert kahan_err < 0.1, kahan_err
    assert naive_err > 0.5, naive_err  # ~1.0: it never moved
    assert naive_err / kahan_err > 10, (naive_err, kahan_err)


def test_kahan_bf16_adamw_state_round_trips_with_an_fp32_second_moment():
    p = _param().to(torch.bfloat16).detach().requires_grad_()
    opt = build_optimizer("adamw_bf16", [{"params": [p]}], clip=1.0, norm_group=None, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, PipeKahanAdamW)
    for i in range(3):
        p.grad = torch.cos(p.detach().float() * (i + 1)).to(torch.bfloat16)
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    st = state["state"][0]
    assert (st["exp_avg"].dtype, st["exp_avg_sq"].dtype, st["comp"].dtype) == (
        torch.bfloat16, torch.float32, torch.bfloat16)
    assert st["comp"].abs().max() > 0  # it carries rounding errors
    q = p.detach().clone().requires_grad_()
    again = build_optimizer("adamw_bf16", [{"params": [q]}], clip=1.0, norm_group=None, lr=1e-3, weight_decay=0.1)
    again.load_state_dict(state)
    assert again.state[q]["exp_avg_sq"].dtype == torch.float32  # torch would have cast it to the weight's bf16
    for _ in range(3):
        p.grad = q.grad = torch.sin(p.detach().float()).to(torch.bfloat16)
        opt.step()
        again.step()
    assert torch.equal(p, q)


def test_kahan_bf16_adamw_refuses_fp32_weights():
    p = _param()
    opt = build_optimizer("adamw_bf16", [{"params": [p]}], clip=0.0, norm_group=None, lr=1e-3)
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="adamw_bf16 steps bf16 weights"):
        opt.step()


@pytest.mark.parametrize("options, problem", [
    (["train.precision=fp32"], "needs train.precision: bf16 \\(got fp32\\)"),
    (["train.precision=bf16", "train.optim.zero_stage=1"], "train.optim.zero_stage: 0 \\(got 1"),
])
def test_adamw_bf16_needs_bf16_without_zero(options: list[str], problem: str):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, ["train.optim.optimizer=adamw_bf16", *options])


def test_adamw_bf16_gets_no_deepspeed_bf16_wrapper_and_our_clipping():
    t = load_config(None, ["train.optim.optimizer=adamw_bf16", "train.precision=bf16",
                           "train.optim.grad_clip=0.5"]).train
    ds = deepspeed_config(t, 1)
    assert "bf16" not in ds and "fp16" not in ds  # DeepSpeed's BF16_Optimizer would keep fp32 master weights
    assert ds["gradient_clipping"] == 0.0  # our PipeKahanAdamW clips with the all-stage norm
    mixed = deepspeed_config(load_config(None, ["train.precision=bf16"]).train, 1)
    assert mixed["bf16"] == {"enabled": True} and mixed["gradient_clipping"] == 1.0


def test_planner_counts_the_8bit_moments():
    assert optimizer_bytes_per_param("fp32", 0, False, 1, "adamw") == 8
    assert optimizer_bytes_per_param("fp32", 0, False, 1, "adamw8bit") == 2
    assert optimizer_bytes_per_param("bf16", 0, False, 1, "adamw8bit") == 10  # + fp32 master and gradient buffer
    assert optimizer_bytes_per_param("bf16", 1, False, 2, "adamw8bit") == 5
    assert optimizer_bytes_per_param("bf16", 1, True, 2, "adamw8bit") == 0


def test_planner_counts_bf16_adamw_without_master_copies():
    # beyond weight (2) and gradient (2): first moment 2 + fp32 second moment 4 + compensation 2
    assert optimizer_bytes_per_param("bf16", 0, False, 1, "adamw_bf16") == 8
    assert optimizer_bytes_per_param("bf16", 0, False, 1, "adamw") == 16  # fp32 moments 8 + master and grad 8


# --- real launches ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_runs(runs: dict[str, Path], tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("optim")
    eight = ("train.optim.optimizer=adamw8bit",)
    return {"pp1_8bit": train(tmp, "pp1_8bit", 1, 1, gas=2, data=tiny_data, steps=STEPS, extra=eight),
            "pp1_adamw": runs["pp1"],  # the session's fp32 AdamW run of the same model (1 stage)
            # stopped after step 3, resumed to STEPS
            "pp2_8bit": train_stopped_and_resumed(tmp, "pp2_8bit", 2, 2, gas=2, data=tiny_data, steps=STEPS,
                                                  extra=eight),
            "pp2_paged": train_stopped_and_resumed(tmp, "pp2_paged", 2, 2, gas=2, data=tiny_data, steps=STEPS,
                                                   extra=("train.optim.optimizer=paged_adamw8bit",))}


# fp32 `adamw` (the default) is covered by the launches of other files: 1 and 2 stages against plain torch
# (test_train_launch.py::test_pp1_pp2_pp2xdp2_match_plain_torch) and exact resume of a 2-stage run
# (test_engine_resume.py::test_sigkill_then_resume_reproduces_uninterrupted_run).
@pytest.mark.process
@pytest.mark.parametrize("pp2, kind, cls", [("pp2_8bit", "adamw8bit", "PipeAdamW8bit"),
                                          ("pp2_paged", "paged_adamw8bit", "PipePagedAdamW8bit")])
def test_8bit_adamw_pp1_equals_pp2_with_a_resume_in_between(opt_runs: dict[str, Path], pp2: str, kind: str, cls: str):
    """Both 8-bit variants against the 1-stage adamw8bit run: on a CPU bitsandbytes' paged AdamW8bit falls back to
    the plain one ("Paged optimizers are not supported on CPU"), so its 2-stage run stopped at step 3 and resumed
    must give the same losses; on CUDA only its state's memory differs (unified memory paged to the host)."""
    one, two = losses(opt_runs["pp1_8bit"]), losses(opt_runs[pp2])
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) / abs(a) <= 1e-5, (one, two)
    log = opt_runs[pp2].with_suffix(".log").read_text()
    assert "resumed from" in log
    assert f"optimizer: {kind}, {cls}" in log
    assert "optimizer: adamw8bit, PipeAdamW8bit" in opt_runs["pp1_8bit"].with_suffix(".log").read_text()


def _optimizer_state_bytes(run: Path) -> int:
    tag = run / (run / "latest").read_text()  # the sizes depend on the model, not on the step
    files = {*tag.glob("mp_rank_*"), *tag.glob("*optim*")}
    assert files, f"no optimizer state files in {tag}"
    return sum(f.stat().st_size for f in files)


@pytest.mark.process
def test_8bit_optimizer_state_files_are_at_most_0_4_of_adamws(opt_runs: dict[str, Path]):
    ratio = _optimizer_state_bytes(opt_runs["pp1_8bit"]) / _optimizer_state_bytes(opt_runs["pp1_adamw"])
    assert ratio <= 0.4, ratio


# bf16 matrix products on the CPU round differently with another intra-op thread count (a 1-stage run would get
# both cores, each rank of a 2-stage run one), so these runs pin one thread per rank; then the 1- and 2-stage runs
# are bitwise equal, which the rel <= 1e-5 bound below checks.
BF16 = ("train.precision=bf16", "train.optim.optimizer=adamw_bf16", "train.num_threads=1")


@pytest.fixture(scope="module")
def bf16_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("optim_bf16")
    return {"pp1": train(tmp, "pp1", 1, 1, gas=2, data=tiny_data, steps=STEPS, extra=BF16),
            # stopped after step 3, resumed to STEPS
            "pp2": train_stopped_and_resumed(tmp, "pp2", 2, 2, gas=2, data=tiny_data, steps=STEPS, extra=BF16),
            # 1 stage x 2 replicas: the same global batch (2 x 4 samples) as pp1's 2 micro-batches
            "pp1dp2": train(tmp, "pp1dp2", 2, 1, gas=1, data=tiny_data, steps=STEPS, extra=BF16),
            # LoRA: only the adapters and the projection train, on 2 stages
            "lora_pp2": train(tmp, "lora_pp2", 2, 2, gas=2, data=tiny_data, steps=STEPS, cfg=LORA_CFG,
                              extra=(*ADAPTERS_ONLY, *BF16))}


@pytest.mark.process
def test_bf16_adamw_pp1_equals_pp2_with_a_resume_in_between(bf16_runs: dict[str, Path]):
    one, two = losses(bf16_runs["pp1"]), losses(bf16_runs["pp2"])
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) / abs(a) <= 1e-5, (one, two)
    assert "resumed from" in bf16_runs["pp2"].with_suffix(".log").read_text()
    # DeepSpeed steps our optimizer itself: its BF16_Optimizer (fp32 master weights) did not wrap it
    log = bf16_runs["pp1"].with_suffix(".log").read_text()
    assert "optimizer: adamw_bf16, PipeKahanAdamW (bf16, ZeRO stage 0)" in log
    state = torch.load(bf16_runs["pp1"] / f"global_step{STEPS}" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=True)["optimizer"]["state"]
    assert state and all(s["comp"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.float32
                         for s in state.values())
    assert one[-1] < one[0]  # it learns


def _kahan_state(run: Path, files: str) -> list[dict]:
    """The optimizer's per-parameter state of each stage of ``run``'s last checkpoint."""
    out = []
    for f in sorted((run / f"global_step{STEPS}").glob(files)):
        out += torch.load(f, map_location="cpu", weights_only=True)["optimizer"]["state"].values()
    return out


@pytest.mark.process
def test_bf16_adamw_data_parallel_replicas_follow_the_one_stage_run(bf16_runs: dict[str, Path]):
    """1 stage x 2 replicas: the replicas' bf16 gradients are averaged before our all-stage clipping and the Kahan
    update, and the run gives the 1-stage run's losses (same global batch; bitwise equal here, checked to 1e-5)."""
    one, dp = losses(bf16_runs["pp1"]), losses(bf16_runs["pp1dp2"])
    assert len(one) == len(dp) == STEPS
    for a, b in zip(one, dp):
        assert abs(a - b) / abs(a) <= 1e-5, (one, dp)
    assert dp[-1] < dp[0]  # it learns
    log = bf16_runs["pp1dp2"].with_suffix(".log").read_text()
    assert "optimizer: adamw_bf16, PipeKahanAdamW (bf16, ZeRO stage 0)" in log
    state = _kahan_state(bf16_runs["pp1dp2"], "mp_rank_00_model_states.pt")
    assert state and all(s["comp"].dtype == torch.bfloat16 for s in state)


@pytest.mark.process
def test_bf16_adamw_trains_lora_adapters_only(bf16_runs: dict[str, Path]):
    """With LoRA the optimizer holds state for the adapters and the projection only (and the stages' zero
    anchors), all bf16 with their compensation; the run learns."""
    run = bf16_runs["lora_pp2"]
    ls = losses(run)
    assert len(ls) == STEPS and ls[-1] < ls[0]
    log = run.with_suffix(".log").read_text()
    assert "optimizer: adamw_bf16, PipeKahanAdamW (bf16, ZeRO stage 0)" in log
    state = _kahan_state(run, "mp_rank_*_model_states.pt")
    trained = sum(s["exp_avg"].numel() for s in state if s["exp_avg"].numel() > 1)  # anchors hold one zero each
    assert trained == PROJ + ADAPTERS
    assert all(s["comp"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.float32 for s in state)


@pytest.mark.process
def test_bf16_adamw_skips_a_nonfinite_step_under_the_guard(tiny_data: Path, tmp_path: Path):
    """Our clipping sees the non-finite all-stage norm and skips the update (DeepSpeed's bf16 wrapper is not there
    to do it); the run goes on with finite weights and writes its checkpoint."""
    out = tmp_path / "skip"
    proc = launch(2, ["--poison-steps", "2", "--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", "4",
                      "--output-dir", str(out), "--options", *COMMON, "train.batch.grad_accum_steps=2",
                      *data_options(tiny_data), *BF16, "train.max_nonfinite_steps=1"],
                  script=REPO / "tests/scripts/poison_train.py")
    assert "Skipped (1 of at most 1)" in proc.stdout + proc.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite", False) for r in rows] == [False, True, False, False]
    assert all(math.isfinite(r["loss"]) for r in rows[2:])
    assert (out / "latest").read_text() == "global_step4"  # saving checks every trained weight is finite
