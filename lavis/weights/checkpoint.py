"""``model.checkpoint`` / ``-c``: a ``.pth`` loaded on top of the base weights, ours or a predecessor's.

Recognised key families (docs/FORMATS.md sections 7-8), each mapped to our plain-model names:

- ours (``lavis.convert``): ``llm_proj.*``, ``llm_model.model.*``, ``llm_model.lm_head.weight``, and any other
  plain-model key (``visual_encoder.*``, ``qformer.*``, ...) as is;
- MPP-Qwen pretrain ``model.pth``: ``{llm_proj.weight, llm_proj.bias}`` (plain dict);
- MPP-Qwen SFT ``unfreeze_llm_model.pth``: ``llm_proj.*`` + ``llm_model.transformer.*`` / ``llm_model.lm_head.weight``
  in Qwen v1 names, through the same literal key map as the LLM directory. For 7B its converter wrote the tuned final
  norm as ``llm_model.transformer.final_h.{L}norm.weight`` and the head as ``llm_model.transformer.lm_head.weight``
  (its indices are 14B-only), which MPP's own ``strict=False`` loader drops; we load them into ``model.norm`` and
  ``lm_head`` and say so in the report;
- MiniGPT-4 ``prerained_minigpt4_7b.pth`` / ``pretrained_minigpt4.pth`` / ``pretrained_minigpt4_llama2_7b.pth`` (no
  Q-Former: ``llama_proj`` reads 4 concatenated ViT patch tokens, 5632 wide) and its runs' ``checkpoint_N.pth``:
  ``{"model": {llama_proj.*, buffers}, "optimizer", "config", "scaler", "epoch"}`` -> ``llm_proj.*``; its saver drops
  frozen parameters but keeps buffers (``Qformer.bert.embeddings.position_ids``,
  ``llama_model.model.layers.N.self_attn.rotary_emb.inv_freq``), which are ignored with the reason; LAVIS-style
  ``Qformer.*`` names go through the BLIP-2 rename;
- ``{"model": ...}`` (LAVIS / MiniGPT-4 saver) and ``{"module": ...}`` (DeepSpeed ``deepspeed2pth.py``) wrappers.

MiniGPT-v2 checkpoints (``minigptv2_checkpoint.pth`` and its runs' ``checkpoint_N.pth``: ``llama_proj`` 5632 wide as
MiniGPT-4 LLaMA-2's, plus the LLM's LoRA adapters ``llama_model.base_model.model.model.layers.N.self_attn.
{q,v}_proj.lora_{A,B}[.default].weight``) are recognised by those adapter keys and refused by name: MiniGPT-v2 is not
supported (docs/MIGRATING.md). MPP-Qwen-Next pipeline directories (``global_stepN/layer_XX-model_states.pt``, no
``lavis_meta.json``) are not checkpoints to resume: :func:`lavis.predecessors.checkpoints.mpp_resume_advice` says how to
convert them.

Keys of the model the file does not hold keep their base weights (a pretrain ``model.pth`` holds only the
projection); a file key that maps to nothing is *unexpected*; only the explicit ignore-list is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lavis.model.llm import qwen_v1_targets, take_third
from lavis.weights.report import FileReport, ShapeMismatch, unwrap
from lavis.weights.torch_file import load_torch_file
from lavis.weights.vision import blip2_rename

Shape = tuple[int, ...]

CKPT_IGNORED: dict[str, str] = {
    r"Qformer\.bert\.embeddings\.position_ids": "BERT position-id buffer kept by the LAVIS saver; the query-only "
    "Q-Former has no position embeddings",
    r"llm_model\.(transformer\.)?rotary_emb\.inv_freq|(llm|llama)_model\.(model\.)?layers\.\d+\.self_attn\."
    r"rotary_emb\.inv_freq": "rotary inverse-frequency buffer (MiniGPT-4's saver keeps LLaMA's as llama_model.*); "
    "recomputed from the config",
}

MINIGPT_V2_KEY = re.compile(r"llama_model\.base_model\.model\..*\.lora_[AB](\.\w+)?\.weight")
"""A LoRA adapter of MiniGPT-v2's LLM (``get_peft_model`` wraps ``llama_model``; MiniGPT-4 v1 never adapts it)."""
MINIGPT_V2_REFUSAL = "this is a MiniGPT-v2 checkpoint; MiniGPT-v2 is not supported (see docs/MIGRATING.md)"

