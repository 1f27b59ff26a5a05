"""Reading the vision-side weight files into the plain model's names: ``eva_vit_g.pth`` and the BLIP-2 checkpoint.

Both readers return ``(tensors, report)``: tensors keyed by our names (``visual_encoder.*``, ``ln_vision.*``,
``qformer.*``, ``query_tokens``) for the keys of ``want`` they are responsible for, and a :class:`FileReport`
accounting for every key of the file (loaded / missing / unexpected / ignored with reason / shape-mismatched).
They never raise on content problems; the caller decides (``report.raise_if_bad()``). The key bookkeeping is done
on shapes alone (``plan_eva_vit`` / ``plan_blip2``), so full-size layouts can be checked without allocating.

``eva_vit_g.pth`` (docs/FORMATS.md section 1): a flat state dict with LAVIS names, which equal timm ``Eva``'s, so the
only rename is our ``visual_encoder.`` prefix. A ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is accepted
and noted. Ignored with reason: one block beyond ``model.vision.depth`` (EVA-CLIP-g has 40 blocks; BLIP-2 uses 39),
``norm.*`` and ``head.*`` (EVA-CLIP's final norm and projection head; BLIP-2 uses neither). More than one extra block
is *unexpected* (probably a wrong ``depth``). ``pos_embed`` for another grid is resized like LAVIS
``interpolate_pos_embed``: cls row kept, grid bicubic (``align_corners=False``, no antialias) in fp32.

``blip2_pretrained_flant5xxl.pth`` (docs/FORMATS.md sections 2-3): ``{"model": {...}}``. Renames:
``Qformer.bert.embeddings.LayerNorm`` -> ``qformer.layernorm``; ``...{attention,crossattention}.self.`` ->
``...{attention,crossattention}.attention.``; other ``Qformer.bert.`` keys -> ``qformer.``; ``query_tokens`` and
``ln_vision.*`` keep their names. See ``BLIP2_IGNORED`` for what is deliberately not loaded. A ViT inside the file
(``visual_encoder.*``, not expected in BLIP-2 pretrain files) is read like ``eva_vit_g.pth`` when
``model.vision.checkpoint`` is unset, and ignored with that reason when it is set (the ViT file wins).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from lavis.config.schema import ModelConfig, VisionConfig
from lavis.weights.report import FileReport, ShapeMismatch, unwrap
from lavis.weights.torch_file import load_torch_file

Shape = tuple[int, ...]
VIT_PREFIX = "visual_encoder."
_BLOCK = re.compile(r"blocks\.(\d+)\.")

EVA_IGNORED: dict[str, str] = {
    r"norm\.(weight|bias)": "EVA-CLIP's final LayerNorm: BLIP-2 has none (ln_vision from the BLIP-2 checkpoint follows "
    "the blocks)",
    r"head\.(weight|bias)": "EVA-CLIP's projection head: BLIP-2 uses the token features, not the head",
}
"""eva_vit_g.pth key pattern (full match, without prefix) -> why it is not loaded; see also ``_extra_block_reason``."""

BLIP2_IGNORED: dict[str, str] = {
    r"Qformer\.bert\.embeddings\.position_ids": "BERT position-id buffer (persistent in LAVIS); the query-only "
    "Q-Former has no position embeddings",
    r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight": "Q-Former text branch (word/position "
    "embeddings), unused by the query-only forward (LAVIS sets it to None with qformer_text_input=False)",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)": "Q-Former "
    "text-token FFN; queries use intermediate_query/output_query",
    r"Qformer\.cls\..+": "Q-Former MLM head (text branch), unused by the query-only forward",
    r"t5_proj\.(weight|bias)": "projection into FlanT5-XXL; this model's projection is llm_proj, sized for its own LLM",
    r"t5_model\..+": "FlanT5 language model; not part of this model",
    r"opt_proj\.(weight|bias)": "projection into OPT; this model's projection is llm_proj, sized for its own LLM",
    r"opt_model\..+": "OPT language model; not part of this model",
    r"(vision_proj|text_proj|itm_head)\.(weight|bias)|temp": "BLIP-2 stage-1 contrastive/matching heads "
    "(ITC/ITM), unused by the generative path",
}
"""BLIP-2 checkpoint key pattern (full match) -> why it is not loaded."""


# ---------------------------------------------------------------- file access


def read_state_dict(path: str | Path, report: FileReport, config_key: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` (memory-mapped when it is a zip file), unwrapping ``model`` / ``state_dict``.

    A missing, empty or unreadable file raises naming ``config_key`` (``load_torch_file``); content problems (keys,
    shapes) never raise, they go to ``report``.
    """
    obj = load_torch_file(path, config_key or "weight file",
                          "; WEIGHT.md lists where to download it and where it goes under cache/ckpt/")
    if not isinstance(obj, Mapping):
        report.unexpected.append(f"<top level: {type(obj).__name__}, not a state dict>")
        return {}
    obj = unwrap(obj, report)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors[str(k)] = v
        else:
            report.unexpected.append(str(k))
            report.notes.append(f"{k}: a {type(v).__name__}, not a tensor")
    return tensors


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _ignore_reason(key: str, table: Mapping[str, str]) -> str | None:
    for pattern, reason in table.items():
        if re.fullmatch(pattern, key):
            return reason
    return None


