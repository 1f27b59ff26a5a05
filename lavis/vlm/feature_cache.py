"""``data.feature_cache`` for a transformers VLM (``model.vlm``) with a frozen vision tower and frozen mergers: the
mergers' outputs of every training image and clip, computed once; training then builds no tower and no merger.

    python -m lavis.vlm.feature_cache --cfg-path CFG [--out DIR] [--dtype fp32|bf16|fp16]

The format is :mod:`lavis.data.cache_features`'s (shards with checksums, ``index.json``; a build starts over), level
``merger``: one row per merged visual token, ``[1 + k, D]`` (the merged token, then Qwen3-VL's ``k`` DeepStack
features, each from its own merger), so an item has as many rows as the processor gives it visual tokens
(``grid_t * grid_h * grid_w / merge^2``). Keys are the media file's absolute path (view 0).

The cache's identity, checked when training opens it (a mismatch is refused, naming what differs):
``fingerprint``, a SHA-256 over the model's vision config and every tensor of the tower and the mergers as this
config loads them (``model.vlm.path``, or ``init_seed`` for a from-scratch model); ``transform``, the processor's
image and video settings after ``data.vlm``'s budgets (pixels, fps, frames); ``feature_shape`` and ``dtype``.
A sample whose item count differs from the cache's rows (another processor or budget) is refused naming the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lavis.config.load import load_config
from lavis.config.schema import Config
from lavis.data import media
from lavis.data.cache_features import (
    DTYPES,
    FORMAT_VERSION,
    CacheError,
    FeatureCache,
    check_rebuild_settings,
    media_key,
)
from lavis.data.datasets import load_records
from lavis.features import _ShardWriter
from lavis.vlm.arch import read_hf_config
from lavis.vlm.cached_features import LEVEL, media_files, transform_spec
from lavis.vlm.config import VLMConfig
from lavis.vlm.data import processor_ref
from lavis.vlm.data_config import VLMDataConfig
from lavis.vlm.layers import (
    MergerEmbedPipe,
    PatchEmbedPipe,
    VisionBlocksPipe,
    layer_classes,
    layer_table,
    meta_built,
)
from lavis.vlm.processor import VLMConversationDataset, VLMSample
from lavis.vlm.processor_files import load_processor
from lavis.vlm.weights import load_stage


def vision_layers(vlm: VLMConfig) -> tuple[list[torch.nn.Module], Any]:
    """The patch embedding, vision block groups and merger layer with this config's weights (the LLM is not
    built); and the HF config."""
    hf = read_hf_config(vlm)
    per = vlm.vision_blocks_per_layer
    table = layer_table(hf, per)
    n = next(e.index for e in table if e.kind == "embed") + 1
    layers = [meta_built(cls, *args) for cls, args in layer_classes(hf, per)[:n]]
    load_stage(vlm, hf, table, dict(enumerate(layers)))
    return [layer.eval() for layer in layers], hf


def fingerprint(vlm: VLMConfig, layers: list[torch.nn.Module], hf: Any) -> str:
    """SHA-256 of the vision config and every tower / merger tensor (not the token embeddings)."""
    h = hashlib.sha256(json.dumps(hf.vision_config.to_dict(), sort_keys=True, default=str).encode())
    table = layer_table(hf, vlm.vision_blocks_per_layer)
    for i, layer in enumerate(layers):
        for name, t in sorted(layer.state_dict().items()):
            if name.startswith("embed_tokens."):
                continue
            t = t.detach().contiguous().cpu()
            h.update(f"{table[i].to_plain(name)}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_shape(hf: Any) -> list[int]:
    k = len(getattr(hf.vision_config, "deepstack_visual_indexes", None) or [])
    return [1 + k, hf.text_config.hidden_size]


def check_model(cache: FeatureCache, vlm: VLMConfig) -> None:
    """Raise :class:`CacheError` unless ``cache`` holds this model's merger features (level, shape, fingerprint)."""
    if not (vlm.freeze_vision and vlm.freeze_merger):
        raise CacheError("data.feature_cache with model.vlm needs model.vlm.freeze_vision: true and "
                         "model.vlm.freeze_merger: true (the cache replaces the tower and the mergers)")
    if cache.index.get("level") != LEVEL:
        raise CacheError(f"{cache.root}: a {cache.index.get('level')}-level cache of a BLIP-2-style model; a model.vlm "
                         "run needs one built with its own config (level merger); rebuild it")
    layers, hf = vision_layers(vlm)
    if list(cache.index["feature_shape"]) != feature_shape(hf):
        raise CacheError(f"{cache.root}: cached features are {cache.index['feature_shape']}, this model needs "
                         f"{feature_shape(hf)}; rebuild the cache")
    fp = fingerprint(vlm, layers, hf)
    if fp != cache.index["fingerprint"]:
        raise CacheError(f"{cache.root}: stale feature cache: built from other vision tower / merger weights "
                         f"(fingerprint {cache.index['fingerprint'][:12]}, this config's {fp[:12]}); rebuild it")


