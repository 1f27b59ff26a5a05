"""MPP-Qwen-Next / MiniGPT4Qwen pipeline checkpoints (``layer_XX-model_states.pt``, no ``lavis_meta.json``) -> our
plain-model names, with every key of every layer file accounted for.

MPP's pipeline (its ``minigpt4qwen_pipe.get_model``) for an LLM of L decoder blocks has this fixed layer list, and
``engine.save_checkpoint`` writes one file per layer (frozen weights included, parameterless layers as ``{}``):

======== ================================== =====================================================================
index    MPP layer                          keys in the file
======== ================================== =====================================================================
0        TokenizerPipeLayer                 ``visionpipe.{visual_encoder,ln_vision,Qformer,query_tokens,llm_proj}``
                                            ``.*`` and ``wtepipe.word_embeddings.weight`` (Qwen's ``wte``)
1-4      IndentityPipeLayer (memory pads)   none
5+j      QwenBlockPipeLayer, block j < L    ``layer.*`` = Qwen v1 ``transformer.h.{j}.*``
5+L      FLNPipeLayer                       ``final_layernorm.weight`` = ``transformer.ln_f.weight``
6+L      LMPipeLayer                        ``lm_head.weight``
7+L      LossPipeLayer                      none
8+L      IndentityPipeLayerLast (pretrain)  ``occupy.weight``: a zero 1000x1000 Linear that only gives the last stage
                                            a parameter; no model weight
======== ================================== =====================================================================

For Qwen-7B (L=32) that is blocks 5-36, norm 37, head 38; for Qwen-14B (L=40) blocks 5-44, norm 45, head 46. MPP's own
``pipemodel2pth.py`` hard-codes the 14B indices; here they follow from L (the LLM config of ``--model-type`` or
``--cfg-path``), and each role is checked against the keys its file holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lavis.config.schema import ModelConfig
from lavis.engine.checkpoint import META_FILE
from lavis.families import describe
from lavis.model.components import component_of
from lavis.model.freezing import is_trainable
from lavis.model.llm import qwen_v1_targets, take_third
from lavis.predecessors.checkpoints import is_mpp_layer_dir, mpp_llm_frozen
from lavis.weights.release import OUTPUT_NAME, check_against_model, describe_run, kind_mismatch, release_names
from lavis.weights.report import FileReport
from lavis.weights.vision import blip2_rename

LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt")
NUM_PADS = 4
"""MPP's ``IndentityPipeLayer`` count after layer 0 (its comment: they adjust how memory spreads over the cards)."""

IGNORED: dict[str, str] = {
    r"occupy\.weight": "MPP's zero placeholder Linear of the pretrain pipeline's last layer; no model weight",
    r"(visionpipe\.)?Qformer\.bert\.embeddings\.position_ids": "BERT position-id buffer; the query-only Q-Former has "
    "no position embeddings",
    r"(.*\.)?rotary_emb\.inv_freq": "rotary inverse-frequency buffer of older Qwen remote code; recomputed from the "
    "config",
    r"(.*\.)?attn\.(bias|masked_bias)": "causal-mask buffer of older Qwen remote code; not a weight",
}


@dataclass(frozen=True)
class Role:
    kind: str
    """``vision_embed``, ``pad``, ``block``, ``norm``, ``head``, ``loss`` or ``occupy``."""
    block: int | None = None


def layer_roles(num_blocks: int, num_files: int) -> dict[int, Role]:
    """Layer index -> role for an LLM of ``num_blocks`` blocks and a directory of ``num_files`` layer files."""
    base = 1 + NUM_PADS + num_blocks + 3
    if num_files not in (base, base + 1):
        raise ValueError(f"an MPP pipeline for a {num_blocks}-block LLM has {base} layer files ({base + 1} in "
                         f"pretrain), not {num_files}: is --model-type / --cfg-path the model this run trained?")
    roles = {0: Role("vision_embed")}
    roles |= {i: Role("pad") for i in range(1, 1 + NUM_PADS)}
    roles |= {1 + NUM_PADS + j: Role("block", j) for j in range(num_blocks)}
    n = 1 + NUM_PADS + num_blocks
    roles |= {n: Role("norm"), n + 1: Role("head"), n + 2: Role("loss")}
    if num_files == base + 1:
        roles[n + 3] = Role("occupy")
    return roles


