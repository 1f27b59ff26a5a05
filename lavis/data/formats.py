"""Dataset formats -> the canonical record (``lavis.data.datasets``), one pure function per format.

- ``mpp`` (MPP-Qwen / MiniGPT4Qwen JSON, also its LLaVA-558k / LLaVA-Instruct / VideoChatGPT-100k conversions):
  ``{"image": "a.jpg" | "video": "v.mp4", "instruction": str | [str, ...], "output": str | [str, ...]}`` with the
  image marker ``<Img><ImageHere></Img>`` in the instruction; list-valued fields are turns of one conversation.
- ``llava`` (LLaVA-Instruct-150k, LLaVA-Pretrain ``blip_laion_cc_sbu_558k.json``):
  ``{"id", "image", "conversations": [{"from": "human" | "gpt", "value": "<image>\\n..."}]}``.

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


CONVERTERS = {"mpp": from_mpp, "llava": from_llava}
