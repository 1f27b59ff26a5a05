"""Frozen-feature cache: run the frozen vision side once over the training media and train from its outputs. This
module holds the format and the read side (it needs no model); building it and the weights check are in
:mod:`lavis.features` (it builds the ViT / Q-Former, so it sits above model and weights).

    python -m lavis.data.cache_features --cfg-path CFG [--out DIR] [--workers N] [--views K] [--dtype bf16]

What is cached depends on what the config freezes: with the ViT and the Q-Former frozen (pretrain and SFT recipes)
the Q-Former's query outputs ``[Q, H]`` per image (level ``qformer``); with only the ViT frozen its ``ln_vision``
features ``[1 + patches, W]`` (level ``vision``). A trainable ViT cannot be cached.

Without ``--views`` every image (and every frame of every video) goes through the eval transform (bicubic squash,
no flip); with ``--views K`` through ``data.transform`` K times, view ``v`` seeded from (path, v), so the K views
are fixed. Training reads view ``seed mod K`` for a sample (seed: its augmentation seed), so the data order and
the choice of view are pure functions of the step.

Layout of DIR: ``index.json`` (format version, level, weights fingerprint, transform, feature shape and dtype,
shards, ``complete``), ``shard_NNNNN.npy`` (``[rows, T, C]``; bf16 stored as uint16) with ``shard_NNNNN.json``
(the cache's identity, i.e. the ``index.json`` fields above but the shard list; the shard's size in bytes and its
BLAKE2b checksum; ``keys``: key -> [first row, rows], a video's frames are consecutive rows). A shard is written
under a temporary name and renamed when complete, so an interrupted build resumes from its finished shards. Keys
are the absolute media path and the view, ``/abs/path.jpg|0``. Media that fail to decode are reported like
``python -m lavis.data.check`` (``file:index (id ...): reason: message``), listed in ``failures.json``, and the
command exits 1; training refuses a sample whose media are not in the cache, naming it.

Opening a cache verifies every shard against its sidecar (size, and the BLAKE2b checksum: a read of every shard,
once per opening process) and the sidecar's identity against ``index.json``: a truncated or damaged shard, or one
copied in from another cache (other weights, transform or dtype), is refused naming the shard file and the rebuild
command. Running the build command again drops such shards (saying which) and makes them anew.

The weights fingerprint is a SHA-256 over the cached modules' architecture config and the content of every frozen
tensor the configured weight files provide (plus ``model.init_seed`` / ``init_std`` for tensors no file provides);
training computes it from its own config and refuses a cache built from other weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lavis.config.schema import DataConfig, ModelConfig
from lavis.data import media
from lavis.data.records import file_digest

FORMAT_VERSION = 2
IDENTITY_KEYS = ("version", "level", "fingerprint", "transform", "feature_shape", "dtype")
"""The ``index.json`` fields every shard's sidecar repeats: what its features were computed from and stored as."""
Level = Literal["vision", "qformer"]
FROZEN_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": ("visual_encoder.", "ln_vision."),
    "qformer": ("visual_encoder.", "ln_vision.", "qformer.", "query_tokens"),
}
"""Plain-model weight prefixes that a cache of each level replaces."""
DTYPES = {"fp32": (np.float32, torch.float32), "fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16)}


class CacheError(ValueError):
    """A cache that does not fit the config (other weights, transform, level) or a lookup that misses."""


def cache_level(model: ModelConfig) -> Level:
    """What a cache replaces for this model: ``qformer`` (ViT, ln_vision, Q-Former and query tokens frozen) or
    ``vision`` (ViT and ln_vision frozen; also for a model without a Q-Former, whose layer 0 then concatenates the
    cached patch features)."""
    if not model.vision.frozen:
        raise CacheError("data.feature_cache needs model.vision.frozen: true (a trainable ViT cannot be cached)")
    return "qformer" if model.qformer.frozen and model.qformer.enabled else "vision"


def feature_shape(model: ModelConfig, level: Level) -> tuple[int, int]:
    """``(tokens, channels)`` of one image's cached features."""
    if level == "qformer":
        return model.qformer.num_query_tokens, model.qformer.hidden_size
    v = model.vision
    return (v.image_size // v.patch_size) ** 2 + 1, v.width


def transform_spec(image_size: int, data: DataConfig, views: int) -> dict[str, Any]:
    """What the cached pixels went through; training must ask for the same."""
    t = data.transform
    spec: dict[str, Any] = {"image_size": image_size, "num_video_frames": data.num_video_frames,
                            "video_fps": data.video_fps, "views": views}
    if views:
        spec.update(kind=t.kind, min_scale=t.min_scale, hflip=t.hflip, video_same_augment=data.video_same_augment)
    else:
        spec.update(kind="eval", hflip=False)
    return spec


def media_key(path: Path, view: int) -> str:
    return f"{os.path.abspath(path)}|{view}"


def rebuild_hint(root: Path) -> str:
    return (f"rebuild it: python -m lavis.data.cache_features --cfg-path <your recipe> --out {root} (remakes only the "
            "damaged or foreign shards)")


def shard_problem(root: Path, name: str, identity: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(what is wrong with shard ``name`` or None, its sidecar)``: sidecar present and readable, its identity equal
    to ``identity``, the ``.npy``'s size and BLAKE2b checksum equal to the sidecar's."""
    side, npy = root / f"{name}.json", root / f"{name}.npy"
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        return f"its sidecar {side.name} is missing or unreadable ({e})", {}
    if not isinstance(meta, dict) or "keys" not in meta:
        return f"its sidecar {side.name} holds no identity and checksum (an older cache format)", {}
    other = sorted(k for k in IDENTITY_KEYS if meta.get(k) != identity[k])
    if other:
        fp = f" (weights fingerprint {str(meta.get('fingerprint'))[:12]}, this cache's {identity['fingerprint'][:12]})"
        return (f"it belongs to another feature cache: its {', '.join(other)} "
                f"{'differs' if len(other) == 1 else 'differ'}"
                + (fp if "fingerprint" in other else "")), meta
    st = npy.stat() if npy.is_file() else None
    size = st.st_size if st else None
    if st is None or size != meta.get("bytes"):
        return f"it is {size} bytes, {meta.get('bytes')} were written (truncated or damaged)", meta
    seen = (str(npy), meta["blake2b"], st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if seen not in _VERIFIED:  # layer 0 and the dataset of one process open the same cache: hash it once
        if file_digest(npy) != meta.get("blake2b"):
            return "its content does not match the checksum written with it (damaged)", meta
        _VERIFIED.add(seen)
    return None, meta


_VERIFIED: set[tuple[Any, ...]] = set()
"""Shards this process verified, with the stat they had then (any later change to the file changes its ctime)."""


# --- reading ----------------------------------------------------------------------------------------------------


class FeatureCache:
    """Read side: ``get(path, seed)`` -> ``[rows, T, C]`` float tensor (one row per image, one per video frame).

    Shards are memory-mapped on first use in each process (loader workers included), so the cache costs page cache,
    not process memory.
    """

    def __init__(self, root: Path, index: dict[str, Any], keys: dict[str, tuple[int, int, int]]) -> None:
        self.root, self.index, self.keys = root, index, keys
        self.views = max(1, int(index["transform"]["views"]))
        self.np_dtype, self.torch_dtype = DTYPES[index["dtype"]]
        self._shards: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: str | Path) -> FeatureCache:
        """Open the cache in ``root``, verifying every shard (size, checksum, identity; see the module docstring)."""
        root = Path(root)
        index = _read_index(root)
        if index is None:
            raise CacheError(f"{root}: no feature cache here (index.json missing); build it with "
                             f"`python -m lavis.data.cache_features --cfg-path CFG --out {root}`")
        if index.get("version") != FORMAT_VERSION:
            raise CacheError(f"{root}: feature cache format {index.get('version')}, this version reads "
                             f"{FORMAT_VERSION} (shards now carry checksums); delete it and build it again: "
                             f"python -m lavis.data.cache_features --cfg-path <your recipe> --out {root}")
        if not index.get("complete"):
            raise CacheError(f"{root}: the feature cache is incomplete (its build was interrupted); "
                             "run `python -m lavis.data.cache_features` again to finish it")
        keys: dict[str, tuple[int, int, int]] = {}
        for i, name in enumerate(index["shards"]):
            problem, meta = shard_problem(root, name, index)
            if problem is not None:
                raise CacheError(f"{root / f'{name}.npy'}: {problem}; {rebuild_hint(root)}")
            for k, (start, n) in meta["keys"].items():
                keys[k] = (i, start, n)
        return cls(root, index, keys)

    def check_transform_of(self, image_size: int, data: DataConfig) -> None:
        """Raise :class:`CacheError` unless the cached pixels went through the transform ``data`` asks for."""
        stored = self.index["transform"]
        t = data.transform
        if not stored["views"] and (t.kind != "eval" or t.hflip):
            raise CacheError(f"{self.root}: cache built with the eval transform (no augmentation) but data.transform "
                             f"asks for kind={t.kind}, hflip={t.hflip}; set data.transform.kind=eval "
                             "data.transform.hflip=false, or rebuild with --views K for fixed augmented views")
        spec = transform_spec(image_size, data, stored["views"])
        if spec != stored:
            raise CacheError(f"{self.root}: cache built with transform {stored}, this config asks for {spec}; "
                             "rebuild the cache with this config")

    def empty(self) -> torch.Tensor:
        """``[0, T, C]``: the media tensor of a sample without images."""
        return torch.zeros(0, *self.index["feature_shape"], dtype=self.torch_dtype)

    def get(self, path: Path, seed: int) -> torch.Tensor:
        key = media_key(path, seed % self.views)
        if key not in self.keys:
            raise media.MediaError(f"{path}: not in the feature cache {self.root} (it failed or was absent when "
                                   "the cache was built; see its failures.json)")
        shard, start, n = self.keys[key]
        if shard not in self._shards:
            file = self.root / f"{self.index['shards'][shard]}.npy"
            try:
                self._shards[shard] = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:  # changed since the cache was opened and verified
                raise CacheError(f"{file}: cannot be read ({e}); {rebuild_hint(self.root)}") from e
        rows = torch.from_numpy(np.array(self._shards[shard][start:start + n]))
        return rows.view(self.torch_dtype) if self.torch_dtype == torch.bfloat16 else rows


def _read_index(root: Path) -> dict[str, Any] | None:
    path = root / "index.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_rebuild_settings(out: Path, head: dict[str, Any]) -> None:
    """A builder may write into ``out`` only a cache of the same settings (``head``: what ``index.json`` records
    besides its shards); raises naming the keys that differ."""
    old = _read_index(out)
    if old is not None and {k: old.get(k) for k in head} != head:
        diff = sorted(k for k in head if old.get(k) != head[k])
        raise CacheError(f"{out} holds a cache built with other settings ({', '.join(diff)} differ); delete it or "
                         "choose another --out")


if __name__ == "__main__":  # the documented command; the builder sits above model and weights (lavis/features.py)
    import runpy

    runpy.run_module("lavis.features", run_name="__main__", alter_sys=True)
