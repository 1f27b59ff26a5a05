"""The read side of ``data.feature_cache`` for a transformers VLM (``model.vlm``): what identifies the processing a
cache was built with, and a sample's pixel rows replaced by its media's cached merger features. The build and the
weights check are in :mod:`lavis.vlm.feature_cache` (they build the tower, so they sit above the data side)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lavis.data import media
from lavis.data.cache_features import CacheError, FeatureCache
from lavis.data.datasets import Record
from lavis.vlm.data_config import VLMDataConfig

if TYPE_CHECKING:
    from lavis.vlm.processor import VLMSample

LEVEL = "merger"
"""``index.json``'s ``level`` of a model.vlm cache."""


def transform_spec(processor: Any, budget: VLMDataConfig) -> dict[str, Any]:
    """What the cached pixels went through: the processor's image / video settings and ``data.vlm``'s budgets."""
    def settings(p: Any) -> dict[str, Any]:
        return json.loads(json.dumps(p.to_dict(), sort_keys=True, default=str))

    keep = {k: v for k, v in asdict(budget).items() if k != "processor"}
    return {"views": 0, "budget": keep, "image_processor": settings(processor.image_processor),
            "video_processor": settings(processor.video_processor)}


def check_present(root: str | Path) -> None:
    """Raise :class:`CacheError` with this family's build command when ``root`` holds no cache."""
    if not (Path(root) / "index.json").is_file():
        raise CacheError(f"{root}: no feature cache here (index.json missing); build it with "
                         f"`python -m lavis.vlm.feature_cache --cfg-path CFG --out {root}`")


def open_cache(root: str | Path) -> FeatureCache:
    """``FeatureCache.open`` (every shard verified) with this family's build command in the error for a directory
    that holds none."""
    check_present(root)
    return FeatureCache.open(root)


def open_for_data(root: str, processor: Any, budget: VLMDataConfig) -> FeatureCache:
    """Open ``root`` for the dataset: refused unless its processor settings and budgets are this run's."""
    cache = open_cache(root)
    if cache.index.get("level") != LEVEL:
        raise CacheError(f"{root}: not a model.vlm feature cache (level {cache.index.get('level')}); rebuild it")
    want = transform_spec(processor, budget)
    if cache.index["transform"] != want:
        diff = sorted(k for k in want if cache.index["transform"].get(k) != want[k])
        raise CacheError(f"{root}: cache built with other processor settings or data.vlm budgets ({', '.join(diff)} "
                         "differ); rebuild the cache with this config")
    return cache


def media_files(r: Record) -> list[Path]:
    """``r``'s image files; a member of a tar shard (webdataset) is refused: the cache is keyed on media files."""
    for p in r.images:
        if not isinstance(p, Path):
            raise CacheError(f"{r.where}: {p} is a member of a tar shard (format: webdataset); the feature cache reads "
                             "media files only: extract the shards, or train without data.feature_cache")
    return [p for p in r.images if isinstance(p, Path)]


def with_cached_features(s: VLMSample, images: list[Path], video: Path | None, cache: FeatureCache,
                         merge: int) -> VLMSample:
    """``s`` with its pixel rows replaced by the cached features of its images / clip, flattened to
    ``[tokens, (1 + k) * D]``; the rows of each item must be its visual token count."""
    def rows(paths: list[Path], grid: torch.Tensor) -> torch.Tensor:
        if len(paths) != len(grid):
            raise media.MediaError(f"{len(grid)} media grids but {len(paths)} files")
        parts = []
        for path, g in zip(paths, grid.tolist()):
            feats = cache.get(path, 0)
            if feats.shape[0] != g[0] * g[1] * g[2] // merge**2:
                raise CacheError(f"{path}: the feature cache holds {feats.shape[0]} visual tokens, the processor "
                                 f"gives {g[0] * g[1] * g[2] // merge**2} (grid {g}); rebuild the cache with this "
                                 "config")
            parts.append(feats.reshape(feats.shape[0], -1).float())
        width = int(torch.tensor(cache.index["feature_shape"]).prod())
        return torch.cat(parts) if parts else torch.zeros(0, width)

    s.pixel_values = rows(images, s.image_grid_thw)
    s.pixel_values_videos = rows([video] if video is not None else [], s.video_grid_thw)
    return s
