"""Train with DeepSpeed pipeline parallelism.

    deepspeed --num_gpus 2 train_pipeline.py --cfg-path lavis/projects/demo/shapes.yaml --num-stages 2
    torchrun --nproc_per_node 2 train_pipeline.py --cfg-path lavis/projects/demo/shapes.yaml --num-stages 2

The number of processes is stages x data-parallel replicas. CPU-only machines use gloo, GPUs use NCCL.
When a rank fails, its error is reported as the root cause and its peers stay quiet (``lavis/engine/errors.py``).
"""

from lavis.engine.errors import run_rank
from lavis.engine.trainer import main

if __name__ == "__main__":
    run_rank(main)
