"""The FastAPI application and ``python -m lavis.serve``: OpenAI's ``/v1/chat/completions`` and ``/v1/models``, and
``/health``. Binds 127.0.0.1 unless ``--host`` says otherwise; with ``--api-key`` every ``/v1`` call needs
``Authorization: Bearer KEY``.

A request is bounded before any expensive work (the list of limits is in :mod:`lavis.serve.limits`): the body's size
as it arrives, then counts, text and characters, then each image's header, then the prompt against the context; only
then are its media decoded, in a pool of ``--decode-workers`` threads, and the job queued for the one generation
worker. Every error, an unexpected one included, is a JSON body in OpenAI's shape."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lavis.chat.engine import (
    Answer,
    ChatEngine,
    ContextError,
    GenerationSettings,
    MediaMarkerError,
    add_model_arguments,
    device_from_args,
)
from lavis.chat.engine import Request as GenRequest
from lavis.chat.loading import config_path, load_engine
from lavis.chat.local_files import add_local_files_argument, local_dirs
from lavis.serve.limits import Limits, check_request
from lavis.serve.messages import Conversation, to_conversation
from lavis.serve.protocol import APIError, ChatCompletionRequest, loc_to_param
from lavis.serve.scheduler import Job, Scheduler


@dataclass
class ServeOptions:
    model_name: str = "lavis"
    api_key: str | None = None
    local_roots: list[Path] = field(default_factory=list)
    """Folders local image/video paths may be read from (none: local files refused)."""
    max_new_tokens: int = 512
    """Answer length when a request gives no ``max_tokens``."""
    max_request_bytes: int = 20 * 2**20
    limits: Limits = field(default_factory=Limits)


def build_app(engine: ChatEngine, scheduler: Scheduler, opts: ServeOptions) -> FastAPI:
    app = FastAPI(title="lavis chat API", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=opts.max_request_bytes)
    created = int(time.time())
    decoding = anyio.CapacityLimiter(opts.limits.decode_workers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # the stack trace goes to the log
        err = APIError(500, f"internal error: {type(exc).__name__}", None, "internal_error", kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = loc_to_param(tuple(first.get("loc", ())))
        msg = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(APIError(400, msg, param or None, first.get("type")).body(), status_code=400)

    def check_key(request: Request) -> None:
        if opts.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), opts.api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": opts.model_name, "waiting": scheduler.waiting(),
                "max_batch": scheduler.max_batch, **scheduler.stats.as_dict()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": created,
                                            "owned_by": "lavis"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatCompletionRequest, request: Request):  # noqa: ANN202 - JSON or an event stream
        check_request(body, opts.limits)
        if decoding.statistics().tasks_waiting >= scheduler.jobs.maxsize:
            raise APIError(503, f"the server is busy ({decoding.statistics().tasks_waiting} requests waiting to be "
                           "decoded); retry later", None, "queue_full", kind="server_error")
        events = _Events(asyncio.get_running_loop())
        job = await anyio.to_thread.run_sync(_make_job, body, engine, opts, events, limiter=decoding)
        try:
            scheduler.submit(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({scheduler.waiting()} requests waiting); retry later", None,
                           "queue_full", kind="server_error") from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or
                opts.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(events, job, meta, include_usage), media_type="text/event-stream")
        return await _complete(events, job, meta, request)

    return app


class _Events:
    """The worker's text pieces and final answer, handed to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    def text(self, piece: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("text", piece))

    def done(self, result: Answer | Exception) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("done", result))


def _make_job(body: ChatCompletionRequest, engine: ChatEngine, opts: ServeOptions, events: _Events) -> Job:
    """Check the media's headers and the prompt, then decode the media (400s before anything streams); runs in the
    decoding pool."""
    try:
        conv = to_conversation(body, engine, opts.local_roots, opts.limits)
    except MediaMarkerError as e:  # markers typed in the text vs the images sent
        raise APIError(400, str(e), "messages") from None
    _measure(engine, conv)  # before decoding: refuse what the text and markers alone cannot fit
    conv.decode()
    prompt = _measure(engine, conv)  # with the decoded media (a native-resolution VLM's images vary in tokens)
    room = engine.context_length - len(prompt) if engine.context_length else None
    limit = body.token_limit() or opts.max_new_tokens
    if room is not None:
        limit = min(limit, room)
    greedy = body.temperature == 0
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens, min_new_tokens=body.min_tokens,
                                  do_sample=not greedy, temperature=1.0 if greedy else body.temperature,
                                  top_p=1.0 if greedy else body.top_p)
    req = GenRequest(conv.turns, conv.system_prompt, body.stop_strings(), limit, threading.Event(),
                     events.text if body.stream else None)
    return Job(req, settings, events.done, None if greedy else body.seed)


