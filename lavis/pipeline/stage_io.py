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
    """``[B, L]`` int64 attention mask: 1 for tokens, 0 for right padding. With ``train.parallel.inter_stage_mask:
    float_additive`` instead a ``[B, 1, L, L]`` float additive causal + padding mask that requires grad (the
    predecessors' layout, kept for comparison: DeepSpeed then ships it and its gradient between stages)."""


def float_additive_mask(mask_BL: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, L, L]``: 0 where query ``i`` may attend key ``j`` (``j <= i`` and ``j`` a token), else the dtype's
    minimum; a leaf that requires grad, as the predecessors shipped it."""
    length = mask_BL.shape[1]
    causal_LL = torch.ones(length, length, dtype=torch.bool, device=mask_BL.device).tril()
    allowed = causal_LL[None, None] & mask_BL.bool()[:, None, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask_BL.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min).requires_grad_()
