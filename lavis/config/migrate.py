"""``python -m lavis.config.migrate PREDECESSOR.yaml [-o OUT.yaml]``: a predecessor's train/eval config -> our recipe.

Reads the LAVIS-style YAML of MPP-Qwen-Next / MiniGPT4Qwen (``lavis/projects/pp_qwen7b_video/*.yaml``,
``pp_qwen14b/*.yaml``: ``model:`` with ``arch: minigpt4qwen``, ``datasets:``, ``run:`` with ``deepspeed_config``)
or MiniGPT-4 (``train_configs/*.yaml``, ``eval_configs/*.yaml``) and writes one of our recipes:

- model: ``base:`` the matching model config in ``lavis/projects/models/`` (weight paths in the predecessors'
  ``cache/ckpt`` layout), freezing, query count, image size, LLM path and ``model.checkpoint``;
- data: each dataset builder name -> our format and the predecessor's ``cache/dataset`` path (DATA.md);
- schedule: epochs and warmup ratio -> optimizer steps, computed the way the predecessor's own training script
  counts them, from the dataset sizes (the annotation files are read when present) or ``--num-samples``;
- DeepSpeed settings: micro-batch, gradient accumulation, precision, ZeRO stage and offload, clipping, AdamW.

Every key of the file gets one printed line: what it maps to, or that it has no equivalent and why. The result is
loaded strictly (:func:`lavis.config.load.load_config`) before the command returns. For MPP files it also prints the
original's and our global batch, LR schedule shape, max length and precision side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lavis.config.load import ConfigError, load_config, predecessor_kind
from lavis.config.presets import MODELS_DIR
from lavis.config.schema import Config

MPP, MINIGPT4 = "MPP-Qwen-Next / MiniGPT4Qwen", "MiniGPT-4"
CACHE = "cache"
"""MPP resolves relative paths (``ckpt/...``, dataset ``storage``) under its ``cache_root``, ``cache/``."""


@dataclass(frozen=True)
class DatasetSpec:
    ann_path: str
    vis_root: str
    format: str
    note: str = ""


MPP_DATASETS: dict[str, DatasetSpec] = {
    # storage paths of MPP's lavis/configs/datasets/*/defaults*.yaml, under cache/
    "llava_pretrain": DatasetSpec(
        "cache/dataset/llava_pretrain/blip_laion_cc_sbu_558k/llava_pretrain_minigpt4qwen_format.json",
        "cache/dataset/llava_pretrain/blip_laion_cc_sbu_558k/images", "mpp"),
    "llava_instruct_156k": DatasetSpec("cache/dataset/llava_instruct/llava_instruction_156k.json",
                                       "cache/dataset/llava_instruct/coco/train2017", "mpp"),
    "llava_instruct_100k": DatasetSpec("cache/dataset/llava_instruct/llava_instruction_100k.json",
                                       "cache/dataset/llava_instruct/coco/train2017", "mpp"),
    "llava_instruction": DatasetSpec("cache/dataset/llava/llava_minigpt4qwen_format.json", "cache/dataset/llava/image",
                                     "mpp"),
    "minigpt4_instruction": DatasetSpec("cache/dataset/minigpt4/minigpt4_minigpt4qwen_format.json",
                                        "cache/dataset/minigpt4/image", "mpp"),
    "videochatgpt_100k": DatasetSpec("cache/dataset/videochatgpt/videochatgpt_instruction_100k.json",
                                     "cache/dataset/videochatgpt/videochatgpt_tune", "videochatgpt",
                                     "32 frames per clip (its max_frames), each frame augmented on its own"),
}
LLAVA_PRETRAIN_558K = DatasetSpec(
    "cache/dataset/llava_pretrain/blip_laion_cc_sbu_558k/blip_laion_cc_sbu_558k.json",
    "cache/dataset/llava_pretrain/blip_laion_cc_sbu_558k/images", "llava_pretrain",
    "MiniGPT-4 reads LAION / CC+SBU webdataset tar shards, which we have no reader for; substituted "
    "LLaVA-Pretrain-558k (a BLIP-captioned LAION/CC/SBU subset, as lavis/projects/minigpt4/vicuna7b_stage1.yaml); "
    "replace data.train with your own canonical files to keep the original pairs")
MINIGPT4_DATASETS: dict[str, DatasetSpec] = {
    "laion": LLAVA_PRETRAIN_558K,
    "cc_sbu": LLAVA_PRETRAIN_558K,
    "cc_sbu_align": DatasetSpec(
        "cache/dataset/cc_sbu_align/cc_sbu_align.jsonl", "cache/dataset/cc_sbu_align/image", "canonical",
        "its filter_cap.json as canonical JSONL, one line per caption (lavis/projects/minigpt4/vicuna7b_stage2.yaml "
        "shows the record)"),
}

LAYOUTS: dict[str, tuple[int, int, str]] = {
    # run.output_dir -> (pipeline stages, data-parallel replicas, where the predecessor says so)
    "lavis/output/pp_7b_video/pretrain": (2, 4, "MPP-Qwen-Next README: 8x3090, --num-stages 2 (pp=2, dp=4)"),
    "lavis/output/pp_7b_video/sft_video": (8, 1, "MPP-Qwen-Next README: 8x3090, --num-stages 8 (pp=8, dp=1)"),
    "lavis/output/pp_7b_video/sft_video_wo-pretrain": (8, 1, "as MPP-Qwen-Next's sft.yaml (pp=8, dp=1)"),
    "lavis/output/pp_14b/pretrain": (2, 1, "MPPQwen14B README: --nproc_per_node=2 --num-stages 2"),
    "lavis/output/pp_14b/sft_100k": (6, 1, "MPPQwen14B README: --nproc_per_node=6 --num-stages 6"),
    "lavis/output/pp_14b/sft": (6, 1, "MPPQwen14B README: 6x4090 (pp=6)"),
    "lavis/output/pp_14b/sft_video": (6, 1, "MPPQwen14B README: 6x4090 (pp=6)"),
    "output/minigpt4_stage1_pretrain": (2, 2, "MiniGPT-4 ran stage 1 on 4 GPUs; here the same 4 as PP2 x DP2"),
    "output/minigpt4_stage2_finetune": (2, 1, "MiniGPT-4 ran stage 2 on 1 GPU; here 2 x 24 GB as PP2"),
}
MINIGPT4_GPUS = {"output/minigpt4_stage1_pretrain": 4, "output/minigpt4_stage2_finetune": 1}
"""GPUs the MiniGPT-4 run used (its README): its global batch is datasets.*.batch_size x this."""

NO_EFFECT_MPP: dict[str, str] = {
    "model.load_pretrained": "the BLIP-2 checkpoint is model.qformer.checkpoint (set by the model config)",
    "model.vit_model": "EVA ViT-g is the model config's vision tower (model.vision.*)",
    "model.drop_path_rate": "no stochastic depth in our ViT (0 in every predecessor file)",
    "model.use_grad_checkpoint": "ViT checkpointing: a frozen ViT runs under no_grad in ours and keeps no activations",
    "model.vit_precision": "MPP's pipeline casts the whole model to bf16 (model.cuda().bfloat16()); ours runs the "
                           "ViT in train.precision too (model.vision.precision: fp16 gives LAVIS's fp16 ViT)",
    "model.qformer_text_input": "our Q-Former is always query-only (text input was off in every predecessor file)",
    "model.freeze_queries": "query_tokens train or freeze with the Q-Former (model.qformer.frozen)",
    "model.enable_autocast": "no separate ViT autocast; the model runs in train.precision",
    "model.lora_alpha": "LoRA is not implemented here (get_lora: false in every predecessor file)",
    "model.lora_r": "LoRA is not implemented here",
    "model.lora_dropout": "LoRA is not implemented here",
    "model.apply_lemmatizer": "evaluation-only option of LAVIS",
    "model.llm_device_map": "training option of MPP's non-pipeline path; chat has --llm_device_map",
    "run.task": "one task: multimodal chat training",
    "run.world_size": "the launcher (deepspeed / torchrun) gives the world size",
    "run.dist_url": "the launcher sets up the process group",
    "run.distributed": "the launcher sets up the process group",
    "run.gpu": "the launcher assigns devices",
    "run.lr_sched": "ours is one schedule: linear warmup, then cosine to train.min_lr, per optimizer step",
    "run.deepspeed_config.steps_per_print": "we log every train.log_every steps ourselves",
    "run.deepspeed_config.wall_clock_breakdown": "python -m lavis.bench measures per-stage time",
    "run.deepspeed_config.dump_state": "DeepSpeed debug output",
    "run.deepspeed_config.optimizer.type": "ours is always AdamW (what every predecessor file uses)",
    "run.deepspeed_config.zero_optimization.allgather_partitions": "DeepSpeed's default (ZeRO-1 tuning)",
    "run.deepspeed_config.zero_optimization.allgather_bucket_size": "DeepSpeed's default (ZeRO-1 tuning)",
    "run.deepspeed_config.zero_optimization.overlap_comm": "DeepSpeed's default (ZeRO-1 tuning)",
    "run.deepspeed_config.zero_optimization.reduce_scatter": "DeepSpeed's default (ZeRO-1 tuning)",
    "run.deepspeed_config.zero_optimization.reduce_bucket_size": "DeepSpeed's default (ZeRO-1 tuning)",
    "run.deepspeed_config.zero_optimization.contiguous_gradients": "DeepSpeed's default (ZeRO-1 tuning)",
    "run.deepspeed_config.zero_optimization.offload_optimizer.pin_memory": "pinned when CUDA is present",
    "run.deepspeed_config.fp16.loss_scale": "ours: dynamic loss scaling from 2^16 (fp16 only)",
    "run.deepspeed_config.fp16.loss_scale_window": "DeepSpeed's default (fp16 only)",
    "run.deepspeed_config.fp16.initial_scale_power": "ours: 16 (fp16 only)",
    "run.deepspeed_config.fp16.hysteresis": "DeepSpeed's default (fp16 only)",
    "run.deepspeed_config.fp16.min_loss_scale": "DeepSpeed's default (fp16 only)",
}
NO_EFFECT_MINIGPT4: dict[str, str] = {
    "model.end_sym": "the template's own end token (vicuna_v0: ###, llama2: </s>), trained as MiniGPT-4 does",
    "model.prompt_template": "the template (model.llm.template of the model config) lays out every turn",
    "model.prompt_path": "stage-2 questions come from the data records (DATA.md); any line of "
                         "prompts/alignment.txt can be written into them",
    "model.prompt": "stage 1 has no prompt in MiniGPT-4 either; ours renders the template around the caption",
    "model.low_resource": "inference option: chat --load-8bit loads the LLM's linear layers in int8",
    "model.image_size": "model.vision.image_size of the model config (224)",
    "model.drop_path_rate": "no stochastic depth in our ViT",
    "model.use_grad_checkpoint": "a frozen ViT keeps no activations in ours",
    "model.vit_precision": "ours runs the ViT in train.precision (model.vision.precision: fp16 gives LAVIS's)",
    "model.num_query_token": "model.qformer.num_query_tokens of the model config (32)",
    "run.task": "one task: multimodal chat training",
    "run.lr_sched": "MiniGPT-4's linear_warmup_cosine_lr decays per epoch (a staircase); ours decays per step",
    "run.evaluate": "no evaluation loop during training",
    "run.train_splits": "data.train lists the training files",
    "run.device": "CUDA when present, gloo on CPU otherwise",
    "run.world_size": "the launcher gives the world size",
    "run.dist_url": "the launcher sets up the process group",
    "run.distributed": "the launcher sets up the process group",
    "run.job_name": "the run is named by train.output_dir",
    "run.name": "the run is named by train.output_dir",
    "run.save_path": "evaluation output of MiniGPT-v2",
}


@dataclass
class Migration:
    """The keys of one predecessor file, consumed as they are mapped, and the lines that say what happened."""

    src: dict[str, Any]
    out: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    dp: int = 1
    """Data-parallel replicas of the layout (not a config key: processes = stages x dp)."""

    def has(self, key: str) -> bool:
        return key in self.src

    def get(self, key: str, default: Any = None) -> Any:
        return self.src.get(key, default)

    def set(self, target: str, value: Any) -> None:
        node = self.out
        *parents, leaf = target.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def map(self, key: str, target: str, value: Any, note: str = "") -> None:
        """``key`` (if present) -> ``target: value`` (also written when ``key`` is absent: a derived value)."""
        if target:
            self.set(target, value)
        shown = f"{key}: {yaml_literal(self.src[key])}" if key in self.src else key
        self.lines.append(f"{shown} -> {target}: {yaml_literal(value)}" + (f"  ({note})" if note else ""))
        self.done.add(key)

    def drop(self, key: str, why: str) -> None:
        if key in self.src and key not in self.done:
            self.lines.append(f"{key}: {yaml_literal(self.src[key])} -> no equivalent: {why}")
            self.done.add(key)

    def note(self, key: str, text: str) -> None:
        self.lines.append(f"{key}: {yaml_literal(self.src[key])} -> {text}" if key in self.src else f"{key}: {text}")
        self.done.add(key)

    def leftovers(self) -> None:
        for key in self.src:
            if key not in self.done:
                self.drop(key, "not a key the migrator knows; nothing was applied for it")


def yaml_literal(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys (lists stay values)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _float(v: Any) -> float:
    return float(v)  # YAML 1.1 reads 1e-3 (no dot) as a string


def _path_under_cache(p: str) -> str:
    """MPP's relative paths (``ckpt/...``) live under ``cache/``; absolute paths stay as they are."""
    if not p or os.path.isabs(p) or p.startswith(CACHE + "/"):
        return p
    return f"{CACHE}/{p}"