@torch.no_grad()
def item_features(layers: list[torch.nn.Module], pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``[tokens, 1 + k, D]`` of one image / clip: patch embedding, vision blocks, mergers."""
    patch, *blocks, merger = layers
    assert isinstance(patch, PatchEmbedPipe) and isinstance(merger, MergerEmbedPipe)
    device = next(patch.parameters()).device
    grid = grid.reshape(1, 3).to(device)
    vis = patch.embed(pixels.to(device), grid)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    for block in blocks:
        assert isinstance(block, VisionBlocksPipe)
        vis = block((vis, grid, empty, empty, empty, empty))[0]
    merged = merger.merge(vis, grid)
    return merged.reshape(merged.shape[0], -1, merger.hf.text_config.hidden_size).cpu()


def build_vlm_cache(cfg: Config, out: Path, dtype: str = "bf16", shard_rows: int = 16384,
                    device: str | None = None) -> list[str]:
    """Build ``out`` from ``cfg``'s training records (every image and clip once, on ``device``: the GPU when there
    is one); returns the failures (``file:index (id ...): message``), empty when every item is cached."""
    vlm = cfg.model.vlm
    assert vlm is not None
    budget = cfg.data.vlm or VLMDataConfig()
    processor = load_processor(processor_ref(budget, vlm.path))
    layers, hf = vision_layers(vlm)
    fp = fingerprint(vlm, layers, hf)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = [layer.to(dev) for layer in layers]
    head = {"version": FORMAT_VERSION, "level": LEVEL, "fingerprint": fp,
            "transform": transform_spec(processor, budget), "feature_shape": feature_shape(hf), "dtype": dtype}
    out.mkdir(parents=True, exist_ok=True)
    check_rebuild_settings(out, head)
    for stale in [*out.glob("shard_*.npy"), *out.glob("shard_*.json")]:  # a rebuild is cheap next to training
        stale.unlink()
    (out / "index.json").write_text(json.dumps({**head, "shards": [], "complete": False}, indent=1))
    writer = _ShardWriter(out, 0, shard_rows, DTYPES[dtype][0], head)
    failures: list[str] = []
    done: set[str] = set()
    for ds in cfg.data.train:
        records = load_records(ds, allow_outside_root=cfg.data.allow_outside_root)
        dataset = VLMConversationDataset(records, processor, cfg.data, budget)
        for i in range(len(records)):
            r = records[i]
            items = [*r.images, *([r.video] if r.video is not None else [])]
            if all(media_key(p, 0) in done for p in items):
                continue
            try:
                s = dataset.sample(i)
            except (media.MediaError, ValueError) as e:
                failures.append(str(e))
                continue
            add_items(writer, done, layers, s, media_files(r), r.video)
    writer.flush()
    names = sorted(p.stem for p in out.glob("shard_*.npy") if not p.stem.endswith(".tmp"))
    (out / "failures.json").write_text(json.dumps(failures, indent=1))
    (out / "index.json").write_text(json.dumps({**head, "shards": names, "complete": True}, indent=1))
    print(f"feature cache {out}: merger-level features {head['feature_shape']} ({dtype}), {len(done)} item(s)",
          file=sys.stderr)
    return failures


def add_items(writer: Any, done: set[str], layers: list[torch.nn.Module], s: VLMSample, images: list[Path],
              video: Path | None) -> None:
    for paths, pixels, grid in ((images, s.pixel_values, s.image_grid_thw),
                                ([video] if video is not None else [], s.pixel_values_videos, s.video_grid_thw)):
        start = 0
        for path, g in zip(paths, grid):
            n = int(g.prod())
            key = media_key(path, 0)
            if key not in done:
                writer.add(key, item_features(layers, pixels[start:start + n], g))
                done.add(key)
            start += n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lavis.vlm.feature_cache",
                                description="Cache the merger outputs of a model.vlm recipe's training media (frozen "
                                            "vision tower and mergers) for data.feature_cache.")
    p.add_argument("--cfg-path", required=True)
    p.add_argument("--out", help="cache directory (default: data.feature_cache of the recipe)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--options", nargs="+", default=[], help="config overrides key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    out = args.out or cfg.data.feature_cache
    if not out:
        raise SystemExit("give --out DIR (or set data.feature_cache in the recipe)")
    if cfg.model.vlm is None or not cfg.data.train:
        raise SystemExit(f"{args.cfg_path}: needs a model.vlm section and data.train (for a BLIP-2-style recipe use "
                         "python -m lavis.data.cache_features)")
    failures = build_vlm_cache(cfg, Path(out), dtype=args.dtype, device=args.device)
    print(f"feature cache {out}: {len(failures)} failure(s)")
    for message in failures:
        print(f"  {message}")
    return 0 if not failures else 1


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
