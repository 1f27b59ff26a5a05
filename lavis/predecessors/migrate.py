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

Every key of the file gets one printed line: what it maps to, or that it has no equivalent and why; a key or value
it cannot translate is refused naming it (the key table is :mod:`lavis.predecessors.keys`, which also generates
docs/MIGRATING.md's list: ``--table-md``). The result is loaded strictly (:func:`lavis.config.load.load_config`)
before the command returns. For MPP files it also prints the original's and our global batch, LR schedule shape, max
length and precision side by side; a value the original file does not state is marked ``(assumed)``, with why.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lavis.config.load import ConfigError, load_config, predecessor_kind, read_yaml
from lavis.config.presets import MODELS_DIR
from lavis.config.schema import Config
from lavis.data.datasets import read_raw
from lavis.engine.optim import warmup_cosine
from lavis.predecessors.keys import MINIGPT4, MPP, rule_for, table_markdown

CACHE = "cache"
"""MPP resolves relative paths (``ckpt/...``, dataset ``storage``) under its ``cache_root``, ``cache/``."""


@dataclass(frozen=True)
class DatasetSpec:
    ann_path: str
    vis_root: str
    format: str
    note: str = ""
    storage: str = ""
    """How MiniGPT-4's ``build_info.storage`` names the files: ``shards`` (a brace pattern of tar shards, the
    ann_path itself) or ``dir`` (cc_sbu_align's directory: ``filter_cap.json`` and ``image/``)."""


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
MINIGPT4_DATASETS: dict[str, DatasetSpec] = {
    # minigpt4/configs/datasets/{laion,cc_sbu}/defaults.yaml and cc_sbu/align.yaml: build_info.storage
    "laion": DatasetSpec("cache/dataset/laion_dataset/{00000..10488}.tar", "", "webdataset",
                         "LAION tar shards as img2dataset writes them (MiniGPT-4's storage pattern)", "shards"),
    "cc_sbu": DatasetSpec("cache/dataset/cc_sbu_dataset/{00000..01255}.tar", "", "webdataset",
                          "CC+SBU tar shards as img2dataset writes them (MiniGPT-4's storage pattern)", "shards"),
    "cc_sbu_align": DatasetSpec("cache/dataset/cc_sbu_align/filter_cap.json", "cache/dataset/cc_sbu_align/image",
                                "minigpt4_captions", "its filter_cap.json and image/, read as they are", "dir"),
}
PLACEHOLDER_PREFIXES = ("/path/to", "/absolute/path/to")
"""MiniGPT-4's shipped storage paths are placeholders the user edits."""

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

@dataclass
class Migration:
    """The keys of one predecessor file, consumed as they are mapped, and the lines that say what happened."""

    src: dict[str, Any]
    out: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    dp: int = 1
    """Data-parallel replicas of the layout (not a config key: processes = stages x dp)."""
    source_name: str = ""
    """The predecessor file's name (a ``..._3090x4.yaml`` name is the only place some files state their GPUs)."""

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

    def drop_no_effect(self, family: str) -> None:
        """Every key of the table with no equivalent gets its line (the table's reason)."""
        for key in list(self.src):
            r = rule_for(family, key)
            if r is not None and not r.ours:
                self.drop(key, r.note)

    def leftovers(self, family: str) -> None:
        """A key the table does not know is refused: nothing may be dropped silently."""
        for key in self.src:
            if key not in self.done:
                r = rule_for(family, key)
                if r is None:
                    raise ConfigError(f"`{key}` is not a key of any {family} file the migrator knows "
                                      "(docs/MIGRATING.md lists them): remove it, or set its equivalent in the "
                                      "migrated recipe by hand")
                self.drop(key, r.note or r.describe())


class _PlainDumper(yaml.SafeDumper):
    """Every value written out: a recipe never holds anchors or aliases (which ``load_config`` refuses)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


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


def lavis_steps_per_epoch(num_samples: int, gpus: int, micro: int, gas: int) -> int:
    """LAVIS's runner (MPP's non-pipeline ``train.py``): a DistributedSampler, ``drop_last=True``, and an optimizer
    step every ``accum_grad_iters`` iterations: ``floor(floor(ceil(N / GPUs) / micro) / GAS)``."""
    return (math.ceil(num_samples / gpus) // micro) // gas


def lavis_epoch_lr(step: int, *, warmup: int, per_epoch: int, epochs: int, lr: float, min_lr: float) -> float:
    """LAVIS's ``linear_warmup_cosine_lr`` at optimizer step ``step``: linear warmup, then a cosine over *epochs*
    (one value per epoch: a staircase)."""
    if step < warmup:
        return lr * step / max(warmup, 1)
    epoch = step // max(per_epoch, 1)
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr


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
    assumed: dict[str, str] = field(default_factory=dict)
    """Row of the side-by-side table -> why its original value is an assumption (not in the file)."""
    per_epoch_lr: tuple[int, int] | None = None
    """(steps per epoch, epochs) when the original decays per epoch (LAVIS's linear_warmup_cosine_lr)."""

    def lr_at(self, step: int) -> float:
        if self.per_epoch_lr is not None:
            per_epoch, epochs = self.per_epoch_lr
            return lavis_epoch_lr(step, warmup=self.warmup_steps, per_epoch=per_epoch, epochs=epochs, lr=self.lr,
                                  min_lr=self.min_lr)
        return mpp_lr(step, warmup=self.warmup_steps, total=self.total_steps, lr=self.lr, min_lr=self.min_lr,
                      warmup_lr=self.warmup_lr)


def _layout(m: Migration, args: Args) -> tuple[int, int]:
    """Our layout: --num-stages/--dp, else the predecessor's published one for its shipped files, else PP2 x DP1."""
    out_dir = str(m.get("run.output_dir", "")).strip("/")
    known = LAYOUTS.get(out_dir)
    stages = args.num_stages or (known[0] if known else 2)
    dp = args.dp or (known[1] if known else 1)
    src = ("--num-stages/--dp" if args.num_stages or args.dp else known[2] if known
           else "not in the file; our choice PP2 x DP1, pass --num-stages/--dp")
    m.lines.append(f"(layout) -> train.parallel.num_stages: {stages}, data-parallel replicas {dp}  ({src}; launch "
                   f"{stages * dp} processes)")
    m.set("train.parallel.num_stages", stages)
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
    if m.get("model.qformer_text_input"):
        raise ConfigError("model.qformer_text_input: true: our Q-Former is query-only (MPP raises too)")
    _lora(m)
    max_len = int(m.get("model.max_txt_len", 512))
    m.map("model.max_txt_len", "data.max_txt_len", max_len,
          "tokens per sample, image placeholders included; ours pads each micro-batch to its longest sample "
          "(data.fixed_length: true pads to max_txt_len as MPP does)")
    _datasets(m, MPP_DATASETS)
    stages, dp = _layout(m, args)
    counts, how = count_samples(m.out["data"]["train"], args.num_samples)
    pipeline = not any(k.startswith("run.runner") for k in m.src) and any(
        k.startswith("run.deepspeed_config.") for k in m.src)
    orig = _mpp_schedule(m, args, sum(counts), how, counts, dp) if pipeline else \
        _lavis_schedule(m, args, sum(counts), how, counts, stages, dp)
    orig.max_len = max_len
    _run_common(m)
    m.drop_no_effect(MPP)
    if args.gpu_memory_gib:
        m.set("train.parallel.gpu_memory_gib", args.gpu_memory_gib)
        m.lines.append(f"(--gpu-memory-gib) -> train.parallel.gpu_memory_gib: {args.gpu_memory_gib}")
    m.set("train.parallel.activation_checkpoint_interval", 1)
    m.lines.append("(train_pipeline.py --llm-grad-ckpt, on by default in MPP) -> "
                   "train.parallel.activation_checkpoint_interval: 1  (MPP's flag turns checkpointing OFF when given; "
                   "ours: set the interval to 0)")
    return orig


def _lora(m: Migration) -> None:
    """MPP's ``get_lora`` / ``lora_*`` -> ``model.llm.lora`` over a frozen LLM (MPP's peft targets q_proj, v_proj)."""
    keys = ("model.lora_r", "model.lora_alpha", "model.lora_dropout")
    if not m.get("model.get_lora"):
        m.drop("model.get_lora", "false: no adapters")
        for k in keys:
            m.drop(k, "get_lora is false: no adapters (true would map it to model.llm.lora)")
        return
    lora = {"r": int(m.get("model.lora_r", 8)), "alpha": float(m.get("model.lora_alpha", 32)),
            "dropout": float(m.get("model.lora_dropout", 0.05)), "targets": ["q_proj", "v_proj"]}
    m.map("model.get_lora", "model.llm.lora", lora, "MPP's peft targets q_proj/v_proj; ours reads Qwen-1's c_attn "
          "into q/k/v_proj, so these layers exist")
    for k, field_name in zip(keys, ("r", "alpha", "dropout")):
        m.note(k, f"model.llm.lora.{field_name}: {lora[field_name]}")
    m.set("model.llm.frozen", True)
    m.lines.append("(model.get_lora: true) -> model.llm.frozen: true  (adapters train over frozen base weights)")


def _mpp_schedule(m: Migration, args: Args, n: int, how: str, counts: list[int], dp: int) -> Original:
    """MPP's ``train_pipeline.py``: its DeepSpeed dict, epochs and warmup ratio -> steps."""
    assumed: dict[str, str] = {}
    ds = "run.deepspeed_config."
    micro = int(m.get(ds + "train_micro_batch_size_per_gpu", 1))
    gas = int(m.get(ds + "gradient_accumulation_steps", 1))
    out_dir = str(m.get("run.output_dir", "")).strip("/")
    pred_dp = args.pred_gpus or (LAYOUTS[out_dir][1] if out_dir in LAYOUTS else dp)
    if args.pred_gpus is None and out_dir not in LAYOUTS:
        assumed["global batch"] = f"the original's DP is not in the file: assumed DP{pred_dp} (pass --pred-gpus)"
    epochs = int(m.get("run.max_epoch", 1))
    per_epoch = mpp_steps_per_epoch(n, dp, micro, gas)
    total = epochs * per_epoch
    _check_steps(total, n, micro * gas * dp, f"micro {micro} x GAS {gas} x DP {dp}")
    if m.has("run.warmup_ratio"):
        warmup = int(_float(m.get("run.warmup_ratio")) * per_epoch)
        wnote = f"int({m.get('run.warmup_ratio')} x {per_epoch} steps of one epoch), as MPP's train_pipeline.py"
        m.map("run.warmup_ratio", "train.optim.warmup_steps", warmup, wnote)
    else:
        warmup = int(m.get("run.warmup_steps", 0))
        m.map("run.warmup_steps", "train.optim.warmup_steps", warmup,
              "" if m.has("run.warmup_steps") else "not in the file")
        if not m.has("run.warmup_steps"):
            assumed["warmup steps"] = "no warmup key in the file: assumed 0"
    m.map("run.max_epoch", "train.max_steps", total,
          f"{epochs} epoch(s) x {per_epoch} steps; {n} samples ({how}: {', '.join(map(str, counts))}), "
          f"ceil(floor(ceil({n} / DP {dp}) / micro {micro}) / GAS {gas}) per epoch, as MPP counts them")
    precision = _precision(m)
    lr = _float(m.get("run.init_lr", m.get(ds + "optimizer.params.lr", 1e-4)))
    min_lr = _float(m.get("run.min_lr", 0.0))
    warmup_lr = _float(m.get("run.warmup_lr", -1))
    m.map("run.init_lr", "train.optim.lr", lr, "" if m.has("run.init_lr") else "optimizer.params.lr (no run.init_lr)")
    m.map("run.min_lr", "train.optim.min_lr", min_lr, "end of the cosine" if m.has("run.min_lr") else "not in the file")
    if not m.has("run.lr_sched"):
        why = "no run.lr_sched in the file: assumed warmup + cosine (ours)"
        assumed.update({"min lr": why, "lr at step": why})
    if m.has("run.warmup_lr"):
        m.note("run.warmup_lr", "ours warms up linearly from lr / warmup_steps (0 when warmup_lr is 0 up to one "
                                "step's offset)" if warmup_lr <= 0 else "ours warms up linearly from about 0, not "
                                f"from {warmup_lr}")
    _deepspeed(m, micro, gas, lr)
    return Original(micro, gas, pred_dp, total, warmup, lr, min_lr, warmup_lr if warmup_lr >= 0 else lr, 0, precision,
                    f"{epochs} x {per_epoch}", assumed)


def _pred_gpus(args: Args, name: str) -> tuple[int, str | None]:
    """GPUs of a non-pipeline run: --pred-gpus, else a ``..._3090x4`` file name (an assumption), else 1 (one too)."""
    if args.pred_gpus:
        return args.pred_gpus, None
    found = re.search(r"x(\d+)$", Path(name).stem)
    if found:
        return int(found.group(1)), f"GPUs are not in the file: assumed {found.group(1)} from its name " \
                                    "(pass --pred-gpus)"
    return 1, "GPUs are not in the file: assumed 1 (pass --pred-gpus)"


def _lavis_schedule(m: Migration, args: Args, n: int, how: str, counts: list[int], stages: int,
                    dp: int) -> Original:
    """MPP's non-pipeline configs (``instruction_tuning/train*.yaml``, ``deepspeed/train_zero*``): LAVIS's runner
    with ``run.batch_size_train`` per GPU, ``accum_grad_iters`` (or the DeepSpeed dict), ``amp``, weight decay and
    ``grad_norm_clip``; a per-epoch cosine. Ours keeps the global batch on our layout."""
    assumed: dict[str, str] = {}
    ds = "run.deepspeed_config."
    gpus, why = _pred_gpus(args, m.source_name)
    if why:
        assumed["global batch"] = why
    micro = int(m.get("run.batch_size_train", m.get(ds + "train_micro_batch_size_per_gpu", 1)))
    gas = int(m.get("run.accum_grad_iters", m.get(ds + "gradient_accumulation_steps", 1)))
    global_batch = micro * gas * gpus
    if global_batch % (micro * dp):
        raise ConfigError(f"the original's global batch {global_batch} (batch_size_train {micro} x accum {gas} x "
                          f"{gpus} GPUs) is not a multiple of micro-batch {micro} x our DP {dp}; pass --dp")
    our_gas = global_batch // (micro * dp)
    m.map("run.batch_size_train", "train.batch.micro_batch_size", micro, "per GPU, as the original")
    m.done.add(ds + "train_micro_batch_size_per_gpu")
    m.map("run.accum_grad_iters", "train.batch.grad_accum_steps", our_gas,
          f"global batch {global_batch} = {micro} x {gas} x {gpus} GPUs kept: {micro} x {our_gas} x DP {dp}")
    m.done.add(ds + "gradient_accumulation_steps")
    epochs = int(m.get("run.max_epoch", 1))
    per_epoch = lavis_steps_per_epoch(n, gpus, micro, gas)
    total = epochs * per_epoch
    _check_steps(total, n, global_batch, f"{micro} x accum {gas} x {gpus} GPUs")
    warmup = int(m.get("run.warmup_steps", 0)) // gas
    m.map("run.warmup_steps", "train.optim.warmup_steps", warmup,
          f"LAVIS counts warmup_steps in micro-batches: {m.get('run.warmup_steps', 0)} // accum {gas}")
    m.map("run.max_epoch", "train.max_steps", total,
          f"{epochs} epoch(s) x {per_epoch} steps; {n} samples ({how}: {', '.join(map(str, counts))}), "
          f"floor(floor(ceil({n} / {gpus} GPUs) / {micro}) / accum {gas}) per epoch, as LAVIS's runner counts them")
    lr = _float(m.get("run.init_lr", m.get(ds + "optimizer.params.lr", 1e-4)))
    min_lr = _float(m.get("run.min_lr", 0.0))
    m.map("run.init_lr", "train.optim.lr", lr)
    m.map("run.min_lr", "train.optim.min_lr", min_lr)
    m.note("run.lr_sched", "LAVIS's linear_warmup_cosine_lr decays once per epoch (a staircase); ours per step")
    if m.has("run.warmup_lr"):
        m.note("run.warmup_lr", "ours warms up linearly from lr / warmup_steps")
    if any(k.startswith(ds) for k in m.src):
        precision = _precision(m, pipeline=False)
        _deepspeed(m, micro, our_gas, lr)
    else:
        amp = bool(m.get("run.amp", False))
        dtype = str(m.get("run.autocast_dtype", m.get("model.autocast_dtype", "bfloat16")))
        precision = ("bf16" if dtype in ("bfloat16", "bf16") else "fp16") if amp else "fp32"
        m.map("run.amp", "train.precision", precision, f"amp {amp} with autocast_dtype {dtype}" if amp else
              "amp false: fp32 as the original")
        for k in ("model.autocast_dtype", "run.autocast_dtype"):
            if m.has(k):
                m.note(k, f"train.precision: {precision}")
        m.map("run.weight_decay", "train.optim.weight_decay", _float(m.get("run.weight_decay", 0.05)))
        clip = _float(m.get("run.grad_norm_clip", 0.0))
        m.map("run.grad_norm_clip", "train.optim.grad_clip", clip, "global norm" if clip else "no clipping")
    if m.get("run.fsdp"):
        raise ConfigError("run.fsdp: true: no FSDP under pipeline parallelism; use more stages or ZeRO-1")
    for k in ("run.resume_ckpt_load_dir", "run.resume_ckpt_path"):
        if m.get(k):
            raise ConfigError(f"{k}: {m.get(k)}: a checkpoint of MPP's non-pipeline runner; convert its weights "
                              "and set model.checkpoint in the migrated recipe")
    return Original(micro, gas, gpus, total, warmup, lr, min_lr, 0.0, 0, precision, f"{epochs} x {per_epoch}",
                    assumed, (per_epoch, epochs))


def _check_steps(total: int, n: int, global_batch: int, how: str) -> None:
    if total < 1:
        raise ConfigError(f"{n} samples make no optimizer step at the global batch {global_batch} ({how}): the "
                          "predecessor's own script would run 0 steps too; pass the real --num-samples (or run from "
                          "the directory holding cache/ so the annotation files are counted)")


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
        if spec.storage:
            entry.update(_storage(m, p + "build_info.storage", spec))
        if not entry["vis_root"]:
            del entry["vis_root"]
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
            m.note(p + "batch_size", "train.batch.micro_batch_size (below)")
        m.drop(p + "data_type", "images or videos follow from each record")
    if not train:
        raise ConfigError("the file lists no datasets: nothing to train on")
    m.set("data.train", train)
    if transform is not None:
        m.set("data.transform", transform)


def _storage(m: Migration, key: str, spec: DatasetSpec) -> dict[str, str]:
    """MiniGPT-4's ``build_info.storage``: a shard pattern (``shards``) or cc_sbu_align's directory (``dir``); its
    shipped ``/path/to/...`` placeholders keep our ``cache/dataset`` default."""
    storage = str(m.get(key) or "")
    if not storage or storage.startswith(PLACEHOLDER_PREFIXES):
        if storage:
            m.drop(key, f"MiniGPT-4's placeholder; data.train uses {spec.ann_path}")
        return {}
    if spec.storage == "shards":
        m.note(key, f"data.train[].ann_path: {storage}  (the shards, read by format webdataset)")
        return {"ann_path": storage}
    base = storage.rstrip("/")
    m.note(key, f"data.train[].ann_path: {base}/filter_cap.json, vis_root: {base}/image  (as MiniGPT-4's "
                "cc_sbu_align builder reads them)")
    return {"ann_path": f"{base}/filter_cap.json", "vis_root": f"{base}/image"}


def _precision(m: Migration, pipeline: bool = True) -> str:
    ds = "run.deepspeed_config."
    bf16, fp16 = bool(m.get(ds + "bf16.enabled", False)), bool(m.get(ds + "fp16.enabled", False))
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    m.map(ds + "bf16.enabled", "train.precision", precision,
          "MPP's pipeline also casts every weight to bf16 (model.cuda().bfloat16())" if bf16 and pipeline else "")
    m.note(ds + "fp16.enabled", f"train.precision: {precision}")
    return precision


def _deepspeed(m: Migration, micro: int, gas: int, lr: float) -> None:
    ds = "run.deepspeed_config."
    m.map(ds + "train_micro_batch_size_per_gpu", "train.batch.micro_batch_size", micro)
    m.map(ds + "gradient_accumulation_steps", "train.batch.grad_accum_steps", gas,
          "" if int(m.get(ds + "gradient_accumulation_steps", gas)) == gas else "the original's global batch kept on "
          "our layout (above)")
    if m.has(ds + "gradient_clipping"):
        m.map(ds + "gradient_clipping", "train.optim.grad_clip", _float(m.get(ds + "gradient_clipping")),
              "global norm over all stages")
    p = ds + "optimizer.params."
    if m.has(p + "lr"):
        m.note(p + "lr", f"overwritten by the schedule at every step in MPP too; train.optim.lr: {lr}")
    if m.has(p + "betas"):
        m.map(p + "betas", "train.optim.betas", [float(b) for b in m.get(p + "betas")])
    if m.has(p + "eps"):
        m.map(p + "eps", "train.optim.eps", _float(m.get(p + "eps")))
    if m.has(p + "weight_decay"):
        m.map(p + "weight_decay", "train.optim.weight_decay", _float(m.get(p + "weight_decay")),
              "ours exempts biases and norms as LAVIS does")
    z = ds + "zero_optimization."
    stage = int(m.get(z + "stage", 0))
    if stage > 1:
        raise ConfigError(f"{z}stage: {stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    m.map(z + "stage", "train.optim.zero_stage", stage)
    offload = m.get(z + "offload_optimizer.device")
    if offload is not None:
        if offload != "cpu" or stage != 1:
            raise ConfigError(f"{z}offload_optimizer.device: {offload!r}: only cpu offload with ZeRO stage 1 "
                              "works here")
        m.map(z + "offload_optimizer.device", "train.optim.offload_optimizer", True, "optimizer state in host RAM")


def _run_common(m: Migration) -> None:
    if m.has("run.output_dir"):
        m.map("run.output_dir", "train.output_dir", str(m.get("run.output_dir")).rstrip("/"))
    if m.has("run.seed"):
        m.map("run.seed", "train.seed", int(m.get("run.seed")),
              "the predecessors add the rank to it; ours makes data order and augmentation a function of it alone")
    if m.has("run.num_workers"):
        m.map("run.num_workers", "data.num_workers", int(m.get("run.num_workers")))
    if m.has("run.log_freq"):
        m.drop("run.log_freq", "ours logs every optimizer step (metrics.jsonl, TensorBoard, the progress bar)")
    resume = m.get("run.resume_ckpt_path")
    if resume:
        m.map("run.resume_ckpt_path", "model.checkpoint", str(resume),
              "WEIGHTS ONLY: the predecessor also restores its optimizer, scaler and epoch from this file; ours "
              "starts a new schedule from these weights (a run of ours resumes fully from train.output_dir/latest)")
    elif m.has("run.resume_ckpt_path"):
        m.drop("run.resume_ckpt_path", "null: nothing to resume; a run resumes from train.output_dir/latest by "
                                       "itself (--resume requires it)")
    if m.has("run.wandb_log"):
        m.drop("run.wandb_log", "set train.log.wandb_project to log to Weights & Biases (off unless set)")


# --- MiniGPT-4 ------------------------------------------------------------------------------------------------------


def migrate_minigpt4(m: Migration, args: Args, out_dir: Path) -> None:
    if m.get("model.arch") == "minigpt_v2":
        raise ConfigError("model.arch: minigpt_v2: MiniGPT-v2 is not supported (another model: 448 px EVA without a "
                          "Q-Former, 4 concatenated patches into LLaMA-2 with LoRA, grounding tasks); only MiniGPT-4 "
                          "v1 (arch mini_gpt4 / minigpt4) configs are translated")
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
    if ckpt and "please set" not in ckpt and not ckpt.startswith(PLACEHOLDER_PREFIXES):
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
    _prompt_path(m)
    m.drop_no_effect(MINIGPT4)
    if not any(k.startswith("run.") and k != "run.task" for k in m.src):  # an eval config: model only
        _datasets_eval(m)
        return
    _datasets(m, MINIGPT4_DATASETS)
    _, dp = _layout(m, args)
    batch = sorted({int(v) for k, v in m.src.items() if k.startswith("datasets.") and k.endswith(".batch_size")}
                   | ({int(m.get("run.batch_size_train"))} if m.has("run.batch_size_train") else set()))
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
    m.set("train.batch.micro_batch_size", micro)
    m.set("train.batch.grad_accum_steps", gas)
    m.lines.append(f"(datasets.*.batch_size, run.accum_grad_iters) -> train.batch.micro_batch_size: {micro}, "
                   f"train.batch.grad_accum_steps: {gas}  (MiniGPT-4's global batch {global_batch} = {per_gpu} per "
                   f"GPU x {gpus} GPUs (--pred-gpus); ours {micro} x {gas} x DP {dp})")
    m.done.add("run.accum_grad_iters")
    if m.has("run.batch_size_train"):
        m.note("run.batch_size_train", f"train.batch.micro_batch_size: {micro}, x GPUs x accum: the global batch above")
    epochs, iters = int(m.get("run.max_epoch", 1)), int(m.get("run.iters_per_epoch", 1))
    m.map("run.max_epoch", "train.max_steps", epochs * iters, f"{epochs} epochs x {iters} iters_per_epoch")
    m.note("run.iters_per_epoch", "train.max_steps (above)")
    m.map("run.warmup_steps", "train.optim.warmup_steps", int(m.get("run.warmup_steps", 0)))
    m.map("run.init_lr", "train.optim.lr", _float(m.get("run.init_lr", 1e-4)))
    m.map("run.min_lr", "train.optim.min_lr", _float(m.get("run.min_lr", 0.0)))
    if m.has("run.warmup_lr"):
        m.note("run.warmup_lr", f"ours warms up linearly from about 0, not from {m.get('run.warmup_lr')}")
    m.map("run.weight_decay", "train.optim.weight_decay", _float(m.get("run.weight_decay", 0.05)))
    beta2 = _float(m.get("run.beta2", 0.999))
    m.map("run.beta2", "train.optim.betas", [0.9, beta2], "LAVIS's AdamW betas (0.9, beta2)")
    m.set("train.optim.grad_clip", 0.0)
    m.lines.append("(no clipping in MiniGPT-4) -> train.optim.grad_clip: 0.0")
    amp = bool(m.get("run.amp", False))
    m.map("run.amp", "train.precision", "bf16" if amp else "fp32",
          "MiniGPT-4's amp is fp16 autocast with a GradScaler; bf16 needs no scaler (Ampere or newer; "
          "train.precision: fp16 for older cards)" if amp else "")
    _run_common(m)
    if args.gpu_memory_gib:
        m.set("train.parallel.gpu_memory_gib", args.gpu_memory_gib)


def _prompt_path(m: Migration) -> None:
    """MiniGPT-4 stage 2 draws its question from ``prompt_path``; ``minigpt4_captions`` asks alignment.txt's four."""
    path = m.get("model.prompt_path")
    if path is None:
        return
    if Path(str(path)).name != "alignment.txt":
        raise ConfigError(f"model.prompt_path: {path}: custom prompt files are not read here (format "
                          "minigpt4_captions asks the four questions of MiniGPT-4's prompts/alignment.txt); write "
                          "your questions into canonical records (DATA.md)")
    m.note("model.prompt_path", "format minigpt4_captions asks the four questions of prompts/alignment.txt (one per "
                                "record, chosen from its image id)")


def _datasets_eval(m: Migration) -> None:
    for k in [k for k in m.src if k.startswith("datasets.")]:
        m.drop(k, "an evaluation config: the model section is what chat and inspect use")
    m.set("data.transform", {"kind": "eval", "hflip": False})
    m.set("data.train", [])
    m.lines.append("(eval config) -> data.transform: {kind: eval}, data.train: []  (chat: cli_demo.py --cfg-path "
                   "OUT.yaml -c CHECKPOINT)")


# --- side by side ---------------------------------------------------------------------------------------------------


def side_by_side(orig: Original, cfg: Config, dp: int) -> list[tuple[str, str, str]]:
    """(quantity, predecessor, ours) rows; the values are computed independently from each config. A predecessor
    value that the file does not state is marked ``(assumed)`` (:func:`assumptions` says why)."""
    t = cfg.train
    micro, gas = t.batch.micro_batch_size, t.batch.grad_accum_steps
    steps = [orig.warmup_steps, (orig.warmup_steps + orig.total_steps) // 2, orig.total_steps - 1]
    rows = [
        ("global batch", f"{orig.micro * orig.gas * orig.dp} = {orig.micro} x {orig.gas} x DP{orig.dp}",
         f"{micro * gas * dp} = {micro} x {gas} x DP{dp}"),
        ("warmup steps", str(orig.warmup_steps), str(t.optim.warmup_steps)),
        ("total steps", str(orig.total_steps), str(t.max_steps)),
        ("peak lr", f"{orig.lr:g}", f"{t.optim.lr:g}"),
        ("min lr", f"{orig.min_lr:g}", f"{t.optim.min_lr:g}"),
    ]
    for s in steps:
        b = warmup_cosine(s, warmup=t.optim.warmup_steps, total=t.max_steps, lr=t.optim.lr, min_lr=t.optim.min_lr)
        rows.append((f"lr at step {s}", f"{orig.lr_at(s):.4g}", f"{b:.4g}"))
    rows += [("max length", str(orig.max_len), str(cfg.data.max_txt_len)),
             ("precision", orig.precision, t.precision)]
    return [(q, f"{a} (assumed)" if _assumed_row(orig, q) else a, b) for q, a, b in rows]


def _assumed_row(orig: Original, quantity: str) -> str | None:
    return next((why for row, why in orig.assumed.items() if quantity.startswith(row)), None)


def assumptions(orig: Original) -> list[str]:
    """Why each ``(assumed)`` value of the table is not the original file's."""
    return [f"(assumed) {row}: {why}" for row, why in orig.assumed.items()]


def _value(cell: str) -> str:
    """What a table cell states: ``128 = 2 x 16 x DP4 (assumed)`` -> ``128``."""
    return cell.removesuffix(" (assumed)").split(" = ")[0]


def format_rows(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "MPP (original)", "")])
    lines = [f"{'':{w0}}  {'MPP (original)':{w1}}  ours (migrated)"]
    lines += [f"{a:{w0}}  {b:{w1}}  {c}" + ("" if _value(b) == _value(c) else "   <- differs") for a, b, c in rows]
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
    assumed: list[str] = field(default_factory=list)
    """Why each ``(assumed)`` value of the table is not stated by the original file."""


def migrate(path: str | Path, out: str | Path | None = None, args: Args | None = None) -> Result:
    """Translate the predecessor file ``path``; ``out`` is where the recipe will live (its ``base:`` is relative to
    it; None: the working directory). The recipe is checked by loading it strictly."""
    args = args or Args()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    raw = read_yaml(path)
    kind = predecessor_kind(raw)
    if kind is None:
        raise ConfigError(f"{path} has none of the predecessors' keys (model.arch, datasets, run): nothing to migrate")
    out_dir = (Path(out).resolve().parent if out is not None else Path.cwd())
    m = Migration(flatten(raw), source_name=path.name)
    orig: Original | None = None
    try:
        if kind == MPP:
            orig = migrate_mpp(m, args, out_dir)
        elif kind in (MINIGPT4, "MiniGPT-v2"):
            migrate_minigpt4(m, args, out_dir)
        else:
            raise ConfigError(f"a {kind} config; only MPP-Qwen-Next and MiniGPT-4 files are translated")
        m.leftovers(MPP if kind == MPP else MINIGPT4)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    body = {k: m.out[k] for k in ("base", "model", "data", "train") if k in m.out}
    header = (f"# Translated from {path} ({kind}) by python -m lavis.config.migrate.\n"
              "# Every source key and what became of it is printed by that command.\n")
    text = header + yaml.dump(body, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None, width=118)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out_dir, delete=False) as fh:
        fh.write(text)
    try:
        cfg = load_config(fh.name)
    except ConfigError as e:  # name the source, not the temporary file
        raise ConfigError(str(e).replace(fh.name, f"{path} (migrated)")) from None
    finally:
        os.unlink(fh.name)
    table = side_by_side(orig, cfg, m.dp) if orig is not None else None
    return Result(text, m.lines, cfg, table, m.dp, assumptions(orig) if orig is not None else [])


