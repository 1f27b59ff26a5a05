"""Converters for LoRA runs (``model.llm.lora``): merged weights or a peft adapter directory.

A LoRA run's ``.pth`` (``pipemodel2pth.py`` by default) holds only what trained: the adapters (peft names,
``llm_model.model.layers.N.self_attn.q_proj.lora_A.default.weight``), the projection and whatever else the config
trains. Chat loads it on top of the base weights. From it:

- ``--merge-lora``: the adapters folded into the base weights (``W + alpha/r * B @ A``; needs the base weight files
  the config names), written as the usual ``unfreeze_llm_model.pth``: the whole LLM plus every other trained tensor,
  loadable without any LoRA config.
- ``--hf-out DIR`` with ``--merge-lora``: that merged LLM as a transformers directory (``hf_export``);
  without: a peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base_llm, DIR)`` loads onto the base LLM, with the projector, config and tokenizer
  beside it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from lavis.config.load import from_dict
from lavis.config.schema import Config
from lavis.convert.hf_export import write_hf_dir, write_sidecar
from lavis.data.tokenizer import load_tokenizer
from lavis.engine.checkpoint import META_FILE, load_meta
from lavis.model.lora import ADAPTER_NAME, is_adapter_key, merge_adapters_, peft_config
from lavis.model.spec import ModelSpec
from lavis.weights.load import load_model
from lavis.weights.release import check_against_model, release_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LLM_PREFIX = "llm_model."
PEFT_PREFIX = "base_model.model."
"""peft's key prefix in ``adapter_model.safetensors`` (the PeftModel's ``base_model.model`` is the LLM)."""


def run_config(tag_dir: Path) -> tuple[Config, Path]:
    """The run's config and its tokenizer file, from a checkpoint directory."""
    meta = load_meta(tag_dir)
    cfg = from_dict(Config, meta["config"], source=str(tag_dir / META_FILE))
    tok_file = tag_dir / meta["tokenizer"]
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} missing: the checkpoint directory lacks the run's tokenizer")
    if cfg.model.llm.lora is None:
        raise ValueError(f"{tag_dir}: not a LoRA run (model.llm.lora is unset); --merge-lora does not apply")
    return cfg, tok_file


def without_lora(cfg: Config) -> Config:
    """The run's config as a plain model whose LLM weights are all in the merged file."""
    llm = replace(cfg.model.llm, lora=None, quantize=None, frozen=False)
    return replace(cfg, model=replace(cfg.model, llm=llm))


def load_merged(tag_dir: Path, adapter_pth: Path, spec: ModelSpec | None = None):  # noqa: ANN201 - (MultimodalLM, Config, Path)
    """Base weights + the adapter ``.pth``, adapters folded in: a plain model with no adapter layers left. ``spec``:
    the run's model description (the converter's; folding the adapters changes no shape, so it also describes the
    merged model)."""
    cfg, tok_file = run_config(tag_dir)
    model = load_model(cfg, adapter_pth, load_tokenizer(str(tok_file)), torch.device("cpu"),
                       DTYPES[cfg.train.precision], spec)
    if not merge_adapters_(model.llm_model):
        raise ValueError(f"{adapter_pth}: the model has no adapter layers to merge")
    return model, cfg, tok_file


def merge_lora(tag_dir: Path, adapter_pth: Path, out: Path, names: str = "auto",
               spec: ModelSpec | None = None) -> Path:
    """Write the merged ``.pth``: every LLM tensor (adapters folded in) and the other trained tensors of
    ``adapter_pth`` (projection, ...), named as ``lavis.weights.release.release_names`` says."""
    model, cfg, _ = load_merged(tag_dir, adapter_pth, spec)
    trained = {k for k in torch.load(adapter_pth, map_location="cpu", weights_only=True, mmap=True)
               if not is_adapter_key(k)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.startswith(LLM_PREFIX) or k in trained}
    plain = without_lora(cfg)
    check_against_model(state, plain.model, load_meta(tag_dir)["placeholder_id"], spec)
    state = release_names(state, plain.model, names, spec)  # type: ignore[arg-type]
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def export_merged_hf(tag_dir: Path, adapter_pth: Path, out_dir: str | Path, dtype: torch.dtype,
                     spec: ModelSpec | None = None) -> Path:
    """The merged LLM as a transformers directory (``AutoModelForCausalLM.from_pretrained``)."""
    model, cfg, tok_file = load_merged(tag_dir, adapter_pth, spec)
    return write_hf_dir(model.to(dtype), without_lora(cfg), tok_file, out_dir)


def peft_state(adapter_state: dict[str, torch.Tensor], train_embeddings: bool) -> dict[str, torch.Tensor]:
    """Our plain names -> peft's saved names (``base_model.model.`` + the LLM name, adapter name dropped); with
    ``train_embeddings`` the embeddings and LM head go along (peft's ``modules_to_save``)."""
    out = {}
    for k, v in adapter_state.items():
        if not k.startswith(LLM_PREFIX):
            continue
        name = k[len(LLM_PREFIX):]
        if is_adapter_key(k):
            out[PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")] = v.detach().contiguous()
        elif train_embeddings:
            out[PEFT_PREFIX + name] = v.detach().contiguous()
    return out


def export_peft(tag_dir: Path, adapter_pth: Path, out_dir: str | Path, spec: ModelSpec | None = None) -> Path:
    """A peft adapter directory: ``PeftModel.from_pretrained(base_llm, DIR)`` gives the trained LLM."""
    from safetensors.torch import save_file

    cfg, tok_file = run_config(tag_dir)
    lora = cfg.model.llm.lora
    assert lora is not None
    state = torch.load(adapter_pth, map_location="cpu", weights_only=True)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state if is_adapter_key(k)})
    if not targets:
        raise ValueError(f"{adapter_pth} holds no adapter tensors")
    config = peft_config(lora, targets)
    config.task_type = "CAUSAL_LM"
    config.base_model_name_or_path = cfg.model.llm.path
    if lora.train_embeddings:
        config.modules_to_save = ["embed_tokens", "lm_head"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(peft_state(state, lora.train_embeddings), str(out / "adapter_model.safetensors"))
    model = load_model(cfg, adapter_pth, load_tokenizer(str(tok_file)), torch.device("cpu"), torch.float32, spec)
    write_sidecar(model, cfg, tok_file, out)
    return out
