"""Canonical-format datasets: records -> (pixels, input_ids, labels) samples, and the step-indexed sampler.

Data order is a pure function of (seed, global sample position): the sampler for optimizer step ``s`` yields the
same indices on every run, so the first and last pipeline stages (separate processes) see the same micro-batches
and a resumed run continues with exactly the data an uninterrupted run would have seen. Random augmentation is
seeded per sample from the same position, so it is reproducible with any number of loader workers.

With ``group_by_length`` the sampler sorts each optimizer step's samples by token length before cutting them into
micro-batches (micro-batch ``k`` of data-parallel rank ``r`` takes sorted chunk ``k x D + r``), so micro-batches
hold samples of similar length and dynamic padding wastes less; the window is one step, so order is still a pure
function of (seed, step), DP ranks get disjoint samples, and the step's sample set is unchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lavis.config.schema import DataConfig, DatasetConfig
from lavis.data import media
from lavis.data.cache_features import FeatureCache
from lavis.data.conversation import (
    IMAGE_MARKER,
    VIDEO_MARKER,
    ChatTemplate,
    Encoded,
    LabelMode,
    SampleError,
    TooLongError,
    count_markers,
    encode_conversation,
    fit_length,
)
from lavis.data.formats import FORMATS, TarMember, read_json_records, to_canonical
from lavis.data.records import RecordStore, open_records

MediaRef = Path | TarMember
"""An image file, or an image inside a webdataset tar shard."""


@dataclass
class Record:
    id: str
    images: list[MediaRef]
    video: Path | None
    conversations: list[dict]
    where: str
    """``file:index`` of the record, for error messages."""


def read_raw(path: Path) -> list[tuple[str, Any]]:
    """``(where, raw record)`` pairs of a JSON list (``file:index``) or JSONL file (``file:line``, 1-based)."""
    return read_json_records(path)


def media_path(root: Path, rel: str, where: str, rid: str, allow_outside_root: bool = False) -> Path:
    """``root / rel``; a path that leaves a non-empty ``root`` (``../..``, an absolute path elsewhere) is refused
    unless ``allow_outside_root`` (``data.allow_outside_root``). Checked on the path as written (symlinks inside
    the root are the dataset's own business), so it needs no file-system access."""
    path = root / rel
    if allow_outside_root or not str(root):
        return path
    full = os.path.normpath(path)
    inside = os.path.relpath(full, os.path.normpath(root))
    if inside == os.pardir or inside.startswith(os.pardir + os.sep):
        raise ValueError(f"{where} (id {rid}): media path {rel!r} resolves to {full}, outside the dataset's "
                         f"vis_root {root}; fix the record, or set data.allow_outside_root: true if the data is "
                         f"trusted and meant to live elsewhere")
    return path


def parse_record(r: Any, where: str, ds: DatasetConfig, index: int = 0, allow_outside_root: bool = False) -> Record:
    """One raw record in ``ds.format`` -> :class:`Record`; ``ValueError`` naming ``where`` and the id if malformed or
    if a media path leaves ``ds.vis_root`` (see :func:`media_path`)."""
    r = to_canonical(r, where, index, ds)
    root = Path(ds.vis_root)
    rid = str(r.get("id", where))
    convs = r.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{where} (id {rid}): `conversations` must be a non-empty list")
    images = r.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, (str, TarMember)) for x in images):
        raise ValueError(f"{where} (id {rid}): `images` must be a list of paths")
    video = r.get("video")
    if video is not None and not isinstance(video, str):
        raise ValueError(f"{where} (id {rid}): `video` must be a path string")
    if images and video:
        raise ValueError(f"{where} (id {rid}): a record holds `images` or a `video`, not both")
    try:
        n_img, n_vid = count_markers(convs, rid)
    except SampleError as e:
        raise ValueError(f"{where} (id {rid}): {str(e).removeprefix(f'record {rid}: ')}") from e
    if n_img != len(images) or n_vid != (1 if video else 0):
        raise ValueError(
            f"{where} (id {rid}): {n_img} {IMAGE_MARKER} and {n_vid} {VIDEO_MARKER} markers but "
            f"{len(images)} images and {1 if video else 0} video; each file needs exactly one marker"
        )
    paths: list[MediaRef] = [x if isinstance(x, TarMember) else media_path(root, x, where, rid, allow_outside_root)
                             for x in images]
    return Record(rid, paths, media_path(root, video, where, rid, allow_outside_root) if video else None, convs, where)


@dataclass(frozen=True)
class RecordParser:
    """:func:`parse_record` bound to one dataset's config, as ``(raw, where, index) -> Record``; picklable, so loader
    workers started by spawn get it too."""

    ds: DatasetConfig
    allow_outside_root: bool = False

    def __call__(self, r: Any, where: str, index: int) -> Record:
        return parse_record(r, where, self.ds, index, self.allow_outside_root)


