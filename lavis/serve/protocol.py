"""The parts of OpenAI's chat-completions request the server accepts (validated strictly), and its error shape.

Limits checked here, while the body is parsed (400 naming the field): ``stop`` holds at most
:data:`MAX_STOP_STRINGS` strings of at most :data:`MAX_STOP_CHARS` characters each; ``seed`` is an integer torch
accepts (-2**63 .. 2**64 - 1). The limits that depend on the server's options are in :mod:`lavis.serve.limits`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4
"""As OpenAI's API."""
MAX_STOP_CHARS = 256


class _Strict(BaseModel):
    # strict: a string where a number belongs is a 400, not silently converted; unknown fields are ignored, as
    # OpenAI's clients send fields this server has no use for (user, logit_bias, ...)
    model_config = ConfigDict(strict=True, extra="ignore")


class URL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: URL
    """``data:image/...;base64,...``, or with ``--allow-local-files DIR`` a path (or ``file://`` URL) under DIR."""


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: URL
    """A path (or ``file://`` URL) under ``--allow-local-files DIR``; frames sampled as in training."""


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    """Accepted and echoed; the server serves one model whatever the name."""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The newer name of ``max_tokens``; wins when both are given."""
    min_tokens: int = Field(0, ge=0)
    """End tokens are suppressed until this many tokens are generated (a vLLM extension; 0: off)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """0: greedy decoding; > 0: sampling (OpenAI's default 1)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise PydanticCustomError("stop_too_long", "at most {n} stop strings of at most {c} characters each "
                                      "(got {got})", {"n": MAX_STOP_STRINGS, "c": MAX_STOP_CHARS,
                                                      "got": f"{len(stops)}, longest {max(map(len, stops))}"})
        return stop

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class APIError(Exception):
    """Raised anywhere in a request; answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def loc_to_param(loc: tuple) -> str:
    """pydantic's error location -> OpenAI's ``param`` spelling, e.g. ``messages[0].content[1].image_url.url``."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[tagged-union[TextPart,ImagePart,VideoPart]]", "list[str]") or "[" in str(part):
            continue  # which member of a union was being tried
        elif not out.endswith(f".{part}"):  # a tagged union repeats its tag: content[1].image_url.image_url
            out += ("." if out else "") + str(part)
    return out
