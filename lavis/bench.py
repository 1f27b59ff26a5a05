"""Measure real training steps: ``python -m lavis.bench --cfg-path CFG [--random-init] [--steps N] [--num-stages N]``.

It runs the trainer itself (same engine, data pipeline and schedule) for ``--warmup`` + ``--steps`` optimizer steps
without saving checkpoints, and reports over the measured steps, printed and as JSON (``--out``):

- non-pad tokens/s and samples/s (all replicas), padding efficiency (real / padded token slots, replica 0's batches);
- MFU = model FLOPs per second / (GPUs x peak). Model FLOPs per step are the planner's per-layer estimates
  (``lavis.pipeline.plan.layer_costs``) at the measured padded batch shape: 2 x params x tokens per forward matmul
  (+ 4 x L^2 x D attention per sequence per block), backward 2x forward for trained layers, 1x for frozen layers that
  gradients pass through, 0 for frozen layers with nothing trainable upstream (the frozen ViT runs forward only).
  The peak is ``--peak-tflops`` or, on known GPUs, their dense bf16 tensor-core peak (``engine.hardware``);
  no MFU on CPU;
- peak memory per stage (GPU: ``max_memory_allocated``; CPU: host peak RSS) and stage time balance: seconds each
  rank spent in forward / backward / optimizer instructions (``lavis.engine.profiling``), and max / mean over stages.

``--random-init`` skips every weight file (full-size shapes need no download). ``--synthetic-data`` writes a
dataset of one-image samples whose token lengths are uniform in [seq_len / 2, seq_len] (``--seq-len``), so
long-sequence throughput can be measured without real data; ``--tokenizer builtin:shapes`` lets a full-size LLM run
without its tokenizer files (the LLM's vocabulary may be larger than the tokenizer's).

Without a launcher it starts ``torch.distributed.run`` itself with ``--num-stages`` x ``--dp`` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lavis.config.load import load_config, with_values
from lavis.config.schema import Config, DatasetConfig, LLMConfig
from lavis.data import shapes
from lavis.data.cache_features import cache_level
from lavis.data.conversation import SYSTEM_PROMPTS, ChatTemplate, encode_conversation, template_from_config
from lavis.data.padding import synthetic_llava_instruct
from lavis.data.tokenizer import load_tokenizer
from lavis.engine import ds_compat
from lavis.engine.distributed import init_distributed, print0, shutdown
from lavis.engine.hardware import known_peak_tflops
from lavis.engine.hooks import Hook
from lavis.families import describe
from lavis.features import build_cache
from lavis.model.spec import ModelSpec
from lavis.pipeline.plan import Workload, layer_costs

if TYPE_CHECKING:
    from lavis.engine.trainer import Run

DEMO_LLM = LLMConfig(hf_config={"model_type": "qwen2"}, tokenizer="builtin:shapes", image_placeholder="<|extra_0|>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", help="recipe to measure (required unless --suite)")
    p.add_argument("--random-init", action="store_true", help="ignore every weight file; random weights, real shapes")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    p.add_argument("--num-stages", type=int, help="pipeline stages (default: the recipe's)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--synthetic-data", action="store_true", help="generate one-image samples of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512, help="--synthetic-data: longest sample (tokens)")
    p.add_argument("--tokenizer", help="override model.llm.tokenizer (e.g. builtin:shapes with --random-init)")
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: known GPUs' bf16 peak)")
    p.add_argument("--output-dir", default="output/bench", help="scratch run directory (no checkpoints are written)")
    p.add_argument("--out", help="write the report as JSON here (default <output-dir>/bench.json)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--compare", choices=["predecessor", "optimizers", "activation_offload"],
                   help="predecessor: also run the predecessors' configuration on the same model, data and machine "
                        "and print the ratio of non-pad tokens/s and each side's memory per stage; optimizers: "
                        "each train.optim.optimizer (adamw_bf16 with precision bf16) against fp32 AdamW, step time "
                        "and memory per stage side by side; activation_offload: train.parallel.activation_offload "
                        "false vs true")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="also run from this frozen-feature cache (built first if DIR holds none) and print the "
                        "steps/s ratio; both sides use the eval transform without flip")
    p.add_argument("--length-mix", choices=["uniform", "llava-instruct"], default="uniform",
                   help="--synthetic-data lengths: uniform in [seq_len/2, seq_len], or the LLaVA-Instruct-like mix "
                        "of lavis.data.padding (capped at --seq-len)")
    p.add_argument("--length-tokenizer",
                   help="--length-mix llava-instruct: tokenizer that measures the mix's lengths (default: the "
                        "model's; e.g. a qwen.tiktoken for Qwen-like lengths when the model uses builtin:shapes)")
    p.add_argument("--suite", choices=["gpu"],
                   help="gpu: the one-GPU check without weight files (lavis/gpu_suite.py; writes one JSON report)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="--suite gpu: cpu is a dry run of the same code paths at tiny sizes")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one side of a comparison (internal)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "adamw_bf16")
OFFLOAD = ("no_offload", "offload")
VARIANTS = ("ours", "predecessor", "pixels", "feature_cache", *OPTIMIZERS, *OFFLOAD)


def variants(args: argparse.Namespace) -> list[str]:
    """The sides one invocation runs, in order (none: a plain single measurement)."""
    out = []
    if args.compare == "predecessor":
        out += ["ours", "predecessor"]
    if args.compare == "optimizers":
        out += OPTIMIZERS
    if args.compare == "activation_offload":
        out += OFFLOAD
    if args.feature_cache:
        out += ["pixels", "feature_cache"]
    return out


def apply_variant(cfg: Config, variant: str | None, feature_cache: str | None,
                  spec: ModelSpec | None = None) -> Config:
    """``ours``: dynamic padding with length grouping, the planner's partition, the padding mask between stages.
    ``predecessor`` (MiniGPT-4 / MPP-Qwen): every sample padded to ``max_txt_len``, every decoder block recomputed
    in backward (``torch.utils.checkpoint``), a float additive mask shipped (with its gradient) between stages, and
    a uniform split (equal layer counts per stage, as DeepSpeed's ``uniform`` with identity pads). ``pixels`` /
    ``feature_cache``: the eval transform without flip, from pixels or from ``feature_cache``. An optimizer name:
    that ``train.optim.optimizer``, in fp32 (``adamw_bf16``: bf16, which it needs). ``no_offload`` / ``offload``:
    ``train.parallel.activation_offload`` false / true. ``spec``: the model's description (described here when not
    given)."""
    d, t = cfg.data, cfg.train
    if variant == "ours":
        d = replace(d, fixed_length=False, group_by_length=True)
        t = with_values(t, {"parallel.inter_stage_mask": "padding"})
    elif variant == "predecessor":
        from deepspeed.runtime.utils import partition_uniform

        blocks = (spec or describe(cfg.model)).num_blocks
        d = replace(d, fixed_length=True, group_by_length=False)
        t = with_values(t, {"parallel.activation_checkpoint_interval": 0,
                            "parallel.activation_checkpoint_blocks": list(range(blocks)),
                            "parallel.inter_stage_mask": "float_additive",
                            "parallel.partition": partition_uniform(blocks + 3, t.parallel.num_stages)})
    elif variant in OPTIMIZERS:
        t = with_values(t, {"optim.optimizer": variant, "precision": "bf16" if variant == "adamw_bf16" else "fp32",
                            "optim.zero_stage": 0, "optim.offload_optimizer": False})
    elif variant in OFFLOAD:
        t = with_values(t, {"parallel.activation_offload": variant == "offload"})
    elif variant in ("pixels", "feature_cache"):
        d = replace(d, transform=replace(d.transform, kind="eval", hflip=False),
                    feature_cache=feature_cache if variant == "feature_cache" else None)
    return replace(cfg, data=d, train=t)


def bench_config(args: argparse.Namespace) -> tuple[Config, ModelSpec]:
    """The measured run's config and the model's description (resolved once, from the recipe: ``--random-init``
    keeps its shape)."""
    cfg = load_config(args.cfg_path, args.options)
    m = cfg.model
    spec = describe(m)
    if args.random_init:
        hf = spec.hf.to_dict()
        keep = {k: v for k, v in hf.items() if not k.startswith("_") and k not in
                ("architectures", "transformers_version", "auto_map", "torch_dtype", "dtype")}
        llm = replace(m.llm, path=None, hf_config=keep)
        m = replace(m, vision=replace(m.vision, checkpoint=None), qformer=replace(m.qformer, checkpoint=None),
                    llm=llm, checkpoint=None)
    if args.tokenizer:
        if args.tokenizer == "builtin:shapes":
            llm = replace(m.llm, tokenizer=args.tokenizer, template=DEMO_LLM.template,
                          image_placeholder=DEMO_LLM.image_placeholder)
        else:
            llm = replace(m.llm, tokenizer=args.tokenizer)
        m = replace(m, llm=llm)
    t = cfg.train
    run_dir = Path(args.output_dir) / args.variant if args.variant else Path(args.output_dir)
    p = t.parallel
    t = with_values(t, {"output_dir": str(run_dir), "max_steps": args.warmup + args.steps,
                        "checkpoint.save_every": 0, "log.tensorboard": False, "log.wandb_project": None,
                        "parallel.num_stages": args.num_stages or p.num_stages,
                        "parallel.partition": p.partition if not args.num_stages or args.num_stages == p.num_stages
                        else None})
    data = cfg.data
    if args.synthetic_data:
        ann = Path(args.output_dir) / "synthetic" / "train.json"  # shared by the sides of a comparison
        data = replace(data, train=[DatasetConfig(ann_path=str(ann), vis_root=str(ann.parent))],
                       max_txt_len=max(data.max_txt_len, args.seq_len))
    return apply_variant(replace(cfg, model=m, train=t, data=data), args.variant, args.feature_cache, spec), spec


def mix_lengths(cfg: Config, n: int, tokenizer: str | None, seed: int = 0) -> list[int]:
    """Token lengths of ``n`` conversations of the LLaVA-Instruct-like mix (``lavis.data.padding``), rendered with the
    real template (32 placeholders per image, MPP's system prompt) and ``tokenizer`` (default the model's)."""
    tok = load_tokenizer(tokenizer or cfg.model.llm.tokenizer)
    tpl = ChatTemplate(tok, SYSTEM_PROMPTS["chatml"], "<|extra_0|>", 32, 32)
    return [len(encode_conversation(c, tpl, record_id=str(i)).input_ids)
            for i, c in enumerate(synthetic_llava_instruct(n, seed))]


def write_synthetic_data(cfg: Config, seq_len: int, num_records: int, seed: int = 0,
                         lengths: list[int] | None = None) -> None:
    """One image + one exchange per record; total tokens (image placeholders included) uniform in [L/2, L], or
    ``lengths[i]`` capped at L (record ``i``)."""
    ds = cfg.data.train[0]
    root = Path(ds.vis_root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    tpl = template_from_config(tok, cfg)
    rng = random.Random(seed)
    words = " ".join(shapes.corpus()).split()
    # Fixed overhead (template, system prompt, question, image run) measured once on a one-word answer.
    probe = {"images": ["x"], "conversations": [{"role": "user", "content": "<image>\nDescribe the image."},
                                                  {"role": "assistant", "content": "a"}]}
    overhead = _num_tokens(tpl, probe) - 1
    per_word = max(1e-3, len(tok.encode(" ".join(words[:200]))) / 200)
    records = []
    for i in range(8):
        shapes.draw(shapes.sample_spec(rng)).save(root / "images" / f"{i}.jpg")
    for i in range(num_records):
        want = rng.randint(seq_len // 2, seq_len) if lengths is None else min(seq_len, lengths[i % len(lengths)])
        target = want - overhead
        if target < 1:
            raise ValueError(f"--seq-len {seq_len} is too short for the image run and template ({overhead} tokens)")
        n = max(1, int(target / per_word))
        answer = " ".join(rng.choice(words) for _ in range(n))
        records.append({"id": f"bench-{i}", "images": [f"images/{i % 8}.jpg"],
                        "conversations": [{"role": "user", "content": "<image>\nDescribe the image."},
                                          {"role": "assistant", "content": answer}]})
    Path(ds.ann_path).write_text(json.dumps(records))


def _num_tokens(tpl: ChatTemplate, record: dict[str, Any]) -> int:
    return len(encode_conversation(record["conversations"], tpl, record_id="probe", label_mode="mpp").input_ids)


class MeasureHook(Hook):
    """Trainer hook: times every pipeline instruction from step ``measure_from`` on (1-based) and gathers each rank's
    seconds and peak memory at the end."""

    def __init__(self, measure_from: int) -> None:
        self.measure_from = measure_from
        self.timer: Any = None
        self.result: dict[str, Any] = {}

    def on_start(self, run: Run) -> None:
        from lavis.engine.profiling import InstructionTimer  # lazy: deepspeed

        self.timer = InstructionTimer(run.engine)

    def before_step(self, run: Run, step: int) -> None:
        if step == self.measure_from:
            self.timer.enabled = True
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def on_end(self, run: Run) -> None:
        from lavis.engine.trainer import peak_memory_gib  # lazy: deepspeed

        mine = {"rank": run.rank, "stage": run.stage, "dp_rank": ds_compat.data_parallel_rank(run.engine),
                "instruction_seconds": dict(self.timer.seconds), "compute_seconds": self.timer.compute_seconds(),
                "peak_memory_gib": peak_memory_gib(), "memory_kind": "gpu" if torch.cuda.is_available() else "host_rss"}
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        self.result = {"ranks": ranks}


def summarize(cfg: Config, result: dict[str, Any], args: argparse.Namespace, spec: ModelSpec) -> dict[str, Any]:
    rows = [json.loads(ln) for ln in Path(result["rows_path"]).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["step"] > args.warmup]
    t = cfg.train
    dp = len(result["ranks"]) // t.parallel.num_stages
    secs = sum(r["step_time_s"] for r in rows)
    real = sum(r["real_tokens_r0"] for r in rows)
    padded = sum(r["padded_tokens_r0"] for r in rows)
    micro = t.batch.grad_accum_steps * len(rows)
    # FLOPs at the measured mean padded micro-batch shape of replica 0, times all micro-batches of all replicas.
    dims = spec.dims
    tokens_per_micro = padded / max(1, micro)
    seq = tokens_per_micro / t.batch.micro_batch_size
    images = round(sum(r["images_r0"] for r in rows) / max(1, micro))
    work = Workload(tokens=round(tokens_per_micro), seq_len=max(1, round(seq)), images=images)
    cached = None
    if cfg.data.feature_cache is not None:
        cached = cache_level(cfg.model)
    flops_step = sum(c.flops for c in layer_costs(cfg.model, dims, work, cached)) * t.batch.grad_accum_steps * dp
    achieved = flops_step * len(rows) / max(secs, 1e-9)
    devices = len(result["ranks"])
    peak = args.peak_tflops or known_peak_tflops()
    stages = []
    for s in range(t.parallel.num_stages):
        rs = [r for r in result["ranks"] if r["stage"] == s]
        stages.append({
            "stage": s,
            "layers": [result["parts"][s], result["parts"][s + 1]],
            "peak_memory_gib": round(max(r["peak_memory_gib"] for r in rs), 3),
            "memory_kind": rs[0]["memory_kind"],
            "compute_seconds": round(statistics.mean(r["compute_seconds"] for r in rs), 4),
            "instruction_seconds": {k: round(v, 4) for k, v in rs[0]["instruction_seconds"].items()},
        })
    compute = [s["compute_seconds"] for s in stages]
    return {
        "config": str(args.cfg_path),
        "variant": args.variant,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "num_stages": t.parallel.num_stages,
        "dp": dp,
        "precision": t.precision,
        "micro_batch_size": t.batch.micro_batch_size,
        "grad_accum_steps": t.batch.grad_accum_steps,
        "measured_steps": len(rows),
        "step_time_s": round(secs / max(1, len(rows)), 4),
        "non_pad_tokens_per_s": round(real * dp / max(secs, 1e-9), 1),
        "samples_per_s": round(sum(r["samples"] for r in rows) / max(secs, 1e-9), 3),
        "padding_efficiency": round(real / max(1, padded), 4),
        "model_tflops_per_step": round(flops_step / 1e12, 3),
        "achieved_tflops_per_device": round(achieved / devices / 1e12, 3),
        "peak_tflops_per_device": peak,
        "mfu": None if peak is None else round(achieved / devices / (peak * 1e12), 4),
        "stage_time_balance": round(max(compute) / max(1e-9, statistics.mean(compute)), 3),
        "stages": stages,
    }


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"bench: {rep['config']} on {rep['device']}: {rep['num_stages']} stage(s) x {rep['dp']} replica(s), "
             f"{rep['precision']}, micro {rep['micro_batch_size']} x GAS {rep['grad_accum_steps']}, "
             f"{rep['measured_steps']} measured steps",
             f"  step time {rep['step_time_s']:.3f} s | {rep['non_pad_tokens_per_s']:.0f} non-pad tokens/s | "
             f"{rep['samples_per_s']:.2f} samples/s | padding efficiency {rep['padding_efficiency']:.1%}",
             f"  model {rep['model_tflops_per_step']:.2f} TFLOP/step, {rep['achieved_tflops_per_device']:.2f} "
             f"TFLOP/s per device, MFU "
             + ("n/a (no peak known; pass --peak-tflops)" if rep["mfu"] is None else f"{rep['mfu']:.1%}"
                + f" of {rep['peak_tflops_per_device']} TFLOP/s"),
             f"  stage time balance (max/mean compute) {rep['stage_time_balance']:.2f}"]
    for s in rep["stages"]:
        lines.append(f"  stage {s['stage']} layers {s['layers'][0]}-{s['layers'][1] - 1}: compute "
                     f"{s['compute_seconds']:.3f} s, peak memory {s['peak_memory_gib']:.2f} GiB ({s['memory_kind']})")
    return "\n".join(lines)


def prepare_data(cfg: Config, args: argparse.Namespace) -> None:
    """Synthetic data (a side of a comparison reuses what the first wrote) and the feature cache (when asked and
    absent), before anything is measured."""
    t = cfg.train
    if args.synthetic_data and (args.variant is None or not Path(cfg.data.train[0].ann_path).is_file()):
        num = max(64, t.batch.micro_batch_size * t.batch.grad_accum_steps * args.dp * t.max_steps)
        lengths = mix_lengths(cfg, num, args.length_tokenizer) if args.length_mix == "llava-instruct" else None
        write_synthetic_data(cfg, args.seq_len, num, lengths=lengths)
    if args.feature_cache and not (Path(args.feature_cache) / "index.json").is_file():
        plain = apply_variant(cfg, "pixels", None)
        findings = build_cache(plain, Path(args.feature_cache), workers=0)
        if findings:
            raise SystemExit(f"feature cache {args.feature_cache}: {len(findings)} item(s) failed; see "
                             "`python -m lavis.data.cache_features` for the report")


def compare(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run each side in its own process group (``torch.distributed.run``; separate processes, so host peak RSS is
    per side), one after the other on the same data, and put the reports side by side."""
    cfg, _ = bench_config(args)
    prepare_data(cfg, args)
    world = cfg.train.parallel.num_stages * args.dp
    reports: dict[str, Any] = {}
    for v in variants(args):
        out = Path(args.output_dir) / v / "bench.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "lavis.bench", *argv, "--variant", v, "--out", str(out)]
        print(f"bench: running side {v!r}", flush=True)
        rc = subprocess.call(cmd)
        if rc:
            raise SystemExit(f"bench side {v!r} failed (exit {rc})")
        reports[v] = json.loads(out.read_text())
    result: dict[str, Any] = {"sides": reports}
    lines = []
    if "ours" in reports:
        ours, pred = reports["ours"], reports["predecessor"]
        result["useful_tokens_per_s_ratio"] = round(ours["non_pad_tokens_per_s"] / max(1e-9, pred[
            "non_pad_tokens_per_s"]), 3)
        lines.append(f"ours vs predecessor: {ours['non_pad_tokens_per_s']:.0f} vs {pred['non_pad_tokens_per_s']:.0f} "
                     f"non-pad tokens/s = {result['useful_tokens_per_s_ratio']:.2f}x (padding efficiency "
                     f"{ours['padding_efficiency']:.1%} vs {pred['padding_efficiency']:.1%})")
        lines += _memory_lines(ours, pred, "ours", "predecessor")
    if "pixels" in reports:
        px, fc = reports["pixels"], reports["feature_cache"]
        result["feature_cache_steps_per_s_ratio"] = round(px["step_time_s"] / max(1e-9, fc["step_time_s"]), 3)
        lines.append(f"feature cache vs pixels: {1 / fc['step_time_s']:.2f} vs {1 / px['step_time_s']:.2f} steps/s = "
                     f"{result['feature_cache_steps_per_s_ratio']:.2f}x")
        lines += _memory_lines(fc, px, "feature cache", "pixels")
    if "adamw" in reports:
        lines += _side_by_side(reports, "adamw", result)
    if "offload" in reports:
        lines += _side_by_side(reports, "no_offload", result)
    for name, rep in reports.items():
        print(f"--- {name}\n{format_report(rep)}")
    print("\n".join(lines), flush=True)
    return result


