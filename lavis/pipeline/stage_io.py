"""The tuple that travels between pipeline stages.

DeepSpeed sends a stage's output tuple to the next stage and runs backward on every floating-point element, so
only ``hidden_BLD`` is float (it always takes part in autograd); the padding mask is int64 and travels without
gradients. Position ids and rotary tables are recomputed on each stage (right padding: positions 0..L-1), so they
are never shipped. Labels reach the last stage through the data iterator, not through this tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StageIO(NamedTuple):
    hidden_BLD: torch.Tensor
    """``[B, L, D]`` hidden states (float, requires grad)."""
    mask_BL: torch.Tensor
    """``[B, L]`` int64 attention mask: 1 for tokens, 0 for right padding."""
