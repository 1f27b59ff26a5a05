"""The predecessors' config keys and command-line flags, and what each is here: the one table that
``python -m lavis.config.migrate`` applies and explains, that ``load_config`` and ``train_pipeline.py`` quote when a
predecessor's key or flag is typed by habit, and that docs/MIGRATING.md is generated from (``--table-md``).

A key is the dotted path of the predecessor's YAML; ``datasets.*.`` stands for any dataset builder name. Every key
that appears in the shipped files of MPP-Qwen-Next / MiniGPT4Qwen (``lavis/projects/pp_qwen7b_video``, ``pp_qwen14b``,
``instruction_tuning``, ``deepspeed``) and MiniGPT-4 v1 (``train_configs/minigpt4*``, ``eval_configs/minigpt4*``)
has a row: ``ours`` is where its value goes ("" when it has no equivalent), ``note`` how or why, and ``refused``
says which values are refused and why (the migrator stops naming the key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MPP, MINIGPT4 = "MPP-Qwen-Next / MiniGPT4Qwen", "MiniGPT-4"


@dataclass(frozen=True)
class Rule:
    ours: str
    """Our key(s) the value goes to; "" when it has no equivalent (the note says why)."""
    note: str = ""
    refused: str = ""
    """Which values are refused and why ("" when every value is translated)."""

    def describe(self) -> str:
        """One line: ``ours (note); refused: ...``."""
        text = self.ours or "no equivalent"
        if self.note:
            text += f" ({self.note})" if self.ours else f": {self.note}"
        return text + (f"; refused: {self.refused}" if self.refused else "")


_LAVIS_DIST = Rule("", "the launcher (torchrun / deepspeed) sets up processes and devices")
_DS_TUNING = Rule("", "DeepSpeed's default (ZeRO-1 bucket tuning)")
_FP16_ONLY = Rule("", "DeepSpeed's default; ours scales fp16 losses dynamically from 2^16 (fp16 only)")
_NO_EVAL_LOOP = Rule("", "no validation loop in the predecessor's training either; ours: train.eval")

MPP_KEYS: dict[str, Rule] = {
    "model.arch": Rule("", "minigpt4qwen: this file's family; nothing to set"),
    "model.model_type": Rule("base", "qwen7b_chat / qwen14b_chat -> base: lavis/projects/models/NAME.yaml"),
    "model.load_pretrained": Rule("", "the BLIP-2 checkpoint is model.qformer.checkpoint of the model config"),
    "model.pretrained": Rule("model.qformer.checkpoint", "under cache/ as MPP resolves it"),
    "model.load_finetuned": Rule("model.checkpoint", "true: model.finetuned becomes model.checkpoint"),
    "model.finetuned": Rule("model.checkpoint", "when load_finetuned is true"),
    "model.vit_model": Rule("", "EVA ViT-g is the model config's vision tower (model.vision.*)"),
    "model.image_size": Rule("model.vision.image_size"),
    "model.drop_path_rate": Rule("", "no stochastic depth in our ViT (0 in every predecessor file)"),
    "model.use_grad_checkpoint": Rule("", "ViT checkpointing: a frozen ViT runs under no_grad in ours and keeps no "
                                          "activations"),
    "model.vit_precision": Rule("", "ours runs the ViT in train.precision (MPP's pipeline casts every weight to "
                                    "bf16 too); model.vision.precision: fp16 gives LAVIS's fp16 ViT"),
    "model.freeze_vit": Rule("model.vision.frozen", "predecessor default true"),
    "model.unfreeze_pos_embed": Rule("", "false: the position embedding follows the ViT's freezing",
                                     "true (a frozen ViT with a trainable position embedding): train the whole ViT "
                                     "(model.vision.frozen: false) or keep it frozen"),
    "model.num_query_token": Rule("model.qformer.num_query_tokens"),
    "model.qformer_text_input": Rule("", "our Q-Former is always query-only", "true (MPP raises too)"),
    "model.freeze_qformer": Rule("model.qformer.frozen", "predecessor default false"),
    "model.freeze_queries": Rule("", "query_tokens train or freeze with the Q-Former (model.qformer.frozen)"),
    "model.freeze_proj": Rule("model.projection.frozen", "predecessor default false"),
    "model.freeze_llm": Rule("model.llm.frozen", "differs: MPP's default is true when the key is absent, ours false"),
    "model.llm_model": Rule("model.llm.path, model.llm.tokenizer", "under cache/ as MPP resolves it"),
    "model.get_lora": Rule("model.llm.lora", "true: adapters on q_proj/v_proj (MPP's peft targets; ours reads "
                                             "Qwen-1's c_attn into q/k/v_proj, so they exist) over a frozen LLM"),
    "model.lora_r": Rule("model.llm.lora.r", "when get_lora is true"),
    "model.lora_alpha": Rule("model.llm.lora.alpha", "when get_lora is true"),
    "model.lora_dropout": Rule("model.llm.lora.dropout", "when get_lora is true"),
    "model.max_txt_len": Rule("data.max_txt_len", "tokens per sample, image placeholders included; ours pads each "
                                                  "micro-batch to its longest sample (data.fixed_length: true pads "
                                                  "to max_txt_len as MPP does)"),
    "model.enable_autocast": Rule("", "no separate ViT autocast; the model runs in train.precision"),
    "model.autocast_dtype": Rule("train.precision", "non-pipeline files: bfloat16 with run.amp: true -> bf16"),
    "model.prompt": Rule("", "empty in every predecessor file; the chat template lays out every turn"),
    "model.apply_lemmatizer": Rule("", "evaluation-only option of LAVIS"),
    "model.llm_device_map": Rule("", "training option of MPP's non-pipeline path; chat has --llm_device_map"),
    "datasets.*": Rule("data.train[]", "builder name -> our reader and MPP's cache/dataset paths",
                       "a builder with no known file layout (convert it to canonical JSON, DATA.md)"),
    "datasets.*.build_info.annotations.train.storage": Rule("data.train[].ann_path", "under cache/"),
    "datasets.*.build_info.images.storage": Rule("data.train[].vis_root", "under cache/"),
    "datasets.*.build_info.max_frames": Rule("data.num_video_frames", "video datasets; each frame augmented on its "
                                                                      "own (data.video_same_augment: false)"),
    "datasets.*.data_type": Rule("", "images or videos follow from each record"),
    "datasets.*.vis_processor.train.name": Rule("data.transform", "blip2_image_train -> {kind: blip2_train, "
                                                                  "min_scale: 0.5, hflip: true}; blip2_image_eval "
                                                                  "-> {kind: eval}", "any other processor"),
    "datasets.*.vis_processor.train.image_size": Rule("", "model.vision.image_size (224 in every predecessor file)"),
    "datasets.*.text_processor.train.name": Rule("", "MPP's base_instruction returns the text unchanged; ours too"),
    "datasets.*.text_processor.train.max_words": Rule("", "base_instruction does not cut; data.max_txt_len bounds "
                                                          "the sample"),
    "run.task": Rule("", "one task: multimodal chat training"),
    "run.runner": Rule("", "deepspeed_runner (non-pipeline ZeRO): ours is the pipeline trainer, "
                           "train.optim.zero_stage"),
    "run.output_dir": Rule("train.output_dir"),
    "run.num_workers": Rule("data.num_workers"),
    "run.seed": Rule("train.seed", "differs: the predecessors add the rank; ours makes data order and augmentation "
                                   "a function of the seed alone"),
    "run.world_size": _LAVIS_DIST,
    "run.dist_url": _LAVIS_DIST,
    "run.distributed": _LAVIS_DIST,
    "run.gpu": _LAVIS_DIST,
    "run.device": _LAVIS_DIST,
    "run.max_epoch": Rule("train.max_steps", "epochs x optimizer steps per epoch, counted as the predecessor's "
                                             "script counts them from the sample count"),
    "run.log_freq": Rule("", "ours logs every optimizer step (metrics.jsonl, TensorBoard, the progress bar)"),
    "run.lr_sched": Rule("", "ours is one schedule: linear warmup, then cosine to train.optim.min_lr per optimizer "
                             "step (MPP's step-wise one has the same shape; LAVIS's linear_warmup_cosine_lr decays per "
                             "epoch)"),
    "run.init_lr": Rule("train.optim.lr"),
    "run.min_lr": Rule("train.optim.min_lr"),
    "run.warmup_lr": Rule("", "ours warms up linearly from lr / warmup_steps"),
    "run.warmup_ratio": Rule("train.optim.warmup_steps", "int(ratio x optimizer steps of one epoch), as MPP's "
                                                   "train_pipeline.py"),
    "run.warmup_steps": Rule("train.optim.warmup_steps",
                             "non-pipeline files count it in micro-batches: / accum_grad_iters"),
    "run.weight_decay": Rule("train.optim.weight_decay", "non-pipeline files"),
    "run.grad_norm_clip": Rule("train.optim.grad_clip", "non-pipeline files"),
    "run.batch_size_train": Rule("train.batch.micro_batch_size", "non-pipeline files: per GPU"),
    "run.accum_grad_iters": Rule("train.batch.grad_accum_steps",
                                 "non-pipeline files (x the GPU count / our DP to keep the global batch)"),
    "run.amp": Rule("train.precision", "true: bf16 (MPP's autocast_dtype); false: fp32"),
    "run.autocast_dtype": Rule("train.precision", "non-pipeline files: bf16 / fp16 with run.amp: true"),
    "run.loss_scale": Rule("", "GradScaler switch of the non-pipeline runner: ours scales fp16 losses dynamically "
                               "(fp16 only); bf16 needs none"),
    "run.batch_size_eval": _NO_EVAL_LOOP,
    "run.max_new_tokens": _NO_EVAL_LOOP,
    "run.min_new_tokens": _NO_EVAL_LOOP,
    "run.num_beams": _NO_EVAL_LOOP,
    "run.max_len": _NO_EVAL_LOOP,
    "run.min_len": _NO_EVAL_LOOP,
    "run.evaluate": _NO_EVAL_LOOP,
    "run.train_splits": Rule("", "data.train lists the training files"),
    "run.valid_splits": _NO_EVAL_LOOP,
    "run.test_splits": _NO_EVAL_LOOP,
    "run.fsdp": Rule("", "false: nothing to do", "true: no FSDP under pipeline parallelism (use stages or ZeRO-1)"),
    "run.resume_ckpt_path": Rule("", "null: nothing to resume; a run resumes from train.output_dir/latest by itself",
                                 "a path: the non-pipeline runner's checkpoint (convert its weights, then use them "
                                 "as model.checkpoint)"),
    "run.resume_ckpt_load_dir": Rule("", "null: nothing to resume",
                                     "a path: a DeepSpeed ZeRO checkpoint of the non-pipeline runner; convert it and "
                                     "use it as model.checkpoint"),
    "run.resume_ckpt_tag": Rule("", "goes with resume_ckpt_load_dir"),
    "run.wandb_log": Rule("", "set train.log.wandb_project to log to Weights & Biases (off unless set)"),
    "run.deepspeed_config.train_micro_batch_size_per_gpu": Rule("train.batch.micro_batch_size"),
    "run.deepspeed_config.gradient_accumulation_steps": Rule("train.batch.grad_accum_steps"),
    "run.deepspeed_config.gradient_clipping": Rule("train.optim.grad_clip", "the global norm over all stages"),
    "run.deepspeed_config.steps_per_print": Rule("", "we log every step ourselves"),
    "run.deepspeed_config.wall_clock_breakdown": Rule("", "python -m lavis.bench measures per-stage time"),
    "run.deepspeed_config.dump_state": Rule("", "DeepSpeed debug output"),
    "run.deepspeed_config.bf16.enabled": Rule("train.precision", "true: bf16"),
    "run.deepspeed_config.fp16.enabled": Rule("train.precision", "true: fp16"),
    "run.deepspeed_config.fp16.loss_scale": _FP16_ONLY,
    "run.deepspeed_config.fp16.loss_scale_window": _FP16_ONLY,
    "run.deepspeed_config.fp16.initial_scale_power": _FP16_ONLY,
    "run.deepspeed_config.fp16.hysteresis": _FP16_ONLY,
    "run.deepspeed_config.fp16.min_loss_scale": _FP16_ONLY,
    "run.deepspeed_config.optimizer.type": Rule("", "ours is always AdamW (what every predecessor file uses)"),
    "run.deepspeed_config.optimizer.params.lr": Rule("train.optim.lr", "when run.init_lr is absent; overwritten by the "
                                                                 "schedule in MPP"),
    "run.deepspeed_config.optimizer.params.betas": Rule("train.optim.betas"),
    "run.deepspeed_config.optimizer.params.eps": Rule("train.optim.eps"),
    "run.deepspeed_config.optimizer.params.weight_decay": Rule("train.optim.weight_decay",
                                                               "ours exempts biases and norms as LAVIS does"),
    "run.deepspeed_config.zero_optimization.stage": Rule("train.optim.zero_stage", "",
                                                         "2 or 3: DeepSpeed's pipeline engine has ZeRO 0/1 only"),
    "run.deepspeed_config.zero_optimization.offload_optimizer.device": Rule(
        "train.optim.offload_optimizer", "cpu: optimizer state in host RAM", "anything but cpu with ZeRO stage 1"),
    "run.deepspeed_config.zero_optimization.offload_optimizer.pin_memory": Rule("", "pinned when CUDA is present"),
    "run.deepspeed_config.zero_optimization.allgather_partitions": _DS_TUNING,
    "run.deepspeed_config.zero_optimization.allgather_bucket_size": _DS_TUNING,
    "run.deepspeed_config.zero_optimization.overlap_comm": _DS_TUNING,
    "run.deepspeed_config.zero_optimization.reduce_scatter": _DS_TUNING,
    "run.deepspeed_config.zero_optimization.reduce_bucket_size": _DS_TUNING,
    "run.deepspeed_config.zero_optimization.contiguous_gradients": _DS_TUNING,
}

MINIGPT4_KEYS: dict[str, Rule] = {
    "model.arch": Rule("", "mini_gpt4 / minigpt4: this file's family; nothing to set",
                       "minigpt_v2 (448 px, no Q-Former, LoRA; another model): not supported"),
    "model.model_type": Rule("base", "pretrain_vicuna0 -> vicuna0_7b (--model-type vicuna0_13b for 13B); "
                                     "pretrain_llama2 -> minigpt4_llama2"),
    "model.llama_model": Rule("model.llm.path, model.llm.tokenizer", "unless a placeholder"),
    "model.ckpt": Rule("model.checkpoint", "loaded on top of the base weights (a placeholder is dropped)"),
    "model.max_txt_len": Rule("data.max_txt_len", "differs: MiniGPT-4 cuts the answer text; ours counts the whole "
                                                  "sample, image placeholders included"),
    "model.end_sym": Rule("", "the template's own end token (vicuna_v0: ###, minigpt4_llama2: </s>)"),
    "model.prompt_template": Rule("", "the template (model.llm.template of the model config) lays out every turn"),
    "model.prompt_path": Rule("", "prompts/alignment.txt: format minigpt4_captions asks its four questions",
                              "another file: custom prompt files are not read here; write the questions into "
                              "canonical records (DATA.md)"),
    "model.prompt": Rule("", "stage 1 has no prompt in MiniGPT-4 either; ours renders the template around the "
                             "caption"),
    "model.low_resource": Rule("", "inference option: chat --load-8bit loads the LLM's linear layers in int8"),
    "model.device_8bit": Rule("", "inference option: chat --gpu-id"),
    "model.has_qformer": Rule("base", "the model config (minigpt4_llama2 has none)"),
    "model.image_size": Rule("", "model.vision.image_size of the model config (224)"),
    "model.drop_path_rate": Rule("", "no stochastic depth in our ViT"),
    "model.use_grad_checkpoint": Rule("", "a frozen ViT keeps no activations in ours"),
    "model.vit_precision": Rule("", "ours runs the ViT in train.precision (model.vision.precision: fp16 gives "
                                    "LAVIS's)"),
    "model.freeze_vit": Rule("model.vision.frozen", "MiniGPT-4 default true"),
    "model.freeze_qformer": Rule("model.qformer.frozen", "MiniGPT-4 default true"),
    "model.num_query_token": Rule("", "model.qformer.num_query_tokens of the model config (32)"),
    "datasets.*": Rule("data.train[]", "laion, cc_sbu: format webdataset (tar shards, brace pattern); "
                                       "cc_sbu_align: format minigpt4_captions (its filter_cap.json)",
                       "any other builder (MiniGPT-v2's datasets)"),
    "datasets.*.build_info.storage": Rule("data.train[].ann_path", "the shard pattern, or the cc_sbu_align "
                                                                   "directory's filter_cap.json and image/"),
    "datasets.*.data_type": Rule("", "images follow from each record"),
    "datasets.*.batch_size": Rule("train.batch.micro_batch_size",
                                  "per GPU; x GPUs x accum_grad_iters is the global batch migrate keeps"),
    "datasets.*.sample_ratio": Rule("", "differs: MiniGPT-4 picks a dataset per iteration by this ratio; ours mixes "
                                        "data.train[].weight x size records per epoch"),
    "datasets.*.vis_processor.train.name": Rule("data.transform", "blip2_image_train / blip2_image_eval -> {kind: "
                                                                  "eval} (MiniGPT-4's is a bicubic squash)",
                                                "any other processor"),
    "datasets.*.vis_processor.train.image_size": Rule("", "model.vision.image_size (224)"),
    "datasets.*.text_processor.train.name": Rule("", "blip_caption's lower-casing and word cut are not applied"),
    "run.task": Rule("", "one task: multimodal chat training"),
    "run.lr_sched": Rule("", "differs: MiniGPT-4's linear_warmup_cosine_lr decays per epoch (a staircase); ours per "
                             "step"),
    "run.init_lr": Rule("train.optim.lr"),
    "run.min_lr": Rule("train.optim.min_lr"),
    "run.warmup_lr": Rule("", "ours warms up linearly from about 0"),
    "run.weight_decay": Rule("train.optim.weight_decay"),
    "run.beta2": Rule("train.optim.betas", "[0.9, beta2]"),
    "run.max_epoch": Rule("train.max_steps", "max_epoch x iters_per_epoch"),
    "run.iters_per_epoch": Rule("train.max_steps", "max_epoch x iters_per_epoch"),
    "run.warmup_steps": Rule("train.optim.warmup_steps"),
    "run.batch_size_train": Rule("train.batch.micro_batch_size",
                                 "per GPU (x GPUs x accum_grad_iters: the global batch)"),
    "run.batch_size_eval": _NO_EVAL_LOOP,
    "run.accum_grad_iters": Rule("train.batch.grad_accum_steps", "x GPUs / our DP keeps the global batch"),
    "run.num_workers": Rule("data.num_workers"),
    "run.seed": Rule("train.seed", "differs: MiniGPT-4 adds the rank"),
    "run.output_dir": Rule("train.output_dir"),
    "run.amp": Rule("train.precision", "true (fp16 autocast + GradScaler): bf16 (fp16 on pre-Ampere cards)"),
    "run.resume_ckpt_path": Rule("model.checkpoint", "weights only: MiniGPT-4 also restores its optimizer, scaler "
                                                     "and epoch; ours starts a new schedule from these weights"),
    "run.evaluate": _NO_EVAL_LOOP,
    "run.train_splits": Rule("", "data.train lists the training files"),
    "run.device": _LAVIS_DIST,
    "run.world_size": _LAVIS_DIST,
    "run.dist_url": _LAVIS_DIST,
    "run.distributed": _LAVIS_DIST,
    "run.wandb_log": Rule("", "set train.log.wandb_project to log to Weights & Biases (off unless set)"),
    "run.job_name": Rule("", "the run is named by train.output_dir"),
    "run.name": Rule("", "the run is named by train.output_dir"),
}

TABLES = {MPP: MPP_KEYS, MINIGPT4: MINIGPT4_KEYS}

FLAGS: dict[str, Rule] = {
    "--llm-grad-ckpt": Rule("--options train.parallel.activation_checkpoint_interval=0",
                            "differs: MPP's train_pipeline.py flag turns LLM checkpointing OFF (it is on by "
                            "default); ours is on (interval 1) in migrated recipes, 0 turns it off"),
    "--cfg-path": Rule("--cfg-path", "the same, with a migrated recipe (python -m lavis.config.migrate)"),
    "--num-stages": Rule("--num-stages", "the same"),
    "--options": Rule("--options", "the same, with our keys (values are YAML literals, never evaluated)"),
    "--local_rank": Rule("--local_rank", "the same (passed by the deepspeed launcher)"),
}
"""``train_pipeline.py`` / ``train.py`` flags of the predecessors."""


def table_key(key: str) -> str:
    """``datasets.<builder>.rest`` -> ``datasets.*.rest`` (the table's spelling)."""
    return re.sub(r"^datasets\.[^.]+", "datasets.*", key)


def rule_for(family: str, key: str) -> Rule | None:
    return TABLES[family].get(table_key(key))


def habit_hint(key: str) -> str | None:
    """A predecessor's config key typed where ours is expected (``--options run.init_lr=...``): where it went."""
    found = [(family, r) for family, table in TABLES.items() if (r := table.get(table_key(key))) is not None]
    tail = "; translate a whole file with python -m lavis.config.migrate"
    if not found:
        section = key.split(".", 1)[0]
        if section in ("run", "datasets"):
            where = "train.* (DeepSpeed's dict is derived from it)" if section == "run" else "data.train"
            return f"`{section}.*` is the predecessors' (LAVIS-style) section; ours is {where}{tail}"
        return None
    families = " / ".join(dict.fromkeys(f.split(" / ")[0] for f, _ in found))
    r = found[0][1]
    what = f"`{r.ours}` here" if r.ours else "not a setting here"
    return f"{families}'s `{key}` is {what}" + (f" ({r.note})" if r.note else "") + tail


def flag_hint(flag: str) -> str | None:
    """A predecessor's command-line flag that ours spells differently: the equivalent."""
    r = FLAGS.get(flag.split("=", 1)[0])
    if r is None or r.ours == flag.split("=", 1)[0]:
        return None
    return f"{flag} is MPP-Qwen-Next's flag; here: {r.ours} ({r.note})"


def table_markdown() -> str:
    """docs/MIGRATING.md's generated section: every key and flag with its translation or refusal."""
    out = []
    for family, table in TABLES.items():
        out += [f"### {family} config keys", "", "| theirs | ours | how / why | refused |", "|---|---|---|---|"]
        out += [f"| `{k}` | {f'`{r.ours}`' if r.ours else 'none'} | {r.note} | {r.refused} |"
                for k, r in table.items()]
        out.append("")
    out += ["### Training command-line flags", "", "| theirs | ours | how / why |", "|---|---|---|"]
    out += [f"| `{k}` | `{r.ours}` | {r.note} |" for k, r in FLAGS.items()]
    return "\n".join(out) + "\n"
