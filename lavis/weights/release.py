"""The released ``.pth`` files (what ``pipemodel2pth.py`` / ``pipe_proj2pth.py`` write, from our runs or from a
predecessor's layer files): their names, the key names users' tools expect, the strict check against the model, and
which converter fits a run (from what it trained)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lavis.config.schema import ModelConfig
from lavis.model.components import COMPONENTS
from lavis.model.freezing import component_trains
from lavis.model.llm import is_qwen_v1, read_config_json, to_qwen_v1_names
from lavis.model.lora import model_targets
from lavis.model.mllm import MultimodalLM, describe
from lavis.model.spec import ModelSpec

Kind = Literal["proj", "model"]
Names = Literal["auto", "ours", "qwen_v1", "minigpt4"]
OUTPUT_NAME = {"proj": "model.pth", "model": "unfreeze_llm_model.pth"}


def trained_components(cfg: ModelConfig) -> list[str]:
    return [c for c in COMPONENTS if component_trains(c, cfg)]


def describe_run(trained: list[str]) -> str:
    """``pretrain`` (only the projection trained), ``SFT`` (the LLM trained too) or the list of what trained."""
    kind = "pretrain" if trained == ["projection"] else "SFT" if "llm" in trained else "custom"
    return f"{kind} run (trained: {', '.join(trained) or 'nothing'})"


def kind_mismatch(kind: Kind, trained: list[str]) -> str | None:
    """Why converter ``kind`` is the wrong one for a run that trained ``trained``; None when it fits."""
    if kind == "proj" and set(trained) - {"projection"}:
        left_out = ", ".join(c for c in trained if c != "projection")
        return (f"pipe_proj2pth.py writes only the projection (llm_proj.*), but this run also trained {left_out}: "
                f"those trained weights would be left out; use pipemodel2pth.py")
    if kind == "model" and trained == ["projection"]:
        return ("only the projection trained, so pipemodel2pth.py would write a projection-only "
                "unfreeze_llm_model.pth; use pipe_proj2pth.py (model.pth, the stage-1 release format)")
    return None


def check_against_model(state: dict[str, torch.Tensor], cfg: ModelConfig, placeholder_id: int,
                        spec: ModelSpec | None = None) -> list[str]:
    """Strict shape check against a meta-device model (``spec``: the description of ``cfg``, resolved when not
    given); returns the model keys the file does not hold."""
    with torch.device("meta"):
        model = MultimodalLM(cfg, placeholder_id, spec)
        expected = {k: v.shape for k, v in model_targets(model, cfg).items()}  # with LoRA: + adapters
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                  for k, v in state.items() if k in expected and v.shape != expected[k]]
    if unexpected or mismatched:
        raise ValueError(f"converted weights do not fit the model: unexpected {unexpected[:5]}, "
                         f"shape mismatches {mismatched[:5]}")
    return sorted(set(expected) - set(state))


def minigpt4_checkpoint(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, Any]:
    """MiniGPT-4's checkpoint format (its ``_save_checkpoint`` / released ``pretrained_minigpt4*.pth``): the projection
    as ``llama_proj.*`` under ``"model"``, fp32 as its model holds it."""
    other = sorted(k for k in state if not k.startswith("llm_proj."))
    if other:
        raise ValueError(f"--names minigpt4: MiniGPT-4's checkpoint holds only the projection (llama_proj), but this "
                         f".pth would hold {other[:3]}; use pipe_proj2pth.py --names minigpt4")
    family = spec.llm_type
    if family != "llama":
        raise ValueError(f"--names minigpt4: MiniGPT-4 runs LLaMA / Vicuna, but this run's LLM is {family!r}; its "
                         "projection would not fit MiniGPT-4's model. Use --names auto")
    return {"model": {"llama_proj." + k[len("llm_proj."):]: v.float() for k, v in state.items()}}


def release_names(state: dict[str, torch.Tensor], cfg: ModelConfig, names: Names,
                  spec: ModelSpec | None = None) -> dict[str, Any]:
    """``auto``: Qwen v1 names (``llm_model.transformer.h.N.attn.c_attn...``) when the LLM was read from a Qwen v1
    directory, as MPP-Qwen's converter writes them, so its users' tools keep working; our names otherwise.
    A LoRA run's adapters have no Qwen v1 names: its ``.pth`` keeps ours (``--merge-lora`` writes Qwen v1 names).
    ``minigpt4``: :func:`minigpt4_checkpoint`. ``spec``: the description of ``cfg`` (resolved when not given)."""
    if names == "minigpt4":
        return minigpt4_checkpoint(state, spec or describe(cfg))
    if cfg.llm.lora is not None:
        if names == "qwen_v1":
            raise ValueError("--names qwen_v1: adapter tensors have no Qwen v1 names; add --merge-lora")
        return state
    v1 = names == "qwen_v1" or (
        names == "auto" and cfg.llm.path is not None and is_qwen_v1(read_config_json(cfg.llm.path)))
    return to_qwen_v1_names(state) if v1 else state
