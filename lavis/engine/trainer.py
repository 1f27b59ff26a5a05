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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from lavis.config.load import deepspeed_config, load_config, optimizer_clips, save_config, to_dict, with_values
from lavis.config.old_keys import upgrade_config
from lavis.config.schema import Config
from lavis.data.collate import PipeBatch
from lavis.data.conversation import ChatTemplate
from lavis.data.datasets import StepSampler, dataset_fingerprint, load_records
from lavis.data.records import ConcatRecords
from lavis.data.step_loader import StepLoader
from lavis.data.tokenizer import AnyTokenizer
from lavis.engine import checkpoint, ds_compat, relayout, safe_load
from lavis.engine.distributed import init_distributed, local_world_size, print0, shutdown
from lavis.engine.guards import (
    NonFiniteError,
    StepVerdict,
    StopSignal,
    agree,
    is_finite,
    nonfinite_advice,
    trainable_weights_finite,
)
from lavis.engine.hardware import known_peak_tflops
from lavis.engine.hooks import Hook
from lavis.engine.metrics import MetricsLogger
from lavis.engine.optim import GlobalNormClip, build_optimizer, lr_lambda, param_groups
from lavis.engine.pipe_module import LavisPipelineModule, cast_float_buffers_, cast_float_params_, to_layer_specs
from lavis.engine.run_dir import (
    RunDirError,
    RunLock,
    check_resume_config,
    check_resume_data,
    check_tokenizer,
    find_resume_tag,
    resume_grad_accum,
)
from lavis.families import describe, family_named
from lavis.families import plan as plan_model
from lavis.model.spec import LayerEntry, ModelSpec
from lavis.pipeline.family import RunText
from lavis.pipeline.plan import format_plan, offloaded_stages
from lavis.predecessors.keys import flag_hint
from lavis.vlm.collate import VLMPipeBatch, VLMStageInputs
from lavis.vlm.data import save_run_processor

if TYPE_CHECKING:
    from collections.abc import Iterator

    from deepspeed.runtime.pipe.engine import PipelineEngine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", required=True, help="YAML recipe (e.g. lavis/projects/demo/shapes.yaml)")
    p.add_argument("--num-stages", type=int, help="pipeline stages (overrides train.parallel.num_stages)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
    p.add_argument("--output-dir", help="run directory (overrides train.output_dir)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (overrides train.checkpoint.save_every)")
    p.add_argument("--partition", help="explicit stage boundaries, e.g. 0,3,5 (overrides the planner)")
    p.add_argument("--stop-at-step", type=int,
                   help="stop (with a checkpoint) after this optimizer step without changing the LR schedule; "
                        "run again to continue, e.g. for time-limited cluster jobs")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to resume from (a run always resumes from `latest` if present)")
    p.add_argument("--resume-from", metavar="global_stepN",
                   help="resume from this checkpoint of the output directory instead of the one `latest` names")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.optim.lr=1e-4 data.max_txt_len=256")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args, unknown = p.parse_known_args(argv)
    if unknown:  # a predecessor's flag gets its equivalent (lavis.predecessors.keys.FLAGS)
        hints = [h for h in map(flag_hint, unknown) if h]
        p.error(f"unrecognized arguments: {' '.join(unknown)}" + "".join(f"; {h}" for h in hints))
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.cfg_path, args.options)
    p = cfg.train.parallel
    updates: dict[str, Any] = {}
    if args.num_stages is not None:
        updates["train.parallel.num_stages"] = args.num_stages
    if args.max_steps is not None:
        updates["train.max_steps"] = args.max_steps
    if args.output_dir is not None:
        updates["train.output_dir"] = args.output_dir
    if args.save_every is not None:
        updates["train.checkpoint.save_every"] = args.save_every
    if args.partition is not None:
        updates["train.parallel.partition"] = [int(x) for x in args.partition.split(",")]
    elif args.num_stages is not None and p.partition is not None and len(p.partition) != args.num_stages + 1:
        updates["train.parallel.partition"] = None  # the recipe's partition was for another stage count
    return with_values(cfg, updates)


