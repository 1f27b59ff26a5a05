"""Process-group set-up for CPU (gloo) and GPU (NCCL) runs, and rank-0 printing."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping

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
        disable_p2p_if_unsupported()
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


def pairs_without_p2p(num_gpus: int, can_access_peer: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """The ordered pairs of the ``num_gpus`` visible GPUs where the first cannot access the second's memory."""
    return [(a, b) for a in range(num_gpus) for b in range(num_gpus) if a != b and not can_access_peer(a, b)]


def p2p_disable_reason(num_gpus: int, can_access_peer: Callable[[int, int], bool],
                       env: Mapping[str, str]) -> str | None:
    """Why NCCL's peer-to-peer transport must be turned off on this node (``NCCL_P2P_DISABLE=1``), or None: some
    pair of GPUs cannot access each other (consumer cards such as the RTX 4090 have no P2P, and NCCL's first
    send/receive then hangs), unless the user set ``NCCL_P2P_DISABLE`` themselves."""
    if num_gpus < 2 or "NCCL_P2P_DISABLE" in env:
        return None
    pairs = pairs_without_p2p(num_gpus, can_access_peer)
    if not pairs:
        return None
    shown = ", ".join(f"{a}->{b}" for a, b in pairs[:6]) + (" ..." if len(pairs) > 6 else "")
    return f"GPUs {shown} cannot access each other's memory (no peer-to-peer)"


def disable_p2p_if_unsupported() -> None:
    """Before NCCL starts: set ``NCCL_P2P_DISABLE=1`` in this process when the node's GPUs lack peer-to-peer
    (:func:`p2p_disable_reason`); local rank 0 says so."""
    reason = p2p_disable_reason(torch.cuda.device_count(), torch.cuda.can_device_access_peer, os.environ)
    if reason is None:
        return
    os.environ["NCCL_P2P_DISABLE"] = "1"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"NOTE: {reason}: set NCCL_P2P_DISABLE=1 (NCCL goes through host memory instead; set "
              "NCCL_P2P_DISABLE yourself to decide otherwise)", file=sys.stderr, flush=True)


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