def load_records(ds: DatasetConfig, errors: list[tuple[str, str]] | None = None,
                 allow_outside_root: bool = False) -> Sequence[Record]:
    """Read a dataset in ``ds.format`` (``lavis/data/formats.py``); structural errors name ``file:index``; media
    paths outside ``ds.vis_root`` are refused unless ``allow_outside_root`` (``data.allow_outside_root``).

    With ``errors`` given, malformed records are appended to it as ``(where, message)`` and left out instead of
    raising (the checker reports them all); training passes none, so the first malformed record stops it.
    Formats kept in one JSON / JSONL file are held compactly (``lavis.data.records``: a shared memory-mapped index
    of byte offsets, each record parsed when accessed); the result indexes, iterates and concatenates (``+``) like a
    list.
    """
    parse = RecordParser(ds, allow_outside_root)
    if FORMATS[ds.format].one_json_file:
        return open_records(Path(ds.ann_path), ds.format, parse, errors, key=f"{ds!r}|{allow_outside_root}")
    records = []
    for index, (where, r) in enumerate(FORMATS[ds.format].read(ds.ann_path)):
        try:
            records.append(parse(r, where, index))
        except ValueError as e:
            if errors is None:
                raise
            errors.append((where, str(e)))
    return records


MAX_TEXT_CHARS_PER_TOKEN = 64
"""A record holding more than this many characters of text per ``data.max_txt_len`` token is too long under any
length policy, and is found before it is tokenized (a 30 MB text costs a tokenizer gigabytes)."""


def check_text_size(r: Record, max_txt_len: int) -> None:
    """Raise :class:`TooLongError` (``record ID: N characters ...``) for a record whose text exceeds
    ``MAX_TEXT_CHARS_PER_TOKEN x max_txt_len`` characters; linear in the text, no tokenizer."""
    chars = sum(len(t["content"]) for t in r.conversations if isinstance(t, dict) and isinstance(t.get("content"), str))
    limit = MAX_TEXT_CHARS_PER_TOKEN * max_txt_len
    if chars > limit:
        raise TooLongError(f"record {r.id}: {chars} characters of text, over the {limit} allowed for "
                           f"data.max_txt_len={max_txt_len} ({MAX_TEXT_CHARS_PER_TOKEN} per token); not tokenized")


def dataset_fingerprint(ds: DatasetConfig, records: Sequence[Record]) -> dict[str, Any]:
    """What a checkpoint records about one training dataset (``lavis_meta.json`` ``data``): its annotation path,
    format, record count and content fingerprint. For a one-file format that is the hash of the file's bytes the
    records index already computed (free); for the others (shards, directories) a hash of the parsed records."""
    if isinstance(records, RecordStore):
        digest = records.digest
    else:
        h = hashlib.blake2b(digest_size=16)
        for r in records:
            h.update(repr((r.id, [str(p) for p in r.images], str(r.video), r.conversations)).encode())
        digest = h.hexdigest()
    return {"ann_path": ds.ann_path, "format": ds.format, "records": len(records), "fingerprint": digest}


def load_record_image(p: MediaRef) -> Image.Image:
    """Decode one image of a record (a file, or a member of a tar shard); ``media.MediaError`` names it."""
    if isinstance(p, TarMember):
        try:
            data = p.read()
        except OSError as e:
            raise media.MediaError(f"{p}: cannot read from its shard ({e})") from e
        return media.load_image(Path(str(p)), fileobj=io.BytesIO(data))
    return media.load_image(p)


@dataclass
class Sample:
    id: str
    pixels_NCHW: torch.Tensor
    """Images then video frames of this sample, in marker order; ``[0, 3, S, S]`` when not loaded; with
    ``data.feature_cache`` their cached features ``[N, T, C]`` instead (``lavis.data.cache_features``)."""
    input_ids: torch.Tensor
    labels: torch.Tensor


