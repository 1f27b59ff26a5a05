"""Resume without executing code: DeepSpeed's checkpoint files are read with ``torch.load(weights_only=True)``.

DeepSpeed 0.19.8's ``TorchCheckpointEngine.load`` unpickles with ``weights_only=False``, so a shared or downloaded
run directory could run code on resume. :class:`SafeCheckpointEngine` replaces it on the engine (``install``): the
restricted unpickler accepts tensors, containers and plain values, plus the few DeepSpeed classes its files store
(:data:`ALLOWED_GLOBALS`). Anything else is refused with the file named; nothing in it is executed.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from lavis.engine import ds_compat


def _allowed_globals() -> list[Any]:
    """Non-tensor objects DeepSpeed 0.19.8 writes into ``mp_rank_*`` / ``*_optim_states.pt`` files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside the allow-list (a foreign or malicious file)."""


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds a pickled object that is not plain checkpoint data ({first}). Nothing "
            "in it was executed. Only load run directories you trust; restore this file from a backup or resume from "
            "another checkpoint (--resume-from).") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(f"cannot read checkpoint file {path} ({type(e).__name__}: {e}); it is truncated or "
                           "damaged: resume from another checkpoint (--resume-from)") from e


class SafeCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


def install(engine: Any) -> None:
    """Make ``engine`` (a DeepSpeed engine) read every checkpoint file through :func:`safe_torch_load`."""
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    vars(safe).update(vars(ds_compat.checkpoint_engine(engine)))
    ds_compat.set_checkpoint_engine(engine, safe)
