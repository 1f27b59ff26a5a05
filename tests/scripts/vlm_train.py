"""Train a tiny transformers VLM directory through the real trainer's ``build_run`` (the ``model.vlm`` branch) and
DeepSpeed's pipeline engine for a few steps on fixed batches (two non-square images per sample); rank 0 writes the
losses as JSON. Run under torchrun with one process per stage:

    torchrun --nproc_per_node S tests/scripts/vlm_train.py DIR S PARTITION OUT.json STEPS [OPTION ...]

The run directory is ``OUT.json``'s directory / ``runS`` (``loraS`` with ``lora``). Options: ``save``: checkpoints
(``run.save``) after step 3 and after the last step. ``resume``: continue from the checkpoint ``latest`` names
(``build_run`` + ``restore``, as train_pipeline.py resumes) up to STEPS, on the micro-batches an uninterrupted run
would see. ``recompute``: ``train.parallel.activation_checkpoint_interval: 1``. ``video``: every second micro-batch is
one sample with an image and a video (``image_and_video_batch``). ``lora`` (or ``--lora``): ``model.vlm.lora``
(all-linear, r 4) over the frozen language model, the merger training, the tower frozen; every rank also writes
``OUT.json.rankR.json``: its parameters that changed, those marked trainable and those the optimizer holds state for
(plain names).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from lavis.config.schema import (
    BatchConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from lavis.engine.checkpoint import read_latest
from lavis.engine.distributed import init_distributed, shutdown
from lavis.engine.trainer import Run, build_run, restore
from lavis.lora_config import VLMLoRAConfig
from lavis.testing.vlm import MICRO_BATCH, image_and_video_batch, two_image_batch
from lavis.vlm.config import VLMConfig
from lavis.vlm.data_config import VLMDataConfig

MICRO, GAS = MICRO_BATCH, 2


def micro_batches(steps: int, start: int = 0, video_of: str | None = None,
                  ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """``video_of``: the model type; odd micro-batches are then an image + a video sample."""
    for i in range(start * GAS, steps * GAS):
        yield image_and_video_batch(video_of, seed=i) if video_of and i % 2 else two_image_batch(seed=i, batch=MICRO)


def main() -> None:
    directory, stages, partition, out, steps = sys.argv[1:6]
    options = {o.removeprefix("--") for o in sys.argv[6:]}
    mode = "save" if "save" in options else "resume" if "resume" in options else None
    lora = "lora" in options
    torch.manual_seed(0)
    init_distributed()
    vlm = (VLMConfig(path=directory, freeze_vision=True, freeze_merger=False, freeze_llm=True,
                     lora=VLMLoRAConfig(r=4, alpha=8.0, targets="all-linear")) if lora else
           VLMConfig(path=directory, freeze_vision=False, freeze_merger=False, freeze_llm=False))
    cfg = Config(
        model=ModelConfig(vlm=vlm),
        # build_run loads the run's processor; the directory holds none and the batches here are fixed tensors
        data=DataConfig(vlm=VLMDataConfig(processor="builtin:shapes")),
        train=TrainConfig(
            parallel=ParallelConfig(num_stages=int(stages), partition=[int(p) for p in partition.split(",")],
                                    activation_checkpoint_interval=int("recompute" in options)),
            batch=BatchConfig(micro_batch_size=MICRO, grad_accum_steps=GAS), precision="fp32",
            optim=OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0),
            output_dir=str(Path(out).parent / f"{'lora' if lora else 'run'}{stages}"),
            checkpoint=CheckpointConfig(save_every=0)),
    )
    tag = read_latest(Path(cfg.train.output_dir)) if mode == "resume" else None
    run = build_run(cfg, tag)
    restore(run, tag)
    start = 0 if tag is None else int(tag.removeprefix("global_step"))
    video_of = json.loads((Path(directory) / "config.json").read_text())["model_type"] if "video" in options else None
    data = micro_batches(int(steps), start, video_of)
    before = snapshot(run) if lora else {}
    losses = []
    for step in range(start + 1, int(steps) + 1):
        losses.append(float(run.engine.train_batch(data_iter=data)))
        if mode == "save" and step in (3, int(steps)):
            run.save(step)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"losses": losses, "boundaries": run.boundaries}))
    if lora:
        Path(f"{out}.rank{dist.get_rank()}.json").write_text(json.dumps(trained_params(run, before)))
    shutdown()


def snapshot(run: Run) -> dict[str, torch.Tensor]:
    """This stage's parameters under their plain names (copies)."""
    return {run.table[idx].to_plain(n): p.detach().clone() for idx, layer in run.pipe.local_layers().items()
            for n, p in layer.named_parameters()}


def trained_params(run: Run, before: dict[str, torch.Tensor]) -> dict:
    """This stage's parameters (plain names) that changed in training, those marked trainable, and the plain names
    of the parameters the optimizer keeps state for (DeepSpeed's optimizer wraps torch's)."""
    after = snapshot(run)
    opt = run.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    names = {id(p): run.table[idx].to_plain(n) for idx, layer in run.pipe.local_layers().items()
             for n, p in layer.named_parameters()}
    return {"changed": sorted(k for k, v in after.items() if not torch.equal(v, before[k])),
            "trainable": sorted(names[id(p)] for layer in run.pipe.local_layers().values()
                                for p in layer.parameters() if p.requires_grad),
            "optimizer_state": sorted(names[id(p)] for p in inner.state if id(p) in names and inner.state[p]),
            "params": len(after)}

if __name__ == "__main__":
    main()
