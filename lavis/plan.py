"""``python -m lavis.plan``: does a recipe fit my cards? Answered before any download.

    python -m lavis.plan --cfg-path CFG [--gpus N] [--gpu-memory-gib G] [--options k=v ...]

Prints the stage table of the run the recipe would start (the planner of ``lavis/pipeline/plan.py``: layers,
parameters, trainable parameters, estimated GiB and compute share per stage) without building the model or reading
any weight: the LLM's shape comes from ``model.llm.path``'s ``config.json`` when it is there, else from the
published shape of the shipped model config with that path (``lavis/model/published.py``). Exit status 0 when every
stage fits the per-GPU memory, 1 otherwise; then it tries, in order of cost, the knobs that change the estimate
(more stages, recomputation, 8-bit or bf16 optimizer state, activations in host memory, optimizer state in host
RAM, LoRA, a shorter ``data.max_txt_len``) and prints which of them make it fit. Estimates, not measurements:
weights, gradients, optimizer state and the activations of the micro-batches in flight under 1F1B; not the CUDA
context, allocator fragmentation or temporary buffers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lavis.config.load import load_config, with_values
from lavis.config.presets import model_types, preset_path
from lavis.families import describe, family_of
from lavis.families import plan as plan_model
from lavis.model.published import PUBLISHED_LLM_CONFIGS
from lavis.model.spec import ModelSpec
from lavis.pipeline.plan import StagePlan, format_plan, stage_memory_bytes
from lavis.vlm.arch import hf_config_source

if TYPE_CHECKING:
    from lavis.config.schema import Config

DEFAULT_GPU_GIB = 24.0
"""The card this trainer is built for (RTX 3090 / 4090) when neither the recipe nor ``--gpu-memory-gib`` says."""


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lavis.plan", description=(__doc__ or "").split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--cfg-path", help="a recipe YAML")
    which.add_argument("--fits-table", action="store_true",
                       help="print the 'what fits' table (docs/BENCHMARKS.md): the shipped LLMs x full / LoRA / QLoRA "
                            "x 2-8 GPUs")
    ap.add_argument("--gpus", type=int, help="GPUs of the run (default: train.parallel.num_stages, one replica)")
    ap.add_argument("--gpu-memory-gib", type=float,
                    help=f"memory per GPU (default: train.parallel.gpu_memory_gib, else {DEFAULT_GPU_GIB:g})")
    ap.add_argument("--options", nargs="*", default=[], help="config overrides key=value")
    return ap.parse_args(argv)


def model_spec(cfg: Config) -> tuple[ModelSpec, str]:
    """The model's description for the planner and where its LLM shape came from; reads at most a ``config.json``."""
    if cfg.model.vlm is not None:  # the VLM family's config reader falls back to the published shapes itself
        return describe(cfg.model), hf_config_source(cfg.model.vlm)
    family = family_of(cfg.model)
    path = family.model_dir(cfg.model)
    if path is None or (Path(path) / "config.json").is_file():
        return describe(cfg.model), f"{path}/config.json" if path else f"{family.section}.hf_config"
    name, raw = published_config_for(path, family.section)
    return describe(cfg.model, published=raw), f"the published shape of {name} ({path} holds no config.json yet)"


def llm_dims(cfg: Config, described: tuple[ModelSpec, str] | None = None) -> tuple[dict[str, int], str]:
    """The cost model's LLM dimensions and where they came from (``described``: :func:`model_spec`'s answer, asked
    here when not given; a ``model.vlm`` recipe: its language model's)."""
    spec, where = described or model_spec(cfg)
    return spec.dims, where


def published_config_for(path: str, section: str = "model.llm") -> tuple[str, dict[str, Any]]:
    """The shipped model config whose ``model.llm.path`` is ``path``, and its LLM's published config.json."""
    for name in model_types():
        if name in PUBLISHED_LLM_CONFIGS and load_config(preset_path(name)).model.llm.path == path:
            return name, PUBLISHED_LLM_CONFIGS[name]
    raise FileNotFoundError(
        f"{section}.path={path}: no config.json there and no shipped model config uses this path, so its shape "
        f"is unknown; put the model's config.json there (no weights needed) or set {section}.hf_config")


@dataclass(frozen=True)
class Verdict:
    plan: StagePlan
    stage_gib: list[float]
    limit_gib: float

    @property
    def fits(self) -> bool:
        return max(self.stage_gib) <= self.limit_gib


