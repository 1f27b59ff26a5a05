"""Meta's LLaMA release (+ an optional Vicuna delta) -> a transformers LLaMA directory, streaming, in one command.

    python -m lavis.weights.prepare_llama --meta-dir DIR [--delta DELTA_DIR] --out cache/ckpt/vicuna-13b-v0 \
        [--dtype fp16|bf16|fp32]

Input: ``params.json``, one or several ``consolidated.XX.pth`` model-parallel shards, optional ``checklist.chk``
(``<md5>  <file>`` lines, verified first) and ``tokenizer.model`` (in DIR or its parent, as Meta ships it, or
``--tokenizer``). Shards are merged as Meta's model-parallel code split them: column-parallel weights (``wq``,
``wk``, ``wv``, ``w1``, ``w3``, ``output``) on dim 0, row-parallel ones (``wo``, ``w2``) and ``tok_embeddings`` on
dim 1, norms replicated (shard 0's taken). ``wq``/``wk`` rows are permuted into transformers' rotary layout (rotate
half instead of interleaved pairs). ``rope.freqs`` is not copied (transformers recomputes it from ``rope_theta``).

Delta (FastChat's ``apply_delta``, v0 or v1.1; transformers names, ``.bin`` or safetensors shards): every output
tensor is base + delta, added in fp32 and then cast. A delta with more vocabulary rows (v0: 32001, its ``[PAD]``) gets
the base's embedding and head resized with zero rows first, as FastChat does, so those rows equal the delta's.
Every tensor's presence and shape is checked from headers before anything is written.

Memory: output shards are one decoder layer each (plus one for the embedding, one for norm + head). For each output
shard every Meta shard is opened memory-mapped in turn (``torch.load(mmap=True, weights_only=True)``), its pieces
copied into the layer's buffers (in the output dtype when that is exact), and closed; then each delta tensor is
read by name and added a block of rows at a time. So the host holds about one layer plus one delta tensor and one
mapped shard's touched pages, not the model.

Resumable: each shard is written to a temporary name and renamed; ``.prepare_state.json`` records the inputs'
fingerprint, the verified checksums and the finished shards, which a rerun skips.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from lavis.weights.llm import LLMFiles, _ignore_reason, read_planned, scan_llm_dir

Shape = tuple[int, ...]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_FILE = ".prepare_state.json"
INDEX_FILE = "model.safetensors.index.json"
PAD_TOKEN = "[PAD]"  # FastChat's DEFAULT_PAD_TOKEN for the v0 delta's extra row
IGNORED_META = {"rope.freqs": "rotary frequencies; transformers recomputes them from rope_theta"}

# Meta name (without "layers.N.") -> (transformers name, how model-parallel shards split it)
LAYER_MAP: dict[str, tuple[str, str]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "col"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "col"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "col"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "row"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "col"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "row"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "col"),
    "attention_norm.weight": ("input_layernorm.weight", "rep"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "rep"),
}
TOP_MAP: dict[str, tuple[str, str]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "row"),  # ParallelEmbedding splits the embedding dim
    "norm.weight": ("model.norm.weight", "rep"),
    "output.weight": ("lm_head.weight", "col"),
}
RESIZABLE = ("model.embed_tokens.weight", "lm_head.weight")


class PrepareError(ValueError):
    """Bad input: the message names the file / tensor and what to do."""


# --- Meta's layout -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetaParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    multiple_of: int
    ffn_dim_multiplier: float | None
    vocab_size: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def ffn_dim(self) -> int:
        """LLaMA's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def read_json(path: Path, fix: str) -> Any:
    """A JSON file's content; a damaged one is a :class:`PrepareError` naming the file, the position and ``fix``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not valid JSON ({e}); {fix}") from None


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    obj = read_json(path, fix)
    if not isinstance(obj, dict):
        raise PrepareError(f"{path}: a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


DELTA_FIX = "download the delta directory again (FastChat's release)"


def read_params(meta_dir: Path) -> MetaParams:
    path = meta_dir / "params.json"
    if not path.is_file():
        raise PrepareError(f"{path} not found: --meta-dir must be the folder with params.json and consolidated.*.pth")
    raw = read_json_object(path, "download it again from Meta (it ships beside consolidated.*.pth)")
    missing = [k for k in ("dim", "n_layers", "n_heads", "norm_eps") if k not in raw]
    if missing:
        raise PrepareError(f"{path}: missing {missing}; is this Meta's params.json?")
    n_heads = int(raw["n_heads"])
    return MetaParams(
        dim=int(raw["dim"]), n_layers=int(raw["n_layers"]), n_heads=n_heads,
        n_kv_heads=int(raw.get("n_kv_heads") or n_heads), norm_eps=float(raw["norm_eps"]),
        multiple_of=int(raw.get("multiple_of", 256)),
        ffn_dim_multiplier=None if raw.get("ffn_dim_multiplier") is None else float(raw["ffn_dim_multiplier"]),
        vocab_size=int(raw.get("vocab_size", -1)), rope_theta=float(raw.get("rope_theta", 10000.0)))


def meta_shards(meta_dir: Path) -> list[Path]:
    shards = sorted(meta_dir.glob("consolidated.*.pth"))
    if not shards:
        raise PrepareError(f"{meta_dir}: no consolidated.*.pth files (Meta's checkpoint shards)")
    names = [p.name for p in shards]
    want = [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if names != want:
        raise PrepareError(f"{meta_dir}: shards {names}, expected {want} (a shard missing or misnamed?)")
    return shards


@contextmanager
def open_meta_shard(path: Path) -> Iterator[dict[str, torch.Tensor]]:
    """A Meta shard memory-mapped (data read only when touched), released on exit."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise PrepareError(f"{path}: cannot be read as a torch checkpoint ({e}); truncated download?") from e
    if not isinstance(obj, dict):
        raise PrepareError(f"{path}: a {type(obj).__name__}, not a state dict")
    try:
        yield obj
    finally:
        obj.clear()
        del obj


