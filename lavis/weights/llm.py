"""Reading an LLM's Hugging Face model directory into the plain model's names (``llm_model.*``).

Families (from ``config.json``): Qwen v1 (``model_type: qwen``, remote-code names ``transformer.*``) through the
literal key map of ``lavis.model.llm`` (``c_attn`` split into q/k/v, ``w2`` -> ``gate_proj``, ``w1`` -> ``up_proj``);
Qwen2 / Qwen2.5 / Qwen3 / LLaMA / Vicuna with transformers' own names (``model.*``, ``lm_head.weight``), one to one.

Files: ``model.safetensors`` or ``model.safetensors.index.json`` shards (read tensor by tensor, by name, with
``safe_open``; c_attn thirds are sliced on read), or ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``
shards (each shard opened once, ``weights_only=True``, memory-mapped when it is a zip file). Only the requested
tensors are read: a pipeline stage reads its own layers and nothing else.

Bookkeeping is done on shapes alone (``plan_llm``), so a full-size layout is checked without reading any data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from lavis.model.llm import is_qwen_v1, qwen_v1_targets, read_config_json, take_third
from lavis.weights.report import FileReport, ShapeMismatch
from lavis.weights.torch_file import load_torch_file

Shape = tuple[int, ...]
PREFIX = "llm_model."

LLM_IGNORED: dict[str, str] = {
    r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq|"
    r"transformer\.rotary_emb\.inv_freq": "rotary inverse-frequency buffer saved by older transformers / Qwen v1 "
    "code; recomputed from the config's rope theta",
}
"""File key pattern (full match) -> why it is deliberately not loaded."""


@dataclass
class LLMFiles:
    """Where each tensor of an LLM directory lives, and its shape (read from headers, no data)."""

    directory: Path
    qwen_v1: bool
    location: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    kind: str = "safetensors"

    @property
    def label(self) -> str:
        return str(self.directory)


def _open_safetensors(path: Path):  # noqa: ANN202 - the safetensors handle
    """One place that opens shards (tests count the tensors read through it)."""
    return safe_open(str(path), framework="pt", device="cpu")


def _safetensors_shapes(path: Path) -> dict[str, Shape]:
    """Tensor name -> shape from a safetensors header (8-byte little-endian length, then JSON); no data read."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    obj = load_torch_file(path, "model.llm.path")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: a {type(obj).__name__}, not a state dict")
    return dict(obj)