# --- sample counts and steps ----------------------------------------------------------------------------------------


def count_samples(entries: list[dict[str, Any]], given: list[int] | None) -> tuple[list[int], str]:
    """Records per dataset: ``--num-samples`` (one total or one per dataset), else read from the annotation files."""
    from lavis.data.datasets import read_raw

    if given:
        if len(given) == len(entries):
            return list(given), "--num-samples"
        if len(given) == 1:
            return [given[0]], "--num-samples (total)"
        raise ConfigError(f"--num-samples: give one total or one count per dataset ({len(entries)}), not {len(given)}")
    counts = []
    for e in entries:
        path = Path(e["ann_path"])
        if not path.is_file():
            raise ConfigError(f"cannot count the samples of {path} (not found from {Path.cwd()}): run from the "
                              "directory holding cache/, or pass --num-samples N (one total or one per dataset)")
        counts.append(len(read_raw(path)))
    return counts, "counted in the annotation files"


def mpp_steps_per_epoch(num_samples: int, dp: int, micro: int, gas: int) -> int:
    """MPP's ``train_pipeline.py``: a DistributedSampler (ceil(N / DP) per replica), a DataLoader with
    ``drop_last=True``, then ``ceil(len(loader) / GAS)`` optimizer steps per epoch."""
    return math.ceil((math.ceil(num_samples / dp) // micro) / gas)


def mpp_lr(step: int, *, warmup: int, total: int, lr: float, min_lr: float, warmup_lr: float) -> float:
    """MPP's ``linear_warmup_cosine_lr_step-wise`` at optimizer step ``step`` (epoch 0 holds the warmup)."""
    if step <= warmup:
        return min(lr, warmup_lr + (lr - warmup_lr) * step / max(warmup, 1))
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup))) + min_lr