def _side_by_side(reports: dict[str, Any], base: str, result: dict[str, Any]) -> list[str]:
    """One line per side: step time, its ratio to ``base``'s, and peak memory per stage (sets
    ``result["step_time_ratio"][side]``)."""
    ratios = result.setdefault("step_time_ratio", {})
    lines = [f"side by side (step time relative to {base}; peak memory per stage):"]
    for name, rep in reports.items():
        ratios[name] = round(rep["step_time_s"] / max(1e-9, reports[base]["step_time_s"]), 3)
        memory = ", ".join(f"stage {s['stage']} {s['peak_memory_gib']:.2f} GiB ({s['memory_kind']})"
                           for s in rep["stages"])
        lines.append(f"  {name:<16} {rep['step_time_s']:.3f} s/step ({ratios[name]:.2f}x) | {memory}")
    return lines


def _memory_lines(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> list[str]:
    return [f"  stage {sa['stage']} peak memory ({sa['memory_kind']}): {name_a} {sa['peak_memory_gib']:.2f} GiB, "
            f"{name_b} {sb['peak_memory_gib']:.2f} GiB" for sa, sb in zip(a["stages"], b["stages"])]


def main(argv: list[str] | None = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.suite == "gpu":  # the check measures with this module, so it sits above it: run it by module name
        sys.argv = [sys.argv[0], *argv]
        runpy.run_module("lavis.gpu_suite", run_name="__main__", alter_sys=True)
        return
    if not args.cfg_path:
        raise SystemExit("--cfg-path is required (or --suite gpu)")
    if args.variant is None and variants(args):
        result = compare(args, argv)
        out = Path(args.out or Path(args.output_dir) / "bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return
    cfg, spec = bench_config(args)
    world = cfg.train.parallel.num_stages * args.dp
    if "RANK" not in os.environ and world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "lavis.bench", *argv]
        sys.exit(subprocess.call(cmd))
    from lavis.engine.trainer import train  # lazy: deepspeed

    init_distributed()
    if dist.get_rank() == 0:
        prepare_data(cfg, args)
    dist.barrier()
    hook = MeasureHook(measure_from=args.warmup + 1)
    run = train(cfg, hooks=[hook], resume=False, save=False, spec=spec)
    result = {**hook.result, "parts": run.boundaries, "rows_path": str(run.out / "metrics.jsonl")}
    if dist.get_rank() == 0:
        rep = summarize(cfg, result, args, spec)
        print(format_report(rep), flush=True)
        out = Path(args.out or Path(cfg.train.output_dir) / "bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1))
        print0(f"wrote {out}")
    shutdown()


if __name__ == "__main__":
    from lavis.engine.errors import run_rank

    run_rank(main)
