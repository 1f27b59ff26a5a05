"""One-GPU check without weight files: ``python -m lavis.bench --suite gpu`` (``make gpu-check``).

Writes one JSON report (``--out``, default ``<output-dir>/gpu_check.json``) with:

1. ``compare``: ``--compare predecessor`` on one full-width Qwen-7B stage (the 7B video SFT recipe with 4 of its
   32 blocks, random weights, bf16, 1536 max tokens, the LLaVA-Instruct-like length mix): both sides' non-pad
   tokens/s, their ratio, MFU and peak memory per side;
2. ``memory``: our side's measured peak GPU memory next to the planner's estimate for the same stage;
3. ``chat_bf16``: a greedy answer about a shapes image from synthetic files in the real layout (EVA ViT-g, BLIP-2,
   Qwen-7B-Chat directory with 2 blocks; ``lavis.testing.synthetic``), with the time it took;
4. ``chat_8bit``: the same with the LLM's linear layers in int8 (bitsandbytes), or why it was skipped.

Each part records its own error instead of stopping the others. ``--device cpu`` is a dry run of the same code
paths at tiny sizes (the demo pretrain config, 128 tokens, reduced-width synthetic files; no 8-bit), for tests.
``scripts/gpu_check.sh`` runs it on a machine that has torch with CUDA but not our other dependencies (it installs
the wheels carried in ``.whl/``, see ``scripts/prepare_gpu_wheels.sh``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lavis.bench import apply_variant, bench_config, parse_args
from lavis.chat.engine import ChatEngine, GenerationSettings
from lavis.config.presets import preset_path
from lavis.data import shapes
from lavis.families import plan as plan_model
from lavis.pipeline.plan import stage_memory_bytes
from lavis.testing.synthetic import TINY_OPTIONS, llm_config_json, write_preset

REPO = Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = REPO.parent / "shared" / "data" / "qwen.tiktoken"

GPU_COMPARE = ["--cfg-path", "lavis/projects/qwen7b/sft_video_8x3090.yaml", "--random-init", "--synthetic-data",
               "--seq-len", "1536", "--tokenizer", "builtin:shapes", "--num-stages", "1", "--steps", "4",
               "--warmup", "2", "--options", "model.llm.hf_config.num_hidden_layers=4", "train.optim.zero_stage=0",
               "train.optim.offload_optimizer=false", "train.parallel.gpu_memory_gib=null",
               "train.batch.micro_batch_size=2", "train.batch.grad_accum_steps=8"]
"""One full-width Qwen-7B stage: 4 blocks, bf16 (the recipe's), 1536 tokens."""
CPU_COMPARE = ["--cfg-path", "lavis/projects/demo/shapes_pretrain.yaml", "--random-init", "--synthetic-data",
               "--seq-len", "128", "--num-stages", "1", "--steps", "1", "--warmup", "1", "--options",
               "train.batch.micro_batch_size=2", "train.batch.grad_accum_steps=2"]


def run_suite(device: str, output_dir: Path, out: Path | None = None) -> dict[str, Any]:
    dry = device == "cpu"
    output_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": "cpu" if dry else torch.cuda.get_device_name(),
        "dry_run": dry,
        "torch": torch.__version__,
    }
    t0 = time.perf_counter()
    report["compare"] = _part(lambda: _compare(dry, output_dir / "compare"))
    if "error" not in report["compare"]:
        report["memory"] = _part(lambda: _memory_vs_plan(report["compare"], dry))
    report["chat_bf16"] = _part(lambda: _chat(dry, output_dir / "weights", load_8bit=False))
    report["chat_8bit"] = ({"skipped": "no CUDA (dry run): bitsandbytes int8 needs a GPU"} if dry
                           else _part(lambda: _chat(dry, output_dir / "weights", load_8bit=True)))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    path = out or output_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "compare"}, indent=1))
    print(f"wrote {path}")
    return report