# ---------------------------------------------------------------- position embeddings


def _grid(num_tokens: int) -> int | None:
    """Side of the square patch grid behind ``num_tokens`` position rows (cls row first), or None."""
    g = math.isqrt(max(num_tokens - 1, 0))
    return g if g * g == num_tokens - 1 and g > 0 else None


def _pos_embed_resizable(file_shape: Shape, model_shape: Shape) -> bool:
    return (len(file_shape) == len(model_shape) == 3 and file_shape[0] == model_shape[0] == 1
            and file_shape[2] == model_shape[2] and _grid(file_shape[1]) is not None
            and _grid(model_shape[1]) is not None)


def interpolate_pos_embed(pos_1LW: torch.Tensor, grid: int) -> torch.Tensor:
    """LAVIS ``interpolate_pos_embed``: keep the cls row, resize the square grid bicubically in fp32 (fp32 out)."""
    old = _grid(pos_1LW.shape[1])
    if old is None:
        raise ValueError(f"pos_embed {list(pos_1LW.shape)} is not 1 cls row + a square grid")
    width = pos_1LW.shape[2]
    cls_11W = pos_1LW[:, :1].float()
    grid_1WGG = pos_1LW[:, 1:].float().reshape(1, old, old, width).permute(0, 3, 1, 2)
    grid_1WGG = F.interpolate(grid_1WGG, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_11W, grid_1WGG.permute(0, 2, 3, 1).reshape(1, grid * grid, width)], dim=1)


# ---------------------------------------------------------------- bookkeeping on shapes


def _vision_hint(our: str, file_shape: Shape, model_shape: Shape, model: ModelConfig | VisionConfig) -> str | None:
    vcfg = model.vision if isinstance(model, ModelConfig) else model
    if our.startswith((VIT_PREFIX, "ln_vision.")):
        return (f"{our}: the file's ViT does not match model.vision (width {vcfg.width}, mlp_hidden "
                f"{vcfg.mlp_hidden}, patch {vcfg.patch_size}); EVA ViT-g is width 1408, num_heads 16, mlp_hidden "
                "6144, patch_size 14, depth 39")
    if isinstance(model, ModelConfig):
        q = model.qformer
        if our == "query_tokens" and len(file_shape) == 3 and file_shape[2] == model_shape[2]:
            return (f"query_tokens: the file has {file_shape[1]} queries, model.qformer.num_query_tokens is "
                    f"{q.num_query_tokens} (BLIP-2: 32)")
        if our.startswith("qformer.") or our == "query_tokens":
            return (f"{our}: the file's Q-Former does not match model.qformer (hidden {q.hidden_size}, "
                    f"intermediate {q.intermediate_size}) or model.vision.width {model.vision.width} for "
                    "cross-attention keys; BLIP-2 is hidden 768, intermediate 3072, vision width 1408")
    return None


