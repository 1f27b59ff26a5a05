"""Pipeline-parallel training: build -> plan -> PipelineModule -> deepspeed.initialize -> one flat loop.

Launch with ``deepspeed --num_gpus W train_pipeline.py ...`` or ``torchrun --nproc_per_node W ...``
(W = stages x data-parallel replicas). Every rank runs this same function; rank 0 (stage 0, replica 0) logs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lavis.config.load import deepspeed_config, load_config, save_config, to_dict
from lavis.config.schema import Config
from lavis.data.collate import Collator
from lavis.data.conversation import template_from_config
from lavis.data.datasets import ConversationDataset, StepSampler, load_records
from lavis.data.step_loader import StepLoader
from lavis.data.tokenizer import ENDOFTEXT, load_tokenizer
from lavis.engine import checkpoint
from lavis.engine.distributed import init_distributed, local_world_size, print0, shutdown
from lavis.engine.hardware import known_peak_tflops
from lavis.engine.metrics import MetricsLogger
from lavis.engine.optim import PipeAdamW, lr_lambda, param_groups
from lavis.engine.pipe_module import LavisPipelineModule, cast_float_buffers_, layer_specs
from lavis.engine.profiling import InstructionTimer
from lavis.model.llm import decoder_parts, llm_hf_config
from lavis.pipeline.plan import LLM_DIMS, checkpoint_blocks, format_plan, layer_table, plan_for_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", required=True, help="YAML recipe (e.g. lavis/projects/demo/shapes.yaml)")
    p.add_argument("--num-stages", type=int, help="pipeline stages (overrides train.num_stages)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
    p.add_argument("--output-dir", help="run directory (overrides train.output_dir)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (overrides train.save_every)")
    p.add_argument("--partition", help="explicit stage boundaries, e.g. 0,3,5 (overrides the planner)")
    p.add_argument("--stop-at-step", type=int,
                   help="stop (with a checkpoint) after this optimizer step without changing the LR schedule; "
                        "run again to continue, e.g. for time-limited cluster jobs")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to resume from (a run always resumes from `latest` if present)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=1e-4 data.max_txt_len=256")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.cfg_path, args.options)
    t = cfg.train
    updates: dict[str, Any] = {}
    if args.num_stages is not None:
        updates["num_stages"] = args.num_stages
    if args.max_steps is not None:
        updates["max_steps"] = args.max_steps
    if args.output_dir is not None:
        updates["output_dir"] = args.output_dir
    if args.save_every is not None:
        updates["save_every"] = args.save_every
    if args.partition is not None:
        updates["partition"] = [int(x) for x in args.partition.split(",")]
    elif args.num_stages is not None and t.partition is not None and len(t.partition) != args.num_stages + 1:
        updates["partition"] = None  # the recipe's partition was for another stage count
    return replace(cfg, train=replace(t, **updates)) if updates else cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = resolve_config(args)
    init_distributed()
    # No `finally`: a rank that fails must not wait in shutdown's barrier while the others wait in a collective;
    # it exits with its traceback and the launcher stops the rest.
    train(cfg, require_resume=args.resume, stop_at_step=args.stop_at_step)
    shutdown()


def train(
    cfg: Config, *, require_resume: bool = False, stop_at_step: int | None = None, measure_from: int | None = None
) -> dict[str, Any] | None:
    """Train; returns None, or with ``measure_from`` (``python -m lavis.bench``) per-rank measurements of the steps
    from that one on, and then neither resumes nor saves checkpoints."""
    import deepspeed

    t = cfg.train
    world = dist.get_world_size()
    rank = dist.get_rank()
    if world % t.num_stages:
        raise ValueError(f"{world} processes cannot form {t.num_stages} pipeline stages (need a multiple)")
    dp = world // t.num_stages
    if not torch.cuda.is_available():
        torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // local_world_size()))
    elif t.num_threads:
        torch.set_num_threads(t.num_threads)
    out = Path(t.output_dir)

    tok = load_tokenizer(cfg.model.llm.tokenizer)
    hf = llm_hf_config(cfg.model.llm)
    if tok.vocab_size > hf.vocab_size:
        raise ValueError(
            f"tokenizer {tok.source} has {tok.vocab_size} tokens but model.llm vocab_size is {hf.vocab_size}"
        )
    tpl = template_from_config(tok, cfg)
    placeholder_id = tpl.placeholder_id

    # --- plan ---------------------------------------------------------------------------------------------------
    table = layer_table(hf.num_hidden_layers)
    dims = {k: getattr(hf, k) for k in LLM_DIMS}
    plan = plan_for_config(cfg, dims, dp)
    parts = plan.parts
    print0(f"pipeline: {t.num_stages} stage(s) x {dp} data-parallel replica(s), boundaries {parts}\n"
           + format_plan(parts, plan.costs, plan.work, plan.optim_bytes, known_peak_tflops()))

    # --- model --------------------------------------------------------------------------------------------------
    pipe = LavisPipelineModule(
        layer_specs(cfg.model, hf, decoder_parts(hf), placeholder_id, checkpoint_blocks(t, hf.num_hidden_layers),
                    feature_cache=cfg.data.feature_cache,  # INTEGRATOR: stage 0 builds no frozen vision module
                    float_mask=t.inter_stage_mask == "float_additive"),  # INTEGRATOR: bench --compare predecessor
        parts,
        activation_checkpoint_interval=t.activation_checkpoint_interval,
        checkpointable_layers=["DecoderBlockPipe"],
        dynamic_shape=not cfg.data.fixed_length,
    )
    for rep in pipe.load_weights(cfg.model, table):  # this rank's layers only; raises if a file does not fit
        print(f"[stage {pipe.stage_id}] {rep.summary()}", flush=True)
    pipe.apply_trainable(cfg.model, table)
    stage = pipe.stage_id
    ds_cfg = deepspeed_config(t, dp)
    own_clip = t.precision == "fp32" and t.zero_stage == 0  # DeepSpeed's norm is wrong here (see engine.optim)
    optimizer = PipeAdamW(
        param_groups(pipe, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
        clip=t.grad_clip if own_clip else 0.0,
        norm_group=pipe._grid.get_pipe_parallel_group() if own_clip else None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup=t.warmup_steps, total=t.max_steps, lr=t.lr, min_lr=t.min_lr)
    )
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if t.precision != "fp32":
        cast_float_buffers_(pipe, torch.bfloat16 if t.precision == "bf16" else torch.float16)
    print0(f"optimizer: {type(engine.optimizer).__name__} ({t.precision}, ZeRO stage {engine.zero_optimization_stage()}"
           f"{', optimizer state offloaded to CPU' if engine.zero_cpu_offload() else ''})")

    # --- resume -------------------------------------------------------------------------------------------------
    start_step = 0
    tag = checkpoint.read_latest(out) if measure_from is None else None
    if tag is None and require_resume:
        raise FileNotFoundError(f"--resume: no checkpoint in {out} (no `latest` file)")
    if tag is not None:
        meta = checkpoint.load_meta(out / tag)
        same_layout = meta["parts"] == parts and meta["dp_size"] == dp
        # Layer files hold only trainable weights (saved with exclude_frozen_parameters), hence non-strict here; the
        # frozen ones were just built from the config's base weights. LavisPipelineModule.load_state_dir then checks
        # that every trainable weight was in its file.
        engine.load_checkpoint(str(out), tag=tag, load_module_strict=False, load_optimizer_states=same_layout,
                               load_lr_scheduler_states=True)
        start_step = int(meta["step"])
        print0(f"resumed from {out / tag} at step {start_step}")
        if not same_layout:
            print0(f"WARNING: the checkpoint was saved with partition {meta['parts']} x dp {meta['dp_size']}, this run "
                   f"uses {parts} x dp {dp}: module weights were loaded, optimizer state was reset")

    # The run's saved config names the tokenizer file it wrote, so chat never rebuilds or re-downloads it.
    llm = replace(cfg.model.llm, tokenizer=str(out / tok.file_name))
    saved_cfg = replace(cfg, model=replace(cfg.model, llm=llm))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(saved_cfg, out / "config.yaml")
        tok.save_to(out)
    dist.barrier()

    # --- data ---------------------------------------------------------------------------------------------------
    # Only the first stage (inputs) and the last stage (labels) read data; the last one never decodes media. Every
    # rank joins StepLoader.next_step's collective, which keeps both stages on the same samples (on_bad_sample).
    first, last = stage == 0, stage == t.num_stages - 1
    if cfg.data.on_bad_sample == "skip" and cfg.data.fixed_length:
        raise ValueError("data.on_bad_sample=skip shrinks micro-batches, which needs data.fixed_length=false")
    dataset = sampler = collate = None
    if first or last:
        if not cfg.data.train:
            raise ValueError("data.train is empty: name at least one dataset (see DATA.md)")
        records = [load_records(d) for d in cfg.data.train]
        dataset = ConversationDataset(sum(records, []), tpl, cfg.data, cfg.model.vision.image_size,
                                      load_media=first, label_mode=cfg.data.label_mode)
        sampler = StepSampler([len(r) for r in records], [d.weight for d in cfg.data.train], seed=t.seed,
                              micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
                              dp_rank=engine.grid.get_data_parallel_rank(), dp_size=dp, start_step=start_step,
                              length_of=dataset.num_tokens if cfg.data.group_by_length else None)
        collate = Collator(tok.token_id(ENDOFTEXT), cfg.data.max_txt_len, cfg.data.pad_to_multiple_of,
                           cfg.data.fixed_length)
    steps = StepLoader(dataset, sampler, collate, grad_accum_steps=t.grad_accum_steps,
                       micro_batch_size=t.micro_batch_size, dp_rank=engine.grid.get_data_parallel_rank(),
                       dp_size=dp, on_bad_sample=cfg.data.on_bad_sample,
                       num_workers=cfg.data.num_workers if first else 0,  # the label-only last stage decodes nothing
                       device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)

    counter = None
    if rank == 0:  # padding efficiency, measured on the batches stage 0 of replica 0 really runs
        counter = _PadCounter(None)

    meta = {
        "layers": checkpoint.table_to_json(table),
        "parts": parts,
        "dp_size": dp,
        "config": to_dict(saved_cfg),
        "tokenizer": tok.file_name,
        "placeholder_id": placeholder_id,
    }

    # --- loop ---------------------------------------------------------------------------------------------------
    bar = _Progress(start_step, t.max_steps) if rank == 0 else None
    logger = MetricsLogger(out, t, to_dict(saved_cfg), start_step) if rank == 0 else None
    g = t.micro_batch_size * t.grad_accum_steps * dp
    end = t.max_steps if stop_at_step is None else min(stop_at_step, t.max_steps)
    timer = InstructionTimer(engine) if measure_from is not None else None
    for step in range(start_step, end):
        if timer is not None and step == measure_from:
            timer.enabled = True
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        batches = steps.next_step(step)  # a collective on every rank, outside train_batch
        data_iter = iter(batches) if batches is not None else None
        if counter is not None:
            counter.it, data_iter = data_iter, counter
        loss = engine.train_batch(data_iter)
        dt = time.perf_counter() - t0
        grad_norm = optimizer.last_grad_norm if own_clip else engine.get_global_grad_norm()
        if step == start_step:
            _report_memory(stage)
        if rank == 0:
            tokens = steps.step_tokens(step)
            skipped = steps.step_skips(step)
            row = {"step": step + 1, "loss": float(loss), "lr": lr,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens": tokens, "samples": g - skipped, "skipped": skipped, "step_time_s": round(dt, 4),
                   **counter.take()}
            logger.log(row)
            bar.update(row)
        done = step + 1
        if measure_from is None and (done == end or (t.save_every and done % t.save_every == 0)):
            tag_dir = checkpoint.save(engine, out, done, meta, t.keep_last)
            print0(f"saved {tag_dir}")
    if rank == 0:
        bar.close()
        logger.close()
    if steps.summary():
        print0(steps.summary())
    if timer is None:
        return None
    mine = {"rank": rank, "stage": stage, "dp_rank": engine.grid.get_data_parallel_rank(),
            "instruction_seconds": dict(timer.seconds), "compute_seconds": timer.compute_seconds(),
            "peak_memory_gib": _peak_memory_gib(), "memory_kind": "gpu" if torch.cuda.is_available() else "host_rss"}
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, mine)
    return {"ranks": ranks, "parts": parts, "rows_path": str(out / "metrics.jsonl")}


class _PadCounter:
    """Passes batches through, counting real (mask 1) and padded (mask numel) token slots and images (video frames)
    since the last take()."""

    def __init__(self, it: Any) -> None:
        self.it, self.real, self.padded, self.images = it, 0, 0, 0

    def __iter__(self) -> _PadCounter:
        return self

    def __next__(self) -> Any:
        batch = next(self.it)
        pixels_NCHW, _, mask_BL = batch[0]
        self.images += pixels_NCHW.shape[0]
        self.real += int(mask_BL.sum())
        self.padded += mask_BL.numel()
        return batch

    def take(self) -> dict[str, int]:
        out = {"real_tokens_r0": self.real, "padded_tokens_r0": self.padded, "images_r0": self.images}
        self.real = self.padded = self.images = 0
        return out


class _Progress:
    """Rank-0 progress: a tqdm bar with loss, lr, tokens/s and ETA."""

    def __init__(self, start: int, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                        mininterval=2.0 if sys.stderr.isatty() else 15.0, dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             tok_s=f"{row['tokens'] / max(row['step_time_s'], 1e-9):.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _report_memory(stage: int) -> None:
    """Collective: rank 0 prints each stage's peak memory after the first step."""
    mem = _peak_memory_gib()
    kind = "GPU peak allocated" if torch.cuda.is_available() else "host peak RSS"
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (dist.get_rank(), stage, mem))
    if dist.get_rank() == 0:
        print0(f"memory after the first step ({kind}): "
               + ", ".join(f"rank {r} (stage {s}) {m:.2f} GiB" for r, s, m in rows))