# --- MPP-Qwen-Next --------------------------------------------------------------------------------------------------


@dataclass
class Args:
    num_samples: list[int] | None = None
    num_stages: int | None = None
    dp: int | None = None
    model_type: str | None = None
    micro_batch_size: int | None = None
    gpu_memory_gib: float | None = None
    pred_gpus: int | None = None


@dataclass
class Original:
    """What the predecessor's own script would run, computed from its file (for the side-by-side table)."""

    micro: int
    gas: int
    dp: int
    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float
    warmup_lr: float
    """LR at the start of the warmup: run.warmup_lr, or init_lr when the file has none (LAVIS's rule)."""
    max_len: int
    precision: str
    epochs: str


def _layout(m: Migration, args: Args) -> tuple[int, int]:
    out_dir = str(m.get("run.output_dir", "")).strip("/")
    known = LAYOUTS.get(out_dir)
    stages = args.num_stages or (known[0] if known else 2)
    dp = args.dp or (known[1] if known else 1)
    src = ("--num-stages/--dp" if args.num_stages or args.dp else known[2] if known
           else "not in the file; assumed PP2 x DP1, pass --num-stages/--dp")
    m.lines.append(f"(layout) -> train.num_stages: {stages}, data-parallel replicas {dp}  ({src}; launch "
                   f"{stages * dp} processes)")
    m.set("train.num_stages", stages)
    m.dp = dp
    return stages, dp