def mpp_trained(tag_dir: Path) -> list[str]:
    """What an MPP run trained: the projection alone when its layer list says the LLM was frozen
    (``predecessors.mpp_llm_frozen``), the projection and the LLM otherwise (ViT and Q-Former are always frozen)."""
    return ["projection"] if mpp_llm_frozen(tag_dir) else ["projection", "llm"]


def is_mpp_checkpoint(ckpt_dir: str | Path) -> bool:
    """A directory of MPP layer files (or an MPP run directory whose ``latest`` names one) without our metadata."""
    return resolve_mpp_tag_dir(ckpt_dir) is not None


def resolve_mpp_tag_dir(ckpt_dir: str | Path) -> Path | None:
    d = Path(ckpt_dir)
    if (d / "layer_00-model_states.pt").is_file():
        return d if is_mpp_layer_dir(d, META_FILE) else None
    latest = d / "latest"
    if latest.is_file():
        tag = d / latest.read_text().strip()
        if tag.is_dir() and is_mpp_layer_dir(tag, META_FILE):
            return tag
    return None


def _targets(role: Role, key: str) -> list[tuple[str, int | None]]:
    """Our plain names (with c_attn's row third) for one key of a layer file of ``role``; [] = not a weight of ours."""
    if role.kind == "vision_embed":
        if key == "wtepipe.word_embeddings.weight":
            return [("llm_model." + o, t) for o, t in qwen_v1_targets("transformer.wte.weight")]
        if not key.startswith("visionpipe."):
            return []
        k = key[len("visionpipe."):]
        if k.startswith(("visual_encoder.", "llm_proj.")):
            return [(k, None)]
        ours = blip2_rename(k)
        return [(ours, None)] if ours else []
    if role.kind == "block" and key.startswith("layer."):
        return [("llm_model." + o, t) for o, t in qwen_v1_targets(f"transformer.h.{role.block}.{key[len('layer.'):]}")]
    if role.kind == "norm" and key == "final_layernorm.weight":
        return [("llm_model." + o, t) for o, t in qwen_v1_targets("transformer.ln_f.weight")]
    if role.kind == "head" and key == "lm_head.weight":
        return [("llm_model." + o, t) for o, t in qwen_v1_targets("lm_head.weight")]
    return []


def read_mpp_dir(tag_dir: Path, num_blocks: int) -> tuple[dict[str, torch.Tensor], dict[str, str], FileReport]:
    """Every layer file -> (our plain state, our key -> ``layer_XX:file key`` it came from, report).

    The report's ``ignored`` holds the buffers and MPP's placeholder weight, each with its reason; ``unexpected``
    any key that fits neither (an error for the caller)."""
    files = sorted((int(m[1]), p) for p in tag_dir.iterdir() if (m := LAYER_FILE.fullmatch(p.name)))
    indices = [i for i, _ in files]
    if indices != list(range(len(files))):
        raise FileNotFoundError(f"{tag_dir}: layer files {indices[:3]}...{indices[-3:]} are not numbered 0..N-1 "
                                "without gaps: the checkpoint is incomplete")
    roles = layer_roles(num_blocks, len(files))
    report = FileReport(str(tag_dir))
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for index, path in files:
        role = roles[index]
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: a {type(obj).__name__}, not a layer state dict")
        if role.kind in ("pad", "loss") and obj:
            raise ValueError(f"{path}: MPP layer {index} is a parameterless {role.kind} layer for a {num_blocks}-block "
                             f"LLM but holds {sorted(obj)[:3]}: is --model-type / --cfg-path the model this run "
                             "trained?")
        for key, value in obj.items():
            where = f"{path.name}:{key}"
            targets = _targets(role, key) if isinstance(value, torch.Tensor) else []
            if not targets:
                report.unplaced(where, next((r for p, r in IGNORED.items() if re.fullmatch(p, key)), None))
                continue
            for ours, third in targets:
                if ours in state:
                    raise ValueError(f"{where}: a second tensor for {ours} (first from {origin[ours]})")
                state[ours] = take_third(value, third)
                origin[ours] = where
    return state, origin, report


