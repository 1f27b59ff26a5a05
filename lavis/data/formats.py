"""Dataset formats -> the canonical record (``lavis.data.datasets``): one reader per file layout, one converter per
record layout. Each name of ``data.train[].format`` (the schema's ``DatasetFormat``) is one :data:`FORMATS` entry.

- ``canonical`` (DATA.md): a JSON list or JSONL of ``{"id", "images" | "video", "conversations"}``.
- ``mpp`` (MPP-Qwen / MiniGPT4Qwen JSON, also its LLaVA-558k / LLaVA-Instruct / VideoChatGPT-100k conversions):
  ``{"image": "a.jpg" | "video": "v.mp4", "instruction": str | [str, ...], "output": str | [str, ...]}`` with the
  image marker ``<Img><ImageHere></Img>`` in the instruction; list-valued fields are turns of one conversation. A bare
  ``<ImageHere>`` is one image too (MPP-Qwen replaces every ``<ImageHere>``, wrapped or not).
- ``llava`` (LLaVA-Instruct-150k, LLaVA-Pretrain ``blip_laion_cc_sbu_558k.json``, Video-ChatGPT's training file):
  ``{"id", "image" | "video", "conversations": [{"from": "human" | "gpt", "value": "<image>\\n..."}]}``. With
  ``image_first`` (default for ``llava``/``llava_pretrain``) every turn's ``<image>`` markers move to its front,
  followed by a newline, as LLaVA's preprocessing does. A ``video`` naming a feature file (Video-ChatGPT's
  ``v_xxx.pkl``) is resolved to the clip ``<vis_root>/v_xxx.<ext>`` (first of ``video_extensions`` that exists).
- ``llava_pretrain``: the ``llava`` layout checked to be one image and one human/gpt exchange.
- ``videochatgpt``: Video-ChatGPT in any of its three layouts: MPP-Qwen-Next's conversion (the ``mpp`` layout with a
  ``video``), Video-ChatGPT's training file (the ``llava`` layout with ``video``) or its raw instruction file
  ``{"video_id", "q", "a"}``. Raw records become the training layout as Video-ChatGPT's own converter writes it: the
  ``<video>`` marker after the question in even records and before it in odd ones; the clip is
  ``<vis_root>/<video_id>.<ext>``.
- ``minigpt4_captions``: MiniGPT-4's cc_sbu_align ``filter_cap.json``, ``{"annotations": [{"image_id", "caption"}]}``,
  images ``<vis_root>/<image_id>.jpg``; the question is one of MiniGPT-4's four stage-2 alignment prompts, chosen
  per record from a hash of the image id (MiniGPT-4 draws one at random per batch).
- ``sharegpt``: ShareGPT-style records as LLaMA-Factory reads them (``formatting: sharegpt``):
  ``{"messages": [{"role": "system" | "user" | "assistant", "content": "<image>..."}], "images": [...],
  "videos": [...]}`` (its ``mllm_demo.json`` layout), or ShareGPT's own ``{"conversations": [{"from": "human" | "gpt"
  | "system", "value": ...}]}``; an optional top-level ``system`` string is the system turn. ``<image>`` / ``<video>``
  markers stay where they are written (no reordering). A system turn is kept as the first turn (the VLM family's chat
  template renders it; the BLIP-2 family's templates refuse it, naming the record). Tool turns
  (``function_call`` / ``observation`` / ``tool``) are refused; at most one video, and not together with images.
- ``webdataset``: tar shards of ``<key>.jpg|jpeg|png|webp`` + ``<key>.txt`` or ``<key>.json`` (``caption``), as
  MiniGPT-4 stage 1 (CC/SBU/LAION via img2dataset) uses; ``ann_path`` is a shard, a directory of shards, or a brace
  pattern (``shards/{00000..00099}.tar``). An index of (shard, member) is built once when the dataset is read, so
  the sampler stays a pure function of the step; each sample is the image alone as the question (MiniGPT-4's stage 1
  has no prompt) and the caption as the answer.

Errors name the record (``file:index``, with its id when it has one) and what is wrong; nothing is skipped silently.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER

if TYPE_CHECKING:
    from lavis.config.schema import DatasetConfig

MPP_IMAGE = "<Img><ImageHere></Img>"
MPP_BARE_IMAGE = "<ImageHere>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}
MINIGPT4_ALIGN_PROMPTS = (
    "<image> Describe this image in detail.",
    "<image> Take a look at this image and describe what you notice.",
    "<image> Please provide a detailed description of the picture.",
    "<image> Could you describe the contents of this image for me?",
)
"""MiniGPT-4's stage-2 prompt list (its ``<Img><ImageHere></Img>`` written as our ``<image>`` marker)."""
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TarMember:
    """An image stored inside a tar shard: read by one seek from the index built at load time."""

    shard: Path
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