def _measure(engine: ChatEngine, conv: Conversation) -> list[int]:
    """The prompt's ids; a prompt that does not fit the context is a 400."""
    try:
        return engine.encode(conv.turns, conv.system_prompt)
    except ContextError as e:
        raise APIError(400, str(e), "messages", "context_length_exceeded") from None


async def _result(events: _Events) -> Answer:
    while True:
        kind, value = await events.queue.get()
        if kind == "done":
            if isinstance(value, Exception):
                raise APIError(500, f"generation failed: {value}", None, "generation_error", kind="server_error")
            return cast(Answer, value)  # a "done" event carries an Answer or an Exception


def _finish(ans: Answer) -> str:
    return "length" if ans.finish_reason == "length" else "stop"


def _usage(ans: Answer) -> dict:
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "total_tokens": ans.prompt_tokens + ans.completion_tokens}


async def _complete(events: _Events, job: Job, meta: dict, request: Request) -> JSONResponse:
    waiter = asyncio.ensure_future(_result(events))
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=1.0)
            if not waiter.done() and await request.is_disconnected() and job.request.cancel is not None:
                job.request.cancel.set()  # the client gave up: stop spending the model on it
        ans = waiter.result()
    finally:
        waiter.cancel()
    return JSONResponse({**meta, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": ans.text}, "finish_reason": _finish(ans),
         "logprobs": None}], "usage": _usage(ans)})


async def _sse(events: _Events, job: Job, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.queue.get()
            if kind == "text":
                yield chunk({"content": value})
                continue
            finished = True
            if isinstance(value, Exception):
                err = APIError(500, f"generation failed: {value}", None, "generation_error", kind="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            else:
                ans = cast(Answer, value)  # a "done" event carries an Answer or an Exception
                yield chunk({}, _finish(ans))
                if include_usage:
                    body = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ans)}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished and job.request.cancel is not None:  # the client closed the stream: end this generation only
            job.request.cancel.set()


class _BodyLimit:
    """413 for request bodies over the limit, by Content-Length or as the bytes arrive."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(receive, send)
            return
        # Read the body here, up to the limit (a chunked one has no length to trust), and hand it on whole: the
        # application then never sees a body cut off by the limit (which it would answer with a 400).
        chunks, seen, message = [], 0, {"type": "http.request", "more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                await self._refuse(receive, send, drain=message.get("more_body", False))
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Callable, send: Callable, drain: bool = True) -> None:
        # Read (and drop) the rest of the body first: a reply while the client is still sending makes most clients
        # see a reset connection instead of the 413.
        message = {"more_body": drain}
        while message.get("more_body", False) and message.get("type", "http.request") == "http.request":
            message = await receive()
        mb = self.limit / 2**20
        body = json.dumps(APIError(413, f"request body over --max-request-mb ({mb:g} MB)", None,
                                   "request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavis.serve", description="OpenAI-compatible chat API over a model.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LAVIS_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 calls (default: env LAVIS_SERVE_API_KEY; "
                        "the environment keeps it out of the process list)")
    add_local_files_argument(p, "default: inline data URLs only")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length when a request sets no max_tokens")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 503")
    p.add_argument("--max-batch", type=int, default=1, help="queued requests decoded together (batched generation)")
    p.add_argument("--max-request-mb", type=float, default=20, help="larger request bodies get 413")
    d = Limits()
    p.add_argument("--max-images", type=int, default=d.max_images, help="images and videos in one request (400)")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars,
                   help="characters of text over a request's messages (413)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="width x height of one image, read from its header before decoding (413)")
    p.add_argument("--decode-workers", type=int, default=d.decode_workers,
                   help="requests whose images are decoded at the same time")
    p.add_argument("--model-name", help="the id /v1/models reports (default: from the config)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        cfg_path = config_path(args)
        roots = local_dirs(args.allow_local_files)
        limits = Limits(max_images=args.max_images, max_text_chars=args.max_text_chars,
                        max_image_pixels=args.max_image_pixels, decode_workers=args.decode_workers)
        if min(args.max_images, args.max_text_chars, args.max_image_pixels, args.decode_workers) < 1:
            raise ValueError("--max-images, --max-text-chars, --max-image-pixels and --decode-workers must be >= 1")
        engine = load_engine(args, device_from_args(args), args.options)
        scheduler = Scheduler(engine, args.max_queue, args.max_batch)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = args.model_name or args.model_type or (Path(args.model_dir).resolve().name if cfg_path is None else
                                                  cfg_path.parent.name if cfg_path.stem == "config" else cfg_path.stem)
    opts = ServeOptions(name, args.api_key, roots, args.max_new_tokens, int(args.max_request_mb * 2**20), limits)
    scheduler.start()
    uvicorn.run(build_app(engine, scheduler, opts), host=args.host, port=args.port, log_level="info")
    return 0
