"""Dataset formats -> the canonical record (``lavis.data.datasets``), one pure function per format.

- ``mpp`` (MPP-Qwen / MiniGPT4Qwen JSON, also its LLaVA-558k / LLaVA-Instruct / VideoChatGPT-100k conversions):
  ``{"image": "a.jpg" | "video": "v.mp4", "instruction": str | [str, ...], "output": str | [str, ...]}`` with the
  image marker ``<Img><ImageHere></Img>`` in the instruction; list-valued fields are turns of one conversation.
- ``llava`` (LLaVA-Instruct-150k, LLaVA-Pretrain ``blip_laion_cc_sbu_558k.json``):
  ``{"id", "image", "conversations": [{"from": "human" | "gpt", "value": "<image>\\n..."}]}``.
- ``llava_pretrain`` (``blip_laion_cc_sbu_558k.json``): the ``llava`` layout, checked to be one image and one
  human/gpt exchange, e.g. ``{"id": "004539375", "image": "00453/004539375.jpg", "conversations": [{"from":
  "human", "value": "Render a clear and concise summary of the photo.\\n<image>"}, {"from": "gpt", "value": "..."}]}``.
- ``videochatgpt`` (VideoChatGPT-100k as MPP-Qwen-Next ships it, read by its ``video_instructions.py``): the ``mpp``
  layout with a ``video`` key, ``{"video": "v_xxx.mp4", "instruction": "<Img><ImageHere></Img> ...", "output": ...}``.

Errors name the record (``file:index``) and what is wrong; nothing is skipped silently.
"""

from __future__ import annotations

from typing import Any

from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER

MPP_IMAGE = "<Img><ImageHere></Img>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


def from_mpp(r: dict[str, Any], where: str) -> dict[str, Any]:
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
        conversations += [{"role": "user", "content": q.replace(MPP_IMAGE, marker)},
                          {"role": "assistant", "content": a}]
    rec: dict[str, Any] = {"id": str(r.get("id", where)), "conversations": conversations}
    if video is not None:
        rec["video"] = video
    elif r.get("image") is not None:
        rec["images"] = r["image"] if isinstance(r["image"], list) else [r["image"]]
    return rec


def from_llava(r: dict[str, Any], where: str) -> dict[str, Any]:
    convs = r.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{where}: `conversations` must be a non-empty list")
    out = []
    for i, turn in enumerate(convs):
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {i} needs `from` in {sorted(LLAVA_ROLES)} and a string `value`")
        out.append({"role": role, "content": turn["value"]})
    rec: dict[str, Any] = {"id": str(r.get("id", where)), "conversations": out}
    if r.get("image") is not None:
        rec["images"] = r["image"] if isinstance(r["image"], list) else [r["image"]]
    return rec


def from_llava_pretrain(r: dict[str, Any], where: str) -> dict[str, Any]:
    rec = from_llava(r, where)
    roles = [t["role"] for t in rec["conversations"]]
    if roles != ["user", "assistant"] or len(rec.get("images", [])) != 1:
        raise ValueError(f"{where}: a LLaVA-Pretrain record has one `image` and one human/gpt exchange "
                         f"(got {len(rec.get('images', []))} image(s), turns {roles})")
    return rec


def from_videochatgpt(r: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(r.get("video"), str):
        raise ValueError(f"{where}: a VideoChatGPT record needs a `video` path string (got {r.get('video')!r})")
    return from_mpp(r, where)


CONVERTERS = {"mpp": from_mpp, "llava": from_llava, "llava_pretrain": from_llava_pretrain,
              "videochatgpt": from_videochatgpt}