def record_id(r: Any) -> str | None:
    """The id a raw record carries under any format's key, or None."""
    if isinstance(r, dict):
        for key in ("id", "video_id", "image_id", "__key__"):
            if r.get(key) is not None:
                return str(r[key])
    return None


# --- readers: file(s) -> (where, raw record) ------------------------------------------------------------------------


def read_annotation_text(path: Path) -> str:
    """An annotation file's text; errors name the file (missing, a directory, not UTF-8)."""
    if path.is_dir():
        raise ValueError(f"annotation file {path} is a directory (data.train[].ann_path must name a file)")
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found (data.train[].ann_path); see DATA.md")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); annotation "
                         f"files must be UTF-8 JSON or JSONL (re-save the file as UTF-8)") from e


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, raw record)`` pairs of a JSON list (``file:index``) or JSONL file (``file:line``, 1-based)."""
    text = read_annotation_text(path)
    if path.suffix == ".jsonl":
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from e
        return raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path}:{i}", r) for i, r in enumerate(data)]


def read_minigpt4_captions(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(read_annotation_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected MiniGPT-4's {{\"annotations\": [{{\"image_id\", \"caption\"}}, ...]}} "
                         "(filter_cap.json)")
    return [(f"{path}:{i}", r) for i, r in enumerate(anns)]


def shard_paths(spec: str) -> list[Path]:
    """Shards named by ``data.train[].ann_path``: one tar, a directory of ``*.tar``, or a brace pattern."""
    from braceexpand import braceexpand

    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        shards = [Path(p) for p in braceexpand(spec)]
    if not shards:
        raise FileNotFoundError(f"{spec}: no .tar shards (data.train[].ann_path for format webdataset)")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shard(s) not found: {', '.join(missing[:3])}"
                                + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's naming: the key is the member path up to the first dot of its file name."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


def index_shard(shard: Path) -> list[tuple[str, Any]]:
    """One raw record per sample key of an uncompressed tar shard: ``{"__key__", "image": TarMember | None,
    "caption": str | None}``; caption text is read now, image bytes only when the sample is fetched."""
    try:
        tar = tarfile.open(shard, "r:")
    except tarfile.TarError as e:
        raise ValueError(f"{shard}: not an uncompressed tar shard ({e}); webdataset shards must be plain .tar") from e
    groups: dict[str, dict[str, Any]] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_key(member.name)
            g = groups.setdefault(key, {"__key__": key, "image": None, "caption": None})
            if ext in WDS_IMAGE_EXTS and g["image"] is None:
                g["image"] = TarMember(shard, member.name, member.offset_data, member.size)
            elif ext == "txt":
                g["caption"] = _read_member(tar, member).decode("utf-8")
            elif ext == "json" and g["caption"] is None:
                try:
                    meta = json.loads(_read_member(tar, member))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{shard}:{member.name}: invalid JSON ({e.msg})") from e
                g["caption"] = meta.get("caption") if isinstance(meta, dict) else None
    return [(f"{shard}:{key}", g) for key, g in groups.items()]


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # isfile() members always have data
    return f.read()


def read_webdataset(spec: str) -> list[tuple[str, Any]]:
    return [item for shard in shard_paths(spec) for item in index_shard(shard)]


# --- converters: raw record -> canonical dict -------------------------------------------------------------------------


def from_mpp(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    instr, out = r.get("instruction"), r.get("output")
    if isinstance(instr, str) and isinstance(out, str):
        instr, out = [instr], [out]
    if not (isinstance(instr, list) and isinstance(out, list) and instr and len(instr) == len(out)
            and all(isinstance(x, str) for x in instr + out)):
        raise ValueError(f"{where}: `instruction` and `output` must be strings or equal-length lists of strings")
    video = r.get("video")
    marker = VIDEO_MARKER if video is not None else IMAGE_MARKER
    conversations = []
    for q, a in zip(instr, out):
        q = q.replace(MPP_IMAGE, marker).replace(MPP_BARE_IMAGE, marker)
        conversations += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rec: dict[str, Any] = {"id": str(r.get("id", where)), "conversations": conversations}
    if video is not None:
        rec["video"] = video
    elif r.get("image") is not None:
        rec["images"] = r["image"] if isinstance(r["image"], list) else [r["image"]]
    return rec


def _image_first(text: str) -> str:
    """LLaVA's preprocessing: the ``<image>`` markers leave the text and go to its front, then a newline."""
    n = text.count(IMAGE_MARKER)
    if not n:
        return text
    return (IMAGE_MARKER * n + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def resolve_video(name: str, ds: DatasetConfig) -> str:
    """A video named by id or by a feature file (``v_xxx.pkl``) -> the clip ``<id>.<ext>`` under ``vis_root``: the
    first of ``video_extensions`` that exists (the first one if none does, so that the missing file is reported)."""
    exts = [e.lstrip(".").lower() for e in ds.video_extensions]
    path = Path(name)
    if path.suffix.lstrip(".").lower() in exts:
        return name
    stem = str(path.with_suffix("")) if path.suffix else name
    for ext in exts:
        if (Path(ds.vis_root) / f"{stem}.{ext}").is_file():
            return f"{stem}.{ext}"
    return f"{stem}.{exts[0]}"


def from_llava(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    convs = r.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{where}: `conversations` must be a non-empty list")
    first = ds.image_first if ds.image_first is not None else ds.format in ("llava", "llava_pretrain")
    out = []
    for i, turn in enumerate(convs):
        role = LLAVA_ROLES.get(str(turn.get("from"))) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {i} needs `from` in {sorted(LLAVA_ROLES)} and a string `value`")
        value = _image_first(turn["value"]) if first else turn["value"]
        out.append({"role": role, "content": value})
    rec: dict[str, Any] = {"id": str(r.get("id", where)), "conversations": out}
    if r.get("image") is not None:
        rec["images"] = r["image"] if isinstance(r["image"], list) else [r["image"]]
    if r.get("video") is not None:
        if not isinstance(r["video"], str):
            raise ValueError(f"{where}: `video` must be a path string (got {r['video']!r})")
        rec["video"] = resolve_video(r["video"], ds)
    return rec


def from_llava_pretrain(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    rec = from_llava(r, where, index, ds)
    roles = [t["role"] for t in rec["conversations"]]
    if roles != ["user", "assistant"] or len(rec.get("images", [])) != 1:
        raise ValueError(f"{where}: a LLaVA-Pretrain record has one `image` and one human/gpt exchange "
                         f"(got {len(rec.get('images', []))} image(s), turns {roles})")
    return rec


def from_videochatgpt(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    if "q" in r or "a" in r or ("video_id" in r and "video" not in r):  # Video-ChatGPT's raw instruction file
        vid, q, a = r.get("video_id"), r.get("q"), r.get("a")
        if not (isinstance(vid, str) and isinstance(q, str) and isinstance(a, str)):
            raise ValueError(f"{where}: a raw Video-ChatGPT record needs string `video_id`, `q` and `a`")
        query = f"{q}\n{VIDEO_MARKER}" if index % 2 == 0 else f"{VIDEO_MARKER}\n{q}"
        return {"id": vid, "video": resolve_video(vid, ds),
                "conversations": [{"role": "user", "content": query}, {"role": "assistant", "content": a}]}
    if not isinstance(r.get("video"), str):
        raise ValueError(f"{where}: a VideoChatGPT record needs a `video` path string (got {r.get('video')!r})")
    if "conversations" in r:  # Video-ChatGPT's training file (LLaVA layout)
        return from_llava(r, where, index, ds)
    return from_mpp(r, where, index, ds)


SHAREGPT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                  "system": "system"}
SHAREGPT_TOOL_ROLES = ("function_call", "observation", "tool", "function")


def _sharegpt_turns(r: dict[str, Any], where: str) -> list[dict[str, str]]:
    key, role_key, text_key = (("messages", "role", "content") if "messages" in r
                               else ("conversations", "from", "value"))
    turns = r.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: a sharegpt record needs a non-empty `messages` (role/content) or "
                         "`conversations` (from/value) list")
    out = [{"role": "system", "content": r["system"]}] if isinstance(r.get("system"), str) and r["system"] else []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if role in SHAREGPT_TOOL_ROLES:
            raise ValueError(f"{where}: turn {i} is a tool turn ({role_key} {role!r}); tool calls are not supported "
                             "for training yet, remove those records")
        if role not in SHAREGPT_ROLES or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{where}: turn {i} needs `{role_key}` in {sorted(SHAREGPT_ROLES)} and a string "
                             f"`{text_key}`")
        out.append({"role": SHAREGPT_ROLES[role], "content": turn[text_key]})
    return out


def _path_list(r: dict[str, Any], key: str, where: str) -> list[str]:
    value = r.get(key)
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{where}: `{key}` must be a list of path strings (got {r[key]!r})")
    return value


def from_sharegpt(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": str(r.get("id", where)), "conversations": _sharegpt_turns(r, where)}
    images, videos = _path_list(r, "images", where), _path_list(r, "videos", where)
    if len(videos) > 1 or (videos and images):
        raise ValueError(f"{where}: {len(images)} images and {len(videos)} videos; a record holds images or one video "
                         "(split the record)")
    if images:
        rec["images"] = images
    if videos:
        rec["video"] = videos[0]
    return rec


def from_minigpt4_captions(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    image_id, caption = r.get("image_id"), r.get("caption")
    if image_id is None or not isinstance(caption, str):
        raise ValueError(f"{where}: a filter_cap.json annotation needs `image_id` and a string `caption`")
    image_id = str(image_id)
    prompt = MINIGPT4_ALIGN_PROMPTS[zlib.crc32(image_id.encode()) % len(MINIGPT4_ALIGN_PROMPTS)]
    return {"id": image_id, "images": [f"{image_id}.jpg"],
            "conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]}


def from_webdataset(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    if r["image"] is None:
        raise ValueError(f"{where}: sample has no image member ({'/'.join(WDS_IMAGE_EXTS)})")
    if not isinstance(r["caption"], str):
        raise ValueError(f"{where}: sample has no caption (a .txt member, or a .json member with a `caption`)")
    return {"id": r["__key__"], "images": [r["image"]],
            "conversations": [{"role": "user", "content": IMAGE_MARKER},
                              {"role": "assistant", "content": r["caption"]}]}


def _canonical(r: dict[str, Any], where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    return r


@dataclass(frozen=True)
class Format:
    read: Callable[[str], list[tuple[str, Any]]]
    """``ann_path`` -> ``(where, raw record)`` pairs."""
    convert: Callable[[dict[str, Any], str, int, Any], dict[str, Any]]
    """``(raw record, where, index, DatasetConfig)`` -> canonical dict."""
    one_json_file: bool = True
    """The records are the elements of one JSON list or the lines of one JSONL file: held compactly as byte offsets
    (``lavis.data.records``) instead of parsed objects."""


def _json(spec: str) -> list[tuple[str, Any]]:
    return read_json_records(Path(spec))


FORMATS: dict[str, Format] = {
    "canonical": Format(_json, _canonical),
    "mpp": Format(_json, from_mpp),
    "llava": Format(_json, from_llava),
    "llava_pretrain": Format(_json, from_llava_pretrain),
    "videochatgpt": Format(_json, from_videochatgpt),
    "sharegpt": Format(_json, from_sharegpt),
    "minigpt4_captions": Format(lambda spec: read_minigpt4_captions(Path(spec)), from_minigpt4_captions, False),
    "webdataset": Format(read_webdataset, from_webdataset, False),
}



def to_canonical(r: Any, where: str, index: int, ds: DatasetConfig) -> dict[str, Any]:
    """One raw record -> canonical dict; ``ValueError`` naming ``where`` and the record's id when it has one."""
    if not isinstance(r, dict):
        raise ValueError(f"{where}: a record must be an object, got {type(r).__name__}")
    try:
        return FORMATS[ds.format].convert(r, where, index, ds)
    except ValueError as e:
        rid = record_id(r)
        msg = str(e)
        if rid is not None and msg.startswith(f"{where}: "):
            msg = f"{where} (id {rid}): " + msg.removeprefix(f"{where}: ")
        raise ValueError(msg) from e
