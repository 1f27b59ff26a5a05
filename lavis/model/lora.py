"""LoRA and QLoRA on the LLM's decoder blocks, built with ``peft`` (``model.llm.lora``, ``model.llm.quantize``).

Adapters go into each decoder block on its own (``peft.inject_adapter_in_model`` on the block module), so a
pipeline stage adapts only the blocks it owns and the plain model (chat, converters) adapts each of its blocks the
same way. Naming inside a block follows peft: an adapted ``self_attn.q_proj`` holds its frozen weight as
``self_attn.q_proj.base_layer.weight`` and the adapter as ``self_attn.q_proj.lora_A.default.weight`` /
``lora_B.default.weight``. Plain-model names (weight files, ``.pth``) drop ``base_layer.`` so base weights load
under their usual names (:func:`plain_key`); adapter tensors keep peft's names.

Adapter init is seeded per block (:func:`adapter_seed`, from the block's own init seed), so every partition and
the plain model start from identical adapters. ``lora_B`` starts at zero (peft's default), so a fresh adapter leaves
the model's output unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from lavis.config.schema import ModelConfig
from lavis.lora_config import LORA_ALL_LINEAR, LoRAConfig

if TYPE_CHECKING:
    from lavis.model.llm import CausalLM
    from lavis.model.mllm import MultimodalLM

ADAPTER_NAME = "default"
ADAPTER_SEED_OFFSET = 1_000_003
"""Adapters of the block seeded ``s`` are drawn from seed ``s + ADAPTER_SEED_OFFSET`` (a stream apart from the
block's own weights)."""


def adapter_seed(block_seed: int) -> int:
    return block_seed + ADAPTER_SEED_OFFSET


def block_seed(cfg: ModelConfig, block_index: int) -> int:
    """The init seed of decoder block ``block_index`` (layer ``1 + block_index`` of the pipeline's layer table)."""
    return cfg.init_seed + 1 + block_index


def linear_names(block: nn.Module) -> list[str]:
    """Leaf names of the block's linear layers (``q_proj``, ..., ``down_proj`` for every supported family)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, nn.Linear)})


def resolve_targets(cfg: LoRAConfig, block: nn.Module) -> list[str]:
    """The configured target names, checked against the block; ``all-linear`` = every linear layer of the block."""
    valid = linear_names(block)
    if cfg.targets == LORA_ALL_LINEAR:
        return valid
    unknown = [t for t in cfg.targets if t not in valid]
    if unknown:
        raise ValueError(f"{cfg.section}.targets {unknown} match no linear layer of {type(block).__name__}; "
                         f"valid names: {valid} (or {LORA_ALL_LINEAR!r})")
    return list(cfg.targets)


def peft_config(cfg: LoRAConfig, targets: list[str]):  # noqa: ANN201 - peft.LoraConfig, imported lazily
    from peft import LoraConfig

    # peft annotates lora_alpha as int, but scales by lora_alpha / r, so any number works (model.llm.lora.alpha).
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha,  # pyright: ignore[reportArgumentType]
                      lora_dropout=cfg.dropout, target_modules=targets, bias="none")


def add_block_adapters(block: nn.Module, cfg: LoRAConfig, block_seed_: int) -> nn.Module:
    """Inject adapters into one decoder block, in place, drawn from the block's adapter seed."""
    from peft import inject_adapter_in_model

    config = peft_config(cfg, resolve_targets(cfg, block))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed(block_seed_))
        inject_adapter_in_model(config, block, adapter_name=ADAPTER_NAME)
    return block


def add_llm_adapters(llm_model: CausalLM, cfg: ModelConfig) -> int:
    """Adapters in every decoder block of a whole transformers LLM (``model.layers``), seeded as the pipeline's
    blocks are. Returns the number of adapter parameters."""
    assert cfg.llm.lora is not None
    for j, block in enumerate(llm_model.model.layers):
        add_block_adapters(block, cfg.llm.lora, block_seed(cfg, j))
    return sum(p.numel() for n, p in llm_model.named_parameters() if is_adapter_key(n))


def is_adapter_key(name: str) -> bool:
    return ".lora_" in name


