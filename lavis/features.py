"""Building the frozen-feature cache (``python -m lavis.data.cache_features``; the format, the read side and the
checks on opening are in :mod:`lavis.data.cache_features`): run the frozen vision side once over the training media
and write its outputs. It builds the ViT / Q-Former and reads their weight files, so it sits above model and weights
(docs/ARCHITECTURE.md, "Layers"); training checks a cache's weights fingerprint with :func:`check_weights`.
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

from lavis.config.load import load_config
from lavis.config.schema import Config, DataConfig, ModelConfig
from lavis.data import cache_features, media
from lavis.data.cache_features import (
    DTYPES,
    FORMAT_VERSION,
    FROZEN_PREFIXES,
    CacheError,
    FeatureCache,
    Level,
    cache_level,
    check_rebuild_settings,
    feature_shape,
    media_key,
    shard_problem,
    transform_spec,
)
from lavis.data.check import Finding, _media_reason, _sort_key, _split, _structural_reason
from lavis.data.datasets import load_records
from lavis.data.formats import TarMember
from lavis.data.records import file_digest
from lavis.model.eva_vit import build_eva_vit, build_ln_vision
from lavis.model.init import init_modules_
from lavis.model.mllm import describe, encode_queries, encode_vision
from lavis.model.qformer import build_qformer, build_query_tokens
from lavis.model.spec import ModelSpec
from lavis.weights.base import load_weights, model_shapes, raise_if_bad, stream_into


def weights_fingerprint(model: ModelConfig, level: Level, spec: ModelSpec | None = None) -> str:
    """SHA-256 of the cached modules' config and frozen tensors as the config's weight files provide them (see
    the module docstring). Reads those tensors once (memory-mapped), builds no module. ``spec``: the description
    of ``model``."""
    shapes = model_shapes(model, spec)
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


def check_weights(cache: FeatureCache, model: ModelConfig, spec: ModelSpec | None = None) -> None:
    """Raise :class:`CacheError` unless ``cache`` holds the features ``model``'s frozen weights give (level,
    shape and weights fingerprint). ``spec``: the description of ``model``."""
    level = cache_level(model)
    if cache.index["level"] != level:
        raise CacheError(f"{cache.root}: cache holds {cache.index['level']}-level features but this config needs "
                         f"{level}-level ones (model.qformer.frozen changed?); rebuild the cache")
    want = list(feature_shape(model, level))
    if list(cache.index["feature_shape"]) != want:
        raise CacheError(f"{cache.root}: cached features are {cache.index['feature_shape']}, this model needs "
                         f"{want}; rebuild the cache")
    fp = weights_fingerprint(model, level, spec)
    if fp != cache.index["fingerprint"]:
        raise CacheError(f"{cache.root}: stale feature cache: it was built from other frozen weights (fingerprint "
                         f"{cache.index['fingerprint'][:12]}, this config's {fp[:12]}: another checkpoint, "
                         "model.init_seed or vision/Q-Former settings); rebuild it")


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
    seen: dict[tuple[str, str], Item] = {}
    for ds in cfg.data.train:
        errors: list[tuple[str, str]] = []
        for r in load_records(ds, errors):
            files: list[tuple[Path | TarMember, Literal["image", "video"]]] = [(p, "image") for p in r.images]
            if r.video is not None:
                files.append((r.video, "video"))
            for p, kind in files:
                if isinstance(p, TarMember):
                    raise CacheError(f"{r.where}: {p} is a member of a tar shard (format: webdataset); the feature "
                                     "cache reads media files only: extract the shards, or train without "
                                     "data.feature_cache")
                key = (os.path.abspath(p), kind)
                if key not in seen:
                    seen[key] = Item(Path(key[0]), kind, 0, r.where, r.id)
        for where, msg in errors:
            rid, text = _split(msg, where)
            findings.append(Finding(where, rid, _structural_reason(text), text))
    return [replace(it, view=v) for it in seen.values() for v in range(max(1, views))]


class FrozenEncoder(nn.Module):
    """The frozen modules of a cache level, initialised and loaded exactly as pipeline layer 0 does."""

    def __init__(self, model: ModelConfig, level: Level, spec: ModelSpec | None = None) -> None:
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
        reports, _ = stream_into(model, self.state_dict(keep_vars=True), set(model_shapes(model, spec)))
        for rep in reports:
            print(rep.summary(), file=sys.stderr)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
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

    model = cfg.model
    level = cache_level(model)
    spec = describe(model)  # the one description of the model this process uses
    fp = weights_fingerprint(model, level, spec)
    head = {"version": FORMAT_VERSION, "level": level, "fingerprint": fp,
            "transform": transform_spec(model.vision.image_size, cfg.data, views),
            "feature_shape": list(feature_shape(model, level)),
            "dtype": dtype}
    out.mkdir(parents=True, exist_ok=True)
    check_rebuild_settings(out, head)
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
    enc = FrozenEncoder(model, level, spec).to(dev)
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
    p = argparse.ArgumentParser(prog="python -m lavis.data.cache_features", description=cache_features.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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

    args = parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    out = args.out or cfg.data.feature_cache
    if not out:
        raise SystemExit("give --out DIR (or set data.feature_cache in the recipe)")
    if not cfg.data.train:
        raise SystemExit(f"{args.cfg_path}: data.train is empty")
    if cfg.model.vlm is not None:  # the tower is built above this layer (lavis.vlm.feature_cache)
        raise SystemExit(f"{args.cfg_path} has a model.vlm section: build its cache with "
                         f"python -m lavis.vlm.feature_cache --cfg-path {args.cfg_path}")
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
