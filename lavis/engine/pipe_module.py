"""The DeepSpeed ``PipelineModule`` for our layer list: explicit stage boundaries and frozen-stage handling.

- Boundaries come from ``lavis.pipeline.plan`` (DeepSpeed 0.19.8 has no explicit-parts option, so
  ``_partition_layers`` is overridden, as DeepSpeed's own ``DualPipeVModule`` does).
- Every stage gets the same optimizer parameter groups (weight-decay and no-decay): a group this stage has no
  trainable parameter for gets one zero "anchor" parameter that the forward uses (``out + 0 * anchor.sum()``).
  So a fully frozen stage still has a parameter with a real (zero) gradient and a frozen first stage's output has a
  grad_fn (docs/PIPELINE.md section 5), and ZeRO-1, which runs one gradient-norm all-reduce across stages per group,
  issues the same number of collectives on every stage (a frozen stage with one group hung the others). Zero
  anchors stay exactly zero under AdamW. They are not part of any layer, so layer files and converters never see
  them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from torch.autograd.graph import save_on_cpu
from transformers import PretrainedConfig

from lavis.config.schema import ModelConfig
from lavis.engine import ds_compat
from lavis.model.freezing import is_trainable
from lavis.model.llm import DecoderParts
from lavis.model.lora import is_adapter_key
from lavis.model.mllm import lm_loss
from lavis.model.spec import LayerEntry, ModelSpec
from lavis.pipeline.family import LayerRecipe, ModelFamily, blip2_layers
from lavis.vlm.layers import meta_built
from lavis.weights.report import FileReport


def layer_specs(
    cfg: ModelConfig, hf: PretrainedConfig, parts: DecoderParts, placeholder_id: int,
    recompute_blocks: frozenset[int] = frozenset(), feature_cache: str | None = None, float_mask: bool = False,
) -> list[LayerSpec]:
    """The BLIP-2-style family's layer list (``lavis.pipeline.family.blip2_layers``) as DeepSpeed layer specs."""
    return to_layer_specs(blip2_layers(cfg, hf, parts, placeholder_id, recompute_blocks, feature_cache, float_mask))


def to_layer_specs(layers: list[LayerRecipe]) -> list[LayerSpec]:
    """A family's layer list (``ModelFamily.pipeline_layers``) as DeepSpeed layer specs."""
    return [(AllocatedLayerSpec if r.allocate_only else LayerSpec)(r.cls, *r.args) for r in layers]


class AllocatedLayerSpec(LayerSpec):
    """A layer built on the meta device, then allocated uninitialised (``LayerRecipe.allocate_only``)."""

    def build(self, log: bool = False) -> nn.Module:
        return meta_built(cast(type[nn.Module], self.typename), *self.module_args, **self.module_kwargs)


