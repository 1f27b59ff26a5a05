"""A chat-completions request's messages -> engine turns: system prompt, (user, assistant) pairs, decoded media.

Images come as ``data:image/...;base64,`` URLs, or as local paths (or ``file://`` URLs) under the folder the server
was started with ``--allow-local-files``; nothing is ever fetched from the network. Videos (``video_url`` parts) are
local paths under that folder only. Every problem is an :class:`APIError` (400) naming the message and part.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from lavis.chat.engine import ChatEngine, Media, Turn
from lavis.data.media import MediaError
from lavis.serve.protocol import APIError, ChatCompletionRequest, ImagePart, Message, TextPart, VideoPart

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<b64>;base64)?,(?P<data>.*)", re.S)


@dataclass
class Conversation:
    turns: list[Turn]
    system_prompt: str | None


def to_conversation(req: ChatCompletionRequest, engine: ChatEngine, local_root: Path | None) -> Conversation:
    """System messages join into the system prompt; user messages in a row join into one turn; the conversation
    must end with a user message."""
    system: list[str] = []
    turns: list[Turn] = []
    texts: list[str] = []
    attached: list[Media] = []
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role == "system":
            system.append(_text_only(msg, where))
        elif msg.role == "user":
            text, found = _user_content(msg, where, engine, local_root)
            texts.append(text)
            attached += found
        else:
            if not texts:
                raise APIError(400, f"{where}: an assistant message must follow a user message", f"{where}.role")
            turn = engine.make_turn("\n".join(texts), attached)
            turn.answer = _text_only(msg, where)
            turns.append(turn)
            texts, attached = [], []
    if not texts:
        raise APIError(400, "the last message must be from the user (the answer to it is generated)", "messages")
    turns.append(engine.make_turn("\n".join(texts), attached))
    return Conversation(turns, "\n".join(system) if system else None)


def _text_only(msg: Message, where: str) -> str:
    if isinstance(msg.content, str):
        return msg.content
    for j, part in enumerate(msg.content):
        if not isinstance(part, TextPart):
            at = f"{where}.content[{j}]"
            raise APIError(400, f"{at}: a {msg.role} message may only hold text", at)
    return "".join(p.text for p in msg.content if isinstance(p, TextPart))


def _user_content(msg: Message, where: str, engine: ChatEngine, local_root: Path | None) -> tuple[str, list[Media]]:
    if isinstance(msg.content, str):
        return msg.content, []
    texts, found = [], []
    for j, part in enumerate(msg.content):
        at = f"{where}.content[{j}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            found.append(_image(part.image_url.url, f"{at}.image_url.url", engine, local_root))
        elif isinstance(part, VideoPart):
            param = f"{at}.video_url.url"
            path = _local_path(part.video_url.url, param, local_root, "video")
            found.append(_decode(lambda p=path: engine.load_media(p, video=True), param, str(path)))
    return "\n".join(texts), found


def _image(url: str, param: str, engine: ChatEngine, local_root: Path | None) -> Media:
    if url.startswith("data:"):
        m = DATA_URL.fullmatch(url)
        if m is None or not m["b64"] or not (m["mime"] or "").startswith("image/"):
            raise APIError(400, f"{param}: expected a data:image/...;base64, URL", param, "invalid_image_url")
        try:
            raw = base64.b64decode(m["data"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: invalid base64 ({e})", param, "invalid_image") from None
        return _decode(lambda: engine.load_image_bytes(raw, "the image"), param, "the image")
    path = _local_path(url, param, local_root, "image")
    return _decode(lambda: engine.load_media(path, video=False), param, str(path))


def _decode(load: Callable[[], Media], param: str, name: str) -> Media:
    try:
        return load()
    except MediaError as e:
        reason = str(e).removeprefix(f"{name}: ")
        raise APIError(400, f"{param}: not a usable image or video: {reason}", param, "invalid_image") from None


def _local_path(url: str, param: str, local_root: Path | None, kind: str) -> Path:
    scheme = urlparse(url).scheme
    if scheme == "data":
        raise APIError(400, f"{param}: a {kind} is read from a local path under --allow-local-files, not a data URL",
                       param, "invalid_image_url")
    if scheme in ("http", "https", "ftp"):
        raise APIError(400, f"{param}: this server never fetches from the network; send the {kind} inline as a "
                       "base64 data URL" + (" (videos: a local path under --allow-local-files)" if kind == "video"
                                            else ""), param, "invalid_image_url")
    if local_root is None:
        raise APIError(400, f"{param}: local files are refused (the server was started without "
                       f"--allow-local-files); send a base64 data URL", param, "invalid_image_url")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    resolved = (local_root / path).resolve() if not path.is_absolute() else path.resolve()
    if not resolved.is_relative_to(local_root):
        raise APIError(400, f"{param}: {url} is outside the folder the server may read ({local_root})", param,
                       "invalid_image_url")
    return resolved