def meta_key_map(params: MetaParams) -> dict[str, tuple[str, str]]:
    """Every Meta tensor name -> (transformers name, split kind)."""
    out = dict(TOP_MAP)
    for i in range(params.n_layers):
        out |= {f"layers.{i}.{k}": (f"model.layers.{i}.{hf}", kind) for k, (hf, kind) in LAYER_MAP.items()}
    return out


def merged_shape(name: str, kind: str, shapes: list[Shape], paths: list[Path]) -> Shape:
    """The merged shape of one tensor from its per-shard shapes (checked against the split rule)."""
    first = shapes[0]
    if kind == "rep" or len(shapes) == 1:
        for s, p in zip(shapes, paths):
            if s != first:
                raise PrepareError(f"{p}: {name} has shape {list(s)} but {paths[0].name} has {list(first)}")
        return first
    axis = 0 if kind == "col" else 1
    for s, p in zip(shapes, paths):
        other = [d for j, d in enumerate(s) if j != axis]
        if len(s) != 2 or other != [d for j, d in enumerate(first) if j != axis]:
            raise PrepareError(f"{p}: {name} has shape {list(s)}, not a dim-{axis} split of {list(first)}")
    total = sum(s[axis] for s in shapes)
    return (total, first[1]) if axis == 0 else (first[0], total)


def scan_meta(params: MetaParams, shards: list[Path]) -> dict[str, Shape]:
    """Transformers name -> merged shape, after checking every shard holds exactly Meta's names."""
    names = meta_key_map(params)
    per_shard: list[dict[str, Shape]] = []
    for p in shards:
        with open_meta_shard(p) as sd:
            per_shard.append({k: tuple(v.shape) for k, v in sd.items()})
    for p, shapes in zip(shards, per_shard):
        missing = sorted(set(names) - set(shapes))
        extra = sorted(set(shapes) - set(names) - set(IGNORED_META))
        if missing:
            raise PrepareError(f"{p}: missing {missing[:5]} (params.json says {params.n_layers} layers)")
        if extra:
            raise PrepareError(f"{p}: unexpected tensors {extra[:5]}; not a LLaMA checkpoint for this params.json?")
    out: dict[str, Shape] = {}
    for meta, (hf, kind) in names.items():
        out[hf] = merged_shape(meta, kind, [s[meta] for s in per_shard], shards)
    d, kv = params.dim, params.head_dim * params.n_kv_heads
    expect = {"model.layers.0.self_attn.q_proj.weight": (d, d), "model.layers.0.self_attn.k_proj.weight": (kv, d),
              "model.layers.0.mlp.gate_proj.weight": (params.ffn_dim(), d)}
    for hf, shape in expect.items():
        if out[hf] != shape:
            raise PrepareError(f"{shards[0].parent}: merged {hf} is {list(out[hf])} but params.json implies "
                               f"{list(shape)} (dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier)")
    vocab = out["model.embed_tokens.weight"][0]
    if params.vocab_size > 0 and params.vocab_size != vocab:
        raise PrepareError(f"params.json vocab_size {params.vocab_size} but tok_embeddings has {vocab} rows")
    return out


