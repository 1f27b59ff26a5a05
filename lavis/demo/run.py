"""``make demo``: the whole loop on the embedded default, end to end.

1. generate the shapes dataset under ``cache/dataset/shapes`` (images, multi-turn, two-image, mp4 videos);
2. train ``lavis/projects/demo/shapes.yaml`` with 2 pipeline stages (CPU gloo; NCCL when 2+ GPUs are present);
3. fold the checkpoint into ``output/shapes/unfreeze_llm_model.pth``;
4. score it with ``lavis.eval`` on held-out benchmark files about freshly drawn images (VQA accuracy on colour,
   shape and "what is in the image" questions; POPE-style F1 on yes/no questions) and print both;
5. print the command to chat with the result (the last line).

``--vlm`` runs the same loop on the tiny Qwen2.5-VL recipe ``lavis/projects/demo/shapes_qwen2_5_vl.yaml``
(``make demo-vlm``): step 3 exports the run with ``--hf-out`` to a transformers directory
(``output/shapes_qwen2_5_vl/hf``), step 4 scores that directory on the same benchmark files, as
``python -m lavis.eval --model-dir DIR`` does, and step 5 prints ``cli_demo.py --model-dir DIR``.

Re-running resumes an interrupted training run and skips steps already done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lavis.chat.engine import ChatEngine
from lavis.chat.vlm_engine import VLMChatEngine
from lavis.config.load import load_config
from lavis.convert.pipe_to_pth import convert
from lavis.convert.vlm_export import export_vlm_hf
from lavis.data import shapes
from lavis.data.shapes import names_asked_value
from lavis.engine.checkpoint import load_plain_state, resolve_tag_dir
from lavis.eval.runner import format_table, run_task
from lavis.eval.tasks import Source
from lavis.eval.yesno import pope_label

CFG = Path("lavis/projects/demo/shapes.yaml")
VLM_CFG = Path("lavis/projects/demo/shapes_qwen2_5_vl.yaml")
DATA_DIR = Path("cache/dataset/shapes")
BENCH_DIR = Path("cache/dataset/shapes_bench")
DEMO_PROMPT = "{question}"
"""The demo model was trained on bare questions, so the benchmarks ask them without the tasks' answer-style hints."""
DATA_SPEC: dict[str, Any] = {"num_single": 8000, "num_multi_turn": 600, "num_pairs": 600, "num_videos": 300,
             "num_video_frames": 4, "seed": 0}
DATA_VERSION = 5  # bump when the generator's output changes, so `make demo` regenerates


def step(n: int, text: str) -> None:
    print(f"\n=== [{n}/5] {text}", file=sys.stderr, flush=True)


