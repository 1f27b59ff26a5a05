"""Deterministic random init, per pipeline layer, independent of the partition.

Real runs load pretrained weights over this; the demo and benchmarks train from it. Layer ``i`` of the layer
table is initialised from seed ``init_seed + i`` whatever stage builds it, and the plain model initialises its
components through the same function in the same order, so PP=1, PP=2 and the plain model start identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

INIT_STD = 0.02


@torch.no_grad()
def init_modules_(modules: Sequence[nn.Module | nn.Parameter | None], seed: int, std: float = INIT_STD) -> None:
    """Norm weights 1, biases 0, everything else N(0, std), drawn in registration order from ``seed``; None entries
    (an absent component, e.g. no Q-Former) are skipped."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in modules:
            if m is None:
                continue
            if isinstance(m, nn.Parameter):
                _normal_(m, std)
                continue
            for owner in m.modules():
                is_norm = "norm" in type(owner).__name__.lower()
                for name, p in owner.named_parameters(recurse=False):
                    if is_norm and name == "weight":
                        p.fill_(1.0)
                    elif name.endswith("bias"):
                        p.zero_()
                    else:
                        _normal_(p, std)


def _normal_(p: torch.Tensor, std: float) -> None:
    """N(0, std) in place; a meta-device tensor (a module that is not built, e.g. the frozen encoders under a
    feature cache) draws the same numbers into a scratch tensor, so later modules get the same init."""
    if p.is_meta:
        torch.empty(p.shape, dtype=p.dtype).normal_(0.0, std)
    else:
        p.normal_(0.0, std)
