"""Fold a pipeline checkpoint into one ``.pth`` of plain-model weights (back end of the two converter scripts).

Everything is derived from the checkpoint's ``lavis_meta.json`` (layer table, model config), never from
hard-coded layer indices, so any model size and any partition converts. Layer files hold only the weights that
trained (frozen ones are excluded at save time). The result is checked strictly against a model built from the
saved config on the meta device: every key must exist there with the same shape, and the keys not in the file
must be exactly the frozen ones (they come from the base weights when the ``.pth`` is loaded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from lavis.config.load import from_dict
from lavis.config.schema import ModelConfig
from lavis.engine.checkpoint import META_FILE, load_meta, read_latest, table_from_json
from lavis.model.freezing import is_trainable
from lavis.model.lora import model_targets
from lavis.model.llm import is_qwen_v1, read_config_json, to_qwen_v1_names
from lavis.model.mllm import MultimodalLM
from lavis.pipeline.plan import layers_to_plain

Kind = Literal["proj", "model"]
Names = Literal["auto", "ours", "qwen_v1"]
OUTPUT_NAME = {"proj": "model.pth", "model": "unfreeze_llm_model.pth"}


def resolve_tag_dir(ckpt_dir: str | Path) -> Path:
    """``ckpt_dir`` may be a run directory (its ``latest`` is used) or one ``global_step*`` directory."""
    d = Path(ckpt_dir)
    if (d / META_FILE).is_file():
        return d
    tag = read_latest(d)
    if tag is None:
        raise FileNotFoundError(f"{d} is neither a checkpoint directory ({META_FILE}) nor a run directory (latest)")
    return d / tag


def load_plain_state(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = load_meta(tag_dir)
    table = table_from_json(meta["layers"])
    states = {}
    for entry in table:
        f = tag_dir / f"layer_{entry.index:02d}-model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: the checkpoint in {tag_dir} is incomplete")
        states[entry.index] = torch.load(f, map_location="cpu", weights_only=True)
    return layers_to_plain(table, states), meta


def check_against_model(state: dict[str, torch.Tensor], cfg: ModelConfig, placeholder_id: int) -> list[str]:
    """Strict shape check against a meta-device model; returns the model keys the file does not hold."""
    with torch.device("meta"):
        model = MultimodalLM(cfg, placeholder_id)
        expected = {k: v.shape for k, v in model_targets(model, cfg).items()}  # with LoRA: + adapters
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                  for k, v in state.items() if k in expected and v.shape != expected[k]]
    if unexpected or mismatched:
        raise ValueError(f"converted weights do not fit the model: unexpected {unexpected[:5]}, "
                         f"shape mismatches {mismatched[:5]}")
    return sorted(set(expected) - set(state))


def release_names(state: dict[str, torch.Tensor], cfg: ModelConfig, names: Names) -> dict[str, torch.Tensor]:
    """``auto``: Qwen v1 names (``llm_model.transformer.h.N.attn.c_attn...``) when the LLM was read from a Qwen v1
    directory, as MPP-Qwen's converter writes them, so its users' tools keep working; our names otherwise.
    A LoRA run's adapters have no Qwen v1 names: its ``.pth`` keeps ours (``--merge-lora`` writes Qwen v1 names)."""
    if cfg.llm.lora is not None:
        if names == "qwen_v1":
            raise ValueError("--names qwen_v1: adapter tensors have no Qwen v1 names; add --merge-lora")
        return state
    v1 = names == "qwen_v1" or (
        names == "auto" and cfg.llm.path is not None and is_qwen_v1(read_config_json(cfg.llm.path)))
    return to_qwen_v1_names(state) if v1 else state


def convert(ckpt_dir: str | Path, kind: Kind, out: str | Path | None = None, names: Names = "auto") -> Path:
    tag_dir = resolve_tag_dir(ckpt_dir)
    state, meta = load_plain_state(tag_dir)
    cfg = from_dict(ModelConfig, meta["config"]["model"], source=str(tag_dir / META_FILE), prefix="model.")
    if kind == "proj":
        state = {k: v for k, v in state.items() if k.startswith("llm_proj.")}
        if not state:
            raise ValueError(f"{tag_dir} holds no llm_proj weights (was model.projection.frozen true?)")
    missing = check_against_model(state, cfg, meta["placeholder_id"])
    if kind == "model":
        trainable_missing = [k for k in missing if is_trainable(k, cfg)]
        if trainable_missing:
            raise ValueError(f"{tag_dir}: trained weights missing from the layer files: {trainable_missing[:5]}")
    state = release_names(state, cfg, names)
    dest = Path(out) if out is not None else Path(ckpt_dir) / OUTPUT_NAME[kind]
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, dest)
    return dest


def cli(kind: Kind, description: str, argv: list[str] | None = None) -> None:
    """The shared command line of ``pipe_proj2pth.py`` and ``pipemodel2pth.py``."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", "--ckpt_dir", required=True, help="run directory or one global_step* directory")
    p.add_argument("--out", help=f"output file (default: CKPT_DIR/{OUTPUT_NAME[kind]})")
    p.add_argument("--names", choices=["auto", "ours", "qwen_v1"], default="auto",
                   help="key names of the .pth: auto = Qwen v1 names (llm_model.transformer.*, as MPP-Qwen) for "
                        "models read from a Qwen v1 directory, our transformers names otherwise")
    p.add_argument("--hf-out", metavar="DIR",
                   help="also write the LLM as a transformers directory (AutoModelForCausalLM.from_pretrained), "
                        "with projector.pth, mm_config.yaml and the tokenizer beside it")
    p.add_argument("--hf-dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="--hf-out weight dtype")
    if kind == "model":
        p.add_argument("--merge-lora", action="store_true",
                       help="LoRA runs: fold the adapters into the base weights (needs the base weight files) and "
                            "write the whole LLM to the .pth; with --hf-out a merged transformers directory "
                            "(without --merge-lora, --hf-out writes a peft adapter directory)")
    args = p.parse_args(argv)
    pth = convert(args.ckpt_dir, kind, args.out, args.names)
    print(pth)
    if kind == "model" and lora_cli(args, pth):
        return
    if args.hf_out:
        from lavis.convert.hf_export import export_hf

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.hf_dtype]
        print(export_hf(resolve_tag_dir(args.ckpt_dir), pth, args.hf_out, dtype))


def lora_cli(args: object, pth: Path) -> bool:
    """``--merge-lora`` / ``--hf-out`` for a LoRA run (``lavis.convert.lora_export``); False if not a LoRA run."""
    from lavis.convert import lora_export

    tag_dir = resolve_tag_dir(args.ckpt_dir)
    cfg = from_dict(ModelConfig, load_meta(tag_dir)["config"]["model"], source=str(tag_dir / META_FILE),
                    prefix="model.")
    if cfg.llm.lora is None:
        if args.merge_lora:
            raise ValueError(f"--merge-lora: {tag_dir} is not a LoRA run (model.llm.lora is unset)")
        return False
    adapters = pth
    if args.merge_lora:
        adapters = pth.with_name("lora_" + pth.name)
        os.replace(pth, adapters)
        print(adapters)
        print(lora_export.merge_lora(tag_dir, adapters, pth, args.names))
    if args.hf_out:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.hf_dtype]
        print(lora_export.export_merged_hf(tag_dir, adapters, args.hf_out, dtype) if args.merge_lora
              else lora_export.export_peft(tag_dir, adapters, args.hf_out))
    return True
