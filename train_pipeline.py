"""Train with DeepSpeed pipeline parallelism.

    deepspeed --num_gpus 2 train_pipeline.py --cfg-path lavis/projects/demo/shapes.yaml --num-stages 2
    torchrun --nproc_per_node 2 train_pipeline.py --cfg-path lavis/projects/demo/shapes.yaml --num-stages 2

The number of processes is stages x data-parallel replicas. CPU-only machines use gloo, GPUs use NCCL.
"""

from lavis.engine.trainer import main

if __name__ == "__main__":
    main()