def _model_common(m: Migration, preset: str, out_dir: Path) -> None:
    path = MODELS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"no model config {path.name} in {MODELS_DIR} for this file; pass --model-type NAME")
    m.out["base"] = os.path.relpath(path, out_dir)
    m.lines.append(f"(model) -> base: {m.out['base']}  (lavis/projects/models/{preset}.yaml: vision, Q-Former, LLM "
                   "shapes and weight paths)")


def _freeze(m: Migration, key: str, target: str, default: bool) -> None:
    value = bool(m.get(key, default))
    m.map(key, target, value, "" if m.has(key) else f"predecessor default {default}")


def migrate_mpp(m: Migration, args: Args, out_dir: Path) -> Original:
    model_type = args.model_type or m.get("model.model_type", "qwen7b_chat")
    _model_common(m, model_type, out_dir)
    if m.has("model.model_type"):
        m.note("model.model_type", f"base: {model_type} (above)")
    m.note("model.arch", "this file's family (MPP-Qwen-Next); nothing to set")
    preset = load_config(MODELS_DIR / f"{model_type}.yaml")
    llm = _path_under_cache(str(m.get("model.llm_model", "")))
    if llm and llm != preset.model.llm.path:
        m.map("model.llm_model", "model.llm.path", llm, "MPP resolves it under cache/")
        m.set("model.llm.tokenizer", llm)
        m.lines.append(f"(model.llm_model) -> model.llm.tokenizer: {llm}  (its qwen.tiktoken)")
    elif llm:
        m.note("model.llm_model", f"model.llm.path: {llm} (as the model config)")
    if m.has("model.pretrained"):
        pre = _path_under_cache(str(m.get("model.pretrained")))
        if pre and pre != preset.model.qformer.checkpoint:
            m.map("model.pretrained", "model.qformer.checkpoint", pre, "BLIP-2 Q-Former, query_tokens, ln_vision")
        else:
            m.note("model.pretrained", f"model.qformer.checkpoint: {pre} (as the model config)")
    finetuned = str(m.get("model.finetuned") or "")
    if m.get("model.load_finetuned") and finetuned:
        exists = Path(finetuned).is_file()
        m.map("model.finetuned", "model.checkpoint", finetuned,
              "loaded on top of the base weights" + ("" if exists else "; not found here: point it at your stage-1 "
                                                     "model.pth (pipe_proj2pth.py output)"))
        m.note("model.load_finetuned", "model.checkpoint is set")
    else:
        m.drop("model.finetuned", "load_finetuned is false: no model.checkpoint")
        m.drop("model.load_finetuned", "no model.checkpoint")
    m.drop("model.finetuned", "load_finetuned is false")
    if m.has("model.image_size") and int(m.get("model.image_size")) != preset.model.vision.image_size:
        m.map("model.image_size", "model.vision.image_size", int(m.get("model.image_size")))
    elif m.has("model.image_size"):
        m.note("model.image_size", f"model.vision.image_size: {preset.model.vision.image_size} (as the model config)")
    if m.has("model.num_query_token") and int(m.get("model.num_query_token")) != preset.model.qformer.num_query_tokens:
        m.map("model.num_query_token", "model.qformer.num_query_tokens", int(m.get("model.num_query_token")))
    elif m.has("model.num_query_token"):
        m.note("model.num_query_token", "model.qformer.num_query_tokens: 32 (as the model config)")
    _freeze(m, "model.freeze_vit", "model.vision.frozen", True)
    _freeze(m, "model.freeze_qformer", "model.qformer.frozen", False)
    _freeze(m, "model.freeze_proj", "model.projection.frozen", False)
    _freeze(m, "model.freeze_llm", "model.llm.frozen", True)
    if m.get("model.unfreeze_pos_embed"):
        raise ConfigError("model.unfreeze_pos_embed: true (a frozen ViT with a trainable position embedding) has no "
                          "equivalent here; train the whole ViT (model.vision.frozen: false) or keep it frozen")
    m.drop("model.unfreeze_pos_embed", "false: the position embedding follows the ViT's freezing")
    if m.get("model.get_lora"):
        raise ConfigError("model.get_lora: true: LoRA is not implemented here; train the full LLM "
                          "(model.llm.frozen: false) instead")
    m.drop("model.get_lora", "false: LoRA is not implemented here")
    max_len = int(m.get("model.max_txt_len", 512))
    m.map("model.max_txt_len", "data.max_txt_len", max_len,
          "tokens per sample, image placeholders included; ours pads each micro-batch to its longest sample "
          "(data.fixed_length: true pads to max_txt_len as MPP does)")
    for key, why in NO_EFFECT_MPP.items():
        m.drop(key, why)

    _datasets(m, MPP_DATASETS)
    _, dp = _layout(m, args)
    ds = "run.deepspeed_config."
    micro = int(m.get(ds + "train_micro_batch_size_per_gpu", 1))
    gas = int(m.get(ds + "gradient_accumulation_steps", 1))
    counts, how = count_samples(m.out["data"]["train"], args.num_samples)
    n = sum(counts)
    epochs = int(m.get("run.max_epoch", 1))
    per_epoch = mpp_steps_per_epoch(n, dp, micro, gas)
    total = epochs * per_epoch
    if m.has("run.warmup_ratio"):
        warmup = int(_float(m.get("run.warmup_ratio")) * per_epoch)
        wnote = f"int({m.get('run.warmup_ratio')} x {per_epoch} steps of one epoch), as MPP's train_pipeline.py"
        m.map("run.warmup_ratio", "train.warmup_steps", warmup, wnote)
    else:
        warmup = int(m.get("run.warmup_steps", 0))
        m.map("run.warmup_steps", "train.warmup_steps", warmup)
    m.map("run.max_epoch", "train.max_steps", total,
          f"{epochs} epoch(s) x {per_epoch} steps; {n} samples ({how}: {', '.join(map(str, counts))}), "
          f"ceil(floor(ceil({n} / DP {dp}) / micro {micro}) / GAS {gas}) per epoch, as MPP counts them")
    precision = _precision(m)
    lr = _float(m.get("run.init_lr", m.get(ds + "optimizer.params.lr", 1e-4)))
    min_lr = _float(m.get("run.min_lr", 0.0))
    warmup_lr = _float(m.get("run.warmup_lr", -1))
    m.map("run.init_lr", "train.lr", lr)
    m.map("run.min_lr", "train.min_lr", min_lr, "end of the cosine")
    if m.has("run.warmup_lr"):
        m.note("run.warmup_lr", "ours warms up linearly from lr / warmup_steps (0 when warmup_lr is 0 up to one "
                                "step's offset)" if warmup_lr <= 0 else "ours warms up linearly from about 0, not "
                                f"from {warmup_lr}")
    _deepspeed(m, micro, gas, lr)
    _run_common(m)
    if args.gpu_memory_gib:
        m.set("train.gpu_memory_gib", args.gpu_memory_gib)
        m.lines.append(f"(--gpu-memory-gib) -> train.gpu_memory_gib: {args.gpu_memory_gib}")
    m.set("train.activation_checkpoint_interval", 1)
    m.lines.append("(train_pipeline.py --llm-grad-ckpt, on by default in MPP) -> train.activation_checkpoint_interval"
                   ": 1  (MPP's flag turns checkpointing OFF when given; ours: set the interval to 0)")
    return Original(micro, gas, dp, total, warmup, lr, min_lr, warmup_lr if warmup_lr >= 0 else lr, max_len, precision,
                    f"{epochs} x {per_epoch}")


