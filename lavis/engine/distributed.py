"""Process-group set-up for CPU (gloo) and GPU (NCCL) runs, and rank-0 printing."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group (``deepspeed``/``torchrun`` env); a plain ``python`` run is rank 0 of 1."""
    import deepspeed

    if "RANK" in os.environ:  # started by a launcher (torchrun, deepspeed): do not outlive it
        watch_launcher()
    else:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    use_private_extensions_dir()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def use_private_extensions_dir() -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` (unless the user did) to a directory of this Python environment and torch version;
    returns it. DeepSpeed JIT-compiles its CPU shared-memory comm op (``deepspeed_shm_comm``) at every
    ``init_distributed``; torch keeps the build in ``~/.cache/torch_extensions/py3X_cuY/<op>`` and ninja rebuilds it
    whenever ``build.ninja`` changes. That file holds the environment's absolute paths, so checkouts with their own
    virtual environments sharing the default directory rebuilt the op (about 100 s on 2 cores, behind a lock) at each
    other's every launch. Keyed on ``sys.prefix`` and the torch version (torch's headers are not in ninja's
    dependencies), each environment builds once and reuses it."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root

    key = hashlib.blake2b(f"{sys.prefix}|{torch.__version__}".encode(), digest_size=6).hexdigest()
    path = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}-env-{key}")
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    return path


ORPHAN_EXIT_S = 30.0
"""A rank whose launcher died stops like on SIGTERM (checkpoint at the step reached); if it is still running this many
seconds later (its peers are gone, a collective cannot finish), it exits without one."""


def watch_launcher(poll_s: float = 0.5, exit_after_s: float = ORPHAN_EXIT_S) -> threading.Thread:
    """Watch the parent process (the launcher) from a daemon thread. A rank outlives a launcher that was SIGKILLed (an
    OOM kill, a scheduler escalating): torchrun starts ranks in sessions of their own, so nothing else stops them, and
    they would go on training, saving and holding the run directory's lock. When the parent is gone this rank sends
    itself SIGTERM (the trainer's graceful stop: every orphaned rank finishes its step and saves), then exits with
    status 1 after ``exit_after_s`` seconds if it is still running; the kernel then releases the lock."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        who = f"[rank {os.environ.get('RANK', '0')}]"
        print(f"{who} the launcher (pid {parent}) is gone: stopping after the current step", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(exit_after_s)
        print(f"{who} still running {exit_after_s:.0f} s after the launcher died: exiting without a checkpoint of "
              "the current step (`latest` names the last complete one)", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


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
