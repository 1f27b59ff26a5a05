"""Frozen-feature cache: run the frozen vision side once over the training media and train from its outputs.

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

import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lavis.config.schema import Config, DataConfig, ModelConfig
from lavis.data import media

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


def weights_fingerprint(model: ModelConfig, level: Level) -> str:
    """SHA-256 of the cached modules' config and frozen tensors as the config's weight files provide them (see
    the module docstring). Reads those tensors once (memory-mapped), builds no module."""
    from lavis.weights.base import load_weights, model_shapes, raise_if_bad

    shapes = model_shapes(model)
    prefixes = FROZEN_PREFIXES[level]
    want = {k: s for k, s in shapes.items() if k.startswith(prefixes)}
    digests: dict[str, str] = {}

    def sink(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        h = hashlib.sha256(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[name] = h.hexdigest()

    _, reports = load_weights(model, want, set(shapes), sink=sink)
    raise_if_bad(reports)
    arch: dict[str, Any] = {"level": level, "vision": _arch(asdict(model.vision))}
    if level == "qformer":
        arch["qformer"] = _arch(asdict(model.qformer))
    missing = sorted(set(want) - set(digests))
    if missing:  # seeded init: the same seed and std give the same tensors (lavis.model.init)
        arch["init"] = {"seed": model.init_seed, "std": model.init_std, "keys": missing}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


def _arch(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("checkpoint", "frozen")}


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
    from lavis.data.records import file_digest

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
    if size != meta.get("bytes"):
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

    def check_weights(self, model: ModelConfig) -> None:
        """Raise :class:`CacheError` unless this cache holds the features ``model``'s frozen weights give (level,
        shape and weights fingerprint)."""
        level = cache_level(model)
        if self.index["level"] != level:
            raise CacheError(f"{self.root}: cache holds {self.index['level']}-level features but this config needs "
                             f"{level}-level ones (model.qformer.frozen changed?); rebuild the cache")
        want = list(feature_shape(model, level))
        if list(self.index["feature_shape"]) != want:
            raise CacheError(f"{self.root}: cached features are {self.index['feature_shape']}, this model needs "
                             f"{want}; rebuild the cache")
        fp = weights_fingerprint(model, level)
        if fp != self.index["fingerprint"]:
            raise CacheError(f"{self.root}: stale feature cache: it was built from other frozen weights (fingerprint "
                             f"{self.index['fingerprint'][:12]}, this config's {fp[:12]}: another checkpoint, "
                             "model.init_seed or vision/Q-Former settings); rebuild it")

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


# --- building ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path
    kind: Literal["image", "video"]
    view: int
    where: str
    """``file:index (id ...)`` of the first record naming this file, for the report."""
    rid: str


class _PixelItems(torch.utils.data.Dataset):
    """Decodes and transforms one item; returns ``(index, pixels | None, error | None)``."""

    def __init__(self, items: list[Item], model: ModelConfig, data: DataConfig, views: int) -> None:
        self.items, self.data = items, data
        t = data.transform
        kind, hflip = (t.kind, t.hflip) if views else ("eval", False)
        self.transform = media.image_transform(kind, model.vision.image_size, min_scale=t.min_scale, hflip=hflip)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        it = self.items[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(media_key(it.path, it.view).encode()))
            try:
                if it.kind == "image":
                    return i, self.transform(media.load_image(it.path)).unsqueeze(0), None
                frames = media.load_video_frames(it.path, self.data.num_video_frames, fps=self.data.video_fps)
                return i, media.video_to_tensor(frames, self.transform, self.data.video_same_augment), None
            except media.MediaError as e:
                return i, None, str(e)


def collect_items(cfg: Config, views: int, findings: list[Any]) -> list[Item]:
    """Every distinct image and video of ``cfg.data.train`` times ``max(1, views)``; malformed records become
    findings."""
    from lavis.data.check import Finding, _split, _structural_reason
    from lavis.data.datasets import load_records

    seen: dict[tuple[str, str], Item] = {}
    for ds in cfg.data.train:
        errors: list[tuple[str, str]] = []
        for r in load_records(ds, errors):
            files = [(p, "image") for p in r.images] + ([(r.video, "video")] if r.video is not None else [])
            for p, kind in files:
                key = (os.path.abspath(p), kind)
                if key not in seen:
                    seen[key] = Item(Path(key[0]), kind, 0, r.where, r.id)
        for where, msg in errors:
            rid, text = _split(msg, where)
            findings.append(Finding(where, rid, _structural_reason(text), text))
    return [replace(it, view=v) for it in seen.values() for v in range(max(1, views))]


class FrozenEncoder(nn.Module):
    """The frozen modules of a cache level, initialised and loaded exactly as pipeline layer 0 does."""

    def __init__(self, model: ModelConfig, level: Level) -> None:
        from lavis.model.eva_vit import build_eva_vit, build_ln_vision
        from lavis.model.init import init_modules_
        from lavis.model.qformer import build_qformer, build_query_tokens
        from lavis.weights.base import model_shapes, stream_into

        super().__init__()
        self.level = level
        self.visual_encoder = build_eva_vit(model.vision)
        self.ln_vision = build_ln_vision(model.vision)
        mods: list[nn.Module | nn.Parameter] = [self.visual_encoder, self.ln_vision]
        if level == "qformer":
            self.qformer = build_qformer(model.qformer, model.vision.width)
            self.query_tokens = build_query_tokens(model.qformer)
            mods += [self.qformer, self.query_tokens]
        # These modules open layer 0's init order, so their draws equal a full layer-0 init (lavis.model.init).
        init_modules_(mods, model.init_seed, model.init_std)
        reports, _ = stream_into(model, self.state_dict(keep_vars=True), set(model_shapes(model)))
        for rep in reports:
            print(rep.summary(), file=sys.stderr)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        from lavis.model.mllm import encode_queries, encode_vision

        feats = encode_vision(self.visual_encoder, self.ln_vision, pixels_NCHW)
        return feats if self.level == "vision" else encode_queries(self.qformer, self.query_tokens, feats)


class _ShardWriter:
    def __init__(self, root: Path, first: int, rows: int, np_dtype: type, identity: dict[str, Any]) -> None:
        self.root, self.next, self.rows, self.np_dtype = root, first, rows, np_dtype
        self.identity = identity
        self.buf: list[np.ndarray] = []
        self.keys: dict[str, list[int]] = {}
        self.count = 0
        self.written: list[str] = []

    def add(self, key: str, feats: torch.Tensor) -> None:
        arr = feats.detach().cpu()
        arr = arr.to(torch.bfloat16).view(torch.uint16).numpy() if self.np_dtype is np.uint16 else \
            arr.numpy().astype(self.np_dtype)
        self.keys[key] = [self.count, arr.shape[0]]
        self.buf.append(arr)
        self.count += arr.shape[0]
        if self.count >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"shard_{self.next:05d}"
        tmp = self.root / f"{name}.tmp.npy"
        np.save(tmp, np.concatenate(self.buf))
        from lavis.data.records import file_digest

        side = {**self.identity, "bytes": tmp.stat().st_size, "blake2b": file_digest(tmp), "keys": self.keys}
        (self.root / f"{name}.json.tmp").write_text(json.dumps(side))
        os.replace(self.root / f"{name}.json.tmp", self.root / f"{name}.json")
        os.replace(tmp, self.root / f"{name}.npy")  # the .npy last: a shard counts as done once it exists
        self.written.append(name)
        self.next += 1
        self.buf, self.keys, self.count = [], {}, 0


def _shard_names(root: Path) -> list[str]:
    return sorted(p.stem for p in root.glob("shard_*.npy") if not p.stem.endswith(".tmp"))


def _done_shards(root: Path, identity: dict[str, Any]) -> tuple[list[str], set[str]]:
    """Finished shards that verify (``shard_problem``) and their keys; the others are deleted, each named."""
    names: list[str] = []
    keys: set[str] = set()
    for n in _shard_names(root):
        problem, meta = shard_problem(root, n, identity)
        if problem is not None:
            print(f"feature cache: {root / f'{n}.npy'}: {problem}; making it again", file=sys.stderr)
            (root / f"{n}.npy").unlink()
            (root / f"{n}.json").unlink(missing_ok=True)
            continue
        names.append(n)
        keys.update(meta["keys"])
    return names, keys


def build_cache(cfg: Config, out: Path, *, workers: int = 2, views: int = 0, dtype: str = "bf16",
                batch_size: int = 64, shard_rows: int = 16384, device: str | None = None,
                progress: bool = False) -> list[Any]:
    """Build (or resume) the cache of ``cfg``'s training media in ``out``; returns the findings (bad records and
    media that failed), empty when every item is cached."""
    from tqdm import tqdm

    from lavis.data.check import Finding, _media_reason, _sort_key

    model = cfg.model
    level = cache_level(model)
    fp = weights_fingerprint(model, level)
    head = {"version": FORMAT_VERSION, "level": level, "fingerprint": fp,
            "transform": transform_spec(model.vision.image_size, cfg.data, views),
            "feature_shape": list(feature_shape(model, level)),
            "dtype": dtype}
    out.mkdir(parents=True, exist_ok=True)
    old = _read_index(out)
    if old is not None and {k: old.get(k) for k in head} != head:
        diff = sorted(k for k in head if old.get(k) != head[k])
        raise CacheError(f"{out} holds a cache built with other settings ({', '.join(diff)} differ); delete it or "
                         "choose another --out")
    (out / "index.json").write_text(json.dumps({**head, "shards": [], "complete": False}, indent=1))
    for stale in out.glob("shard_*.tmp.npy"):
        stale.unlink()

    findings: list[Any] = []
    items = collect_items(cfg, views, findings)
    done_names, done_keys = _done_shards(out, head)
    todo = [it for it in items if media_key(it.path, it.view) not in done_keys]
    print(f"feature cache {out}: {level}-level features {head['feature_shape']} ({dtype}), {len(items)} item(s), "
          f"{len(items) - len(todo)} already cached", file=sys.stderr)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc = FrozenEncoder(model, level).to(dev)
    first = int(done_names[-1].removeprefix("shard_")) + 1 if done_names else 0  # never reuse a kept shard's name
    writer = _ShardWriter(out, first, shard_rows, DTYPES[dtype][0], head)
    loader = torch.utils.data.DataLoader(_PixelItems(todo, model, cfg.data, views), batch_size=None,
                                         num_workers=workers, collate_fn=_identity)
    t0 = time.perf_counter()
    for group in _grouped(tqdm(loader, total=len(todo), desc="cache", unit="item", disable=not progress,
                               file=sys.stderr), batch_size):
        ok = [(i, px) for i, px, err in group if err is None]
        for i, _, err in group:
            if err is not None:
                it = todo[i]
                findings.append(Finding(it.where, it.rid, _media_reason(media.MediaError(err), it.path, it.kind), err))
        if not ok:
            continue
        feats = enc(torch.cat([px for _, px in ok]).to(dev))
        row = 0
        for i, px in ok:
            writer.add(media_key(todo[i].path, todo[i].view), feats[row:row + px.shape[0]])
            row += px.shape[0]
    writer.flush()
    names = _shard_names(out)
    (out / "failures.json").write_text(json.dumps([asdict(f) for f in sorted(findings, key=_sort_key)], indent=1))
    (out / "index.json").write_text(json.dumps({**head, "shards": names, "complete": True}, indent=1))
    print(f"cached {len(todo) - sum(1 for f in findings if f.reason not in ('malformed', 'marker_count'))} item(s) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return sorted(findings, key=_sort_key)


def _identity(x: Any) -> Any:
    return x


def _grouped(it: Any, n: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for x in it:
        group.append(x)
        if len(group) >= n:
            yield group
            group = []
    if group:
        yield group


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", required=True, help="training recipe (its model and data.train)")
    p.add_argument("--out", help="cache directory (default: data.feature_cache of the recipe)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    p.add_argument("--views", type=int, default=0, help="K fixed augmented views per image with data.transform "
                                                        "(default 0: the eval transform, one view)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored precision (default bf16)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from collections import Counter

    from lavis.config.load import load_config

    args = parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    out = args.out or cfg.data.feature_cache
    if not out:
        raise SystemExit("give --out DIR (or set data.feature_cache in the recipe)")
    if not cfg.data.train:
        raise SystemExit(f"{args.cfg_path}: data.train is empty")
    findings = build_cache(cfg, Path(out), workers=args.workers, views=args.views, dtype=args.dtype,
                           batch_size=args.batch_size, device=args.device, progress=sys.stderr.isatty())
    print(f"feature cache {out}: {len(findings)} failure(s)")
    if findings:
        counts = Counter(f.reason for f in findings)
        print("by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for f in findings:
            print(f"  {f.where} (id {f.id}): {f.reason}: {f.message}")
    return 0 if not findings else 1


if __name__ == "__main__":
    sys.exit(main())
