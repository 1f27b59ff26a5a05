"""A chat-completions request's messages -> engine turns: system prompt, (user, assistant) pairs, decoded media.

Images come as ``data:image/...;base64,`` URLs, or as local paths (or ``file://`` URLs) under the folders the server
was started with ``--allow-local-files``; nothing is ever fetched from the network. Videos (``video_url`` parts) are
local paths under those folders only. Every problem is an :class:`APIError` (400, 413 for sizes) naming the message
and part.

Two steps: :func:`to_conversation` builds the turns with each image's size read from its header and nothing
decoded (the caller checks the prompt against the context then), :meth:`Conversation.decode` decodes the media.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from lavis.chat.engine import ChatEngine, Media, Turn
from lavis.chat.local_files import admitted
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER
from lavis.data.media import MediaError
from lavis.serve.limits import Limits, check_image_header
from lavis.serve.protocol import APIError, ChatCompletionRequest, ImagePart, Message, TextPart, VideoPart

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<b64>;base64)?,(?P<data>.*)", re.S)


@dataclass
class Pending:
    """An image or video part, checked but not yet decoded."""

    marker: str
    load: Callable[[], Media]
    param: str
    name: str


@dataclass
class Conversation:
    turns: list[Turn]
    """Markers in place; ``pixels`` are stand-ins (one empty row per image/frame) until :meth:`decode`."""
    system_prompt: str | None
    media: list[list[Pending]] = field(default_factory=list)
    """Each turn's media, in order."""

    def decode(self) -> None:
        """Decode every image and video (the expensive step) into its turn's ``pixels``."""
        for turn, pending in zip(self.turns, self.media, strict=True):
            if pending:
                turn.media = [_decode(p.load, p.param, p.name) for p in pending]
                turn.pixels = torch.cat([m.pixels for m in turn.media])


def to_conversation(req: ChatCompletionRequest, engine: ChatEngine, local_roots: Sequence[Path],
                    limits: Limits) -> Conversation:
    """System messages join into the system prompt; user messages in a row join into one turn; the conversation
    must end with a user message. Media are checked (source, header, pixels) but not decoded."""
    system: list[str] = []
    turns: list[Turn] = []
    texts: list[str] = []
    attached: list[Pending] = []
    media: list[list[Pending]] = []
    budget = [limits.max_request_pixels]

    def close_turn(answer: str | None) -> None:
        nonlocal texts, attached
        # stand-in pixels, one row per image/frame (the prompt and its context check need only the markers)
        stand_in = [Media(p.marker, torch.empty(1 if p.marker == IMAGE_MARKER else engine.num_video_frames, 0),
                          p.name) for p in attached]
        turn = engine.make_turn("\n".join(texts), stand_in)
        turn.answer = answer
        turns.append(turn)
        media.append(attached)
        texts, attached = [], []

    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role == "system":
            system.append(_text_only(msg, where))
        elif msg.role == "user":
            text, found = _user_content(msg, where, engine, local_roots, limits, budget)
            texts.append(text)
            attached += found
        else:
            if not texts:
                raise APIError(400, f"{where}: an assistant message must follow a user message", f"{where}.role")
            close_turn(_text_only(msg, where))
    if not texts:
        raise APIError(400, "the last message must be from the user (the answer to it is generated)", "messages")
    close_turn(None)
    return Conversation(turns, "\n".join(system) if system else None, media)


def _text_only(msg: Message, where: str) -> str:
    if isinstance(msg.content, str):
        return msg.content
    for j, part in enumerate(msg.content):
        if not isinstance(part, TextPart):
            at = f"{where}.content[{j}]"
            raise APIError(400, f"{at}: a {msg.role} message may only hold text", at)
    return "".join(p.text for p in msg.content if isinstance(p, TextPart))


def _user_content(msg: Message, where: str, engine: ChatEngine, local_roots: Sequence[Path], limits: Limits,
                  budget: list[int]) -> tuple[str, list[Pending]]:
    if isinstance(msg.content, str):
        return msg.content, []
    texts, found = [], []
    for j, part in enumerate(msg.content):
        at = f"{where}.content[{j}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            found.append(_image(part.image_url.url, f"{at}.image_url.url", engine, local_roots, limits, budget))
        elif isinstance(part, VideoPart):
            param = f"{at}.video_url.url"
            path = _local_path(part.video_url.url, param, local_roots, "video")
            found.append(Pending(VIDEO_MARKER, lambda p=path: engine.load_media(p, video=True), param, str(path)))
    return "\n".join(texts), found


def _image(url: str, param: str, engine: ChatEngine, local_roots: Sequence[Path], limits: Limits,
           budget: list[int]) -> Pending:
    """The image checked by its header; ``budget``: pixels the request's images may still have (decreased)."""
    if url.startswith("data:"):
        m = DATA_URL.fullmatch(url)
        if m is None or not m["b64"] or not (m["mime"] or "").startswith("image/"):
            raise APIError(400, f"{param}: expected a data:image/...;base64, URL", param, "invalid_image_url")
        try:
            raw = base64.b64decode(m["data"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: invalid base64 ({e})", param, "invalid_image") from None
        _spend(budget, check_image_header(raw, param, limits), param, limits)
        return Pending(IMAGE_MARKER, lambda: engine.load_image_bytes(raw, "the image"), param, "the image")
    path = _local_path(url, param, local_roots, "image")
    _spend(budget, check_image_header(path, param, limits), param, limits)
    return Pending(IMAGE_MARKER, lambda: engine.load_media(path, video=False), param, str(path))


def _spend(budget: list[int], pixels: int, param: str, limits: Limits) -> None:
    budget[0] -= pixels
    if budget[0] < 0:
        raise APIError(413, f"{param}: the request's images hold more than {limits.max_request_pixels} pixels "
                       "together; send fewer or smaller images", param, "image_too_large")


def _decode(load: Callable[[], Media], param: str, name: str) -> Media:
    try:
        return load()
    except MediaError as e:
        reason = str(e).removeprefix(f"{name}: ")
        raise APIError(400, f"{param}: not a usable image or video: {reason}", param, "invalid_image") from None


def _local_path(url: str, param: str, local_roots: Sequence[Path], kind: str) -> Path:
    scheme = urlparse(url).scheme
    if scheme == "data":
        raise APIError(400, f"{param}: a {kind} is read from a local path under --allow-local-files, not a data URL",
                       param, "invalid_image_url")
    if scheme in ("http", "https", "ftp"):
        raise APIError(400, f"{param}: this server never fetches from the network; send the {kind} inline as a "
                       "base64 data URL" + (" (videos: a local path under --allow-local-files)" if kind == "video"
                                            else ""), param, "invalid_image_url")
    if not local_roots:
        raise APIError(400, f"{param}: local files are refused (the server was started without "
                       f"--allow-local-files); send a base64 data URL", param, "invalid_image_url")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    resolved = admitted(path if path.is_absolute() else local_roots[0] / path, local_roots)
    if resolved is None:
        raise APIError(400, f"{param}: {url} is outside the folders the server may read (--allow-local-files)",
                       param, "invalid_image_url")
    return resolved