def _check_shape(our: str, fkey: str, fshape: Shape, want: Mapping[str, Shape], take: dict[str, str],
                 report: FileReport, hint_cfg: ModelConfig | VisionConfig) -> None:
    wshape = tuple(want[our])
    if fshape == wshape:
        take[our] = fkey
        report.loaded.append(our)
    elif our.endswith("pos_embed") and _pos_embed_resizable(fshape, wshape):
        take[our] = fkey
        report.loaded.append(our)
        g0, g1 = _grid(fshape[1]), _grid(wshape[1])
        report.notes.append(f"{fkey}: position embedding interpolated {g0}x{g0} -> {g1}x{g1} (bicubic, cls row kept)")
    else:
        report.mismatched.append(ShapeMismatch(our, fshape, wshape))
        hint = _vision_hint(our, fshape, wshape, hint_cfg)
        if hint and hint not in report.notes:
            report.notes.append(hint)


def _extra_block_reason(file_keys: list[str], depth: int, prefix: str) -> Callable[[str], str | None]:
    """Blocks at index ``depth``: ignored when the file has exactly one block more than the model."""
    idx = {int(m.group(1)) for k in file_keys if k.startswith(prefix) and (m := _BLOCK.match(k[len(prefix):]))}
    one_extra = bool(idx) and max(idx) == depth and idx == set(range(depth + 1))

    def reason(key: str) -> str | None:
        m = _BLOCK.match(key)
        if one_extra and m and int(m.group(1)) == depth:
            return (f"block {depth} of {depth + 1}: BLIP-2 uses the first {depth} EVA-CLIP-g blocks "
                    f"(model.vision.depth={depth}; LAVIS builds depth=39 and loads strict=False)")
        return None

    return reason


def plan_eva_vit(
    file_shapes: Mapping[str, Shape],
    cfg: VisionConfig,
    want: Mapping[str, Shape],
    *,
    report: FileReport | None = None,
    file_prefix: str = "",
) -> tuple[dict[str, str], FileReport]:
    """Our ``visual_encoder.*`` key -> file key for every loadable tensor, and the report, from shapes alone.

    Only the ``visual_encoder.*`` keys of ``want`` are considered; ``file_prefix`` is the ViT's prefix inside the file
    (``""`` for ``eva_vit_g.pth``, ``"visual_encoder."`` inside a BLIP-2 checkpoint); other file keys are left alone.
    """
    report = report if report is not None else FileReport("<shapes>")
    keys = [k for k in file_shapes if k.startswith(file_prefix)]
    extra_block = _extra_block_reason(keys, cfg.depth, file_prefix)
    idx = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k[len(file_prefix):]))}
    if idx and max(idx) > cfg.depth:
        report.notes.append(f"the file has blocks 0..{max(idx)} ({max(idx) + 1} blocks) but model.vision.depth is "
                            f"{cfg.depth}; only one extra block (EVA-CLIP-g's 40th) is ignored")
    take: dict[str, str] = {}
    for fkey in keys:
        key = fkey[len(file_prefix):]
        our = VIT_PREFIX + key
        if our in want:
            _check_shape(our, fkey, tuple(file_shapes[fkey]), want, take, report, cfg)
            continue
        report.unplaced(fkey, extra_block(key) or _ignore_reason(key, EVA_IGNORED))
    matched = set(take) | {m.key for m in report.mismatched}
    report.missing += [k for k in want if k.startswith(VIT_PREFIX) and k not in matched]
    return take, report