def permute_rotary(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> transformers' rotate-half order (as convert_llama_weights_to_hf)."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


# --- checksums -----------------------------------------------------------------------------------------------------

def file_md5(path: Path, bar: tqdm) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_checklist(meta_dir: Path, verified: dict[str, list[int]]) -> dict[str, list[int]]:
    """Check ``checklist.chk`` md5 sums; ``verified`` maps file -> [size, mtime_ns] already checked (skipped)."""
    chk = meta_dir / "checklist.chk"
    if not chk.is_file():
        print(f"no {chk.name} in {meta_dir}: checksums not verified", file=sys.stderr)
        return verified
    entries: list[tuple[str, str]] = []
    for n, line in enumerate(chk.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(\S.*)", line.strip())
        if m is None:
            raise PrepareError(f"{chk}:{n}: not an '<md5>  <file>' line: {line!r}")
        entries.append((m.group(1).lower(), m.group(2)))
    todo = []
    for md5, name in entries:
        p = meta_dir / name
        if not p.is_file():
            raise PrepareError(f"{chk} lists {name} but {p} is missing (incomplete download?)")
        st = p.stat()
        if verified.get(name) != [st.st_size, st.st_mtime_ns]:
            todo.append((md5, name, p, st))
    with tqdm(total=sum(st.st_size for *_, st in todo), unit="B", unit_scale=True, desc="md5",
              disable=not todo) as bar:
        for md5, name, p, st in todo:
            got = file_md5(p, bar)
            if got != md5:
                raise PrepareError(f"{p}: md5 {got} but {chk.name} says {md5}: the file is corrupt or incomplete; "
                                   "download it again")
            verified[name] = [st.st_size, st.st_mtime_ns]
    return verified


# --- delta -----------------------------------------------------------------------------------------------------------

def scan_delta(delta: Path, base: dict[str, Shape]) -> tuple[LLMFiles, dict[str, Shape]]:
    """The delta's index and the target shapes (base, with embedding/head rows grown to the delta's vocabulary)."""
    files = scan_llm_dir(delta)
    ignored = {k for k in files.shapes if _ignore_reason(k) is not None}
    if ignored:
        print(f"delta: {len(ignored)} rotary inv_freq buffers ignored (recomputed from the config)", file=sys.stderr)
    keys = set(files.shapes) - ignored
    missing, extra = sorted(set(base) - keys), sorted(keys - set(base))
    if missing:
        raise PrepareError(f"delta {delta} has no tensor {missing[0]} ({len(missing)} missing); "
                           "is it a delta for this LLaMA size?")
    if extra:
        raise PrepareError(f"delta {delta} has tensor {extra[0]} that the base model lacks ({len(extra)} extra)")
    target = dict(base)
    for k, b in base.items():
        d = files.shapes[k]
        grows = k in RESIZABLE and len(d) == 2 and d[1] == b[1] and d[0] >= b[0]
        if d != b and not grows:
            raise PrepareError(f"delta tensor {k} has shape {list(d)} but the base has {list(b)}: "
                               "a delta for another model size or version?")
        target[k] = d
    rows = {target[k][0] for k in RESIZABLE}
    if len(rows) != 1:
        raise PrepareError(f"delta {delta}: embed_tokens and lm_head have different vocabularies {sorted(rows)}")
    return files, target


# --- output ----------------------------------------------------------------------------------------------------------

def output_groups(params: MetaParams) -> list[list[str]]:
    """Transformers names per output shard: embedding, each layer, norm + head."""
    groups = [["model.embed_tokens.weight"]]
    for i in range(params.n_layers):
        groups.append([f"model.layers.{i}.{hf}" for hf, _ in LAYER_MAP.values()])
    groups.append(["model.norm.weight", "lm_head.weight"])
    return groups


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def hf_config(params: MetaParams, vocab: int, intermediate: int, dtype: str, max_pos: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": params.dim,
        "intermediate_size": intermediate, "num_hidden_layers": params.n_layers,
        "num_attention_heads": params.n_heads, "num_key_value_heads": params.n_kv_heads, "head_dim": params.head_dim,
        "rms_norm_eps": params.norm_eps, "rope_theta": params.rope_theta, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "hidden_act": "silu", "initializer_range": 0.02,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype],
    }


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One output shard, written under a temporary name and renamed (a killed run leaves no half shard)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS between shards: glibc keeps freed blocks of a few MB (one layer's
    tensors) in the heap, which would otherwise add up to several layers of RSS. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


@dataclass
class Plan:
    params: MetaParams
    shards: list[Path]
    base: dict[str, Shape]
    target: dict[str, Shape]
    delta: LLMFiles | None
    dtype: torch.dtype
    groups: list[list[str]] = field(default_factory=list)


def build_group(plan: Plan, keys: list[str]) -> dict[str, torch.Tensor]:
    """The output tensors of one shard: pieces from each Meta shard (one mapped at a time), merged, permuted,
    plus the delta."""
    hf_to_meta = {hf: (meta, kind) for meta, (hf, kind) in meta_key_map(plan.params).items()}
    buf: dict[str, torch.Tensor] = {}
    offset = dict.fromkeys(keys, 0)
    for si, path in enumerate(plan.shards):
        with open_meta_shard(path) as sd:
            for k in keys:
                meta, kind = hf_to_meta[k]
                piece = sd[meta]
                if k not in buf:
                    buf[k] = merge_buffer(plan.base[k], plan.target[k], piece.dtype, plan.dtype)
                rows = buf[k][: plan.base[k][0]]  # the base's rows (a grown embedding's extra rows stay zero)
                if kind == "rep" or len(plan.shards) == 1:
                    if si == 0:
                        rows.copy_(piece)
                    continue
                axis = 0 if kind == "col" else 1
                n = piece.shape[axis]
                rows.narrow(axis, offset[k], n).copy_(piece)
                offset[k] += n
    p = plan.params
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        t = buf.pop(k)
        if k.endswith("self_attn.q_proj.weight"):
            t = permute_rotary(t, p.n_heads, p.dim, p.dim)
        elif k.endswith("self_attn.k_proj.weight"):
            t = permute_rotary(t, p.n_kv_heads, p.head_dim * p.n_kv_heads, p.dim)
        out[k] = add_delta(t, None if plan.delta is None else read_delta(plan.delta, k), plan.dtype)
        del t
    return out


def read_delta(files: LLMFiles, key: str) -> torch.Tensor:
    """One delta tensor (by name from safetensors; from a memory-mapped .bin shard, released after the caller)."""
    got: list[torch.Tensor] = []
    read_planned(files, {key: (key, None)}, lambda _name, t: got.append(t))
    return got[0]


def merge_buffer(base: Shape, target: Shape, src: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """Where a tensor's shard pieces are merged: directly in the output dtype and shape (extra rows zero) when that
    holds the source values exactly (same dtype, or fp32 out), so the delta can be added in place; otherwise in the
    source dtype and shape (the delta is then added in fp32 from the source values)."""
    if dtype == src or dtype == torch.float32:
        return torch.zeros(target, dtype=dtype) if target != base else torch.empty(target, dtype=dtype)
    return torch.empty(base, dtype=src)


def add_delta(base: torch.Tensor, delta: torch.Tensor | None, dtype: torch.dtype,
              chunk_elems: int = 1 << 22) -> torch.Tensor:
    """base + delta in fp32, cast to ``dtype``, a block of rows at a time (no fp32 copy of a whole embedding);
    in place when ``base`` already has the delta's shape and ``dtype``.

    Rows the delta has beyond the base (v0's ``[PAD]``) are the delta's: the base is resized with zero rows."""
    if delta is None:
        return base.to(dtype).contiguous()
    in_place = base.shape == delta.shape and base.dtype == dtype and base.is_contiguous()
    out = base if in_place else torch.empty(delta.shape, dtype=dtype)
    n_base = base.shape[0]
    step = max(1, chunk_elems // max(1, delta[0].numel()))
    for a in range(0, delta.shape[0], step):
        b = min(a + step, delta.shape[0])
        r = delta[a:b].to(torch.float32, copy=True)
        if a < n_base:
            r[: min(b, n_base) - a] += base[a:min(b, n_base)].float()
        out[a:b] = r
    return out


def tokenizer_source(meta_dir: Path, tokenizer: Path | None, delta: Path | None) -> Path:
    if delta is not None and (delta / "tokenizer.model").is_file():
        return delta / "tokenizer.model"  # FastChat saves the delta's tokenizer with the result
    for p in ([tokenizer] if tokenizer else []) + [meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model"]:
        if p.is_file():
            return p
    raise PrepareError(f"no tokenizer.model in {meta_dir} or {meta_dir.parent}; pass --tokenizer PATH "
                       "(Meta ships it beside the size folders)")


def tokenizer_added(src: Path, delta: Path | None, vocab: int) -> tuple[int, dict[str, int]]:
    """The SentencePiece model's piece count and the added tokens (the delta's ``added_tokens.json``, or ``[PAD]``
    for exactly one extra embedding row), checked against the model's vocabulary before any shard is written."""
    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_file=str(src)).get_piece_size()
    except (RuntimeError, OSError) as e:  # sentencepiece: "Internal: ... ParseFromArray" for a damaged model
        raise PrepareError(f"{src}: not a SentencePiece tokenizer.model ({str(e).strip()}); use the tokenizer.model "
                           "Meta ships beside the size folders (or pass --tokenizer PATH)") from None
    if pieces > vocab:
        raise PrepareError(f"{src} has {pieces} pieces but the model has {vocab} embedding rows: wrong tokenizer?")
    added: dict[str, int] = {}
    if delta is not None and (delta / "added_tokens.json").is_file():
        added_raw = read_json(delta / "added_tokens.json", DELTA_FIX)
        if not isinstance(added_raw, dict) or not all(isinstance(v, int) for v in added_raw.values()):
            raise PrepareError(f"{delta / 'added_tokens.json'}: not a {{token: id}} object; {DELTA_FIX}")
        added = {str(k): int(v) for k, v in added_raw.items()}
        bad = {k: v for k, v in added.items() if not pieces <= v < vocab}
        if bad:
            raise PrepareError(f"{delta / 'added_tokens.json'}: ids {bad} outside {pieces}..{vocab - 1} "
                               f"(tokenizer pieces .. embedding rows)")
    elif vocab == pieces + 1:
        added = {PAD_TOKEN: pieces}
    return pieces, added


def delta_tokenizer_json(delta: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The delta's ``special_tokens_map.json`` and ``tokenizer_config.json`` ({} where absent)."""
    found = [delta / n if delta is not None else None for n in ("special_tokens_map.json", "tokenizer_config.json")]
    specials, cfg = (read_json_object(p, DELTA_FIX) if p is not None and p.is_file() else {} for p in found)
    return specials, cfg


def write_tokenizer(out: Path, src: Path, delta: Path | None, vocab: int, max_pos: int) -> None:
    """tokenizer.model, added_tokens.json, tokenizer_config.json with today's class name ``LlamaTokenizer``,
    special_tokens_map.json."""
    pieces, added = tokenizer_added(src, delta, vocab)
    shutil.copyfile(src, out / "tokenizer.model")
    if added:
        atomic_write_text(out / "added_tokens.json", json.dumps(added))
    elif vocab > pieces:
        print(f"note: {vocab - pieces} embedding rows have no token (ids {pieces}..{vocab - 1})", file=sys.stderr)
    specials: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if PAD_TOKEN in added:
        specials["pad_token"] = PAD_TOKEN
    delta_specials, cfg = delta_tokenizer_json(delta)
    specials |= delta_specials  # the delta's own entries win
    cfg.update({"tokenizer_class": "LlamaTokenizer", "add_bos_token": cfg.get("add_bos_token", True),
                "add_eos_token": cfg.get("add_eos_token", False), "model_max_length": max_pos,
                "clean_up_tokenization_spaces": False, "legacy": cfg.get("legacy", True), **specials})
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2))
    atomic_write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2))


