"""Canonical conversations -> token ids, labels and image-placeholder runs (pure functions).

Canonical record (DATA.md)::

    {"id": "...", "images": ["a.jpg", ...] | "video": "v.mp4",
     "conversations": [{"role": "user", "content": "<image>\\nWhat is in the image?"},
                       {"role": "assistant", "content": "A red circle."}, ...]}

Each ``<image>`` marker stands for the next entry of ``images``; ``<video>`` for the clip. For the ChatML
template a marker expands to ``<Img>`` + ``num_query`` placeholder tokens (per frame for video) + ``</Img>``,
exactly the text MPP-Qwen builds from ``<Img><ImageHere></Img>``; the model later overwrites the placeholder
positions with the projected Q-Former outputs, in order.

Labels (``label_mode``):
- ``mpp`` (default, MPP-Qwen / QwenLM ``finetune.py``): ``<|im_start|>``, ``<|im_end|>`` and the newline after
  it are trained in every turn (system and user too); role words, the newline after them and system/user content
  are masked; assistant content is trained.
- ``assistant``: only assistant content plus its ``<|im_end|>`` are trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lavis.data.tokenizer import IM_END, IM_START, TextTokenizer

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
LabelMode = Literal["mpp", "assistant"]


class SampleError(ValueError):
    """A record cannot be turned into a training sample; the message names the record."""


@dataclass(frozen=True)
class ChatTemplate:
    """What a template needs to know about the tokenizer and the image tokens."""

    tokenizer: TextTokenizer
    system_prompt: str
    placeholder: str
    num_query: int
    num_video_frames: int

    @property
    def placeholder_id(self) -> int:
        return self.tokenizer.token_id(self.placeholder)

    def media_text(self, marker: str) -> str:
        run = self.placeholder * self.num_query
        if marker == IMAGE_MARKER:
            return f"<Img>{run}</Img>"
        return "<Img>" + run * self.num_video_frames + "</Img>"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_media: int
    """Image embeddings the sample needs: one per image, one per video frame."""


def count_markers(conversations: list[dict], record_id: str) -> tuple[int, int]:
    images = videos = 0
    for turn in conversations:
        content = turn.get("content")
        if not isinstance(content, str):
            raise SampleError(f"record {record_id}: every turn needs a string `content` (got {content!r})")
        images += content.count(IMAGE_MARKER)
        videos += content.count(VIDEO_MARKER)
    return images, videos


def encode_chatml(
    conversations: list[dict],
    tpl: ChatTemplate,
    *,
    record_id: str,
    label_mode: LabelMode = "mpp",
) -> Encoded:
    """Render a canonical conversation with ChatML; return ids and labels (unshifted) of equal length."""
    tok = tpl.tokenizer
    im_start, im_end = tok.token_id(IM_START), tok.token_id(IM_END)
    nl = tok.encode("\n")
    ids: list[int] = []
    labels: list[int] = []
    num_media = 0

    def add_turn(role: str, content: str) -> None:
        head = [im_start] + tok.encode(role) + nl
        body = tok.encode(content)
        tail = [im_end] + nl
        ids.extend(head + body + tail)
        if role == "assistant":
            body_labels = list(body)
        else:
            body_labels = [IGNORE_INDEX] * len(body)
        if label_mode == "mpp":
            labels.extend([im_start] + [IGNORE_INDEX] * (len(head) - 1) + body_labels + tail)
        elif role == "assistant":
            labels.extend([IGNORE_INDEX] * len(head) + body_labels + [im_end] + [IGNORE_INDEX] * len(nl))
        else:
            labels.extend([IGNORE_INDEX] * (len(head) + len(body) + len(tail)))

    add_turn("system", tpl.system_prompt)
    expected = "user"
    for i, turn in enumerate(conversations):
        role, content = turn.get("role"), turn.get("content")
        if role != expected:
            raise SampleError(
                f"record {record_id}: turn {i} has role {role!r}, expected {expected!r} "
                "(turns alternate user/assistant, starting with user)"
            )
        if not isinstance(content, str):
            raise SampleError(f"record {record_id}: turn {i} `content` must be a string (got {content!r})")
        if role == "user":
            num_media += content.count(IMAGE_MARKER) + content.count(VIDEO_MARKER) * tpl.num_video_frames
            content = content.replace(IMAGE_MARKER, tpl.media_text(IMAGE_MARKER))
            content = content.replace(VIDEO_MARKER, tpl.media_text(VIDEO_MARKER))
        elif IMAGE_MARKER in content or VIDEO_MARKER in content:
            raise SampleError(f"record {record_id}: turn {i} (assistant) contains an image/video marker")
        add_turn(role, content)
        expected = "assistant" if role == "user" else "user"
    if expected != "user":
        raise SampleError(f"record {record_id}: the conversation must end with an assistant turn")
    return Encoded(ids, labels, num_media)


def encode_prompt(turns: list[tuple[str, str | None]], tpl: ChatTemplate) -> list[int]:
    """Ids of a chat prompt: system block, then (query, answer) pairs, the last answer None (to be generated).

    Query text may contain ``<image>``/``<video>`` markers, expanded as in training. The result ends with
    ``<|im_start|>assistant\\n`` so generation continues with the answer.
    """
    tok = tpl.tokenizer
    im_start, im_end = tok.token_id(IM_START), tok.token_id(IM_END)
    nl = tok.encode("\n")

    def block(role: str, content: str) -> list[int]:
        return [im_start] + tok.encode(role) + nl + tok.encode(content) + [im_end] + nl

    ids = block("system", tpl.system_prompt)
    for i, (query, answer) in enumerate(turns):
        query = query.replace(IMAGE_MARKER, tpl.media_text(IMAGE_MARKER))
        query = query.replace(VIDEO_MARKER, tpl.media_text(VIDEO_MARKER))
        ids += block("user", query)
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may lack an answer")
            ids += [im_start] + tok.encode("assistant") + nl
        else:
            ids += block("assistant", answer)
    return ids


def truncate(enc: Encoded, max_len: int, placeholder_id: int, record_id: str) -> Encoded:
    """Cut to ``max_len`` tokens without splitting an image run: text after the last placeholder may go.

    A sample whose image placeholders themselves do not fit raises :class:`SampleError` (never a silent
    corruption of the image/placeholder correspondence).
    """
    if len(enc.input_ids) <= max_len:
        return enc
    last_ph = max((i for i, t in enumerate(enc.input_ids) if t == placeholder_id), default=-1)
    if last_ph >= max_len:
        raise SampleError(
            f"record {record_id}: {len(enc.input_ids)} tokens with image placeholders up to position {last_ph}; "
            f"they do not fit data.max_txt_len={max_len}. Raise max_txt_len or use fewer frames/images."
        )
    labels = enc.labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(
            f"record {record_id}: after truncation to data.max_txt_len={max_len} no answer token is left to train on"
        )
    return Encoded(enc.input_ids[:max_len], labels, enc.num_media)
