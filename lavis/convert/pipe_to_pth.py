"""Fold a pipeline checkpoint into one ``.pth`` of plain-model weights (back end of the two converter scripts).

Everything is derived from the checkpoint's ``lavis_meta.json`` (layer table, model config), never from
hard-coded layer indices, so any model size and any partition converts. Layer files hold only the weights that
trained (frozen ones are excluded at save time). The result is checked strictly against a model built from the
saved config on the meta device: every key must exist there with the same shape, and the keys not in the file
must be exactly the frozen ones (they come from the base weights when the ``.pth`` is loaded).

Each converter says what kind of run it read (which components trained, from the saved config) and refuses the
wrong kind: ``pipe_proj2pth.py`` on a run that also trained the LLM (its ``model.pth`` would leave the trained LLM
out) and ``pipemodel2pth.py`` on a projection-only run (it would write a projection-only
``unfreeze_llm_model.pth``); ``--allow-kind-mismatch`` turns the refusal into a warning. Non-finite (NaN / inf)
weights are refused, naming them, unless ``--allow-nonfinite``. MPP-Qwen-Next layer directories get the same refusal:
MPP appends its ``occupy`` layer exactly when the LLM is frozen, so the layer list says what trained.

No output may be one of the command's inputs: ``--out`` naming a file of the checkpoint (layer files, metadata,
optimizer states, ``latest``, the config, the base weights) and ``--hf-out`` naming a directory that holds any of
them are refused before anything is written.

``--names minigpt4`` (``pipe_proj2pth.py``) writes MiniGPT-4's checkpoint format,
``{"model": {"llama_proj.weight", "llama_proj.bias"}}`` in fp32, which MiniGPT-4's ``ckpt:`` loading reads
(``torch.load(path)["model"]``, ``load_state_dict(strict=False)``); only for a LLaMA-family LLM.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from lavis.config.load import from_dict, load_config
from lavis.config.presets import preset_path
from lavis.config.schema import ModelConfig
from lavis.convert import lora_export
from lavis.convert.hf_export import export_hf
from lavis.convert.vlm_export import export_vlm_hf, is_vlm_run
from lavis.engine.checkpoint import META_FILE, load_meta, load_plain_state, resolve_tag_dir
from lavis.families import describe, family_named
from lavis.model.freezing import is_trainable
from lavis.model.spec import ModelSpec
from lavis.predecessors.mpp_layers import convert_mpp, is_mpp_checkpoint, resolve_mpp_tag_dir
from lavis.weights.release import (
    OUTPUT_NAME,
    Kind,
    Names,
    check_against_model,
    describe_run,
    kind_mismatch,
    release_names,
)

PREVIOUS_OUTPUTS = frozenset({*OUTPUT_NAME.values(), *(f"lora_{n}" for n in OUTPUT_NAME.values())})
"""Files a converter writes into a checkpoint directory itself: the only files there that an output may replace."""


def _checkpoint_tag_dir(ckpt_dir: Path) -> Path | None:
    mpp = resolve_mpp_tag_dir(ckpt_dir)
    if mpp is not None:
        return mpp
    try:
        return resolve_tag_dir(ckpt_dir)
    except (FileNotFoundError, ValueError):
        return None  # convert() reports what is wrong with it


def _config_weight_paths(tag_dir: Path) -> list[Path]:
    """The weight files and directories our checkpoint's config reads (base weights, tokenizer)."""
    try:
        model = load_meta(tag_dir).get("config", {}).get("model", {})
    except (OSError, ValueError):
        return []
    found = [model.get("checkpoint"), model.get("vision", {}).get("checkpoint"),
             model.get("qformer", {}).get("checkpoint"), model.get("llm", {}).get("path"),
             model.get("llm", {}).get("tokenizer")]
    return [Path(p) for p in found if isinstance(p, str) and p]