def _datasets(m: Migration, table: dict[str, DatasetSpec]) -> None:
    names = list(dict.fromkeys(k.split(".")[1] for k in m.src if k.startswith("datasets.")))
    train: list[dict[str, Any]] = []
    seen: set[DatasetSpec] = set()
    transform: dict[str, Any] | None = None
    for name in names:
        p = f"datasets.{name}."
        spec = table.get(name)
        if spec is None:
            known = ", ".join(sorted(table))
            raise ConfigError(f"datasets.{name}: no known file layout for this dataset builder (known: {known}); "
                              "convert it to our canonical format (DATA.md) and list it in data.train")
        ann = m.get(p + "build_info.annotations.train.storage")
        img = m.get(p + "build_info.images.storage")
        entry = {"ann_path": _path_under_cache(ann) if ann else spec.ann_path,
                 "vis_root": _path_under_cache(img) if img else spec.vis_root, "format": spec.format}
        m.done |= {p + "build_info.annotations.train.storage", p + "build_info.images.storage"}
        if spec not in seen:
            train.append(entry)
            seen.add(spec)
            m.lines.append(f"datasets.{name} -> data.train[{len(train) - 1}]: {yaml_literal(entry)}"
                           + (f"  ({spec.note})" if spec.note else ""))
        else:
            m.lines.append(f"datasets.{name} -> data.train[{len(train) - 1}] (same substitute as above)")
        if spec.format == "videochatgpt":
            frames = int(m.get(p + "build_info.max_frames", 32))
            m.set("data.num_video_frames", frames)
            m.set("data.video_same_augment", False)
            m.lines.append(f"datasets.{name} (video) -> data.num_video_frames: {frames}, data.video_same_augment: "
                           "false  (MPP samples max_frames frames and augments each on its own)")
            m.done.add(p + "build_info.max_frames")
        vis = m.get(p + "vis_processor.train.name")
        if vis is not None:
            kind = {"blip2_image_train": "blip2_train", "blip_image_train": "blip2_train",
                    "blip2_image_eval": "eval", "blip_image_eval": "eval"}.get(str(vis))
            if kind is None:
                raise ConfigError(f"{p}vis_processor.train.name: {vis!r} has no equivalent transform here")
            t = {"kind": kind, "min_scale": 0.5, "hflip": kind == "blip2_train"}
            if table is MINIGPT4_DATASETS and kind == "blip2_train":
                t = {"kind": "eval", "hflip": False}  # MiniGPT-4's blip2_image_train is a bicubic squash since 2023
            if transform is not None and transform != t:
                raise ConfigError(f"{p}vis_processor: datasets use different transforms; ours has one per run")
            transform = t
            m.map(p + "vis_processor.train.name", "data.transform", t,
                  "RandomResizedCrop(0.5-1, bicubic) + flip, as MPP" if t["kind"] == "blip2_train" and
                  table is MPP_DATASETS else "bicubic squash to the model's image size" + (
                      " (MiniGPT-4's current blip2_image_train)" if table is MINIGPT4_DATASETS else ""))
        size = m.get(p + "vis_processor.train.image_size")
        if size is not None:
            m.note(p + "vis_processor.train.image_size", f"model.vision.image_size ({size} in every predecessor file)")
        for k in [k for k in m.src if k.startswith(p + "text_processor.")]:
            m.drop(k, "text goes through the chat template unchanged (MPP's base_instruction also returns it as "
                      "is; LAVIS's blip_caption lower-casing and word cut are not applied)")
        if m.has(p + "sample_ratio"):
            m.drop(p + "sample_ratio", "MiniGPT-4 picks a dataset per iteration by this ratio; ours mixes "
                                       "data.train[].weight x size records per epoch (one substitute here)")
        if m.has(p + "batch_size"):
            m.note(p + "batch_size", "train.micro_batch_size (below)")
        m.drop(p + "data_type", "images or videos follow from each record")
        m.drop(p + "build_info.storage", "webdataset shards have no reader here (see data.train)")
    if not train:
        raise ConfigError("the file lists no datasets: nothing to train on")
    m.set("data.train", train)
    if transform is not None:
        m.set("data.transform", transform)


