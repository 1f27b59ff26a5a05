"""Optimizer and LR schedule. One AdamW for all modes; global-norm clipping where DeepSpeed gets it wrong.

DeepSpeed's fp32/no-ZeRO clipping under PP sums only stage 0's gradients (docs/PIPELINE.md section 6). In that mode
:class:`PipeAdamW` computes the norm over every stage itself (an all-reduce over the pipeline group; data-parallel
replicas already hold identical, averaged gradients) and clips before stepping. In bf16 / ZeRO-1 DeepSpeed's own
clipping is correct and is used instead (``lavis.config.load.deepspeed_config``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


class GlobalNormClip:
    """Mixed into an optimizer class: with ``norm_group``, the gradient norm over every pipeline stage, a skipped
    step when it is not finite, and clipping to ``clip`` before the base class steps."""

    def __init__(self, params: list[dict], *, clip: float, norm_group: object | None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        self.clip = clip
        self.norm_group = norm_group
        self.last_grad_norm: float | None = None
        self.overflow = False
        """True when the last step was skipped for a non-finite global gradient norm (DeepSpeed reads this attribute
        and then leaves the LR schedule where it is, as for its own bf16/ZeRO overflow steps)."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        self.overflow = False
        if self.norm_group is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
            for g in grads:
                sq += g.double().pow(2).sum()
            dist.all_reduce(sq, group=self.norm_group)
            norm = float(sq.sqrt())
            self.last_grad_norm = norm
            if not math.isfinite(norm):  # the norm is global over the pipeline, so every stage skips together
                self.overflow = True
                for g in grads:
                    g.zero_()
                return None
            if self.clip > 0 and norm > self.clip:
                coef = self.clip / (norm + 1e-6)
                for g in grads:
                    g.mul_(coef)
        return super().step(closure)  # type: ignore[misc]


class PipeAdamW(GlobalNormClip, torch.optim.AdamW):
    """torch's AdamW (``train.optimizer: adamw``)."""


def build_optimizer(kind: str, groups: list[dict], *, clip: float, norm_group: object | None,
                    **kwargs: object) -> torch.optim.Optimizer:
    """``train.optimizer`` -> the optimizer with our global-norm clipping (see :class:`GlobalNormClip`)."""
    if kind == "adamw":
        return PipeAdamW(groups, clip=clip, norm_group=norm_group, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError(f"train.optimizer: {kind} needs bitsandbytes: pip install -e '.[quant]' (or use "
                           "train.optimizer: adamw)") from e
    base = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[kind]
    cls = type(f"Pipe{base.__name__}", (GlobalNormClip, base), {})
    return cls(groups, clip=clip, norm_group=norm_group, **kwargs)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Empty groups are left out: DeepSpeed drops them from the optimizer, and a scheduler built before that would
    # then hold one LR lambda too many. (Pipeline stages never have an empty group: see engine.pipe_module.)
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine down to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_lambda(*, warmup: int, total: int, lr: float, min_lr: float) -> Callable[[int], float]:
    """``LambdaLR``'s factor for step ``step``: :func:`warmup_cosine` relative to ``lr``."""
    return lambda step: warmup_cosine(step, warmup=warmup, total=total, lr=lr, min_lr=min_lr) / lr
