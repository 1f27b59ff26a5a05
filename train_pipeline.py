"""Train with DeepSpeed pipeline parallelism.

    deepspeed --num_gpus 2 train_pipeline.py --cfg-path lavis/projects/demo/shapes.yaml --num-stages 2
    torchrun --nproc_per_node 2 train_pipeline.py --cfg-path lavis/projects/demo/shapes.yaml --num-stages 2
    python -m lavis.engine.launch --nproc_per_node 2 train_pipeline.py ...   # torchrun, exit 0 when preempted

The number of processes is stages x data-parallel replicas. CPU-only machines use gloo, GPUs use NCCL.
When a rank fails, its error is reported as the root cause and its peers stay quiet (``lavis/engine/errors.py``).
SIGTERM (a scheduler's preemption) saves a checkpoint at the step reached and exits 0; under torchrun itself the
launcher still reports its own signal as a failure, ``lavis.engine.launch`` does not (docs/PIPELINE.md section 10).
"""

from lavis.engine.errors import run_rank
from lavis.engine.trainer import main
from lavis.eval.train_hook import config_hooks

if __name__ == "__main__":
    run_rank(lambda: main(hooks_for=config_hooks))