def fingerprint(meta_dir: Path, shards: list[Path], delta: Path | None, dtype: str) -> dict[str, Any]:
    files = [meta_dir / "params.json", *shards]
    if delta is not None:
        files += sorted(p for p in delta.iterdir() if p.is_file())
    return {"dtype": dtype, "delta": None if delta is None else str(delta.resolve()),
            "files": {str(p.resolve()): p.stat().st_size for p in files}}


def prepare(meta_dir: str | Path, out: str | Path, delta: str | Path | None = None, dtype: str = "fp16",
            tokenizer: str | Path | None = None, max_position_embeddings: int = 2048) -> Path:
    meta, out_dir = Path(meta_dir), Path(out)
    delta_dir = None if delta is None else Path(delta)
    if dtype not in DTYPES:
        raise PrepareError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    params = read_params(meta)
    shards = meta_shards(meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    fp = fingerprint(meta, shards, delta_dir, dtype)
    state: dict[str, Any] = {"inputs": fp, "verified": {}, "done": []}
    if state_path.is_file():
        old = read_json_object(state_path, f"delete {state_path} (the shards are then rewritten)")
        if old.get("inputs") == fp:
            state = old
        elif old.get("done"):
            raise PrepareError(f"{out_dir} holds shards of a run from other inputs or --dtype ({state_path}); "
                               "use another --out or empty it")

    def save_state() -> None:
        atomic_write_text(state_path, json.dumps(state, indent=1))

    state["verified"] = verify_checklist(meta, state["verified"])
    save_state()
    tok_src = tokenizer_source(meta, None if tokenizer is None else Path(tokenizer), delta_dir)
    base = scan_meta(params, shards)
    print("rope.freqs ignored: transformers recomputes the rotary frequencies from rope_theta", file=sys.stderr)
    files, target = scan_delta(delta_dir, base) if delta_dir is not None else (None, base)
    tokenizer_added(tok_src, delta_dir, target["model.embed_tokens.weight"][0])  # fail now, not after the shards
    delta_tokenizer_json(delta_dir)
    plan = Plan(params, shards, base, target, files, DTYPES[dtype], output_groups(params))
    n = len(plan.groups)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    itemsize = torch.empty(0, dtype=plan.dtype).element_size()
    done = set(state["done"])
    with tqdm(total=n, unit="shard", desc=f"writing {out_dir.name}") as bar:
        for i, keys in enumerate(plan.groups):
            name = shard_name(i, n)
            weight_map |= dict.fromkeys(keys, name)
            total_bytes += sum(itemsize * torch.Size(target[k]).numel() for k in keys)
            if name in done and (out_dir / name).is_file():
                bar.update(1)
                continue
            write_shard(build_group(plan, keys), out_dir / name)
            release_freed_memory()
            state["done"] = sorted(set(state["done"]) | {name})
            save_state()
            bar.update(1)
    vocab = target["model.embed_tokens.weight"][0]
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=1))
    intermediate = target["model.layers.0.mlp.gate_proj.weight"][0]
    config = hf_config(params, vocab, intermediate, dtype, max_position_embeddings)
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2))
    gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))
    write_tokenizer(out_dir, tok_src, delta_dir, vocab, max_position_embeddings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"wrote {out_dir}: {n} shards, {total_bytes / 2**30:.2f} GiB of weights ({dtype}); "
          f"peak host RSS {peak / 2**30:.2f} GiB", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lavis.weights.prepare_llama",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--meta-dir", required=True, help="Meta's folder: params.json, consolidated.XX.pth, checklist.chk")
    ap.add_argument("--delta", help="Vicuna delta directory (transformers layout), e.g. vicuna-13b-delta-v0")
    ap.add_argument("--out", required=True, help="output directory, e.g. cache/ckpt/vicuna-13b-v0")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="output dtype (default fp16)")
    ap.add_argument("--tokenizer", help="tokenizer.model when it is not in --meta-dir or its parent")
    ap.add_argument("--max-position-embeddings", type=int, default=2048,
                    help="context length for config.json (LLaMA-1 / Vicuna v0: 2048; LLaMA-2: 4096)")
    a = ap.parse_args(argv)
    try:
        prepare(a.meta_dir, a.out, a.delta, a.dtype, a.tokenizer, a.max_position_embeddings)
    except (ValueError, FileNotFoundError) as e:  # PrepareError and the delta reader's errors name the file
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