class ConversationDataset(torch.utils.data.Dataset):
    """Indexable by ``(index, seed)``; ``load_media=False`` skips decoding (the last stage needs only labels)."""

    def __init__(
        self,
        records: Sequence[Record],
        tpl: ChatTemplate,
        data: DataConfig,
        image_size: int,
        *,
        train: bool = True,
        load_media: bool = True,
        label_mode: LabelMode = "mpp",
    ) -> None:
        self.records = records
        self.tpl = tpl
        self.data = data
        self.image_size = image_size
        self.load_media = load_media
        self.label_mode: LabelMode = label_mode
        t = data.transform
        kind = t.kind if train else "eval"
        self.transform = media.image_transform(kind, image_size, min_scale=t.min_scale, hflip=t.hflip and train)
        self._lengths: dict[int, int] = {}
        self.features = None
        """``data.feature_cache`` opened (stage 0 reads features instead of pixels; the weights are checked where
        the model is built, ``lavis.pipeline.layers.VisionEmbedPipe``)."""
        if data.feature_cache is not None and load_media:
            self.features = FeatureCache.open(data.feature_cache)
            self.features.check_transform_of(image_size, data)

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, index: int) -> Encoded:
        """Ids and labels after ``data.length_policy``; :class:`SampleError` names ``file:index`` and the id."""
        r = self.records[index]
        try:
            check_text_size(r, self.data.max_txt_len)
            enc = encode_conversation(r.conversations, self.tpl, record_id=r.id, label_mode=self.label_mode)
            return fit_length(enc, self.data.max_txt_len, self.tpl.placeholder_id, r.id, self.data.length_policy)
        except SampleError as e:
            raise type(e)(f"{r.where}: {e}") from e

    def num_tokens(self, index: int) -> int:
        """Token count after the length policy (cached; tokenisation only). A sample that cannot be encoded
        counts as 0 (it is reported when fetched)."""
        if index not in self._lengths:
            try:
                self._lengths[index] = len(self.encode(index).input_ids)
            except SampleError:
                self._lengths[index] = 0
        return self._lengths[index]

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        r = self.records[index]
        enc = self.encode(index)
        if self.load_media and enc.num_media:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    pixels = self._load_media(r, seed)
                except media.MediaError as e:
                    raise media.MediaError(f"{r.where} (id {r.id}): {e}") from e
        elif self.features is not None:
            pixels = self.features.empty()
        else:
            pixels = torch.zeros(0, 3, self.image_size, self.image_size)
        if self.load_media and pixels.shape[0] != enc.num_media:
            raise SampleError(f"{r.where} (id {r.id}): {pixels.shape[0]} images decoded (or cached frames read), "
                              f"{enc.num_media} expected")
        return Sample(r.id, pixels, torch.tensor(enc.input_ids), torch.tensor(enc.labels))

    def _load_media(self, r: Record, seed: int) -> torch.Tensor:
        # A record holds images (in marker order) or one video (load_records enforces it).
        if self.features is not None:
            files = [*r.images, *([r.video] if r.video is not None else [])]
            return torch.cat([self.features.get(p, seed) for p in files])
        tensors = [self.transform(load_record_image(p)).unsqueeze(0) for p in r.images]
        if r.video is not None:
            frames = media.load_video_frames(r.video, self.tpl.num_video_frames, fps=self.data.video_fps)
            tensors.append(media.video_to_tensor(frames, self.transform, same_augment=self.data.video_same_augment))
        return torch.cat(tensors)


def _epoch_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> list[int]:
    """One epoch of global indices over concatenated datasets: ``round(weight x size)`` draws per dataset."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order: list[int] = []
    offset = 0
    for size, w in zip(sizes, weights):
        want = max(1, round(w * size))
        picks: list[int] = []
        while len(picks) < want:
            picks.extend(torch.randperm(size, generator=g).tolist())
        order.extend(offset + i for i in picks[:want])
        offset += size
    perm = torch.randperm(len(order), generator=g).tolist()
    return [order[i] for i in perm]


Key = tuple[int, int]
"""``(record index, augmentation seed)``."""


class StepSampler:
    """Micro-batches of ``(index, seed)`` keys for this data-parallel rank, starting at optimizer step ``start_step``.

    Global sample position ``p = step * G + micro * (m * D) + dp_rank * m + t`` with G = m x GAS x D; the
    position fixes both the record (through a seeded per-epoch permutation) and the augmentation seed. With
    ``length_of`` (record index -> token count) the step's G samples are sorted by length (longest first, ties by
    position) and cut into micro-batches of similar length; see the module docstring.
    """

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        *,
        seed: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_size: int,
        start_step: int = 0,
        length_of: Callable[[int], int] | None = None,
    ) -> None:
        self.sizes, self.weights, self.seed = sizes, weights, seed
        self.m, self.gas, self.dp_rank, self.dp_size = micro_batch_size, grad_accum_steps, dp_rank, dp_size
        self.start_step = start_step
        self.length_of = length_of
        self.epoch_len = len(_epoch_order(sizes, weights, seed, 0))
        self._cache: dict[int, list[int]] = {}

    def index_at(self, position: int) -> int:
        epoch, pos = divmod(position, self.epoch_len)
        if epoch not in self._cache:
            self._cache = {epoch: _epoch_order(self.sizes, self.weights, self.seed, epoch)}
        return self._cache[epoch][pos]

    def positions(self, step: int, micro: int, dp_rank: int) -> range:
        start = step * self.m * self.gas * self.dp_size + micro * self.m * self.dp_size + dp_rank * self.m
        return range(start, start + self.m)

    def step_keys(self, step: int) -> list[list[list[Key]]]:
        """Keys of optimizer step ``step`` as ``[micro][dp_rank][slot]``."""
        keys = [[[(self.index_at(p), self.seed * 1_000_003 + p) for p in self.positions(step, mb, r)]
                 for r in range(self.dp_size)] for mb in range(self.gas)]
        length_of = self.length_of
        if length_of is None:
            return keys
        flat = [k for mb in keys for rank in mb for k in rank]
        flat.sort(key=lambda k: (-length_of(k[0]), k[1]))
        chunks = [flat[c * self.m:(c + 1) * self.m] for c in range(self.gas * self.dp_size)]
        return [[chunks[mb * self.dp_size + r] for r in range(self.dp_size)] for mb in range(self.gas)]

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.start_step
        while True:
            for mb in self.step_keys(step):
                yield mb[self.dp_rank]
            step += 1