def _precision(m: Migration) -> str:
    ds = "run.deepspeed_config."
    bf16, fp16 = bool(m.get(ds + "bf16.enabled", False)), bool(m.get(ds + "fp16.enabled", False))
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    m.map(ds + "bf16.enabled", "train.precision", precision,
          "MPP also casts every weight to bf16 (model.cuda().bfloat16())" if bf16 else "")
    m.note(ds + "fp16.enabled", f"train.precision: {precision}")
    return precision


def _deepspeed(m: Migration, micro: int, gas: int, lr: float) -> None:
    ds = "run.deepspeed_config."
    m.map(ds + "train_micro_batch_size_per_gpu", "train.micro_batch_size", micro)
    m.map(ds + "gradient_accumulation_steps", "train.grad_accum_steps", gas)
    if m.has(ds + "gradient_clipping"):
        m.map(ds + "gradient_clipping", "train.grad_clip", _float(m.get(ds + "gradient_clipping")),
              "global norm over all stages")
    p = ds + "optimizer.params."
    if m.has(p + "lr"):
        m.note(p + "lr", f"overwritten by the schedule at every step in MPP too; train.lr: {lr}")
    if m.has(p + "betas"):
        m.map(p + "betas", "train.betas", [float(b) for b in m.get(p + "betas")])
    if m.has(p + "eps"):
        m.map(p + "eps", "train.eps", _float(m.get(p + "eps")))
    if m.has(p + "weight_decay"):
        m.map(p + "weight_decay", "train.weight_decay", _float(m.get(p + "weight_decay")),
              "ours exempts biases and norms as LAVIS does")
    z = ds + "zero_optimization."
    stage = int(m.get(z + "stage", 0))
    if stage > 1:
        raise ConfigError(f"{z}stage: {stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    m.map(z + "stage", "train.zero_stage", stage)
    offload = m.get(z + "offload_optimizer.device")
    if offload is not None:
        if offload != "cpu" or stage != 1:
            raise ConfigError(f"{z}offload_optimizer.device: {offload!r}: only cpu offload with ZeRO stage 1 "
                              "works here")
        m.map(z + "offload_optimizer.device", "train.offload_optimizer", True, "optimizer state in host RAM")


def _run_common(m: Migration) -> None:
    if m.has("run.output_dir"):
        m.map("run.output_dir", "train.output_dir", str(m.get("run.output_dir")).rstrip("/"))
    if m.has("run.seed"):
        m.map("run.seed", "train.seed", int(m.get("run.seed")),
              "the predecessors add the rank to it; ours makes data order and augmentation a function of it alone")
    if m.has("run.num_workers"):
        m.map("run.num_workers", "data.num_workers", int(m.get("run.num_workers")))
    if m.has("run.log_freq"):
        m.map("run.log_freq", "train.log_every", int(m.get("run.log_freq")))
    if m.has("run.resume_ckpt_path"):
        m.drop("run.resume_ckpt_path", "a run resumes from train.output_dir/latest by itself (--resume requires it)")
    if m.has("run.wandb_log"):
        m.drop("run.wandb_log", "set train.wandb_project to log to Weights & Biases (off unless set)")


# --- MiniGPT-4 ------------------------------------------------------------------------------------------------------


def migrate_minigpt4(m: Migration, args: Args, out_dir: Path) -> None:
    if m.get("model.arch") == "minigpt_v2":
        raise ConfigError("MiniGPT-v2 configs (arch: minigpt_v2: 448 px, no Q-Former, LoRA) have no equivalent here")
    mt = str(m.get("model.model_type", "pretrain_vicuna0"))
    default = {"pretrain_vicuna0": "vicuna0_7b", "pretrain_llama2": "minigpt4_llama2"}.get(mt)
    preset = args.model_type or default
    if preset is None:
        raise ConfigError(f"model.model_type: {mt!r} is not a MiniGPT-4 variant we know; pass --model-type NAME")
    _model_common(m, preset, out_dir)
    m.note("model.model_type", f"base: {preset}" + ("" if args.model_type or mt != "pretrain_vicuna0" else
           " (7B or 13B is not in this file: MiniGPT-4 names the LLM in minigpt4/configs/models/; "
           "pass --model-type vicuna0_13b for 13B)"))
    m.note("model.arch", "this file's family (MiniGPT-4); nothing to set")
    if m.has("model.llama_model") and "please set" not in str(m.get("model.llama_model")):
        m.map("model.llama_model", "model.llm.path", str(m.get("model.llama_model")))
        m.set("model.llm.tokenizer", str(m.get("model.llama_model")))
    else:
        m.drop("model.llama_model", "a placeholder; the model config names the LLM directory")
    ckpt = str(m.get("model.ckpt") or "")
    if ckpt and "please set" not in ckpt and not ckpt.startswith("/path/to"):
        m.map("model.ckpt", "model.checkpoint", ckpt, "loaded on top of the base weights")
    else:
        m.drop("model.ckpt", "a placeholder in the file: set model.checkpoint (or chat -c) to the stage-1 / "
                             "released .pth")
    for key, target in (("model.freeze_vit", "model.vision.frozen"), ("model.freeze_qformer", "model.qformer.frozen")):
        _freeze(m, key, target, True)
    m.set("model.projection.frozen", False)
    m.set("model.llm.frozen", True)
    m.lines.append("(MiniGPT-4 trains llama_proj only) -> model.projection.frozen: false, model.llm.frozen: true")
    if m.has("model.max_txt_len"):
        m.map("model.max_txt_len", "data.max_txt_len", int(m.get("model.max_txt_len")),
              "MiniGPT-4 cuts the answer text at this many tokens; ours counts the whole sample, image "
              "placeholders included")
    else:
        m.map("model.max_txt_len", "data.max_txt_len", 160, "absent: MiniGPT-4 cuts captions at 32 tokens; ours "
              "counts the whole sample: 32 image placeholders + prompt + caption fit in 160")
    if m.has("model.has_qformer"):
        m.note("model.has_qformer", f"the model config ({preset})")
    for key, why in NO_EFFECT_MINIGPT4.items():
        m.drop(key, why)
    if not any(k.startswith("run.") and k != "run.task" for k in m.src):  # an eval config: model only
        _datasets_eval(m)
        return
    _datasets(m, MINIGPT4_DATASETS)
    _, dp = _layout(m, args)
    batch = sorted({int(v) for k, v in m.src.items() if k.startswith("datasets.") and k.endswith(".batch_size")})
    if len(batch) > 1:
        raise ConfigError(f"datasets.*.batch_size: {batch}: one micro-batch size per run here")
    per_gpu = (batch[0] if batch else 1) * int(m.get("run.accum_grad_iters", 1))
    gpus = args.pred_gpus or MINIGPT4_GPUS.get(str(m.get("run.output_dir", "")).strip("/"), dp)
    global_batch = per_gpu * gpus
    micro = args.micro_batch_size or (batch[0] if batch else 1)
    if global_batch % (micro * dp):
        raise ConfigError(f"global batch {global_batch} ({per_gpu} per GPU x {gpus} GPUs) is not a multiple of "
                          f"micro-batch {micro} x DP {dp}; pass --micro-batch-size / --dp")
    gas = global_batch // (micro * dp)
    m.set("train.micro_batch_size", micro)
    m.set("train.grad_accum_steps", gas)
    m.lines.append(f"(datasets.*.batch_size, run.accum_grad_iters) -> train.micro_batch_size: {micro}, "
                   f"train.grad_accum_steps: {gas}  (MiniGPT-4's global batch {global_batch} = {per_gpu} per GPU x "
                   f"{gpus} GPUs (--pred-gpus); ours {micro} x {gas} x DP {dp})")
    m.done.add("run.accum_grad_iters")
    epochs, iters = int(m.get("run.max_epoch", 1)), int(m.get("run.iters_per_epoch", 1))
    m.map("run.max_epoch", "train.max_steps", epochs * iters, f"{epochs} epochs x {iters} iters_per_epoch")
    m.note("run.iters_per_epoch", "train.max_steps (above)")
    m.map("run.warmup_steps", "train.warmup_steps", int(m.get("run.warmup_steps", 0)))
    m.map("run.init_lr", "train.lr", _float(m.get("run.init_lr", 1e-4)))
    m.map("run.min_lr", "train.min_lr", _float(m.get("run.min_lr", 0.0)))
    if m.has("run.warmup_lr"):
        m.note("run.warmup_lr", f"ours warms up linearly from about 0, not from {m.get('run.warmup_lr')}")
    m.map("run.weight_decay", "train.weight_decay", _float(m.get("run.weight_decay", 0.05)))
    beta2 = _float(m.get("run.beta2", 0.999))
    m.map("run.beta2", "train.betas", [0.9, beta2], "LAVIS's AdamW betas (0.9, beta2)")
    m.set("train.grad_clip", 0.0)
    m.lines.append("(no clipping in MiniGPT-4) -> train.grad_clip: 0.0")
    amp = bool(m.get("run.amp", False))
    m.map("run.amp", "train.precision", "bf16" if amp else "fp32",
          "MiniGPT-4's amp is fp16 autocast with a GradScaler; bf16 needs no scaler (Ampere or newer; "
          "train.precision: fp16 for older cards)" if amp else "")
    _run_common(m)
    if args.gpu_memory_gib:
        m.set("train.gpu_memory_gib", args.gpu_memory_gib)


def _datasets_eval(m: Migration) -> None:
    for k in [k for k in m.src if k.startswith("datasets.")]:
        m.drop(k, "an evaluation config: the model section is what chat and inspect use")
    m.set("data.transform", {"kind": "eval", "hflip": False})
    m.set("data.train", [])
    m.lines.append("(eval config) -> data.transform: {kind: eval}, data.train: []  (chat: cli_demo.py --cfg-path "
                   "OUT.yaml -c CHECKPOINT)")


# --- side by side ---------------------------------------------------------------------------------------------------


def side_by_side(orig: Original, cfg: Config, dp: int) -> list[tuple[str, str, str]]:
    """(quantity, predecessor, ours) rows; the values are computed independently from each config."""
    t = cfg.train
    steps = [orig.warmup_steps, (orig.warmup_steps + orig.total_steps) // 2, orig.total_steps - 1]
    from lavis.engine.optim import warmup_cosine

    rows = [
        ("global batch", f"{orig.micro * orig.gas * orig.dp} = {orig.micro} x {orig.gas} x DP{orig.dp}",
         f"{t.micro_batch_size * t.grad_accum_steps * dp} = {t.micro_batch_size} x {t.grad_accum_steps} x DP{dp}"),
        ("warmup steps", str(orig.warmup_steps), str(t.warmup_steps)),
        ("total steps", str(orig.total_steps), str(t.max_steps)),
        ("peak lr", f"{orig.lr:g}", f"{t.lr:g}"),
        ("min lr", f"{orig.min_lr:g}", f"{t.min_lr:g}"),
    ]
    for s in steps:
        a = mpp_lr(s, warmup=orig.warmup_steps, total=orig.total_steps, lr=orig.lr, min_lr=orig.min_lr,
                   warmup_lr=orig.warmup_lr)
        b = warmup_cosine(s, warmup=t.warmup_steps, total=t.max_steps, lr=t.lr, min_lr=t.min_lr)
        rows.append((f"lr at step {s}", f"{a:.4g}", f"{b:.4g}"))
    rows += [("max length", str(orig.max_len), str(cfg.data.max_txt_len)),
             ("precision", orig.precision, t.precision)]
    return rows


def format_rows(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "MPP (original)", "")])
    lines = [f"{'':{w0}}  {'MPP (original)':{w1}}  ours (migrated)"]
    lines += [f"{a:{w0}}  {b:{w1}}  {c}" + ("" if b == c else "   <- differs") for a, b, c in rows]
    return "\n".join(lines)


