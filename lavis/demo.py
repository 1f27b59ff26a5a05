"""``make demo``: the whole loop on the embedded default, end to end.

1. generate the shapes dataset under ``cache/dataset/shapes`` (images, multi-turn, two-image, mp4 videos);
2. train ``lavis/projects/demo/shapes.yaml`` with 2 pipeline stages (CPU gloo; NCCL when 2+ GPUs are present);
3. fold the checkpoint into ``output/shapes/unfreeze_llm_model.pth``;
4. ask "What is in the image?" about freshly generated held-out images and print the accuracy;
5. print the command to chat with the result (the last line).

Re-running resumes an interrupted training run and skips steps already done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lavis.config.load import load_config

CFG = Path("lavis/projects/demo/shapes.yaml")
DATA_DIR = Path("cache/dataset/shapes")
EVAL_DIR = Path("cache/dataset/shapes_eval")
DATA_SPEC = {"num_single": 8000, "num_multi_turn": 600, "num_pairs": 600, "num_videos": 300,
             "num_video_frames": 4, "seed": 0}
DATA_VERSION = 3  # bump when the generator's output changes, so `make demo` regenerates
QUESTION = "What is in the image?"


def step(n: int, text: str) -> None:
    print(f"\n=== [{n}/5] {text}", file=sys.stderr, flush=True)


def generate_data() -> None:
    from lavis.data import shapes

    stamp = DATA_DIR / "spec.json"
    spec = {**DATA_SPEC, "version": DATA_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and (DATA_DIR / "train.json").is_file():
        print(f"{DATA_DIR}/train.json already generated", file=sys.stderr)
        return
    t0 = time.perf_counter()
    ann = shapes.generate_dataset(DATA_DIR, progress=True, **DATA_SPEC)
    stamp.write_text(json.dumps(spec))
    print(f"wrote {ann} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def launch_training(num_stages: int, extra: list[str]) -> float:
    """Run train_pipeline.py under the DeepSpeed launcher; returns wall seconds."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus < num_stages:  # one GPU per rank; with fewer GPUs than stages, train on the CPU (gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_stages),
           "train_pipeline.py", "--cfg-path", str(CFG), "--num-stages", str(num_stages), *extra]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def evaluate(cfg_path: Path, ckpt: Path, n: int, seed: int) -> float:
    from lavis.chat.engine import ChatEngine, GenerationSettings
    from lavis.data import shapes

    pairs = shapes.generate_eval_images(EVAL_DIR, n, seed)
    engine = ChatEngine.from_files(cfg_path, ckpt)
    settings = GenerationSettings(max_new_tokens=16)
    right = 0
    for i, (path, spec) in enumerate(pairs):
        reply = engine.answer([path], QUESTION, settings)
        ok = shapes.parse_answer(reply) == (spec.colour, spec.shape)
        right += ok
        if i < 5:
            print(f"  {path.name}: truth '{shapes.answer(spec)}' -> model '{reply}' {'ok' if ok else 'WRONG'}",
                  file=sys.stderr)
    return right / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--eval-seed", type=int, default=2024)
    p.add_argument("--options", nargs="+", default=[], help="config overrides passed to train_pipeline.py")
    args = p.parse_args()
    cfg = load_config(CFG, args.options)
    out = Path(cfg.train.output_dir)

    step(1, "generating the shapes dataset")
    generate_data()

    step(2, f"training {CFG} with {args.num_stages} pipeline stages")
    extra = ["--options", *args.options] if args.options else []
    secs = launch_training(args.num_stages, extra)
    print(f"training process finished in {secs:.0f} s", file=sys.stderr)

    step(3, "converting the pipeline checkpoint")
    from lavis.convert.pipe_to_pth import convert

    ckpt = convert(out, "model")
    print(f"wrote {ckpt}", file=sys.stderr)

    step(4, f"evaluating on {args.eval_images} freshly generated held-out images")
    acc = evaluate(out / "config.yaml", ckpt, args.eval_images, args.eval_seed)
    print(f"held-out accuracy (colour and shape both right): {acc:.3f}", flush=True)

    step(5, "chat with the result (add --image PATH --query TEXT for one answer, or --batch IN --out OUT)")
    py = Path(sys.executable)
    py = py.relative_to(Path.cwd()) if py.is_relative_to(Path.cwd()) else py
    print(f"{py} cli_demo.py --cfg-path {out / 'config.yaml'} -c {ckpt}", flush=True)


if __name__ == "__main__":
    from lavis.engine.errors import run_cli

    run_cli(main)
