"""Every weight the config names, for the set of plain-model tensors one module (or one pipeline stage) needs.

Sources, in order (a later one overrides an earlier one for the same key): ``model.vision.checkpoint``
(``eva_vit_g.pth``), ``model.qformer.checkpoint`` (BLIP-2: Q-Former, ``query_tokens``, ``ln_vision``),
``model.llm.path`` (the HF directory), then ``model.checkpoint`` (ours or a predecessor's ``.pth``). A file is opened
only when the requested names include something it provides, and only requested tensors are read, so a pipeline rank
reads its own stage. A key no configured file provides keeps the seeded random init (demo, tests, ``llm_proj``
before training).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lavis.config.schema import ModelConfig
from lavis.model.mllm import MultimodalLM
from lavis.model.spec import ModelSpec
from lavis.weights.checkpoint import read_checkpoint
from lavis.weights.llm import plan_llm, read_llm, scan_llm_dir
from lavis.weights.report import FileReport
from lavis.weights.vision import read_blip2, read_eva_vit

Shape = tuple[int, ...]


_BLOCK_KEY = re.compile(r"llm_model\.model\.layers\.(\d+)\.")


def model_shapes(cfg: ModelConfig, spec: ModelSpec | None = None) -> dict[str, Shape]:
    """Plain-model name -> shape of every tensor of the full model, built on the meta device (no memory); ``spec``:
    the entry point's description of ``cfg``."""
    with torch.device("meta"):
        model = MultimodalLM(cfg, placeholder_id=0, spec=spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def llm_blocks(keys: Iterable[str]) -> int:
    """The LLM's block count as the model's plain keys (``known``: all stages) show it."""
    return 1 + max((int(m[1]) for k in keys if (m := _BLOCK_KEY.match(k))), default=-1)


def default_init_keys(cfg: ModelConfig) -> dict[str, str]:
    """Plain-model keys that no weight file provides by design, each with the reason (their seeded init, LayerNorm
    weight 1 and bias 0, is what the predecessor runs with)."""
    if cfg.qformer.enabled:
        return {}
    why = ("ln_vision without a Q-Former: MiniGPT-4 never loads it (its BLIP-2 file is not read), so it keeps "
           "nn.LayerNorm's default weight 1, bias 0, as here")
    return {"ln_vision.weight": why, "ln_vision.bias": why}


def _wants(want: Mapping[str, Shape], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in want)


def load_weights(
    cfg: ModelConfig,
    want: Mapping[str, Shape],
    known: set[str] | None = None,
    checkpoint: str | None = None,
    read: bool = True,
    sink: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[FileReport]]:
    """Tensors (plain names) for the keys of ``want`` from every configured file, and one report per file read.

    ``known``: every plain-model key (all stages), so keys of other stages are not reported as unexpected.
    ``checkpoint`` overrides ``cfg.checkpoint`` (the ``-c`` flag). ``read=False``: reports only; the LLM directory is
    checked from its headers and no LLM tensor is read (the ``.pth`` files are memory-mapped, so only the few tensors
    touched are paged in). ``sink``: each tensor is handed over as it is read instead of being returned (the
    LLM directory then costs one tensor of host RAM at a time); files are read in the order above, so a later file's
    tensor overrides an earlier one's. Never raises on content: see the reports.
    """
    want = {k: tuple(v) for k, v in want.items()}
    tensors: dict[str, torch.Tensor] = {}
    reports: list[FileReport] = []

    def take(got: dict[str, torch.Tensor]) -> None:
        if sink is None:
            tensors.update(got)
        else:
            for k, v in got.items():
                sink(k, v)

    if cfg.vision.checkpoint and _wants(want, "visual_encoder."):
        got, rep = read_eva_vit(cfg.vision.checkpoint, cfg.vision, want)
        take(got)
        reports.append(rep)
    if cfg.qformer.checkpoint and _wants(want, "qformer.", "query_tokens", "ln_vision."):
        got, rep = read_blip2(cfg.qformer.checkpoint, cfg, want)
        take(got)
        reports.append(rep)
    if cfg.llm.path and _wants(want, "llm_model."):
        if read:
            got, rep = read_llm(cfg.llm.path, want, known, sink)
            take(got)
        else:
            _, rep = plan_llm(scan_llm_dir(cfg.llm.path), want, known)
        reports.append(rep)
    ckpt = checkpoint if checkpoint is not None else cfg.checkpoint
    if ckpt:
        got, rep = read_checkpoint(ckpt, want, known, num_layers=llm_blocks(known or want))
        take(got)
        reports.append(rep)
    return tensors, reports


def stream_into(
    cfg: ModelConfig, targets: Mapping[str, torch.Tensor], known: set[str] | None = None,
    checkpoint: str | None = None,
) -> tuple[list[FileReport], set[str]]:
    """Fill ``targets`` (plain name -> the parameter or buffer to write, e.g. ``state_dict(keep_vars=True)``) from
    every file the config names.

    Every file's report is checked from its headers first (raises before anything is copied); then each tensor is
    copied in (dtype converted) as it is read, so host RAM holds one file tensor at a time, not all of them. Keys no
    file provides are left as they are. Returns the reports of the reading pass and the names filled.
    """
    want = {k: tuple(t.shape) for k, t in targets.items()}
    _, reports = load_weights(cfg, want, known, checkpoint, read=False)
    raise_if_bad(reports)
    filled: set[str] = set()

    def sink(plain: str, t: torch.Tensor) -> None:
        dst = targets[plain]
        if dst.shape != t.shape:
            raise ValueError(f"{plain}: file tensor {list(t.shape)} vs model {list(dst.shape)}")
        with torch.no_grad():
            dst.copy_(t)
        filled.add(plain)

    _, reports = load_weights(cfg, want, known, checkpoint, sink=sink)
    raise_if_bad(reports)
    return reports, filled


def copy_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], to_local: Callable[[str], str | None]) -> int:
    """Copy plain-named ``tensors`` into ``module``'s parameters/buffers (dtype converted); returns the count."""
    own: dict[str, torch.Tensor] = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    n = 0
    with torch.no_grad():
        for plain, t in tensors.items():
            local = to_local(plain)
            if local is None or local not in own:
                raise KeyError(f"{plain}: loaded but {type(module).__name__} has no {local!r}")
            dst = own[local]
            if tuple(dst.shape) != tuple(t.shape):
                raise ValueError(f"{plain}: tensor {list(t.shape)} vs module {list(dst.shape)}")
            dst.copy_(t)
            n += 1
    return n


def raise_if_bad(reports: list[FileReport]) -> None:
    bad = [r for r in reports if not r.ok]
    if bad:
        raise ValueError("weights do not fit the model:\n" + "\n".join(r.format() for r in bad))