# --- driver ---------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    text: str
    """The recipe YAML."""
    lines: list[str]
    cfg: Config
    table: list[tuple[str, str, str]] | None
    dp: int


def migrate(path: str | Path, out: str | Path | None = None, args: Args | None = None) -> Result:
    """Translate the predecessor file ``path``; ``out`` is where the recipe will live (its ``base:`` is relative to
    it; None: the working directory). The recipe is checked by loading it strictly."""
    args = args or Args()
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    kind = predecessor_kind(raw)
    if kind is None:
        raise ConfigError(f"{path} has none of the predecessors' keys (model.arch, datasets, run): nothing to migrate")
    out_dir = (Path(out).resolve().parent if out is not None else Path.cwd())
    m = Migration(flatten(raw))
    orig: Original | None = None
    if kind == MPP:
        orig = migrate_mpp(m, args, out_dir)
    elif kind in (MINIGPT4, "MiniGPT-v2"):
        migrate_minigpt4(m, args, out_dir)
    else:
        raise ConfigError(f"{path}: a {kind} config; only MPP-Qwen-Next and MiniGPT-4 files are translated")
    m.leftovers()
    body = {k: m.out[k] for k in ("base", "model", "data", "train") if k in m.out}
    header = (f"# Translated from {path} ({kind}) by python -m lavis.config.migrate.\n"
              "# Every source key and what became of it is printed by that command.\n")
    text = header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=118)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out_dir, delete=False) as fh:
        fh.write(text)
    try:
        cfg = load_config(fh.name)
    finally:
        os.unlink(fh.name)
    table = side_by_side(orig, cfg, m.dp) if orig is not None else None
    return Result(text, m.lines, cfg, table, m.dp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lavis.config.migrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="an MPP-Qwen-Next (lavis/projects/pp_qwen*/...) or MiniGPT-4 (train_configs/, "
                                 "eval_configs/) YAML")
    ap.add_argument("-o", "--out", help="write the recipe here (default: print it on stdout)")
    ap.add_argument("--num-samples", type=int, nargs="+",
                    help="records per dataset (or one total), instead of counting the annotation files")
    ap.add_argument("--num-stages", type=int, help="pipeline stages (default: the predecessor's published layout)")
    ap.add_argument("--dp", type=int, help="data-parallel replicas (processes = stages x dp)")
    ap.add_argument("--model-type", help="model config in lavis/projects/models/ (default: from the file)")
    ap.add_argument("--micro-batch-size", type=int,
                    help="MiniGPT-4: split its per-GPU batch into micro-batches of this size (same global batch)")
    ap.add_argument("--gpu-memory-gib", type=float, help="also set train.gpu_memory_gib (the planner's per-GPU limit)")
    ap.add_argument("--pred-gpus", type=int,
                    help="MiniGPT-4: GPUs the original run used (its global batch = batch_size x this)")
    a = ap.parse_args(argv)
    args = Args(a.num_samples, a.num_stages, a.dp, a.model_type, a.micro_batch_size, a.gpu_memory_gib, a.pred_gpus)
    try:
        res = migrate(a.path, a.out, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = sys.stderr if a.out is None else sys.stdout
    for line in res.lines:
        print(line, file=info)
    if res.table:
        print("\n" + format_rows(res.table), file=info)
    if a.out is None:
        sys.stdout.write(res.text)
    elif not res.cfg.data.train:
        Path(a.out).write_text(res.text)
        print(f"\nwrote {a.out} (loads strictly; a model config, no training data). Chat with:\n  python "
              f"cli_demo.py --cfg-path {a.out} -c CHECKPOINT.pth", file=info)
    else:
        Path(a.out).write_text(res.text)
        stages = res.cfg.train.num_stages
        print(f"\nwrote {a.out} (loads strictly). Train with:\n  torchrun --nproc_per_node {stages * res.dp} "
              f"train_pipeline.py --cfg-path {a.out}   ({stages} stages x {res.dp} data-parallel replicas)", file=info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