def blip2_rename(key: str) -> str | None:
    """LAVIS BLIP-2 checkpoint key -> our plain-model key (None: not a key this model can hold)."""
    if key == "query_tokens" or key.startswith("ln_vision."):
        return key
    if key.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "qformer.layernorm." + key[len("Qformer.bert.embeddings.LayerNorm."):]
    m = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\."
                     r"(weight|bias)", key)
    if m:
        return f"qformer.encoder.layer.{m[1]}.{m[2]}.attention.{m[3]}.{m[4]}"
    m = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.((attention|crossattention)\.output\.(dense|LayerNorm)|"
                     r"intermediate_query\.dense|output_query\.(dense|LayerNorm))\.(weight|bias)", key)
    if m:
        return "qformer." + key[len("Qformer.bert."):]
    return None


def _blip2_owns(our: str) -> bool:
    return our == "query_tokens" or our.startswith(("ln_vision.", "qformer."))


def plan_blip2(
    file_shapes: Mapping[str, Shape],
    cfg: ModelConfig,
    want: Mapping[str, Shape],
    *,
    report: FileReport | None = None,
) -> tuple[dict[str, str], FileReport]:
    """Our key -> file key for the BLIP-2 checkpoint, and the report, from shapes alone.

    Considered keys of ``want``: ``qformer.*``, ``query_tokens``, ``ln_vision.*``, and ``visual_encoder.*`` only when
    the file holds a ViT and ``model.vision.checkpoint`` is unset.
    """
    report = report if report is not None else FileReport("<shapes>")
    has_vit = any(k.startswith(VIT_PREFIX) for k in file_shapes)
    take: dict[str, str] = {}
    if has_vit and cfg.vision.checkpoint is None:
        take, _ = plan_eva_vit(file_shapes, cfg.vision, want, report=report, file_prefix=VIT_PREFIX)
        report.notes.append("the ViT (visual_encoder.*) is read from this file: model.vision.checkpoint is unset")
    for fkey, fshape in file_shapes.items():
        if fkey.startswith(VIT_PREFIX):
            if cfg.vision.checkpoint is not None:
                report.ignored[fkey] = (f"ViT weights come from model.vision.checkpoint ({cfg.vision.checkpoint}); "
                                        "this file's copy is not used")
            continue
        our = blip2_rename(fkey)
        if our is not None and our in want:
            _check_shape(our, fkey, tuple(fshape), want, take, report, cfg)
            continue
        report.unplaced(fkey, _ignore_reason(fkey, BLIP2_IGNORED))
    matched = set(take) | {m.key for m in report.mismatched}
    report.missing += [k for k in want if _blip2_owns(k) and k not in matched]
    return take, report


# ---------------------------------------------------------------- readers


def _materialise(take: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
                 want: Mapping[str, Shape]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for our, fkey in take.items():
        t = tensors[fkey]
        if tuple(t.shape) != tuple(want[our]):  # planned: a pos_embed for another grid
            grid = _grid(want[our][1])
            assert grid is not None  # planned only between square grids (_pos_embed_resizable)
            t = interpolate_pos_embed(t, grid)
        out[our] = t
    return out


def read_eva_vit(
    path: str | Path, cfg: VisionConfig, want: dict[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], FileReport]:
    """``eva_vit_g.pth`` -> ``{visual_encoder.<name>: tensor}`` for the ``visual_encoder.*`` keys of ``want``."""
    report = FileReport(str(path))
    tensors = read_state_dict(path, report, "model.vision.checkpoint")
    take, report = plan_eva_vit(_shapes(tensors), cfg, want, report=report)
    return _materialise(take, tensors, want), report


def read_blip2(
    path: str | Path, cfg: ModelConfig, want: dict[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], FileReport]:
    """``blip2_pretrained_flant5xxl.pth`` -> Q-Former (``qformer.*``), ``query_tokens``, ``ln_vision.*`` tensors."""
    report = FileReport(str(path))
    tensors = read_state_dict(path, report, "model.qformer.checkpoint")
    take, report = plan_blip2(_shapes(tensors), cfg, want, report=report)
    return _materialise(take, tensors, want), report