def main(argv: list[str] | None = None, hooks_for: Callable[[Config], Sequence[Hook]] | None = None) -> None:
    """``train_pipeline.py``: ``hooks_for`` gives the hooks the config asks for (the script passes
    ``lavis.eval.train_hook.config_hooks``: the evaluation hook sits above engine)."""
    args = parse_args(argv)
    cfg = resolve_config(args)
    init_distributed()
    # No `finally`: a rank that fails must not wait in shutdown's barrier while the others wait in a collective;
    # it exits with its traceback and the launcher stops the rest.
    train(cfg, require_resume=args.resume, resume_from=args.resume_from, stop_at_step=args.stop_at_step,
          hooks=hooks_for(cfg) if hooks_for is not None else ())
    shutdown()


@dataclass
class Run:
    """Everything one training run is made of, built by :func:`build_run` and advanced by :func:`fit`."""

    cfg: Config
    """The resolved config as saved in the run directory (``model.llm.tokenizer`` names the run's own copy)."""
    out: Path
    engine: PipelineEngine
    pipe: LavisPipelineModule
    optimizer: torch.optim.Optimizer
    text: RunText
    """What makes the samples, from the model family: a tokenizer and template, or a transformers processor."""
    table: list[LayerEntry]
    """The model's layer list in pipeline order (``lavis.pipeline.plan.layer_table``)."""
    boundaries: list[int]
    """Stage s owns layers ``boundaries[s]`` to ``boundaries[s+1]-1`` (saved as ``parts`` in lavis_meta.json)."""
    dp: int
    own_clip: bool
    """fp32 or adamw_bf16 without ZeRO: our optimizer clips with the all-stage norm (DeepSpeed's is wrong there)."""
    start_step: int = 0
    nonfinite_steps: int = 0
    protected_tags: set[str] = field(default_factory=set)
    """Checkpoint tags that rotation (``train.checkpoint.keep_last``) never deletes (e.g. the best one by an eval
    metric)."""
    steps: StepLoader | None = None
    spec: ModelSpec | None = None
    """The model's description, resolved once by :func:`build_run`."""
    data: list[dict[str, Any]] = field(default_factory=list)
    """Each training dataset's path, format, record count and content fingerprint (rank 0, which writes the meta)."""

    @property
    def tpl(self) -> ChatTemplate:
        """The run's chat template (a family whose samples its processor makes has none)."""
        if self.text.template is None:
            family = self.spec.family if self.spec is not None else "this"
            raise ValueError(f"the {family} model family's prompts are its processor's chat template: our templates' "
                             "tools (train.eval.data, train.eval.generate) do not take its runs yet; unset them")
        return self.text.template

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def stage(self) -> int:
        return self.pipe.stage_id

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.cfg.train.parallel.num_stages - 1

    def meta(self) -> dict[str, Any]:
        """What ``lavis_meta.json`` records besides the step (converters and resume read it)."""
        tok = self.text.tokenizer
        return {"layers": checkpoint.table_to_json(self.table), "parts": self.boundaries, "dp_size": self.dp,
                "config": to_dict(self.cfg), "tokenizer": tok.file_name if tok is not None else None,
                "placeholder_id": self.text.placeholder_id, "nonfinite_steps": self.nonfinite_steps, "data": self.data}

    def save(self, step: int) -> Path:
        """Collective: write the checkpoint of ``step`` (never one with non-finite weights) and make it ``latest``."""
        if not trainable_weights_finite(self.pipe):
            raise NonFiniteError(
                f"step {step}: some trained weights are not finite; no checkpoint was written and `latest` still "
                f"names the last good one ({checkpoint.read_latest(self.out)}). Lower train.optim.lr and resume from "
                "it.")
        meta = {**self.meta(), relayout.NAMES_KEY: relayout.gather_names(self.engine)}  # a collective
        return checkpoint.save(self.engine, self.out, step, meta, self.cfg.train.checkpoint.keep_last,
                               protected=self.protected_tags)


