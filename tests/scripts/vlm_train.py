"""Train a tiny transformers VLM directory through the real trainer's ``build_run`` (the ``model.vlm`` branch) and
DeepSpeed's pipeline engine for a few steps on fixed batches (two non-square images per sample); rank 0 writes the
losses as JSON. Run under torchrun with one process per stage:

    torchrun --nproc_per_node S tests/scripts/vlm_train.py DIR S PARTITION OUT.json STEPS [OPTION ...]

The run directory is ``OUT.json``'s directory / ``runS``. Options: ``save``: checkpoints (``run.save``) after step 3
and after the last step. ``resume``: continue from the checkpoint ``latest`` names (``build_run`` + ``restore``, as
train_pipeline.py resumes) up to STEPS, on the micro-batches an uninterrupted run would see. ``recompute``:
``train.parallel.activation_checkpoint_interval: 1``. ``video``: every second micro-batch is one sample with an image
and a video (``image_and_video_batch``).
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
from lavis.engine.trainer import build_run, restore
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
    options = set(sys.argv[6:])
    mode = "save" if "save" in options else "resume" if "resume" in options else None
    torch.manual_seed(0)
    init_distributed()
    cfg = Config(
        model=ModelConfig(vlm=VLMConfig(path=directory, freeze_vision=False, freeze_merger=False, freeze_llm=False)),
        # build_run loads the run's processor; the directory holds none and the batches here are fixed tensors
        data=DataConfig(vlm=VLMDataConfig(processor="builtin:shapes")),
        train=TrainConfig(
            parallel=ParallelConfig(num_stages=int(stages), partition=[int(p) for p in partition.split(",")],
                                    activation_checkpoint_interval=int("recompute" in options)),
            batch=BatchConfig(micro_batch_size=MICRO, grad_accum_steps=GAS), precision="fp32",
            optim=OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0),
            output_dir=str(Path(out).parent / f"run{stages}"), checkpoint=CheckpointConfig(save_every=0)),
    )
    tag = read_latest(Path(cfg.train.output_dir)) if mode == "resume" else None
    run = build_run(cfg, tag)
    restore(run, tag)
    start = 0 if tag is None else int(tag.removeprefix("global_step"))
    video_of = json.loads((Path(directory) / "config.json").read_text())["model_type"] if "video" in options else None
    data = micro_batches(int(steps), start, video_of)
    losses = []
    for step in range(start + 1, int(steps) + 1):
        losses.append(float(run.engine.train_batch(data_iter=data)))
        if mode == "save" and step in (3, int(steps)):
            run.save(step)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"losses": losses, "boundaries": run.boundaries}))
    shutdown()


if __name__ == "__main__":
    main()