class LavisPipelineModule(PipelineModule):
    _planned_boundaries: list[int]

    def __init__(self, specs: list[LayerSpec], boundaries: list[int], offload_stages: frozenset[int] = frozenset(),
                 **kwargs: Any) -> None:
        """``offload_stages``: stages whose forward keeps its saved activations in host memory
        (``train.parallel.activation_offload``, :func:`lavis.pipeline.plan.offloaded_stages`)."""
        object.__setattr__(self, "_planned_boundaries", list(boundaries))
        super().__init__(specs, num_stages=len(boundaries) - 1, partition_method="uniform", loss_fn=lm_loss, **kwargs)
        self.group_anchors = nn.ParameterList()
        self.offload_activations = self.stage_id in offload_stages
        self._tied: list[tuple[nn.Parameter, Any]] = []
        """This stage's copies of weights tied across stages, with the group of the stages holding a copy."""

    def _partition_layers(self, method: str = "uniform") -> None:
        ds_compat.set_stage_bounds(self, self._planned_boundaries)

    def local_layers(self) -> dict[int, nn.Module]:
        return ds_compat.local_layers(self)

    def load_weights(self, family: ModelFamily, spec: ModelSpec, cfg: ModelConfig) -> list[FileReport]:
        """This rank reads only its own layers' tensors from the configured files (the family's weight reading,
        ``lavis.weights.base``); raises if a file does not fit. Frozen weights come from here on every start,
        resumes included (checkpoints exclude them)."""
        return family.load_layer_weights(spec, cfg, self.local_layers())

    def apply_trainable(self, cfg: ModelConfig, table: list[LayerEntry]) -> int:
        """Set ``requires_grad`` from the config; add anchors for the optimizer groups this stage lacks. Returns
        the number of trainable parameters."""
        return self.apply_trainable_by(lambda plain: is_trainable(plain, cfg), table)

    def apply_trainable_by(self, trainable: Callable[[str], bool], table: list[LayerEntry]) -> int:
        """:meth:`apply_trainable` with ``trainable(plain weight name)`` deciding (any model family)."""
        count = 0
        has_matrix = has_vector = False  # the optimizer's weight-decay / no-decay groups (engine.optim)
        for idx, layer in self.local_layers().items():
            for name, p in layer.named_parameters():
                p.requires_grad_(trainable(table[idx].to_plain(name)))
                if p.requires_grad:
                    count += p.numel()
                    has_matrix |= p.ndim >= 2
                    has_vector |= p.ndim < 2
        print(f"[stage {self.stage_id}] trainable parameters: {count:,}"
              + (f" (LoRA adapters {adapters:,})" if (adapters := _adapter_count(self)) else ""), flush=True)
        if not has_matrix:
            self.group_anchors.append(nn.Parameter(torch.zeros(1, 1)))
        if not has_vector:
            self.group_anchors.append(nn.Parameter(torch.zeros(1)))
        return count

    def tie_weights(self, first: tuple[int, str], second: tuple[int, str]) -> None:
        """Tie parameter ``second[1]`` of layer ``second[0]`` to ``first[1]`` of layer ``first[0]`` (tied
        embeddings: the LM head is the token embedding); both hold the same values when this is called. Collective:
        every rank calls it, after the weights are loaded and ``requires_grad`` is set.

        On one stage the second becomes the same ``Parameter`` (autograd sums both uses). Across stages each holds a
        copy, and DeepSpeed's ReduceTiedGrads instruction (before the data-parallel gradient all-reduce and the
        optimizer step) sums the copies' gradients over the two stages (:meth:`get_tied_weights_and_groups`), so
        both take the same step and stay equal; the second copy is marked ``ds_pipe_replicated`` so gradient norms
        count the weight once."""
        owners = [self.stage_owner(first[0]), self.stage_owner(second[0])]
        local = self.local_layers()
        if owners[0] == owners[1]:
            if first[0] in local:
                holder, attr = _owner_of(local[second[0]], second[1])
                setattr(holder, attr, local[first[0]].get_parameter(first[1]))
            return
        for replica in range(ds_compat.data_parallel_size(self)):
            ranks = [ds_compat.stage_rank(self, s, replica) for s in owners]
            group = dist.new_group(ranks=ranks)  # every rank creates every group, in the same order
            if self.global_rank in ranks:
                idx, name = first if self.stage_id == owners[0] else second
                weight = local[idx].get_parameter(name)
                weight.ds_pipe_replicated = self.stage_id == owners[1]  # pyright: ignore[reportAttributeAccessIssue]
                self._tied.append((weight, group))

    def get_tied_weights_and_groups(self) -> list:
        """DeepSpeed's ReduceTiedGrads all-reduces the gradient of each ``(weight, group)``: its own tied layers'
        and those of :meth:`tie_weights`."""
        return super().get_tied_weights_and_groups() + self._tied

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True) -> None:  # noqa: ANN001 - DeepSpeed's signature
        """Resume: layer files hold only the weights that train (saved with ``exclude_frozen_parameters``), so
        DeepSpeed's per-layer load must run non-strict; afterwards every trainable parameter of this stage must have
        been in its layer file and the file must hold nothing the layer lacks (keys read via mmap, no tensor data)."""
        super().load_state_dir(load_dir, checkpoint_engine, strict=False)
        problems = []
        for idx, layer in self.local_layers().items():
            files = ds_compat.layer_files(self, load_dir, idx - ds_compat.local_start(self))
            if not files:
                problems.append(f"layer {idx}: no layer file in {load_dir}")
                continue
            keys = set(torch.load(files[0], map_location="cpu", weights_only=True, mmap=True))
            own = layer.state_dict()
            missing = [n for n, p in layer.named_parameters() if p.requires_grad and n not in keys]
            unexpected = sorted(keys - set(own))
            if missing or unexpected:
                problems.append(f"{files[0]}: trainable weights missing {missing[:5]}, unknown keys {unexpected[:5]}")
        if problems:
            raise ValueError("checkpoint does not fit this model (another config or a damaged file?):\n  "
                             + "\n  ".join(problems))

    def forward(self, forward_input) -> torch.Tensor | tuple:  # noqa: ANN001 - DeepSpeed's signature
        with activation_offload(self.offload_activations):
            out = super().forward(forward_input)
        if len(self.group_anchors):
            zero = cast(torch.Tensor, sum(0.0 * a.sum() for a in self.group_anchors))  # non-empty: a tensor
            if isinstance(out, tuple):  # StageIO, or another family's inter-stage tuple (lavis.vlm.layers)
                out = (out[0] + zero.to(out[0].dtype), *out[1:])
            else:
                out = out + zero.to(out.dtype)
        # DeepSpeed sends plain tuples of tensors between stages.
        return tuple(out) if isinstance(out, tuple) else out


def activation_offload(active: bool) -> contextlib.AbstractContextManager:
    """While active, every tensor autograd saves for backward is kept in host memory (pinned on CUDA) and copied
    back when backward needs it; under recomputation only what the checkpointed blocks still save moves."""
    return save_on_cpu(pin_memory=torch.cuda.is_available()) if active else contextlib.nullcontext()


def _owner_of(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding parameter ``name`` (dotted) and the parameter's attribute name."""
    path, _, attr = name.rpartition(".")
    return module.get_submodule(path), attr


def _adapter_count(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if is_adapter_key(n) and p.requires_grad)


def cast_float_buffers_(module: nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 mode casts parameters but not buffers; timm's EVA attention concatenates its float32
    ``k_bias`` buffer with the bf16 ``q_bias``/``v_bias`` parameters, so buffers follow the parameters here."""
    for owner in module.modules():
        for name, buf in owner.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                owner._buffers[name] = buf.to(dtype)


def cast_float_params_(module: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters to ``dtype`` in place (the same ``Parameter`` objects, as DeepSpeed's own bf16 cast;
    quantized integer weights stay): ``train.optim.optimizer: adamw_bf16`` trains the bf16 weights themselves, so the
    module is cast here and DeepSpeed's bf16 mode, which would add fp32 master copies, stays off."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
