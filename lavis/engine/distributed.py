"""Process-group set-up for CPU (gloo) and GPU (NCCL) runs, and rank-0 printing."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group (``deepspeed``/``torchrun`` env); a plain ``python`` run is rank 0 of 1."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def print0(*args: object) -> None:
    if rank() == 0:
        print(*args, file=sys.stderr, flush=True)


def shutdown() -> None:
    """End cleanly: exiting without destroy_process_group once aborted a finished gloo run (docs/PIPELINE.md
    section 10)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
