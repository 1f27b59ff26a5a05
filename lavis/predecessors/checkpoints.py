"""Predecessors' run directories: MPP-Qwen-Next pipeline directories (``global_stepN/layer_XX-model_states.pt``, no
``lavis_meta.json``) and MiniGPT-4 output directories (``checkpoint_N.pth``) are recognised and, given to ``--resume``
/ ``--output-dir``, answered with what to do instead (:func:`resume_advice`); :mod:`lavis.predecessors.mpp_layers`
converts the MPP layer files. Their ``.pth`` files load as ``model.checkpoint`` through
:mod:`lavis.weights.checkpoint`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from lavis.weights.torch_file import load_torch_file

MPP_LAYER_ZERO = "layer_00-model_states.pt"
MPP_PRESETS = {32: "qwen7b_chat", 40: "qwen14b_chat"}
"""MPP-Qwen-Next's LLMs by decoder-block count (Qwen-7B-Chat, Qwen-14B-Chat)."""


MPP_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt")


def mpp_layer_files(tag_dir: Path) -> list[Path]:
    """An MPP pipeline directory's ``layer_XX-model_states.pt`` files in layer order."""
    found = [(int(m[1]), p) for p in tag_dir.iterdir() if (m := MPP_LAYER_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def mpp_llm_frozen(tag_dir: Path) -> bool:
    """Whether an MPP run froze its LLM (pretrain: only the projection trained). MPP's ``get_model(model,
    freeze_llm)`` appends its ``IndentityPipeLayerLast`` (``occupy.weight``, a zero 1000x1000 Linear) exactly then, so
    the last layer file holds ``occupy.weight``; otherwise it is the parameterless loss layer."""
    layers = mpp_layer_files(tag_dir)
    if not layers:
        raise FileNotFoundError(f"{tag_dir}: no MPP layer files (layer_XX-model_states.pt)")
    last = load_torch_file(layers[-1], "MPP layer file")
    return isinstance(last, Mapping) and "occupy.weight" in last


def is_mpp_layer_dir(tag_dir: Path, meta_file: str) -> bool:
    """MPP layer files without our ``meta_file``, told from an interrupted save of ours by MPP's own names in layer 0
    (its ``TokenizerPipeLayer``: ``visionpipe.*``, ``wtepipe.word_embeddings.weight``; memory-mapped, not read)."""
    if not (tag_dir / MPP_LAYER_ZERO).is_file() or (tag_dir / meta_file).is_file():
        return False
    try:
        layer0 = load_torch_file(tag_dir / MPP_LAYER_ZERO, "MPP layer file")
    except ValueError:
        return False  # unreadable: the caller's own checks name it
    return isinstance(layer0, Mapping) and any(
        str(k).startswith("visionpipe.") or k == "wtepipe.word_embeddings.weight" for k in layer0)


def mpp_resume_advice(tag_dir: Path, meta_file: str) -> str | None:
    """For an MPP-Qwen-Next checkpoint directory (:func:`is_mpp_layer_dir`): what to do instead of resuming it, with
    the exact commands; None for anything else. A pretrain run (:func:`mpp_llm_frozen`) converts with
    ``pipe_proj2pth.py``, an SFT run (LLM trained) with ``pipemodel2pth.py``."""
    if not is_mpp_layer_dir(tag_dir, meta_file):
        return None
    pretrain = mpp_llm_frozen(tag_dir)
    blocks = len(mpp_layer_files(tag_dir)) - (9 if pretrain else 8)  # layer 0, 4 pads, blocks, norm, head, loss
    model = f"--model-type {MPP_PRESETS[blocks]}" if blocks in MPP_PRESETS else "--cfg-path YOUR_MODEL_RECIPE"
    script, pth = ("pipe_proj2pth.py", "model.pth") if pretrain else ("pipemodel2pth.py", "unfreeze_llm_model.pth")
    return (f"{tag_dir} is an MPP-Qwen checkpoint directory (layer_XX-model_states.pt without {meta_file}), which "
            f"this trainer cannot resume; convert it: `python {script} --ckpt-dir {tag_dir} {model}`, then use it as "
            f"`model.checkpoint`: `--options model.checkpoint={tag_dir / pth}` with another --output-dir")


MINIGPT4_CHECKPOINT = re.compile(r"checkpoint_(\d+|best)\.pth")
"""What MiniGPT-4's runner saves into its output directory (``_save_checkpoint``: per epoch, or the best one)."""


def minigpt4_resume_advice(run_dir: Path) -> str | None:
    """For a MiniGPT-4 output directory (``checkpoint_N.pth`` files): it cannot be resumed here, its newest checkpoint
    loads as ``model.checkpoint`` (weights only); None for anything else."""
    found = sorted((int(m[1]) if m[1].isdigit() else -1, p) for p in run_dir.iterdir()
                   if (m := MINIGPT4_CHECKPOINT.fullmatch(p.name)))
    if not found:
        return None
    newest = found[-1][1]
    return (f"{run_dir} is a MiniGPT-4 output directory ({newest.name}), which this trainer cannot resume (its "
            f"optimizer and scaler state do not carry over); start a new run from its weights: `--options "
            f"model.checkpoint={newest}` with another --output-dir")


def resume_advice(run_or_tag_dir: Path, meta_file: str) -> str | None:
    """What to do with a predecessor's directory given to ``--resume`` / ``--output-dir`` (None: not one)."""
    return mpp_resume_advice(run_or_tag_dir, meta_file) or minigpt4_resume_advice(run_or_tag_dir)