def train(
    cfg: Config, *, require_resume: bool = False, resume_from: str | None = None, stop_at_step: int | None = None,
    hooks: Sequence[Hook] = (), resume: bool = True, save: bool = True, spec: ModelSpec | None = None,
) -> Run:
    """Lock the run directory, build the run, restore it from its checkpoint, fit it. ``resume``/``save`` False
    (``python -m lavis.bench``): start fresh and write no checkpoints. ``spec``: the model's description when the
    caller resolved it already (see :func:`build_run`)."""
    out = Path(cfg.train.output_dir)
    stop_signal = StopSignal().install()  # from the start: a SIGTERM while the run is built stops it after step 1
    lock = _lock_run_dir(out)
    run = None
    try:
        tag = find_resume_tag(out, require=require_resume, resume_from=resume_from) if resume else None
        run = build_run(cfg, tag, spec)
        restore(run, tag)
        run.steps = build_data(run)
        _check_resume_data(run, tag)
        write_run_files(run)
        fit(run, hooks, stop_at_step=stop_at_step, save=save, stop_signal=stop_signal)
        return run
    finally:  # no collective here: a failing rank must not wait for the others
        stop_signal.uninstall()
        if run is not None and run.steps is not None:
            run.steps.close()  # data workers ignore SIGTERM (preemption), so they are ended explicitly
        if lock is not None:
            lock.release()


def _lock_run_dir(out: Path) -> RunLock | None:
    """Collective: rank 0 takes the run directory's lock; every rank fails alike if another run holds it."""
    lock, error = None, None
    if dist.get_rank() == 0:
        lock = RunLock(out)
        try:
            lock.acquire()
        except RunDirError as e:
            lock, error = None, str(e)
        if lock is not None and lock.stale:
            print0(f"NOTE: {out} had a lock left by a run that is no longer running ({lock.stale}); taking it over")
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise RunDirError(shared[0])
    return lock


def _set_threads(t: Any) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // local_world_size()))
    elif t.num_threads:
        torch.set_num_threads(t.num_threads)


def build_run(cfg: Config, resume_tag: str | None, spec: ModelSpec | None = None) -> Run:
    """Tokenizer and template, the stage plan, this rank's layers with their weights, optimizer and engine. With
    ``resume_tag``, first refuse a config that changes what the checkpoint fixes (nothing is built or written).
    ``spec``: the model's description (``lavis.families.describe``), resolved here when not given."""
    import deepspeed

    t = cfg.train
    out = Path(t.output_dir)
    world = dist.get_world_size()
    if world % t.parallel.num_stages:
        raise ValueError(f"{world} processes cannot form {t.parallel.num_stages} pipeline stages (need a multiple)")
    dp = world // t.parallel.num_stages
    _set_threads(t)

    spec = spec or describe(cfg.model)  # the one description of the model this process uses
    family = family_named(spec.family)
    text = family.run_text(spec, cfg)  # the family's tokenizer and template, or its processor
    tok = text.tokenizer
    if tok is not None:  # the run's saved config names the tokenizer file it wrote, so chat never rebuilds it
        cfg = replace(cfg, model=replace(cfg.model, llm=replace(cfg.model.llm, tokenizer=str(out / tok.file_name))))
    if resume_tag is not None:
        cfg = _check_resume(out / resume_tag, cfg, tok, dp)
        t = cfg.train

    table = spec.table
    plan = plan_model(spec, cfg, dp)
    boundaries = plan.parts
    print0(f"pipeline: {t.parallel.num_stages} stage(s) x {dp} data-parallel replica(s), boundaries {boundaries}\n"
           + format_plan(boundaries, plan.costs, plan.work, plan.optim_bytes, known_peak_tflops()))

    pipe = LavisPipelineModule(
        to_layer_specs(family.pipeline_layers(spec, cfg, text.placeholder_id)),
        boundaries,
        offload_stages=offloaded_stages(t),
        activation_checkpoint_interval=t.parallel.activation_checkpoint_interval,
        checkpointable_layers=list(family.recomputed_layers),
        dynamic_shape=not cfg.data.fixed_length,
    )
    for rep in pipe.load_weights(family, spec, cfg.model):  # this rank's layers only; raises if a file does not fit
        print(f"[stage {pipe.stage_id}] {rep.summary()}", flush=True)
    pipe.apply_trainable_by(lambda plain: family.is_trainable(cfg.model, plain), table)
    family.prepare_stage(spec, cfg, pipe)  # tied weights, checks of what the stage reads besides its weights
    if pipe.offload_activations:
        print(f"[stage {pipe.stage_id}] activation offload: saved activations kept in host memory", flush=True)
    if t.optim.optimizer == "adamw_bf16":  # bf16 weights are ours, not DeepSpeed's (its bf16 mode adds fp32 masters)
        cast_float_params_(pipe, torch.bfloat16)
    own_clip = optimizer_clips(t)  # DeepSpeed's norm is wrong where its own fp32 path clips (see engine.optim)
    optimizer = build_optimizer(
        t.optim.optimizer, param_groups(pipe, t.optim.weight_decay), lr=t.optim.lr, betas=t.optim.betas,
        eps=t.optim.eps,
        weight_decay=t.optim.weight_decay,
        clip=t.optim.grad_clip if own_clip else 0.0,
        norm_group=ds_compat.pipe_parallel_group(pipe) if own_clip else None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t))
    # DeepSpeed annotates lr_scheduler with torch's old _LRScheduler; LambdaLR is an LRScheduler, which it takes.
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer,
                                           lr_scheduler=scheduler,  # pyright: ignore[reportArgumentType]
                                           config=deepspeed_config(t, dp))
    assert isinstance(engine, deepspeed.PipelineEngine), "a PipelineModule gets DeepSpeed's pipeline engine"
    safe_load.install(engine)
    if t.precision != "fp32":
        cast_float_buffers_(pipe, torch.bfloat16 if t.precision == "bf16" else torch.float16)
    print0(f"optimizer: {t.optim.optimizer}, {type(engine.optimizer).__name__} ({t.precision}, "
           f"ZeRO stage {engine.zero_optimization_stage()}"
           f"{', optimizer state offloaded to CPU' if engine.zero_cpu_offload() else ''})")
    return Run(cfg=cfg, out=out, engine=engine, pipe=pipe, optimizer=optimizer, text=text, table=table,
               boundaries=boundaries, dp=dp, own_clip=own_clip, spec=spec)


