"""A transformers VLM directory's tensors: every one accounted for, each stage reading only its own.

Key layout: the released directories (and transformers' ``save_pretrained``) name the tensors ``visual.*``,
``model.*`` (the language model) and ``lm_head.*``; transformers' in-memory names (``model.visual.*``,
``model.language_model.*``) are read too and mean the same tensors.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from lavis.pipeline.plan import LayerEntry
from lavis.vlm.arch import reference_model
from lavis.vlm.config import VLMConfig
from lavis.vlm.layers import build_layers, layer_table
from lavis.weights.llm import scan_llm_dir
from lavis.weights.report import FileReport, ShapeMismatch

TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")
"""With ``tie_word_embeddings`` the directory may hold no ``lm_head.weight``: the head reads the embeddings."""


def published_key(key: str) -> str:
    """transformers' in-memory names -> the released directories' names."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def model_shapes(hf: PretrainedConfig, per_layer: int = 1) -> dict[str, tuple[int, ...]]:
    """Published name -> shape of every weight of the layer list (built on the meta device: nothing allocated)."""
    table = layer_table(hf, per_layer)
    with torch.device("meta"):
        layers = build_layers(hf, per_layer, meta=False)
    return {table[i].to_plain(k): tuple(t.shape) for i, layer in enumerate(layers)
            for k, t in layer.state_dict().items()}


class DirectoryIndex:
    """Where each published tensor lives in a directory (headers only, no tensor data read)."""

    def __init__(self, path: str) -> None:
        files = scan_llm_dir(path)
        if files.kind != "safetensors":
            raise ValueError(f"{path}: VLM weights are read from safetensors (model.safetensors or sharded "
                             "model-*.safetensors + model.safetensors.index.json); found only pytorch_model.bin")
        self.directory = Path(path)
        self.location: dict[str, tuple[Path, str]] = {}
        """published key -> (file, key inside the file)."""
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fkey, file in files.location.items():
            key = published_key(fkey)
            if key in self.location:
                raise ValueError(f"{file}: {fkey!r} and {self.location[key][1]!r} ({self.location[key][0]}) are "
                                 "the same tensor under two names")
            self.location[key] = (file, fkey)
            self.shapes[key] = files.shapes[fkey]


def account(index: DirectoryIndex, want: dict[str, tuple[int, ...]], tied: bool) -> list[FileReport]:
    """Per-file reports over the whole directory (strict: a model weight no file holds is ``missing`` in the
    directory's report, a file tensor the model lacks is ``unexpected`` in its file's report)."""
    reports: dict[Path, FileReport] = {}
    for key, (file, fkey) in sorted(index.location.items()):
        rep = reports.setdefault(file, FileReport(str(file)))
        if key not in want:
            rep.unexpected.append(fkey)
        elif index.shapes[key] != want[key]:
            rep.mismatched.append(ShapeMismatch(fkey, index.shapes[key], want[key]))
        else:
            rep.loaded.append(fkey)
    directory = FileReport(str(index.directory))
    for key in sorted(set(want) - set(index.location)):
        if tied and key == TIED_HEAD[0] and TIED_HEAD[1] in index.location:
            directory.notes.append("tie_word_embeddings: lm_head.weight is read from model.embed_tokens.weight")
        else:
            directory.missing.append(key)
    return [directory, *reports.values()]


def check_directory(cfg: VLMConfig, hf: PretrainedConfig) -> list[FileReport]:
    """Every tensor of ``model.vlm.path`` against the model (headers only); raises naming each bad file / key."""
    assert cfg.path is not None
    reports = account(DirectoryIndex(cfg.path), model_shapes(hf, cfg.vision_blocks_per_layer),
                      bool(hf.tie_word_embeddings))
    bad = [r for r in reports if not r.ok]
    if bad:
        raise ValueError(f"model.vlm.path={cfg.path} does not fit its config.json (another model, or a damaged "
                         "download?):\n" + "\n".join(r.format() for r in bad))
    return reports


def load_stage(cfg: VLMConfig, hf: PretrainedConfig, table: list[LayerEntry],
               layers: dict[int, nn.Module]) -> list[FileReport]:
    """Copy in the weights of ``layers`` (``{layer index: module}``, this stage's layers): from ``model.vlm.path``
    (the whole directory checked first, headers only, raising on any missing / unexpected / mis-shaped tensor;
    then only these tensors read, one at a time), or with no path from transformers' own random init of the whole
    model drawn from ``init_seed`` (tiny models). Returns one report per file read (what this stage loaded)."""
    targets = {table[i].to_plain(k): t for i, layer in layers.items() for k, t in layer.state_dict().items()}
    if cfg.path is None:
        state = {published_key(k): v for k, v in reference_model(hf, cfg.init_seed).state_dict().items()}
        with torch.no_grad():
            for key, t in targets.items():
                t.copy_(state[key] if key in state or key != TIED_HEAD[0] else state[TIED_HEAD[1]])
        return [FileReport(f"random init (model.vlm.init_seed={cfg.init_seed})", loaded=sorted(targets))]
    notes = [n for r in check_directory(cfg, hf) for n in r.notes]
    index = DirectoryIndex(cfg.path)
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for key in targets:
        source = key if key in index.location else TIED_HEAD[1]
        file, fkey = index.location[source]
        by_file[file].append((key, fkey))
    reports = []
    with torch.no_grad():
        for file, keys in sorted(by_file.items()):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key, fkey in keys:
                    targets[key].copy_(f.get_tensor(fkey))
            reports.append(FileReport(str(file), loaded=[fkey for _, fkey in keys]))
    if reports:
        reports[0].notes += notes
    return reports