def _part(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    res: dict[str, Any]
    try:
        res = fn()
    except Exception as e:  # recorded in the JSON with its traceback, so one failing part keeps the others' numbers
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _compare(dry: bool, out_dir: Path) -> dict[str, Any]:
    args = list(CPU_COMPARE if dry else GPU_COMPARE)
    if not dry:  # no weight files: Qwen-7B-Chat's real config.json (4 blocks) is all --random-init needs
        cfg_dir = out_dir / "qwen7b_config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        (cfg_dir / "config.json").write_text(json.dumps(llm_config_json("qwen7b_chat", 4)))
        args.append(f"model.llm.path={cfg_dir.resolve()}")
    opts = args.index("--options")
    mix = ["--length-mix", "llava-instruct"]
    if SHARED_TIKTOKEN.is_file():
        mix += ["--length-tokenizer", str(SHARED_TIKTOKEN)]
    args[opts:opts] = [*mix, "--compare", "predecessor", "--output-dir", str(out_dir)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if dry else dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1" if dry else env.get("OMP_NUM_THREADS", "8"))
    proc = subprocess.run([sys.executable, "-m", "lavis.bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"bench --compare predecessor failed ({proc.returncode}): {proc.stderr[-3000:]}")
    rep = json.loads((out_dir / "bench.json").read_text())
    ours, pred = rep["sides"]["ours"], rep["sides"]["predecessor"]
    keep = ("non_pad_tokens_per_s", "padding_efficiency", "step_time_s", "mfu", "achieved_tflops_per_device",
            "peak_tflops_per_device", "stages")
    return {"args": args, "useful_tokens_per_s_ratio": rep["useful_tokens_per_s_ratio"],
            "ours": {k: ours[k] for k in keep}, "predecessor": {k: pred[k] for k in keep}}


def _memory_vs_plan(compare: dict[str, Any], dry: bool) -> dict[str, Any]:
    """The planner's stage-0 estimate (weights, gradients, optimizer state, activations of max_txt_len micro-batches
    in flight) for the configuration our side ran, next to its measured peak."""
    args = parse_args(compare["args"])
    cfg, spec = bench_config(args)
    cfg = apply_variant(cfg, "ours", None, spec)
    plan = plan_model(spec, cfg, 1)
    est = stage_memory_bytes(plan.costs[plan.parts[0]:plan.parts[1]], 0, 1, plan.work, plan.optim_bytes) / 2**30
    measured = compare["ours"]["stages"][0]["peak_memory_gib"]
    return {"planner_estimate_gib": round(est, 3), "measured_peak_gib": measured,
            "measured_over_estimate": round(measured / max(est, 1e-9), 3),
            "memory_kind": compare["ours"]["stages"][0]["memory_kind"],
            "note": "host peak RSS of the whole process on CPU (not comparable)" if dry else
            "torch.cuda.max_memory_allocated over the measured steps"}


def _chat(dry: bool, root: Path, *, load_8bit: bool) -> dict[str, Any]:
    opts = [*(TINY_OPTIONS if dry else []), "model.vision.depth=2"]
    if not (root / "cache" / "ckpt").is_dir():
        write_preset("qwen7b_chat", root, num_layers=2, vision_depth=2, tiny=dry)
    image = root / "shape.png"
    shapes.draw(shapes.sample_spec(random.Random(0))).save(image)
    cwd = Path.cwd()
    os.chdir(root)  # the preset's weight paths are relative to the working directory (WEIGHT.md)
    try:
        t0 = time.perf_counter()
        engine = ChatEngine.from_files(preset_path("qwen7b_chat"), None, device="cpu" if dry else "auto",
                                       options=opts, load_8bit=load_8bit)
        load_s = time.perf_counter() - t0
        if torch.cuda.is_available() and not dry:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        answer = engine.answer([image], "What is in the image?", GenerationSettings(max_new_tokens=16))
        gen_s = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    dtype = next(p.dtype for p in engine.model.llm_model.lm_head.parameters())
    out: dict[str, Any] = {"answer": answer, "load_s": round(load_s, 1), "generate_s": round(gen_s, 2),
                           "dtype": str(dtype), "device": str(engine.device),
                           "note": "random weights: the answer is arbitrary text; the check is that it runs"}
    if torch.cuda.is_available() and not dry:
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m lavis.bench --suite gpu ...`` (bench runs this module by name: the check sits above bench)."""
    args = parse_args(list(argv if argv is not None else sys.argv[1:]))
    run_suite(args.device, Path(args.output_dir), Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
