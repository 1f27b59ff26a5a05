"""What one chat-completions request may hold, checked before any image is decoded or any text tokenized.

Every request is bounded in this order, each refusal an OpenAI-shaped error naming the field:

- the body: at most ``--max-request-mb`` (20 MB) as sent, chunked or not (413, ``request_too_large``);
- ``stop``: at most 4 strings of at most 256 characters (400, :mod:`lavis.serve.protocol`); matching them costs
  linear time per generated token (:class:`lavis.chat.stops.StopStrings`);
- ``seed``: an integer in -2**63 .. 2**64 - 1 (400);
- messages: at most :attr:`Limits.max_messages` (400), content parts over all messages at most
  :attr:`Limits.max_parts` (400), images and videos at most ``--max-images`` (400);
- text: at most ``--max-text-chars`` characters over all messages (413); no NUL character or lone UTF-16 surrogate
  in any string (400);
- each image: its size is read from the file's header (PIL opens lazily) and must be at most
  ``--max-image-pixels`` (413), all images of the request together at most :attr:`Limits.max_request_pixels` (413);
- the prompt: images, videos and text are placed as markers and tokenized, and must fit the model's context (400,
  ``context_length_exceeded``), all before any pixel is decoded;
- decoding then runs in a pool of ``--decode-workers`` threads; requests waiting for it beyond ``--max-queue`` get
  503, like requests beyond ``--max-queue`` waiting for the model.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lavis.serve.protocol import APIError, ChatCompletionRequest, ImagePart, TextPart, VideoPart

BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
"""NUL and lone surrogates: no tokenizer, file name or JSON reply can carry them."""


@dataclass(frozen=True)
class Limits:
    max_messages: int = 256
    max_parts: int = 512
    """Content parts (text, image, video) over all messages."""
    max_images: int = 64
    """Image and video parts over all messages."""
    max_text_chars: int = 100_000
    """Characters of text over all messages (system, user, assistant)."""
    max_image_pixels: int = 50_000_000
    """Width x height of one image, read from its header before decoding."""
    max_request_pixels: int = 200_000_000
    """Width x height summed over a request's images."""
    decode_workers: int = 2
    """Requests whose media are decoded at the same time."""


def check_request(body: ChatCompletionRequest, limits: Limits) -> None:
    """Counts, text length and characters of ``body``: cheap (no decoding), so it runs first."""
    if len(body.messages) > limits.max_messages:
        raise APIError(400, f"messages: {len(body.messages)} messages, over the limit of {limits.max_messages}",
                       "messages", "too_many_messages")
    parts = [(f"messages[{i}].content[{j}]", p) for i, m in enumerate(body.messages) if not isinstance(m.content, str)
             for j, p in enumerate(m.content)]
    if len(parts) > limits.max_parts:
        raise APIError(400, f"messages: {len(parts)} content parts, over the limit of {limits.max_parts}",
                       "messages", "too_many_parts")
    media = [where for where, p in parts if isinstance(p, (ImagePart, VideoPart))]
    if len(media) > limits.max_images:
        raise APIError(400, f"{media[limits.max_images]}: {len(media)} images/videos, over the limit of "
                       f"{limits.max_images} (--max-images)", media[limits.max_images], "too_many_images")
    texts = [(f"messages[{i}].content", m.content) for i, m in enumerate(body.messages) if isinstance(m.content, str)]
    texts += [(f"{where}.text", p.text) for where, p in parts if isinstance(p, TextPart)]
    total = sum(len(t) for _, t in texts)
    if total > limits.max_text_chars:
        raise APIError(413, f"messages: {total} characters of text, over the limit of {limits.max_text_chars} "
                       "(--max-text-chars)", "messages", "text_too_long")
    texts += [(f"{where}.image_url.url", p.image_url.url) for where, p in parts  # data URLs: base64 checks them
              if isinstance(p, ImagePart) and not p.image_url.url.startswith("data:")]
    texts += [(f"{where}.video_url.url", p.video_url.url) for where, p in parts if isinstance(p, VideoPart)]
    texts += [(f"messages[{i}].name", m.name) for i, m in enumerate(body.messages) if m.name]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    texts += [("stop" if isinstance(body.stop, str) else f"stop[{k}]", s) for k, s in enumerate(stops)]
    texts += [("model", body.model)] if body.model else []
    for where, text in texts:
        if (bad := BAD_CHARS.search(text)) is not None:
            what = "a NUL character" if bad[0] == "\x00" else f"a lone surrogate (U+{ord(bad[0]):04X})"
            raise APIError(400, f"{where}: holds {what} at position {bad.start()}; send valid Unicode text without "
                           "NUL", where, "invalid_text")


def check_image_header(source: bytes | Path, param: str, limits: Limits) -> int:
    """The image's pixel count from its header (nothing decoded); 413 over ``max_image_pixels``, 400 when it is not
    an image PIL knows."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise APIError(413, f"{param}: the image declares more pixels than PIL opens at all, over the limit of "
                       f"{limits.max_image_pixels} pixels (--max-image-pixels)", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise APIError(400, f"{param}: not a usable image or video: {reason}", param, "invalid_image") from None
    if width * height > limits.max_image_pixels:
        raise APIError(413, f"{param}: the image is {width}x{height} pixels, over the limit of "
                       f"{limits.max_image_pixels} pixels (--max-image-pixels)", param, "image_too_large")
    return width * height