def _lr_lambda(t: Any) -> Any:
    return lr_lambda(warmup=t.optim.warmup_steps, total=t.max_steps, lr=t.optim.lr, min_lr=t.optim.min_lr)


def _check_resume(tag_dir: Path, cfg: Config, tok: AnyTokenizer | None, dp: int) -> Config:
    """Refuse a resume that changes what the checkpoint fixes; print what changes from the resumed step. Returns
    ``cfg`` with the gradient accumulation that keeps the checkpoint's global batch on ``dp`` replicas."""
    saved = checkpoint.load_meta(tag_dir)
    b = cfg.train.batch
    saved_config = upgrade_config(saved["config"], str(tag_dir), warn=False)  # a run saved with flat train keys
    saved_batch = {**to_dict(Config())["train"]["batch"], **saved_config.get("train", {}).get("batch", {})}
    gas = resume_grad_accum(saved_batch, int(saved["dp_size"]), b.micro_batch_size, b.grad_accum_steps, dp, tag_dir)
    cfg = with_values(cfg, {"train.batch.grad_accum_steps": gas}) if gas != b.grad_accum_steps else cfg
    meta, changes = check_resume_config(tag_dir, to_dict(cfg), defaults=to_dict(Config()))
    _verify_checkpoint_files(tag_dir)
    if tok is not None:  # a family whose processor makes the samples has no tokenizer file of ours
        check_tokenizer(tag_dir / meta.get("tokenizer", tok.file_name), tok)
    for line in changes:
        print0(f"resume: {line} (from step {meta['step']} on)")
    return cfg


