"""Optimizer and LR schedule: the AdamW variants of ``train.optim.optimizer``; global-norm clipping where DeepSpeed gets
it wrong.

DeepSpeed's fp32/no-ZeRO clipping under PP sums only stage 0's gradients (docs/PIPELINE.md section 6). In that mode
(and under ``adamw_bf16``, which DeepSpeed steps the same way) :class:`GlobalNormClip` computes the norm over every
stage itself (an all-reduce over the pipeline group; data-parallel replicas already hold identical, averaged
gradients) and clips before stepping. In bf16 / ZeRO-1 DeepSpeed's own clipping is correct and is used instead
(``lavis.config.load.deepspeed_config``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class GlobalNormClip:
    """Mixed into an optimizer class: with ``norm_group``, the gradient norm over every pipeline stage, a skipped
    step when it is not finite, and clipping to ``clip`` before the base class steps."""

    param_groups: list[dict[str, Any]]  # the optimizer's, which this class is mixed into

    def __init__(self, params: list[dict], *, clip: float, norm_group: dist.ProcessGroup | None,
                 **kwargs: object) -> None:
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
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
            for p in params:  # a tied weight's copy on a later stage (pipe_module.tie_weights) counts once
                if not getattr(p, "ds_pipe_replicated", False):
                    sq += p.grad.double().pow(2).sum()
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
    """torch's AdamW (``train.optim.optimizer: adamw``)."""


class KahanAdamW(torch.optim.Optimizer):
    """AdamW on bf16 weights without fp32 master copies (``train.optim.optimizer: adamw_bf16``).

    Each step computes the update in fp32 from the bf16 gradient and adds it to the bf16 weight with Kahan
    compensation: ``comp`` (bf16, one per weight) holds what the rounding to bf16 dropped last time and is added to
    the next update, so small updates (a 1e-4 step on a weight of 0.5 is below bf16's half ulp, which naive bf16
    AdamW drops entirely) accumulate as in fp32. Deterministic (no random rounding), so a run is reproducible across
    layouts and resumes exactly. State per weight: ``exp_avg`` bf16, ``exp_avg_sq`` fp32 (in bf16, ``0.999 * v``
    rounds back to ``v``, so the second moment could never decay), ``comp`` bf16: 8 bytes beyond weight and
    gradient. Same update rule as torch's AdamW (decoupled weight decay ``lr * weight_decay``, bias correction, eps
    outside the square root). Large tensors are stepped in chunks of :data:`CHUNK` elements so the fp32 temporaries
    stay small."""

    CHUNK = 1 << 22

    def __init__(self, params: list[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"train.optim.optimizer: adamw_bf16 steps bf16 weights, got a {p.dtype} one "
                                    f"(shape {tuple(p.shape)})")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.contiguous_format)
                    state["comp"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                self._update(p, state, group, int(state["step"]))
        return loss

    def _update(self, p: torch.Tensor, state: dict, group: dict, step: int) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        bc1, bc2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
        if not p.is_contiguous():
            raise ValueError(f"train.optim.optimizer: adamw_bf16 needs contiguous weights (shape {tuple(p.shape)})")
        assert p.grad is not None  # step() updates only weights with a gradient
        chunks = zip(*(t.view(-1).split(self.CHUNK) for t in (p, p.grad.contiguous(), state["exp_avg"],
                                                                state["exp_avg_sq"], state["comp"])))
        for w, g, m, v, c in chunks:
            g32, w32 = g.float(), w.float()
            m32 = m.float().mul_(beta1).add_(g32, alpha=1 - beta1)
            m.copy_(m32)
            v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
            update = m32.div_(v.sqrt().div_(bc2_sqrt).add_(eps)).mul_(-lr / bc1)
            if wd:
                update.add_(w32, alpha=-lr * wd)
            update.add_(c.float())  # what the last rounding dropped
            new = (w32 + update).to(torch.bfloat16)
            c.copy_(update.sub_(new.float().sub_(w32)))  # what this rounding drops, carried to the next step
            w.copy_(new)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its weight's dtype on loading; ``exp_avg_sq`` stays fp32."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            saved = state_dict["state"].get(i)
            if saved is not None and "exp_avg_sq" in saved:
                self.state[p]["exp_avg_sq"] = saved["exp_avg_sq"].to(device=p.device, dtype=torch.float32)


class PipeKahanAdamW(GlobalNormClip, KahanAdamW):
    """:class:`KahanAdamW` under the all-stage gradient-norm clipping (``train.optim.optimizer: adamw_bf16``)."""


def build_optimizer(kind: str, groups: list[dict], *, clip: float, norm_group: dist.ProcessGroup | None,
                    **kwargs: object) -> torch.optim.Optimizer:
    """``train.optim.optimizer`` -> the optimizer with our global-norm clipping (see :class:`GlobalNormClip`)."""
    if kind == "adamw":
        return PipeAdamW(groups, clip=clip, norm_group=norm_group, **kwargs)
    if kind == "adamw_bf16":
        return PipeKahanAdamW(groups, clip=clip, norm_group=norm_group, **kwargs)
    try:
        from bitsandbytes.optim.adamw import AdamW8bit, PagedAdamW8bit
    except ImportError as e:
        raise RuntimeError(f"train.optim.optimizer: {kind} needs bitsandbytes: pip install -e '.[quant]' (or use "
                           "train.optim.optimizer: adamw)") from e
    base = {"adamw8bit": AdamW8bit, "paged_adamw8bit": PagedAdamW8bit}[kind]
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