def select(state: dict[str, torch.Tensor], origin: dict[str, str], report: FileReport, cfg: ModelConfig, kind: str,
           include_frozen: bool) -> dict[str, torch.Tensor]:
    """The tensors the ``.pth`` of ``kind`` holds; every other one goes to ``report.ignored`` with the reason."""
    keep: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if kind == "proj" and not key.startswith("llm_proj."):
            report.ignored[origin[key]] = "pipe_proj2pth.py writes the projection only (the stage-1 release)"
        elif kind == "model" and not include_frozen and not is_trainable(key, cfg):
            report.ignored[origin[key]] = (f"frozen in this config (model.{component_of(key)}.frozen: true), so equal "
                                           "to the base file it was loaded from; --include-frozen writes it too")
        else:
            keep[key] = value
    return keep


def convert_mpp(ckpt_dir: str | Path, kind: str, cfg: ModelConfig, out: str | Path | None = None,
                names: str = "auto", include_frozen: bool = False, *,
                allow_kind_mismatch: bool = False) -> tuple[Path, FileReport]:
    """MPP layer files -> ``model.pth`` (``kind="proj"``) or ``unfreeze_llm_model.pth`` (``kind="model"``) beside
    them, checked against a model built from ``cfg`` (every key known, every shape equal, every trained weight
    present). The wrong converter for what the run trained (:func:`mpp_trained`) is refused as for our runs.
    Returns the file and the report that accounts for every key of every layer file."""
    import os
    import sys

    tag_dir = resolve_mpp_tag_dir(ckpt_dir)
    if tag_dir is None:
        raise FileNotFoundError(f"{ckpt_dir}: no MPP layer files (layer_00-model_states.pt) here or under `latest`")
    spec = describe(cfg)  # the one description of the model this conversion uses
    num_blocks = spec.num_blocks
    state, origin, report = read_mpp_dir(tag_dir, num_blocks)
    if report.unexpected:
        raise ValueError(f"MPP layer files hold keys that fit no layer of a {num_blocks}-block LLM: is --model-type / "
                         "--cfg-path the model this run trained?\n" + report.format())
    trained = mpp_trained(tag_dir)
    print(f"{tag_dir}: MPP-Qwen-Next {describe_run(trained)}", file=sys.stderr)
    mismatch = kind_mismatch(kind, trained)  # type: ignore[arg-type]
    if mismatch and not allow_kind_mismatch:
        raise ValueError(f"{tag_dir}: {mismatch} (or pass --allow-kind-mismatch)")
    if mismatch:
        print(f"warning: {mismatch} (--allow-kind-mismatch)", file=sys.stderr)
    keep = select(state, origin, report, cfg, kind, include_frozen)
    if not keep:
        raise ValueError(f"{tag_dir}: nothing to write for {OUTPUT_NAME[kind]}")
    missing = check_against_model(keep, cfg, 0, spec)
    if kind == "model":
        lacking = [k for k in missing if is_trainable(k, cfg)]
        if lacking:
            raise ValueError(f"{tag_dir}: weights this config trains are not in the layer files: {lacking[:5]}")
    report.loaded = sorted(keep)
    keep = release_names(keep, cfg, names, spec)  # type: ignore[arg-type]
    dest = Path(out) if out is not None else tag_dir / OUTPUT_NAME[kind]
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(keep, tmp)
    os.replace(tmp, dest)
    return dest, report
