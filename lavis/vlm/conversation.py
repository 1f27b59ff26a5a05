"""Canonical conversations -> the messages a transformers chat template renders, and where the assistant turns are.

A canonical record's turns (``lavis.data.datasets.Record.conversations``) hold text with ``<image>`` / ``<video>``
markers, each standing for the record's next image / its clip. For a VLM they become transformers' message layout:
a user turn is a list of ``{"type": "text" | "image" | "video"}`` parts in marker order, assistant and system turns
are strings. The prompt is then the model's own chat template (``processor.apply_chat_template``), token for token.

Labels: the tokens of each assistant turn after the template's generation prompt (``<|im_start|>assistant\\n`` for
Qwen), i.e. the answer, ``<|im_end|>`` and the newline after it, as Qwen's own fine-tuning code and LLaMA-Factory's
``qwen2_vl`` template train them; everything else (system, user, visual tokens, role headers) is ``IGNORE_INDEX``.
The spans are found by rendering prefixes of the conversation, so they follow whatever the template writes.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER, SampleError

_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


class ChatRenderer(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


def user_content(text: str) -> list[dict[str, str]]:
    """One user turn's text -> its parts in order: ``<image>`` -> ``{"type": "image"}``, ``<video>`` ->
    ``{"type": "video"}``, the text between -> ``{"type": "text", "text": ...}`` (empty pieces left out)."""
    parts: list[dict[str, str]] = []
    for piece in _MARKER_RE.split(text):
        if piece == IMAGE_MARKER:
            parts.append({"type": "image"})
        elif piece == VIDEO_MARKER:
            parts.append({"type": "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_messages(conversations: list[dict], record_id: str) -> list[dict[str, Any]]:
    """Canonical turns -> chat-template messages. An optional leading ``system`` turn, then ``user`` /
    ``assistant`` alternating from ``user`` and ending with ``assistant``; markers only in user turns.
    :class:`SampleError` names the record and the turn otherwise."""
    messages: list[dict[str, Any]] = []
    expected = "user"
    for i, turn in enumerate(conversations):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(content, str):
            raise SampleError(f"record {record_id}: turn {i} `content` must be a string (got {content!r})")
        if role == "system" and i == 0:
            _no_markers(content, record_id, i, "system")
            messages.append({"role": "system", "content": content})
            continue
        if role != expected:
            raise SampleError(f"record {record_id}: turn {i} has role {role!r}, expected {expected!r} (an optional "
                              "first system turn, then user/assistant alternating, starting with user)")
        if role == "user":
            messages.append({"role": "user", "content": user_content(content)})
        else:
            _no_markers(content, record_id, i, "assistant")
            messages.append({"role": "assistant", "content": content})
        expected = "assistant" if role == "user" else "user"
    if expected != "user":
        raise SampleError(f"record {record_id}: the conversation must end with an assistant turn")
    return messages


def _no_markers(content: str, record_id: str, i: int, role: str) -> None:
    if IMAGE_MARKER in content or VIDEO_MARKER in content:
        raise SampleError(f"record {record_id}: turn {i} ({role}) contains an image/video marker; images and "
                          "videos go in user turns")


def render(renderer: ChatRenderer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (untokenized)."""
    text = renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected the rendered text")
    return text


def assistant_spans(renderer: ChatRenderer, messages: list[dict[str, Any]],
                    record_id: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans of its assistant turns (each from the end
    of the generation prompt to the end of the turn). :class:`SampleError` if the template is not prefix-stable (a
    later turn rewrites earlier text, e.g. a template that drops past reasoning), where no span can be placed."""
    full = render(renderer, messages)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(renderer, messages[:k], add_generation_prompt=True)
        upto = render(renderer, messages[:k + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise SampleError(f"record {record_id}: the chat template does not render turn {k} as an extension of "
                              "the turns before it, so the assistant tokens cannot be located for the labels")
        spans.append((len(prompt), len(upto)))
    return full, spans
