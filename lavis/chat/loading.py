"""Which engine the front ends' model flags name: ``--model-dir DIR`` (a transformers VLM directory), a ``model.vlm``
run or recipe through ``--cfg-path`` (with ``-c RUN/global_stepN`` or ``-c RUN``), else the BLIP-2-style model of
``--cfg-path`` / ``--model-type`` (with ``-c M.pth``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lavis.chat.engine import ChatEngine
from lavis.chat.vlm_engine import VLMChatEngine, is_vlm_config
from lavis.config.presets import preset_path


def config_path(args: argparse.Namespace) -> Path | None:
    """The config the flags name (None with ``--model-dir``)."""
    if getattr(args, "model_dir", None):
        return None
    return Path(args.cfg_path or preset_path(args.model_type))


def load_engine(args: argparse.Namespace, device: str, options: Sequence[str] = ()) -> ChatEngine:
    """The engine of ``add_model_arguments``' flags on ``device`` ("auto", "cpu" or "cuda[:i]")."""
    if getattr(args, "model_dir", None):
        if args.checkpoint_path:
            raise ValueError("-c belongs to --cfg-path / --model-type; a --model-dir directory holds its weights")
        if options:
            raise ValueError("--options change a config; --model-dir has none (edit the directory's config.json)")
        return VLMChatEngine.from_model_dir(args.model_dir, device=device, load_8bit=args.load_8bit,
                                            llm_device_map=args.llm_device_map)
    cfg_path = config_path(args)
    assert cfg_path is not None
    if is_vlm_config(cfg_path, options):
        return VLMChatEngine.from_run(cfg_path, args.checkpoint_path, device=device, options=options,
                                      load_8bit=args.load_8bit, llm_device_map=args.llm_device_map)
    return ChatEngine.from_files(cfg_path, args.checkpoint_path, device=device, options=options,
                                 load_8bit=args.load_8bit, llm_device_map=args.llm_device_map)