_MANGLED_NORM = re.compile(r"llm_model\.transformer\.final_h\.(\d+)norm\.weight")


def checkpoint_targets(fkey: str, num_layers: int) -> tuple[list[tuple[str, int | None]], str | None]:
    """File key -> ([(our key, c_attn third)], note). Empty list: not a key any model of ours has."""
    if fkey.startswith("llama_proj."):
        return [("llm_proj." + fkey[len("llama_proj."):], None)], "MiniGPT-4 llama_proj -> llm_proj"
    m = _MANGLED_NORM.fullmatch(fkey)
    if m:
        if int(m[1]) != num_layers:
            return [], None
        return [("llm_model.model.norm.weight", None)], (
            "MPP pipemodel2pth.py 7B name for the tuned final norm (its strict=False loader drops it); loaded")
    if fkey == "llm_model.transformer.lm_head.weight":
        return [("llm_model.lm_head.weight", None)], (
            "MPP pipemodel2pth.py 7B name for the tuned LM head (its strict=False loader drops it); loaded")
    if fkey.startswith("llm_model.transformer."):
        return [("llm_model." + o, t) for o, t in qwen_v1_targets(fkey[len("llm_model."):])], "Qwen v1 names"
    if fkey.startswith("Qformer."):
        ours = blip2_rename(fkey)
        return ([(ours, None)] if ours else []), "LAVIS Q-Former names"
    return [(fkey, None)], None


def read_checkpoint(
    path: str | Path, want: Mapping[str, Shape], known: set[str] | None = None, num_layers: int = 0
) -> tuple[dict[str, torch.Tensor], FileReport]:
    """Tensors of ``want`` that the checkpoint holds (our names) and the report for every key of the file.

    ``known``: every plain-model key (all stages); keys for other stages are counted, not read. ``num_layers``: the
    LLM's block count (to recognise MPP's 7B-mangled final-norm name).
    """
    path = Path(path)
    report = FileReport(str(path))
    obj = load_torch_file(path, "model.checkpoint / -c")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: a {type(obj).__name__}, not a state dict")
    obj = unwrap(obj, report)
    v2 = next((str(k) for k in obj if MINIGPT_V2_KEY.fullmatch(str(k))), None)
    if v2 is not None:
        raise ValueError(f"{path}: {MINIGPT_V2_REFUSAL}: it holds MiniGPT-v2's LLM LoRA adapters ({v2}, ...)")
    known = set(want) if known is None else set(known) | set(want)
    out: dict[str, torch.Tensor] = {}
    notes: dict[str, int] = {}
    other_stage = 0
    for fkey, value in obj.items():
        fkey = str(fkey)
        if not isinstance(value, torch.Tensor):
            report.unexpected.append(fkey)
            report.notes.append(f"{fkey}: a {type(value).__name__}, not a tensor")
            continue
        targets, note = checkpoint_targets(fkey, num_layers)
        targets = [(o, t) for o, t in targets if o in known]
        if not targets:
            report.unplaced(fkey, next((r for p, r in CKPT_IGNORED.items() if re.fullmatch(p, fkey)), None))
            continue
        if note:
            notes[note] = notes.get(note, 0) + 1
        for ours, third in targets:
            if ours not in want:
                other_stage += 1
                continue
            shape = tuple(value.shape) if third is None else (value.shape[0] // 3, *value.shape[1:])
            if third is not None and value.shape[0] % 3:
                shape = tuple(value.shape)
            if shape != tuple(want[ours]):
                report.mismatched.append(ShapeMismatch(ours, shape, tuple(want[ours])))
                continue
            if ours in out:
                report.unexpected.append(fkey)
                report.notes.append(f"{fkey}: a second tensor for {ours}")
                continue
            out[ours] = take_third(value, third)
            report.loaded.append(ours)
    report.notes += [f"{n} tensors: {note}" for note, n in notes.items()]
    if other_stage:
        report.notes.append(f"{other_stage} tensors belong to other pipeline stages (not read here)")
    kept = [k for k in want if k not in out and not any(m.key == k for m in report.mismatched)]
    if kept:
        report.notes.append(f"{len(kept)} model tensors are not in this file and keep their base weights")
    return out, report