def _verify_checkpoint_files(tag_dir: Path) -> None:
    """Collective: each rank checks a share of the checkpoint's files against its checksums; every rank fails alike,
    naming the damaged file, before anything is loaded or written."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        note, error = checkpoint.verify_checksums(tag_dir, part=rank, parts=world), None
    except checkpoint.ChecksumError as e:
        note, error = None, str(e)
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise checkpoint.ChecksumError(first)
    if note:
        print0(note)


def restore(run: Run, tag: str | None) -> None:
    """Load the checkpoint ``tag`` (DeepSpeed's files, read by the restricted unpickler) and put this config's LR
    schedule in force from the resumed step. A checkpoint of another layout (stages x replicas) gets its optimizer
    state re-mapped per parameter (:mod:`lavis.engine.relayout`)."""
    if tag is None:
        return
    meta = checkpoint.load_meta(run.out / tag)
    same_layout = meta["parts"] == run.boundaries and meta["dp_size"] == run.dp
    # Layer files hold only trainable weights (saved with exclude_frozen_parameters), hence non-strict here; the
    # frozen ones were just built from the config's base weights. LavisPipelineModule.load_state_dir then checks
    # that every trainable weight was in its file.
    run.engine.load_checkpoint(str(run.out), tag=tag, load_module_strict=False, load_optimizer_states=same_layout,
                               load_lr_scheduler_states=True)
    if not same_layout and relayout.can_remap(run.out / tag, meta):
        _remap_optimizer(run, tag, meta)
    elif not same_layout:
        print0(f"WARNING: {tag} was written with {relayout.describe(meta['parts'], int(meta['dp_size']))} by an "
               f"older version that does not name its optimizer state per parameter; this run uses "
               f"{relayout.describe(run.boundaries, run.dp)}: module weights were loaded, optimizer state was reset")
    scheduler = run.engine.lr_scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR), "build_run gives DeepSpeed our LambdaLR"
    apply_schedule(scheduler, run.cfg.train.optim.lr)
    run.start_step = int(meta["step"])
    run.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
    print0(f"resumed from {run.out / tag} at step {run.start_step}")


def _remap_optimizer(run: Run, tag: str, meta: dict[str, Any]) -> None:
    """Collective: every rank takes its parameters' optimizer state from the checkpoint's stages; every rank fails
    alike (naming the reason) when one cannot."""
    error = None
    try:
        relayout.load_remapped(run.engine, run.out / tag, meta, run.boundaries[run.stage],
                               run.boundaries[run.stage + 1])
    except relayout.RelayoutError as e:
        error = str(e)
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    old, new = relayout.describe(meta["parts"], int(meta["dp_size"])), relayout.describe(run.boundaries, run.dp)
    if first is not None:
        raise RunDirError(f"cannot resume {tag} (written with {old}) on {new}: {first}. Nothing was written.")
    print0(f"resuming {tag} written with {old} on {new}; optimizer state re-mapped per parameter "
           f"(stage boundaries {meta['parts']} -> {run.boundaries})")


def _check_resume_data(run: Run, tag: str | None) -> None:
    """Collective: rank 0 compares the training data with the checkpoint's record (``lavis_meta.json`` ``data``);
    every rank refuses alike when it changed in place (unless ``train.allow_data_change``)."""
    if tag is None:
        return
    lines: list[str] = []
    shared: list[str | None] = [None]
    if run.rank == 0:
        try:
            lines = check_resume_data(run.out / tag, checkpoint.load_meta(run.out / tag).get("data"), run.data,
                                      run.cfg.train.allow_data_change)
        except RunDirError as e:
            shared = [str(e)]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise RunDirError(shared[0])
    for line in lines:
        print0(f"resume: {line}")


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After a resume: the saved scheduler state carries the old base LR and the optimizer state the old group LRs;
    put this config's schedule (its lambda is already this config's) in force at the saved position."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


def write_run_files(run: Run) -> None:
    """``config.yaml`` (atomically, only now that the model and checkpoint loaded) and the tokenizer file or the
    processor (``processor/``)."""
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.out / "config.yaml")
        if run.text.tokenizer is not None:
            run.text.tokenizer.save_to(run.out)
        if run.text.processor is not None:
            save_run_processor(run.text.processor, run.out)
    dist.barrier()


def build_data(run: Run) -> StepLoader:
    """Only the first stage (inputs) and the last stage (labels) read data; the last one never decodes media. Every
    rank joins StepLoader.next_step's collective, which keeps both stages on the same samples (on_bad_sample)."""
    cfg, t = run.cfg, run.cfg.train
    if cfg.data.on_bad_sample == "skip" and cfg.data.fixed_length:
        raise ValueError("data.on_bad_sample=skip shrinks micro-batches, which needs data.fixed_length=false")
    dataset = sampler = collate = None
    dp_rank = ds_compat.data_parallel_rank(run.engine)
    if run.is_first_stage or run.is_last_stage:
        if not cfg.data.train:
            raise ValueError("data.train is empty: name at least one dataset (see DATA.md)")
        records = [load_records(d, allow_outside_root=cfg.data.allow_outside_root) for d in cfg.data.train]
        if run.rank == 0:  # what lavis_meta.json records (rank 0 writes it)
            run.data = [dataset_fingerprint(d, r) for d, r in zip(cfg.data.train, records)]
        assert run.spec is not None  # build_run described the model
        dataset, collate = family_named(run.spec.family).training_data(run.text, ConcatRecords(records), cfg,
                                                                       load_media=run.is_first_stage)
        sampler = StepSampler([len(r) for r in records], [d.weight for d in cfg.data.train], seed=t.seed,
                              micro_batch_size=t.batch.micro_batch_size, grad_accum_steps=t.batch.grad_accum_steps,
                              dp_rank=dp_rank, dp_size=run.dp, start_step=run.start_step,
                              length_of=dataset.num_tokens if cfg.data.group_by_length else None)
    return StepLoader(dataset, sampler, collate, grad_accum_steps=t.batch.grad_accum_steps,
                      micro_batch_size=t.batch.micro_batch_size, dp_rank=dp_rank, dp_size=run.dp,
                      on_bad_sample=cfg.data.on_bad_sample,
                      num_workers=cfg.data.num_workers if run.is_first_stage else 0,  # the last stage decodes nothing
                      device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)


def fit(run: Run, hooks: Sequence[Hook] = (), *, stop_at_step: int | None = None, save: bool = True,
        stop_signal: StopSignal | None = None) -> None:
    """The loop: one ``train_batch`` per optimizer step, the guards every rank agrees on, metrics, checkpoints,
    hooks. Stops early (with a checkpoint, exit 0) on SIGTERM/SIGINT (``stop_signal``: one installed by the caller)."""
    t = run.cfg.train
    end = t.max_steps if stop_at_step is None else min(stop_at_step, t.max_steps)
    own_signal = stop_signal is None
    stop_signal = stop_signal or StopSignal().install()
    assert run.steps is not None  # build_data ran
    rank0 = run.rank == 0
    counter = _PadCounter(None) if rank0 else None  # padding efficiency of the batches stage 0 of replica 0 runs
    bar = _Progress(run.start_step, t.max_steps) if rank0 else None
    logger = MetricsLogger(run.out, t, to_dict(run.cfg), run.start_step) if rank0 else None
    for h in hooks:
        h.on_start(run)
    try:
        for step in range(run.start_step, end):
            done = step + 1
            for h in hooks:
                h.before_step(run, done)
            row, verdict = _train_step(run, step, counter, stop_signal.requested)
            for h in hooks:
                h.after_step(run, done, row)
            if logger is not None and bar is not None and row is not None:  # rank 0
                logger.log(row)
                bar.update(row)
            if verdict.nonfinite:
                _count_nonfinite(run, done, verdict)  # raises past train.max_nonfinite_steps
            every = t.checkpoint.save_every
            if save and (done == end or verdict.stop or (every and done % every == 0)):
                tag_dir = run.save(done)
                print0(f"saved {tag_dir}")
                for h in hooks:
                    h.after_save(run, done, tag_dir)
            if verdict.stop:
                print0(f"stopped by a signal after step {done}"
                       + (f"; checkpoint {run.out / f'global_step{done}'} written: run the same command to resume"
                          if save else ""))
                break
        else:
            for h in hooks:
                h.on_end(run)
    finally:
        if own_signal:
            stop_signal.uninstall()
        if bar is not None and logger is not None:  # rank 0
            bar.close()
            logger.close()
    if run.steps.summary():
        print0(run.steps.summary())


def _train_step(run: Run, step: int, counter: _PadCounter | None, stop: bool) -> tuple[dict[str, Any] | None, Any]:
    """One optimizer step (0-based ``step``) and the guards' collective; returns (rank 0's metrics row, verdict)."""
    t = run.cfg.train
    assert run.steps is not None  # build_data ran
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    batches = run.steps.next_step(step)  # a collective on every rank, outside train_batch
    data_iter = iter(batches) if batches is not None else None
    if counter is not None:  # the run's collate (Collator or VLMCollator) made these micro-batches
        counter.it, data_iter = cast("Iterator[PipeBatch | VLMPipeBatch] | None", data_iter), counter
    loss = float(run.engine.train_batch(data_iter))
    dt = time.perf_counter() - t0
    ours = cast(GlobalNormClip, run.optimizer)  # build_optimizer's, which records the norm it clipped with
    grad_norm = ours.last_grad_norm if run.own_clip else run.engine.get_global_grad_norm()
    grad_norm = None if grad_norm is None else float(grad_norm)
    verdict = agree(not (is_finite(loss) and is_finite(grad_norm)), stop)
    verdict.loss, verdict.grad_norm = loss, grad_norm  # every rank holds them (DeepSpeed broadcasts the loss)
    if step == run.start_step:
        _report_memory(run.stage)
    if run.rank != 0:
        return None, verdict
    assert counter is not None  # rank 0 counts padding
    skipped = run.steps.step_skips(step)
    row = {"step": step + 1, "loss": loss if is_finite(loss) else None, "lr": lr,
           "grad_norm": grad_norm if is_finite(grad_norm) else None,
           "tokens": run.steps.step_tokens(step),
           "samples": t.batch.micro_batch_size * t.batch.grad_accum_steps * run.dp - skipped,
           "skipped": skipped, "step_time_s": round(dt, 4), **counter.take()}
    if verdict.nonfinite:
        row.update(nonfinite=True, nonfinite_loss=repr(loss), nonfinite_grad_norm=repr(grad_norm))
    return row, verdict


def _count_nonfinite(run: Run, step: int, verdict: StepVerdict) -> None:
    """Every rank: count a skipped non-finite step; stop the run (all ranks alike) past ``max_nonfinite_steps``.
    Each rank names its own values (the loss and the global gradient norm are the same on every rank), so whichever
    rank torchrun reports as the root cause quotes them."""
    t = run.cfg.train
    run.nonfinite_steps += 1
    advice = nonfinite_advice(step, verdict.loss, verdict.grad_norm, run.optimizer.param_groups[0]["lr"], t.precision)
    if run.nonfinite_steps > t.max_nonfinite_steps:
        latest = checkpoint.read_latest(run.out) if run.out.is_dir() else None
        raise NonFiniteError(f"{advice}. Stopping ({run.nonfinite_steps} non-finite step(s), "
                             f"train.max_nonfinite_steps is {t.max_nonfinite_steps}); no checkpoint was written for "
                             f"this step; the last checkpoint is {latest or 'none'}.")
    print0(f"WARNING: {advice}. Skipped ({run.nonfinite_steps} of at most {t.max_nonfinite_steps}).")


class _PadCounter:
    """Passes batches through, counting real (mask 1) and padded (mask numel) token slots and images (video frames)
    since the last take()."""

    def __init__(self, it: Iterator[PipeBatch | VLMPipeBatch] | None) -> None:
        self.it, self.real, self.padded, self.images = it, 0, 0, 0

    def __iter__(self) -> _PadCounter:
        return self

    def __next__(self) -> PipeBatch | VLMPipeBatch:
        assert self.it is not None, "set .it before iterating"
        batch = next(self.it)
        inputs = batch.inputs
        self.images += (inputs.grid_thw if isinstance(inputs, VLMStageInputs) else inputs.media).shape[0]
        self.real += int(batch.inputs.mask_BL.sum())
        self.padded += batch.inputs.mask_BL.numel()
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
        self.bar.set_postfix(loss="nan" if row["loss"] is None else f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             tok_s=f"{row['tokens'] / max(row['step_time_s'], 1e-9):.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _report_memory(stage: int) -> None:
    """Collective: rank 0 prints each stage's peak memory after the first step."""
    mem = peak_memory_gib()
    kind = "GPU peak allocated" if torch.cuda.is_available() else "host peak RSS"
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (dist.get_rank(), stage, mem))
    if dist.get_rank() == 0:
        print0(f"memory after the first step ({kind}): "
               + ", ".join(f"rank {r} (stage {s}) {m:.2f} GiB" for r, s, m in rows))