DOC = Path(__file__).resolve().parents[2] / "docs" / "MIGRATING.md"
BEGIN, END = "<!-- BEGIN generated: python -m lavis.config.migrate --table-md -->", "<!-- END generated -->"


def docs_with_table(text: str) -> str:
    """``text`` (docs/MIGRATING.md) with its generated section replaced by the current key table."""
    if BEGIN not in text or END not in text:
        raise ConfigError(f"{DOC}: the markers {BEGIN!r} ... {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{table_markdown()}\n{END}{tail}"


def write_docs_table(doc: Path = DOC) -> bool:
    """Regenerate docs/MIGRATING.md's key table; True when the file changed."""
    old = doc.read_text(encoding="utf-8")
    new = docs_with_table(old)
    if new != old:
        doc.write_text(new, encoding="utf-8")
    return new != old


def refuse_overwriting_input(src: str | Path, out: str | Path) -> None:
    """``-o`` naming the input file itself (any spelling, a link) would replace the original."""
    if Path(out).exists() and Path(src).exists() and os.path.samefile(src, out):
        raise ConfigError(f"-o {out} is the input file {src}: write the recipe elsewhere (e.g. "
                          f"{Path(src).stem}_migrated.yaml)")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an input error (one ``error:`` line), 2 a malformed command line (argparse)."""
    ap = argparse.ArgumentParser(prog="python -m lavis.config.migrate", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("path", nargs="?", help="an MPP-Qwen-Next (lavis/projects/pp_qwen*/...) or MiniGPT-4 "
                                            "(train_configs/, eval_configs/) YAML")
    ap.add_argument("--table-md", action="store_true",
                    help="regenerate the key table of docs/MIGRATING.md from the table migrate applies, then exit")
    ap.add_argument("-o", "--out", help="write the recipe here (default: print it on stdout)")
    ap.add_argument("--num-samples", type=int, nargs="+",
                    help="records per dataset (or one total), instead of counting the annotation files")
    ap.add_argument("--num-stages", type=int, help="pipeline stages (default: the predecessor's published layout)")
    ap.add_argument("--dp", type=int, help="data-parallel replicas (processes = stages x dp)")
    ap.add_argument("--model-type", help="model config in lavis/projects/models/ (default: from the file)")
    ap.add_argument("--micro-batch-size", type=int,
                    help="MiniGPT-4: split its per-GPU batch into micro-batches of this size (same global batch)")
    ap.add_argument("--gpu-memory-gib", type=float,
                    help="also set train.parallel.gpu_memory_gib (the planner's per-GPU limit)")
    ap.add_argument("--pred-gpus", type=int,
                    help="GPUs the original run used when its file does not say (MiniGPT-4, MPP's non-pipeline "
                         "files): its global batch = per-GPU batch x accumulation x this")
    a = ap.parse_args(argv)
    if a.table_md:
        print(f"{DOC}: {'updated' if write_docs_table() else 'already up to date'}")
        return 0
    if a.path is None:
        ap.error("the predecessor YAML is required (or --table-md)")
    args = Args(a.num_samples, a.num_stages, a.dp, a.model_type, a.micro_batch_size, a.gpu_memory_gib, a.pred_gpus)
    try:
        if a.out is not None:
            refuse_overwriting_input(a.path, a.out)
        res = migrate(a.path, a.out, args)
    except (ValueError, OSError) as e:  # ConfigError and a malformed value (e.g. int("abc")): the user's input
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = sys.stderr if a.out is None else sys.stdout
    for line in res.lines:
        print(line, file=info)
    if res.table:
        print("\n" + format_rows(res.table), file=info)
        for line in res.assumed:
            print(line, file=info)
    if a.out is None:
        sys.stdout.write(res.text)
    elif not res.cfg.data.train:
        Path(a.out).write_text(res.text)
        print(f"\nwrote {a.out} (loads strictly; a model config, no training data). Chat with:\n  python "
              f"cli_demo.py --cfg-path {a.out} -c CHECKPOINT.pth", file=info)
    else:
        Path(a.out).write_text(res.text)
        stages = res.cfg.train.parallel.num_stages
        print(f"\nwrote {a.out} (loads strictly). Train with:\n  torchrun --nproc_per_node {stages * res.dp} "
              f"train_pipeline.py --cfg-path {a.out}   ({stages} stages x {res.dp} data-parallel replicas)", file=info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