def plan_of(cfg: Config, spec: ModelSpec, dp: int) -> StagePlan:
    """The trainer's plan: the model family's plan of ``spec`` (``lavis.families.plan``)."""
    return plan_model(spec, cfg, dp)


def assess(cfg: Config, spec: ModelSpec, dp: int, limit_gib: float) -> Verdict:
    """The plan the trainer would make (within ``limit_gib`` where any split fits, else the FLOP-balanced one) and
    each stage's estimated GiB."""
    limited = with_values(cfg, {"train.parallel.gpu_memory_gib": limit_gib})
    try:
        plan = plan_of(limited, spec, dp)
    except ValueError as e:
        if "fits" not in str(e):
            raise
        plan = plan_of(with_values(cfg, {"train.parallel.gpu_memory_gib": None}), spec, dp)
    n = len(plan.parts) - 1
    gib = [stage_memory_bytes(plan.costs[plan.parts[s]:plan.parts[s + 1]], s, n, plan.work, plan.optim_bytes) / 2**30
           for s in range(n)]
    return Verdict(plan, gib, limit_gib)


def knob_options(cfg: Config, gpus: int) -> list[tuple[str, list[str]]]:
    """What could make a run fit, cheapest first, as ``--options`` to try; only knobs not already turned and none
    whose key the model family's list of unsupported options names."""
    t, llm = cfg.train, cfg.model.llm
    knobs: list[tuple[str, list[str]]] = []
    for stages in range(t.parallel.num_stages + 1, gpus + 1):
        if gpus % stages == 0:
            knobs.append((f"more stages: train.parallel.num_stages={stages}", [f"train.parallel.num_stages={stages}"]))
            break
    if t.parallel.partition is None and t.parallel.num_stages * 2 > gpus:
        stages = t.parallel.num_stages * 2
        knobs.append((f"more stages on more GPUs: train.parallel.num_stages={stages} (needs {stages} GPUs)",
                      [f"train.parallel.num_stages={stages}"]))
    if t.parallel.activation_checkpoint_interval == 0:
        knobs.append(("recompute every decoder block: train.parallel.activation_checkpoint_interval=1",
                      ["train.parallel.activation_checkpoint_interval=1"]))
    if t.optim.optimizer == "adamw" and t.optim.zero_stage == 0 and not t.optim.offload_optimizer:
        knobs.append(("8-bit optimizer states: train.optim.optimizer=adamw8bit", ["train.optim.optimizer=adamw8bit"]))
        if t.precision == "bf16":
            knobs.append(("bf16 weights without fp32 master copies: train.optim.optimizer=adamw_bf16",
                          ["train.optim.optimizer=adamw_bf16"]))
    if t.parallel.activation_offload is not True:
        knobs.append(("saved activations in host memory: train.parallel.activation_offload=true",
                      ["train.parallel.activation_offload=true"]))
    if not t.optim.offload_optimizer and t.precision != "fp32" and t.optim.optimizer != "adamw_bf16":
        knobs.append(("optimizer state in host RAM: train.optim.zero_stage=1 train.optim.offload_optimizer=true",
                      ["train.optim.zero_stage=1", "train.optim.offload_optimizer=true"]))
    if not llm.frozen and llm.lora is None:
        knobs.append(("LoRA instead of full fine-tuning: model.llm.frozen=true model.llm.lora={r: 64, targets: "
                      "all-linear}", ["model.llm.frozen=true", "model.llm.lora={r: 64, targets: all-linear}"]))
    if cfg.model.vlm is not None and not cfg.model.vlm.freeze_llm:
        knobs.append(("LoRA instead of training the VLM's language model: model.vlm.freeze_llm=true "
                      "model.vlm.lora={r: 64, targets: all-linear}",
                      ["model.vlm.freeze_llm=true", "model.vlm.lora={r: 64, targets: all-linear}"]))
    if cfg.data.max_txt_len >= 256:
        half = cfg.data.max_txt_len // 2
        knobs.append((f"shorter samples: data.max_txt_len={half}", [f"data.max_txt_len={half}"]))
    refused = " ".join(key for key, _ in family_of(cfg.model).unsupported_options(cfg))  # the family's refusals
    return [(text, options) for text, options in knobs if not any(o.split("=")[0] in refused for o in options)]