def scan_llm_dir(directory: str | Path) -> LLMFiles:
    """Index the weight files of an HF model directory (shapes from safetensors headers / memory-mapped .bin)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model.llm.path={d} is not a directory; WEIGHT.md says where the LLM goes")
    files = LLMFiles(d, is_qwen_v1(read_config_json(d)))
    for index_name, single, kind in (("model.safetensors.index.json", "model.safetensors", "safetensors"),
                                     ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin")):
        index = d / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are absent: {missing[:5]} (incomplete download?)")
            paths = [d / s for s in shards]
        elif (d / single).is_file():
            paths = [d / single]
        else:
            continue
        files.kind = kind
        for p in paths:
            if kind == "safetensors":
                for k, shape in _safetensors_shapes(p).items():
                    files.location[k] = p
                    files.shapes[k] = shape
            else:
                for k, v in _load_bin(p).items():
                    files.location[k] = p
                    files.shapes[k] = tuple(v.shape)
        if index.is_file():
            stray = sorted(set(weight_map) - set(files.location))
            if stray:
                raise ValueError(f"{index} lists tensors no shard holds: {stray[:5]}")
        return files
    raise FileNotFoundError(
        f"{d}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json); is the download complete?")


def file_targets(fkey: str, qwen_v1: bool) -> list[tuple[str, int | None]]:
    """File key -> our ``llm_model.*`` names it feeds, each with its c_attn third (None = whole tensor)."""
    if qwen_v1:
        return [(PREFIX + ours, third) for ours, third in qwen_v1_targets(fkey)]
    return [(PREFIX + fkey, None)]


def _ignore_reason(fkey: str) -> str | None:
    for pattern, reason in LLM_IGNORED.items():
        if re.fullmatch(pattern, fkey):
            return reason
    return None


def _sub_shape(shape: Shape, third: int | None) -> Shape:
    if third is None:
        return shape
    return (shape[0] // 3, *shape[1:]) if shape and shape[0] % 3 == 0 else (-1, *shape[1:])


Take = dict[str, tuple[str, int | None]]


def plan_llm(
    files: LLMFiles, want: Mapping[str, Shape], known: set[str] | None = None
) -> tuple[Take, FileReport]:
    """Our key -> (file key, third) for the ``llm_model.*`` keys of ``want``, and the report, from shapes alone.

    ``known`` is every plain-model key (all stages); a file key feeding a known key outside ``want`` belongs to
    another pipeline stage: counted in a note, not read, not unexpected.
    """
    known = set(want) if known is None else set(known) | set(want)
    report = FileReport(files.label)
    take: Take = {}
    other_stage = 0
    for fkey, fshape in files.shapes.items():
        targets = [(o, t) for o, t in file_targets(fkey, files.qwen_v1) if o in known]
        if not targets:
            report.unplaced(fkey, _ignore_reason(fkey))
            continue
        for ours, third in targets:
            if ours not in want:
                other_stage += 1
                continue
            got, need = _sub_shape(fshape, third), tuple(want[ours])
            if got == need:
                take[ours] = (fkey, third)
                report.loaded.append(ours)
            else:
                file_shape = fshape if third is None else got
                report.mismatched.append(ShapeMismatch(ours, file_shape, need))
    matched = set(take) | {m.key for m in report.mismatched}
    # LoRA adapter tensors (lavis.model.lora) are in no base directory: they come from a checkpoint or their init.
    report.missing += [k for k in want if k.startswith(PREFIX) and k not in matched and ".lora_" not in k]
    if files.qwen_v1:
        report.notes.append("Qwen v1 names mapped to Qwen2 (c_attn split into q/k/v, w2 -> gate_proj, "
                            "w1 -> up_proj, intermediate_size halved)")
    if other_stage:
        report.notes.append(f"{other_stage} tensors belong to other pipeline stages (not read here)")
    return take, report


def read_planned(
    files: LLMFiles, take: Take, sink: Callable[[str, torch.Tensor], None] | None = None
) -> dict[str, torch.Tensor]:
    """Read exactly the planned tensors: safetensors by name (c_attn thirds sliced on read), .bin shards once each.

    With ``sink``, each tensor is handed over as soon as it is read and not kept (host RAM: one tensor at a time);
    the returned dict is then empty."""
    by_file: dict[Path, list[tuple[str, str, int | None]]] = {}
    for ours, (fkey, third) in take.items():
        by_file.setdefault(files.location[fkey], []).append((ours, fkey, third))
    out: dict[str, torch.Tensor] = {}
    for path, items in by_file.items():
        if files.kind == "safetensors":
            with _open_safetensors(path) as f:
                for ours, fkey, third in items:
                    if third is None:
                        t = f.get_tensor(fkey)
                    else:
                        n = files.shapes[fkey][0] // 3
                        t = f.get_slice(fkey)[third * n:(third + 1) * n]
                    if sink is None:
                        out[ours] = t
                    else:
                        sink(ours, t)
                    del t
        else:
            shard = _load_bin(path)
            for ours, fkey, third in items:
                t = take_third(shard[fkey], third)
                if sink is None:
                    out[ours] = t.clone()
                else:
                    sink(ours, t)
            del shard
    return out


def read_llm(
    directory: str | Path, want: Mapping[str, Shape], known: set[str] | None = None,
    sink: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, torch.Tensor], FileReport]:
    """The ``llm_model.*`` tensors of ``want`` from an HF model directory (or each handed to ``sink``), and its
    report. Nothing is read when the report shows a problem."""
    files = scan_llm_dir(directory)
    take, report = plan_llm(files, want, known)
    if not report.ok:
        return {}, report
    return read_planned(files, take, sink), report