def generate_data() -> None:
    stamp = DATA_DIR / "spec.json"
    spec = {**DATA_SPEC, "version": DATA_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and (DATA_DIR / "train.json").is_file():
        print(f"{DATA_DIR}/train.json already generated", file=sys.stderr)
        return
    t0 = time.perf_counter()
    ann = shapes.generate_dataset(DATA_DIR, progress=True, **DATA_SPEC)
    stamp.write_text(json.dumps(spec))
    print(f"wrote {ann} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the launcher's default 29500 may be taken by another job)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_training(num_stages: int, extra: list[str], cfg: Path = CFG) -> float:
    """Run train_pipeline.py on ``cfg`` under the DeepSpeed launcher; returns wall seconds."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus < num_stages:  # one GPU per rank; with fewer GPUs than stages, train on the CPU (gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_stages),
           "--master_port", str(free_port()), "train_pipeline.py", "--cfg-path", str(cfg),
           "--num-stages", str(num_stages), *extra]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def evaluate(cfg_path: Path, ckpt: Path, n: int, seed: int, out: Path) -> dict[str, dict]:
    """Write the held-out benchmark files and score the checkpoint on them with ``lavis.eval`` (vqa, yesno)."""
    return score(ChatEngine.from_files(cfg_path, ckpt), {"config": str(cfg_path), "checkpoint": str(ckpt)}, n, seed,
                 out)


def evaluate_model_dir(model_dir: Path, n: int, seed: int, out: Path, bench_dir: Path = BENCH_DIR) -> dict[str, dict]:
    """Score a transformers VLM directory on the same benchmark files (``python -m lavis.eval --model-dir``'s
    engine)."""
    return score(VLMChatEngine.from_model_dir(model_dir), {"config": str(model_dir), "checkpoint": None}, n, seed,
                 out, bench_dir)


def score(engine: ChatEngine, meta: dict[str, Any], n: int, seed: int, out: Path,
          bench_dir: Path = BENCH_DIR) -> dict[str, dict]:
    """Answer and score the held-out benchmark files (written under ``bench_dir/seed``) with ``engine``."""
    files = shapes.write_benchmarks(bench_dir / str(seed), n, seed)
    shutil.rmtree(out, ignore_errors=True)  # predictions of an earlier checkpoint must not be resumed
    summaries = {}
    for task in ("vqa", "yesno"):
        summaries[task] = run_task(engine, task, Source(files[task], files["images"]), out / task, prompt=DEMO_PROMPT,
                                   batch_size=16, meta=meta)
        print(format_table(summaries[task]), file=sys.stderr)
        rows = [json.loads(ln) for ln in (out / task / "predictions.jsonl").read_text().splitlines()]
        for r in rows[:3]:
            print(f"  {r['query']!r} -> {r['prediction']!r} (gold {r['gold']})", file=sys.stderr)
        if task == "yesno":
            summaries[task]["scores"]["contradictions"] = count_contradictions(rows)
    return summaries


def count_contradictions(rows: list[dict]) -> int:
    """Yes/no predictions whose verdict (read by the POPE scorer's rule) disagrees with the shape or colour they
    name, e.g. "No, it is a triangle." to "Is it a triangle?"."""
    bad = 0
    for r in rows:
        named = names_asked_value(r["query"], r["prediction"])
        bad += named is not None and named != (pope_label(r["prediction"]) == "yes")
    return bad


def export_hf(run: Path) -> Path:
    """``pipemodel2pth.py --ckpt-dir RUN --hf-out RUN/hf --hf-dtype fp32`` of the run's latest checkpoint."""
    tag_dir = resolve_tag_dir(run)
    return export_vlm_hf(tag_dir, *load_plain_state(tag_dir), run / "hf", torch.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vlm", action="store_true", help=f"train and score the tiny Qwen2.5-VL demo ({VLM_CFG})")
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=200, help="held-out images in the benchmark files")
    p.add_argument("--eval-seed", type=int, default=2024)
    p.add_argument("--options", nargs="+", default=[], help="config overrides passed to train_pipeline.py")
    args = p.parse_args()
    cfg_path = VLM_CFG if args.vlm else CFG
    cfg = load_config(cfg_path, args.options)
    out = Path(cfg.train.output_dir)

    step(1, "generating the shapes dataset")
    generate_data()

    step(2, f"training {cfg_path} with {args.num_stages} pipeline stages")
    extra = ["--options", *args.options] if args.options else []
    secs = launch_training(args.num_stages, extra, cfg_path)
    print(f"training process finished in {secs:.0f} s", file=sys.stderr)

    step(3, "exporting the run as a transformers directory (--hf-out)" if args.vlm
         else "converting the pipeline checkpoint")
    ckpt = export_hf(out) if args.vlm else convert(out, "model")
    print(f"wrote {ckpt}", file=sys.stderr)

    step(4, f"scoring with lavis.eval on benchmark files about {args.eval_images} freshly drawn held-out images")
    if args.vlm:
        res = evaluate_model_dir(ckpt, args.eval_images, args.eval_seed, out / "eval")
    else:
        res = evaluate(out / "config.yaml", ckpt, args.eval_images, args.eval_seed, out / "eval")
    vqa, pope = res["vqa"]["scores"], res["yesno"]["scores"]
    print(f"held-out VQA accuracy: {vqa['accuracy']:.3f} ({vqa['count']} questions); "
          f"POPE-style yes/no F1: {pope['f1']:.3f} (accuracy {pope['accuracy']:.3f}, yes-ratio "
          f"{pope['yes_ratio']:.2f}, {pope['count']} questions, {pope['contradictions']} contradict themselves)",
          flush=True)
    print(f"predictions and summaries: {out / 'eval'}", file=sys.stderr)

    step(5, "chat with the result (add --image PATH --query TEXT for one answer, or --batch IN --out OUT)")
    py = Path(sys.executable)
    py = py.relative_to(Path.cwd()) if py.is_relative_to(Path.cwd()) else py
    model = f"--model-dir {ckpt}" if args.vlm else f"--cfg-path {out / 'config.yaml'} -c {ckpt}"
    print(f"{py} cli_demo.py {model}", flush=True)


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