def _layout(cfg: Config, gpus: int | None) -> tuple[int, int]:
    stages = cfg.train.parallel.num_stages
    gpus = stages if gpus is None else gpus
    if gpus < 1 or gpus % stages:
        raise ValueError(f"--gpus {gpus}: the recipe has train.parallel.num_stages={stages}; the GPU count must be a "
                         "multiple of it (stages x data-parallel replicas)")
    return gpus, gpus // stages


FITS_MODELS = ("qwen7b_chat", "qwen14b_chat", "vicuna0_7b", "vicuna0_13b")
FITS_MODES = {
    "full SFT, AdamW states on the GPU": ["model.llm.frozen=false"],
    "full SFT, ZeRO-1 + optimizer offload": ["model.llm.frozen=false", "train.optim.zero_stage=1",
                                             "train.optim.offload_optimizer=true"],
    "LoRA r=64 all-linear": ["model.llm.frozen=true", "model.llm.lora={r: 64, targets: all-linear}"],
    "QLoRA (NF4) r=64 all-linear": ["model.llm.frozen=true", "model.llm.lora={r: 64, targets: all-linear}",
                                    "model.llm.quantize=nf4"],
}
FITS_COMMON = ["train.precision=bf16", "train.batch.micro_batch_size=1", "data.max_txt_len=512",
               "train.parallel.activation_checkpoint_interval=1", "model.projection.frozen=false"]
FITS_GPUS = (2, 4, 6, 8)


def fits_table(limit_gib: float) -> str:
    """Markdown: for each shipped LLM and training mode, the largest stage's estimate with N stages on N GPUs."""
    head = f"| model | training | {' | '.join(f'{n} x {limit_gib:g} GB' for n in FITS_GPUS)} |"
    rows = [head, "|" + "---|" * (2 + len(FITS_GPUS))]
    for name in FITS_MODELS:
        for mode, options in FITS_MODES.items():
            cells = []
            for n in FITS_GPUS:
                cfg = load_config(preset_path(name), [*FITS_COMMON, *options, f"train.parallel.num_stages={n}"])
                v = assess(cfg, model_spec(cfg)[0], 1, limit_gib)
                cells.append(f"{'fits' if v.fits else 'no'} ({max(v.stage_gib):.1f})")
            rows.append(f"| {name} | {mode} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.fits_table:
        print(fits_table(a.gpu_memory_gib or DEFAULT_GPU_GIB))
        return 0
    cfg = load_config(a.cfg_path, a.options)
    gpus, dp = _layout(cfg, a.gpus)
    limit = a.gpu_memory_gib or cfg.train.parallel.gpu_memory_gib or DEFAULT_GPU_GIB
    described = model_spec(cfg)
    spec = described[0]
    dims, where = llm_dims(cfg, described)
    t = cfg.train
    print(f"config: {a.cfg_path}\nLLM: hidden {dims['hidden_size']}, {dims['num_hidden_layers']} blocks, vocab "
          f"{dims['vocab_size']} ({where})\nlayout: {t.parallel.num_stages} stage(s) x {dp} replica(s) on {gpus} "
          f"GPU(s) of {limit:g} GiB; micro-batch {t.batch.micro_batch_size} x {cfg.data.max_txt_len} tokens, "
          f"{t.precision}, ZeRO-{t.optim.zero_stage}{' + optimizer offload' if t.optim.offload_optimizer else ''}")
    verdict = assess(cfg, spec, dp, limit)
    p = verdict.plan
    print(format_plan(p.parts, p.costs, p.work, p.optim_bytes))
    worst = max(range(len(verdict.stage_gib)), key=verdict.stage_gib.__getitem__)
    if verdict.fits:
        print(f"fits: every stage's estimate is within {limit:g} GiB (largest: stage {worst}, "
              f"{verdict.stage_gib[worst]:.2f} GiB). Estimates, not measurements.")
        return 0
    print(f"does not fit: stage {worst} needs about {verdict.stage_gib[worst]:.2f} GiB > {limit:g} GiB")
    print("knobs, cheapest first (each tried alone on top of this recipe):")
    for text, options in knob_options(cfg, gpus):
        tried = load_config(a.cfg_path, [*a.options, *options])
        tried_gpus = max(gpus, tried.train.parallel.num_stages)
        v = assess(tried, model_spec(tried)[0], tried_gpus // tried.train.parallel.num_stages, limit)
        print(f"  {'FITS' if v.fits else 'no  '}  {text}: largest stage {max(v.stage_gib):.2f} GiB")
    return 1


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
