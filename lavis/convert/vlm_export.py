"""``--hf-out DIR`` for a ``model.vlm`` run: a directory of the same class as the source (Qwen2.5-VL / Qwen3-VL).

``AutoModelForImageTextToText.from_pretrained(DIR)`` loads it: ``config.json`` and safetensors written by transformers'
own ``save_pretrained`` from the trained weights (the checkpoint's trained tensors over the source directory's, which
hold the frozen parts); the source directory's other files (processor, tokenizer, chat template, generation config)
are copied beside them so ``AutoProcessor.from_pretrained(DIR)`` loads too; a run without ``model.vlm.path`` (from
scratch) copies the processor its run directory saved (``RUN/processor``).

A LoRA run (``model.vlm.lora``) is written merged (each adapter folded into its base weight, ``W + alpha/r * B @ A``,
over the unquantized base weights also for QLoRA), or with ``adapter=True`` as a peft adapter directory
(``adapter_config.json``, ``adapter_model.safetensors``, the processor files) that
``peft.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(BASE), DIR)`` loads onto the source
directory; what else trained (merger, tower, embeddings) goes along as peft's ``modules_to_save``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

from lavis.engine.vlm_checkpoint import in_memory_key, run_vlm_config, trained_layers, trained_model
from lavis.model.lora import ADAPTER_NAME, is_adapter_key, peft_config
from lavis.vlm.config import VLMConfig
from lavis.vlm.data import RUN_PROCESSOR_DIR

__all__ = ["WEIGHT_FILES", "export_vlm_hf", "is_vlm_run", "trained_layers"]  # trained_layers: its old home

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
"""Written by ``save_pretrained``; every other file of the source directory is copied."""


def is_vlm_run(meta: dict) -> bool:
    """``lavis_meta.json``'s config has a ``model.vlm`` section."""
    return (meta.get("config", {}).get("model") or {}).get("vlm") is not None


def export_vlm_hf(tag_dir: Path, trained: dict[str, torch.Tensor], meta: dict, out_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16, adapter: bool = False) -> Path:
    """Write ``out_dir`` (see the module docstring); ``trained``, ``meta``: the checkpoint's
    (``lavis.engine.checkpoint.load_plain_state``); ``adapter``: a LoRA run as a peft adapter directory instead of
    merged."""
    vlm = run_vlm_config(meta, tag_dir)
    if vlm is None:
        raise ValueError(f"{tag_dir}: not a model.vlm run")
    if adapter and vlm.lora is None:
        raise ValueError(f"{tag_dir}: not a LoRA run (model.vlm.lora is unset): there is no adapter to write; "
                         "drop --peft-adapter to write the whole model")
    model = trained_model(vlm, trained, str(tag_dir), merge_lora=not adapter)
    nn.Module.to(model, dtype)  # in place (transformers' wrapper of ``to`` confuses the type checker)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if adapter:
        adapters = {k: v for k, v in trained.items() if is_adapter_key(k)}
        write_peft_adapter(model, vlm, adapters, [k for k in trained if not is_adapter_key(k)], out)
    else:
        model.save_pretrained(out)
    copy_processor_files(vlm, tag_dir, out)
    return out


def copy_processor_files(vlm: VLMConfig, tag_dir: Path, out: Path) -> None:
    """The source directory's files other than config and weights (processor, tokenizer, chat template, generation
    config); a run from scratch: the processor its run directory saved."""
    source = Path(vlm.path) if vlm.path is not None else tag_dir.parent / RUN_PROCESSOR_DIR  # from scratch: the run's
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, out / f.name)


def modules_to_save(trained_keys: list[str]) -> list[str]:
    """transformers module paths that hold the run's trained tensors other than adapters (peft's
    ``modules_to_save``): the whole tower when it trained, else the merger and each DeepStack merger; the
    embeddings and LM head."""
    paths = set()
    for key in trained_keys:
        parts = in_memory_key(key).split(".")
        if key.startswith("visual.") and not key.startswith(("visual.merger.", "visual.deepstack_merger_list.")):
            paths.add("model.visual")
        elif key.startswith("visual.merger."):
            paths.add("model.visual.merger")
        elif key.startswith("visual.deepstack_merger_list."):
            paths.add(".".join(parts[:4]))  # model.visual.deepstack_merger_list.N
        elif key.startswith(("model.embed_tokens.", "lm_head.")):
            paths.add(".".join(parts[:-1]))
        else:
            raise ValueError(f"trained tensor {key} is neither an adapter nor in a module peft can save beside it")
    if "model.visual" in paths:
        paths = {p for p in paths if not p.startswith("model.visual.")}
    return sorted(paths)


def write_peft_adapter(model: nn.Module, vlm: VLMConfig, adapters: dict[str, torch.Tensor], trained_keys: list[str],
                       out: Path) -> None:
    """``adapters`` (published names, peft's layout) and the trained modules, saved by peft itself from the model
    wrapped with the run's adapter config (targets: those linear layers of the language model's decoder blocks)."""
    from peft import get_peft_model

    assert vlm.lora is not None
    names = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters})
    if not names:
        raise ValueError("the checkpoint holds no adapter tensors")
    config = peft_config(vlm.lora, names)
    config.target_modules = rf"model\.language_model\.layers\.\d+\.\w+\.({'|'.join(map(re.escape, names))})"
    config.modules_to_save = modules_to_save(trained_keys) or None
    config.base_model_name_or_path = vlm.path
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, tensor in adapters.items():
            target = params.get("base_model.model." + in_memory_key(key))
            if target is None:
                raise ValueError(f"adapter tensor {key} has no place in peft's model")
            target.copy_(tensor)
    peft_model.save_pretrained(str(out))