def command_inputs(ckpt_dir: str | Path, cfg_path: str | Path | None = None) -> list[Path]:
    """Every file and directory a conversion of ``ckpt_dir`` reads or that makes up the checkpoint: the checkpoint
    directory's files (but a converter's own earlier outputs), the run's ``latest``, ``cfg_path`` and the base
    weights its config names."""
    d = Path(ckpt_dir)
    tag = _checkpoint_tag_dir(d)
    found: list[Path] = [d / "latest"]
    if tag is not None:
        found += [p for p in tag.iterdir() if p.name not in PREVIOUS_OUTPUTS]
        found += [tag.parent / "latest", tag.parent / "config.yaml"] + _config_weight_paths(tag)
    if cfg_path is not None:
        found.append(Path(cfg_path))
    return [p for p in found if p.exists()]


def _same(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()


def refuse_output_over_inputs(flag: str, out: str | Path, inputs: list[Path], *, is_dir: bool = False) -> None:
    """``out`` (a file; with ``is_dir`` a directory written into) must not be, or hold, one of ``inputs``."""
    out = Path(out)
    for inp in inputs:
        files = [p for p in inp.iterdir() if p.is_file()] if inp.is_dir() and not is_dir else [inp]
        for f in files:
            hit = (_same(out, f) or out.resolve() in f.resolve().parents) if is_dir else _same(out, f)
            if hit:
                which = "" if str(out) == str(f) else f"{f}, "
                what = "holds" if is_dir and not _same(out, f) else "is"
                raise ValueError(f"{flag} {out} {what} {which}an input of this conversion; it would be overwritten. "
                                 f"Nothing was written: choose another {flag}")


def nonfinite_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def refuse_nonfinite(state: dict[str, torch.Tensor], tag_dir: Path, allow: bool) -> None:
    bad = nonfinite_keys(state)
    if bad and not allow:
        raise ValueError(f"{tag_dir}: {len(bad)} weight(s) hold NaN or inf: {bad[:5]}; the run diverged before this "
                         f"checkpoint: convert an earlier global_step* (or pass --allow-nonfinite)")
    if bad:
        print(f"warning: {len(bad)} weight(s) hold NaN or inf: {bad[:5]} (--allow-nonfinite)", file=sys.stderr)


def check_converter_names(spec: ModelSpec, names: str) -> None:
    """Refuse ``--names`` that the run's model family does not write."""
    allowed = family_named(spec.family).converter_names
    if names not in allowed:
        writes = ", ".join(allowed) or "no .pth names (export its runs with pipemodel2pth.py --hf-out DIR)"
        raise ValueError(f"--names {names}: the {spec.family} model family's converters write {writes}")


def convert(ckpt_dir: str | Path, kind: Kind, out: str | Path | None = None, names: Names = "auto",
            model: ModelConfig | None = None, include_frozen: bool = False, *, allow_kind_mismatch: bool = False,
            allow_nonfinite: bool = False) -> Path:
    """``model``: the model config for a checkpoint without our metadata (MPP-Qwen-Next's layer files,
    ``lavis.predecessors.mpp_layers``); ``include_frozen``: write its frozen weights too."""
    return convert_and_describe(ckpt_dir, kind, out, names, model, include_frozen,
                                allow_kind_mismatch=allow_kind_mismatch, allow_nonfinite=allow_nonfinite)[0]


def convert_and_describe(
    ckpt_dir: str | Path, kind: Kind, out: str | Path | None = None, names: Names = "auto",
    model: ModelConfig | None = None, include_frozen: bool = False, *, allow_kind_mismatch: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[Path, ModelSpec | None]:
    """:func:`convert`, and the run's model description for the exports that follow (None for MPP layer files)."""
    if out is not None:
        refuse_output_over_inputs("--out", out, command_inputs(ckpt_dir))
    if is_mpp_checkpoint(ckpt_dir):
        if model is None:
            raise ValueError(f"{ckpt_dir} holds MPP-Qwen-Next layer files without our lavis_meta.json: name the model "
                             "with --model-type NAME (e.g. qwen7b_chat, qwen14b_chat) or --cfg-path CFG")
        dest, report = convert_mpp(ckpt_dir, kind, model, out, names, include_frozen,
                                   allow_kind_mismatch=allow_kind_mismatch)
        print(report.format(limit=10))
        return dest, None
    tag_dir = resolve_tag_dir(ckpt_dir)
    state, meta = load_plain_state(tag_dir)
    cfg = from_dict(ModelConfig, meta["config"]["model"], source=str(tag_dir / META_FILE), prefix="model.")
    spec = describe(cfg)  # the one description of the model this conversion uses
    check_converter_names(spec, names)
    trained = list(spec.trains)
    print(f"{tag_dir}: {describe_run(trained)}", file=sys.stderr)
    mismatch = kind_mismatch(kind, trained)
    if mismatch and not allow_kind_mismatch:
        raise ValueError(f"{tag_dir}: {mismatch} (or pass --allow-kind-mismatch)")
    if mismatch:
        print(f"warning: {mismatch} (--allow-kind-mismatch)", file=sys.stderr)
    if kind == "proj":
        state = {k: v for k, v in state.items() if k.startswith("llm_proj.")}
        if not state:
            raise ValueError(f"{tag_dir} holds no llm_proj weights (was model.projection.frozen true?)")
    missing = check_against_model(state, cfg, meta["placeholder_id"], spec)
    if kind == "model":
        trainable_missing = [k for k in missing if is_trainable(k, cfg)]
        if trainable_missing:
            raise ValueError(f"{tag_dir}: trained weights missing from the layer files: {trainable_missing[:5]}")
    refuse_nonfinite(state, tag_dir, allow_nonfinite)
    state = release_names(state, cfg, names, spec)
    dest = Path(out) if out is not None else Path(ckpt_dir) / OUTPUT_NAME[kind]
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, dest)
    return dest, spec


def cli(kind: Kind, description: str, argv: list[str] | None = None) -> None:
    """The shared command line of ``pipe_proj2pth.py`` and ``pipemodel2pth.py``."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", "--ckpt_dir", required=True, help="run directory or one global_step* directory")
    p.add_argument("--out", help=f"output file (default: CKPT_DIR/{OUTPUT_NAME[kind]})")
    p.add_argument("--names", choices=["auto", "ours", "qwen_v1", *(["minigpt4"] if kind == "proj" else [])],
                   default="auto",
                   help="key names of the .pth: auto = Qwen v1 names (llm_model.transformer.*, as MPP-Qwen) for "
                        "models read from a Qwen v1 directory, our transformers names otherwise"
                        + ("; minigpt4 = MiniGPT-4's checkpoint {'model': {llama_proj.*}} (its `ckpt:`)"
                           if kind == "proj" else ""))
    p.add_argument("--hf-out", metavar="DIR",
                   help="also write the LLM as a transformers directory (AutoModelForCausalLM.from_pretrained), "
                        "with projector.pth, mm_config.yaml and the tokenizer beside it")
    p.add_argument("--hf-dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="--hf-out weight dtype")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-type", help="for MPP-Qwen-Next layer files (no lavis_meta.json): the model config "
                                            "(lavis/projects/models/NAME.yaml) whose LLM the run trained")
    which.add_argument("--cfg-path", help="for MPP-Qwen-Next layer files: a recipe naming the model instead")
    p.add_argument("--include-frozen", action="store_true",
                   help="MPP layer files: also write the frozen weights they hold (ViT, Q-Former)")
    p.add_argument("--allow-kind-mismatch", action="store_true",
                   help="convert even when the run trained other components than this converter writes (warns)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert even when weights hold NaN / inf (warns)")
    if kind == "model":
        p.add_argument("--merge-lora", action="store_true",
                       help="LoRA runs: fold the adapters into the base weights (needs the base weight files) and "
                            "write the whole LLM to the .pth; with --hf-out a merged transformers directory "
                            "(without --merge-lora, --hf-out writes a peft adapter directory)")
        p.add_argument("--peft-adapter", action="store_true",
                       help="LoRA runs with --hf-out: a peft adapter directory (the default for model.llm.lora runs; "
                            "a model.vlm.lora run is written merged unless this is given)")
    args = p.parse_args(argv)
    if getattr(args, "peft_adapter", False) and (args.merge_lora or not args.hf_out):
        p.error("--peft-adapter writes a peft adapter directory with --hf-out DIR; it excludes --merge-lora")
    if args.hf_out and (args.model_type or args.cfg_path):
        p.error("--hf-out needs a checkpoint of ours (lavis_meta.json); for MPP layer files convert first, then "
                "train or export from the .pth")
    refuse_outputs_over_inputs(args, kind)
    if args.model_type is None and args.cfg_path is None and is_vlm_run(load_meta(resolve_tag_dir(args.ckpt_dir))):
        if not args.hf_out or kind != "model":
            p.error("a model.vlm run (a transformers VLM) is exported with pipemodel2pth.py --hf-out DIR: a directory "
                    "of the source's class that transformers loads")
        tag_dir = resolve_tag_dir(args.ckpt_dir)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.hf_dtype]
        print(export_vlm_hf(tag_dir, *load_plain_state(tag_dir), args.hf_out, dtype, adapter=args.peft_adapter))
        return
    pth, spec = convert_and_describe(args.ckpt_dir, kind, args.out, args.names,
                                     _model_arg(args.model_type, args.cfg_path), args.include_frozen,
                                     allow_kind_mismatch=args.allow_kind_mismatch, allow_nonfinite=args.allow_nonfinite)
    print(pth)
    if kind == "model" and args.model_type is None and args.cfg_path is None and lora_cli(args, pth, spec):
        return
    if args.hf_out:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.hf_dtype]
        print(export_hf(resolve_tag_dir(args.ckpt_dir), pth, args.hf_out, dtype, spec))


def refuse_outputs_over_inputs(args: Any, kind: Kind) -> None:
    """Before anything is written: ``--out``, the adapters file ``--merge-lora`` moves it to, and ``--hf-out`` must
    not be (or, for the directory, hold) one of the conversion's inputs."""
    inputs = command_inputs(args.ckpt_dir, args.cfg_path)
    out = Path(args.out) if args.out else Path(args.ckpt_dir) / OUTPUT_NAME[kind]
    refuse_output_over_inputs("--out", out, inputs)
    if getattr(args, "merge_lora", False):
        refuse_output_over_inputs("--out", out.with_name("lora_" + out.name), inputs)
    if args.hf_out:
        refuse_output_over_inputs("--hf-out", args.hf_out, inputs, is_dir=True)


def _model_arg(model_type: str | None, cfg_path: str | None) -> ModelConfig | None:
    if model_type is None and cfg_path is None:
        return None
    return load_config(preset_path(model_type) if model_type else cfg_path).model


def lora_cli(args: Any, pth: Path, spec: ModelSpec | None = None) -> bool:
    """``--merge-lora`` / ``--hf-out`` for a LoRA run (``lavis.convert.lora_export``); False if not a LoRA run.
    ``spec``: the run's model description (the converter's)."""
    tag_dir = resolve_tag_dir(args.ckpt_dir)
    cfg = from_dict(ModelConfig, load_meta(tag_dir)["config"]["model"], source=str(tag_dir / META_FILE),
                    prefix="model.")
    if cfg.llm.lora is None:
        if args.merge_lora or args.peft_adapter:
            flag = "--merge-lora" if args.merge_lora else "--peft-adapter"
            raise ValueError(f"{flag}: {tag_dir} is not a LoRA run (model.llm.lora is unset)")
        return False
    adapters = pth
    if args.merge_lora:
        adapters = pth.with_name("lora_" + pth.name)
        os.replace(pth, adapters)
        print(adapters)
        print(lora_export.merge_lora(tag_dir, adapters, pth, args.names, spec))
    if args.hf_out:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.hf_dtype]
        print(lora_export.export_merged_hf(tag_dir, adapters, args.hf_out, dtype, spec) if args.merge_lora
              else lora_export.export_peft(tag_dir, adapters, args.hf_out, spec))
    return True