def plain_key(name: str) -> str:
    """A module key with peft's wrapper level removed: ``...q_proj.base_layer.weight`` -> ``...q_proj.weight``."""
    return name.replace(".base_layer.", ".")


def plain_targets(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict(keep_vars=True)`` of a module with adapters -> the tensors the weight files fill, under their
    plain names (adapter tensors are not in any base file; they keep their seeded init or come from a checkpoint)."""
    return {plain_key(k): v for k, v in state.items() if not is_adapter_key(k)}


def model_targets(model: MultimodalLM, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """For loaders of the plain model (chat, converters): inject the configured adapters into ``model.llm_model``
    (seeded as in training) and return its live tensors under plain names (``state_dict(keep_vars=True)`` with
    ``base_layer.`` dropped), so base files fill the base weights and an adapter checkpoint fills the adapters.
    Without ``model.llm.lora`` this is the plain ``state_dict(keep_vars=True)``."""
    if cfg.llm.lora is not None:
        add_llm_adapters(model.llm_model, cfg)
    return {plain_key(k): v for k, v in model.state_dict(keep_vars=True).items()}


def merge_adapters_(module: nn.Module) -> int:
    """Fold every adapter under ``module`` into its base weight (``W += alpha/r * B @ A``) and put the plain linear
    layer back in its place, so the module has its original names again. Returns the number of layers merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, m in list(module.named_modules()):
        if not isinstance(m, LoraLayer):
            continue
        m.merge(safe_merge=True)
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, m.get_base_layer())
        merged += 1
    return merged


# --- QLoRA ----------------------------------------------------------------------------------------------------


def check_quantize_runtime(cfg: ModelConfig) -> None:
    """``model.llm.quantize`` needs CUDA and bitsandbytes; raise at start (before any layer is built) otherwise."""
    require_quantize_runtime(cfg.llm.quantize, "model.llm.quantize")


def require_quantize_runtime(q: str | None, key: str) -> None:
    """Quantized weights (``key``: the config key that asks for them) need CUDA and bitsandbytes."""
    if q is None:
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"{key}: {q} needs a CUDA GPU (bitsandbytes kernels); none is visible. "
                           f"Remove {key} to train LoRA over unquantized weights")
    try:
        import bitsandbytes  # noqa: F401 - only whether it is installed
    except ImportError as e:
        raise RuntimeError(f"{key}: {q} needs bitsandbytes: pip install -e '.[quant]'") from e


def quantize_block_(block: nn.Module, kind: str) -> int:
    """Replace the block's linear layers by bitsandbytes ones (frozen; quantized when moved to the GPU, after the
    base weights were copied in). Compute dtype bf16. Returns the number of layers replaced."""
    from bitsandbytes.nn.modules import Int8Params, Linear4bit, Linear8bitLt, Params4bit

    count = 0
    for name, m in list(block.named_modules()):
        if type(m) is not nn.Linear:
            continue
        has_bias = m.bias is not None
        if kind == "nf4":
            q = Linear4bit(m.in_features, m.out_features, bias=has_bias, compute_dtype=torch.bfloat16,
                           quant_type="nf4", device="cpu")
            # The bitsandbytes parameter classes take their options in __new__; torch's Parameter.__init__, which
            # the checker also matches the call against, does not name them.
            q.weight = Params4bit(m.weight.data, requires_grad=False, quant_type="nf4")  # pyright: ignore[reportCallIssue]
        else:
            q = Linear8bitLt(m.in_features, m.out_features, bias=has_bias, has_fp16_weights=False, device="cpu")
            q.weight = Int8Params(m.weight.data, requires_grad=False,
                                  has_fp16_weights=False)  # pyright: ignore[reportCallIssue] (as Params4bit above)
        if has_bias:
            q.bias = nn.Parameter(m.bias.data, requires_grad=False)
        parent_name, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, leaf, q)
        count += 1
    # peft reads these model flags to wrap bitsandbytes layers in its bnb-aware LoRA layers (dequantizing merge).
    # torch annotates Module.__setattr__ for tensors and modules only; other values are plain attributes.
    block.is_loaded_in_4bit = kind == "nf4"  # pyright: ignore[reportArgumentType]
    block.is_loaded_in_8bit = kind == "int8"  # pyright: ignore[reportArgumentType]
    return count
