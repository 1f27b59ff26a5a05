"""The OpenAI-compatible server (python -m lavis.serve) driven by the official ``openai`` client, and the engine's
batched decoding it relies on.

The server runs the demo architecture randomly initialised (no training launch): plumbing is checked against the
engine's own answer for the same input, computed here in-process from the same seeded weights.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lavis.chat.engine import ChatEngine, GenerationSettings, Request

from .conftest import DEMO_CFG, REPO, free_port, stop_server, wait_until_served, write_png_header_only

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra: pip install -e '.[dev]'")

KEY = "sk-test-key"
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.from_files(DEMO_CFG, None, device="cpu")


@pytest.fixture(scope="module")
def images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "images/train").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def server(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "lavis.serve", "--cfg-path", str(DEMO_CFG), "--cpu-only",
                                 "--port", str(port), "--api-key", KEY, "--max-batch", "4", "--max-new-tokens", "12",
                                 "--allow-local-files", str(tiny_data), "--max-request-mb", "1"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_served(proc, url + "/health", log, "lavis.serve")
        yield url
    finally:
        stop_server(proc)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, *image_urls: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in image_urls)]}]


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def test_batched_decoding_equals_one_at_a_time(engine: ChatEngine, images: list[Path]) -> None:
    """Different prompt lengths and image counts in one left-padded batch: each answer is its answer alone, and a
    sequence that ends early (its own token limit, a stop string) leaves the others unchanged."""
    m = [engine.load_media(p) for p in images]
    convs = [[engine.make_turn(QUESTION, [m[0]])], [engine.make_turn("Describe both images in detail.", m[1:3])],
             [engine.make_turn("hi", [])], [engine.make_turn("What colour is it?", [m[3]])]]
    settings = GenerationSettings(max_new_tokens=10)
    alone = [engine.generate(c, settings) for c in convs]
    assert engine.generate_batch(convs, settings) == alone
    assert all(a.finish_reason == "length" and a.completion_tokens == 10 for a in alone)
    stop = alone[0].text[3:5]  # a stop string that occurs in the first answer
    short = engine.run([Request(convs[0], stop_strings=[stop]), Request(convs[1], max_new_tokens=4),
                        Request(convs[2]), Request(convs[3])], settings)
    assert short[0].finish_reason == "stop" and short[0].text == alone[0].text[:alone[0].text.find(stop)].strip()
    assert short[1].finish_reason == "length" and short[1].completion_tokens == 4
    assert short[2:] == alone[2:]


@pytest.mark.process
def test_image_data_url_answer_usage_and_stream(server: str, engine: ChatEngine, images: list[Path]) -> None:
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["shapes"]
    turn = engine.make_turn(QUESTION, [engine.load_media(images[0])])
    expected = engine.generate([turn], GenerationSettings(max_new_tokens=12))
    res = api.chat.completions.create(model="shapes", messages=user(QUESTION, data_url(images[0])), temperature=0)
    assert res.choices[0].message.content == expected.text and res.choices[0].finish_reason == "length"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(engine.encode([turn])), 12)
    # the same file named by path (allowed under --allow-local-files) gives the same answer
    res = api.chat.completions.create(model="shapes", messages=user(QUESTION, str(images[0])), temperature=0)
    assert res.choices[0].message.content == expected.text

    stream = api.chat.completions.create(model="shapes", messages=user(QUESTION, data_url(images[0])), temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.process
def test_concurrent_streams_and_closing_one(server: str, engine: ChatEngine, images: list[Path]) -> None:
    """Two streams at once; the first is closed after two pieces and is cancelled on the server (it was asked for
    400 tokens and could not end before); the second's answer is unchanged."""
    api = client(server)
    expected = engine.generate([engine.make_turn("Describe it.", [engine.load_media(images[1])])],
                               GenerationSettings(max_new_tokens=12)).text
    before = health(server)["cancelled"]
    got: queue.Queue = queue.Queue()

    def long_then_close() -> None:
        s = api.chat.completions.create(model="shapes", messages=user(QUESTION, data_url(images[0])), stream=True,
                                        temperature=0, max_tokens=400, extra_body={"min_tokens": 400})
        n = 0
        for c in s:
            n += bool(c.choices and c.choices[0].delta.content)
            if n == 2:
                break
        s.close()
        got.put(("closed", n))

    def full() -> None:
        s = api.chat.completions.create(model="shapes", messages=user("Describe it.", data_url(images[1])),
                                        stream=True, temperature=0)
        got.put(("full", "".join(c.choices[0].delta.content or "" for c in s if c.choices)))

    threads = [threading.Thread(target=long_then_close), threading.Thread(target=full)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    results = dict(got.get_nowait() for _ in range(2))
    assert results == {"closed": 2, "full": expected}
    deadline = time.time() + 120
    while health(server)["cancelled"] == before:
        assert time.time() < deadline, "the closed stream was not cancelled on the server"
        time.sleep(0.2)


@pytest.mark.process
def test_four_concurrent_greedy_requests_equal_one_at_a_time(server: str, images: list[Path]) -> None:
    api = client(server)
    asks = [user(QUESTION, data_url(images[0])), user("Describe both.", data_url(images[1]), data_url(images[2])),
            [{"role": "user", "content": "hi"}], user("Which colour?", data_url(images[3]))]
    one_by_one = [api.chat.completions.create(model="m", messages=m, temperature=0).choices[0].message.content
                  for m in asks]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = api.chat.completions.create(model="m", messages=asks[i], temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [answers.get(i) for i in range(4)] == one_by_one


@pytest.mark.process
def test_errors_are_openai_shaped(server: str, images: list[Path], tmp_path: Path) -> None:
    api = client(server)
    bad = "data:image/png;base64," + base64.b64encode(b"this is text, not an image").decode()
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="m", messages=user(QUESTION, data_url(images[0]), bad))
    err = e.value.response.json()["error"]
    assert e.value.status_code == 400 and err["param"] == "messages[0].content[2].image_url.url"
    assert err["message"].startswith("messages[0].content[2].image_url.url: not a usable image")
    assert set(err) == {"message", "type", "param", "code"}

    too_many = [data_url(images[0])] * 64  # 64 images x 8 slots over the 512-token context
    with pytest.raises(openai.BadRequestError, match="context of 512"):
        api.chat.completions.create(model="m", messages=user(QUESTION, *too_many))
    with pytest.raises(openai.BadRequestError, match="outside the folder"):
        api.chat.completions.create(model="m", messages=user(QUESTION, str(tmp_path / "x.png")))
    with pytest.raises(openai.BadRequestError, match="never fetches from the network"):
        api.chat.completions.create(model="m", messages=user(QUESTION, "https://example.com/x.png"))
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"max_tokens": "twelve"})
    assert e.value.response.json()["error"]["param"] == "max_tokens"

    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.response.json()["error"]["code"] == "invalid_api_key"

    big = {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(big).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"


def test_full_queue_answers_503(engine: ChatEngine) -> None:
    """With the worker not started, the queue fills deterministically: the request past --max-queue gets 503."""
    from fastapi.testclient import TestClient

    from lavis.serve.app import ServeOptions, build_app
    from lavis.serve.scheduler import Scheduler

    scheduler = Scheduler(engine, max_queue=1, max_batch=1)  # not started: nothing leaves the queue
    app = TestClient(build_app(engine, scheduler, ServeOptions()))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    done = threading.Event()
    first = threading.Thread(target=lambda: (app.post("/v1/chat/completions", json=body), done.set()))
    first.daemon = True  # never answered: the worker is not running
    first.start()
    deadline = time.time() + 60
    while scheduler.waiting() < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    res = app.post("/v1/chat/completions", json=body)
    assert res.status_code == 503 and res.json()["error"]["code"] == "queue_full"


def test_weights_side_does_not_import_the_chat_package() -> None:
    """load_model lives with the weight readers; the converter and the loader import nothing from lavis.chat."""
    import ast

    for path in [*(REPO / "lavis/convert").glob("*.py"), REPO / "lavis/weights/load.py", REPO / "lavis/inspect.py"]:
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.startswith("lavis.chat")], path


def post(url: str, body: object, chunks: int = 0) -> tuple[int, dict]:
    """Plain HTTP POST of ``body`` (JSON; a str is sent as it is); ``chunks``: sent chunked in that many pieces."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8", "surrogatepass")
    if chunks:
        size = -(-len(data) // chunks)
        data = iter([data[i:i + size] for i in range(0, len(data), size)])  # no length: urllib sends it chunked
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_stop_strings_match_as_a_full_search_in_linear_time() -> None:
    """StopStrings against the plain definition (first occurrence; longest end that starts a stop string) on random
    growing texts, then a 200,000-character stop string over 16 tokens: the quadratic search took about 2 s per token,
    this one microseconds (bound: 5 s for all)."""
    import random

    from lavis.chat.stops import StopStrings

    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(0, 4))]
        matcher, text = StopStrings(stops), ""
        for _ in range(8):
            text += "".join(rng.choice("ab") for _ in range(rng.randint(0, 3)))
            text = text[:-1] if rng.random() < 0.1 else text  # a decode may also shorten the text
            first = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
            held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert (matcher.first(text), matcher.held(text)) == (first, held), (stops, text)
    start = time.monotonic()
    matcher = StopStrings(["a" * 200_000 + "b"])
    for i in range(1, 17):
        assert matcher.first("a" * 40 * i) == -1 and matcher.held("a" * 40 * i) == 40 * i
    assert time.monotonic() - start < 5


@pytest.mark.process
def test_stop_is_bounded_and_a_maximal_stop_holds_no_one(server: str) -> None:
    api = client(server)
    hi = [{"role": "user", "content": "hi"}]
    for stop in (["a"] * 5, "x" * 257, "x" * 200_000):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="m", messages=hi, stop=stop)
        assert e.value.response.json()["error"]["param"] == "stop" and "at most 4 stop strings" in str(e.value)
    maximal = ["a" * 255 + "b", "ab" * 128, " " * 256, "\n" * 256]  # never produced, so each token searches them
    done: dict[str, float] = {}

    def ask(name: str, **kw: object) -> None:
        start = time.monotonic()
        api.chat.completions.create(model="m", messages=hi, temperature=0, **kw)
        done[name] = time.monotonic() - start

    slow = threading.Thread(target=ask, args=("maximal",), kwargs={"stop": maximal, "max_tokens": 12})
    slow.start()
    time.sleep(0.2)
    ask("small", max_tokens=2)
    slow.join(timeout=300)
    assert done["maximal"] < 60 and done["small"] < 60  # generous: seconds under load, minutes when it stalled


@pytest.mark.process
def test_requests_are_bounded_before_any_decoding(server: str, images: list[Path], tmp_path: Path) -> None:
    api = client(server)
    tiny = data_url(images[0])
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="m", messages=user(QUESTION, *[tiny] * 65))
    assert e.value.response.json()["error"]["param"] == "messages[0].content[65]" and "--max-images" in str(e.value)

    start = time.monotonic()  # thousands of parts: refused by counting, nothing decoded or tokenized
    status, body = post(server, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 5000}]})
    assert (status, body["error"]["code"]) == (400, "too_many_parts") and time.monotonic() - start < 30
    status, body = post(server, {"messages": [{"role": "user", "content": "a" * 100_001}]})
    assert (status, body["error"]["code"], body["error"]["param"]) == (413, "text_too_long", "messages")

    for side in (8000, 30_000):  # over --max-image-pixels; the second over PIL's own limit: the header tells
        write_png_header_only(tmp_path / "big.png", side, side)
        big = "data:image/png;base64," + base64.b64encode((tmp_path / "big.png").read_bytes()).decode()
        status, body = post(server, {"messages": user(QUESTION, tiny, big)})
        assert (status, body["error"]["code"]) == (413, "image_too_large")
        assert body["error"]["param"] == "messages[0].content[2].image_url.url"

    # 40 images whose pixels cannot be decoded, and a question that overflows the context: the context check comes
    # first, so nothing is decoded (decoding would fail on the first image)
    write_png_header_only(tmp_path / "hollow.png", 64, 64)
    hollow = "data:image/png;base64," + base64.b64encode((tmp_path / "hollow.png").read_bytes()).decode()
    status, body = post(server, {"messages": user("describe " * 300, *[hollow] * 40)})
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")
    status, body = post(server, {"messages": user(QUESTION, hollow)})
    assert (status, body["error"]["code"]) == (400, "invalid_image")


@pytest.mark.process
def test_seed_bad_characters_and_chunked_bodies(server: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    status, body = post(server, {"messages": hi, "seed": 2**70, "temperature": 1})
    assert (status, body["error"]["param"]) == (400, "seed")
    status, body = post(server, {"messages": [{"role": "user", "content": "a\x00b"}]})
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "messages[0].content", "invalid_text")
    surrogate = '{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\ud800y"}]}]}'
    status, body = post(server, surrogate)
    assert (status, body["error"]["param"]) == (400, "messages[0].content[0].text")
    status, body = post(server, {"messages": hi, "stop": "\udfff"})
    assert (status, body["error"]["param"]) == (400, "stop")

    status, body = post(server, {"messages": hi, "max_tokens": 2, "temperature": 0}, chunks=3)  # chunked, small
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, body = post(server, {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}, chunks=40)
    assert (status, body["error"]["code"]) == (413, "request_too_large")


def test_media_decoding_runs_in_a_bounded_pool(engine: ChatEngine, images: list[Path]) -> None:
    """Six requests with images at once, two decode workers: at most two requests decode at the same time."""
    from fastapi.testclient import TestClient

    from lavis.serve.app import ServeOptions, build_app
    from lavis.serve.limits import Limits
    from lavis.serve.scheduler import Scheduler

    class Counting(ChatEngine):
        def __init__(self) -> None:
            self.__dict__.update(engine.__dict__)
            self.now, self.most, self.lock = 0, 0, threading.Lock()

        def load_image_bytes(self, data: bytes, name: str):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.3)
            try:
                return super().load_image_bytes(data, name)
            finally:
                with self.lock:
                    self.now -= 1

    counting = Counting()
    scheduler = Scheduler(counting, max_queue=16, max_batch=1)
    scheduler.start()
    codes: list[int] = []
    body = {"messages": user(QUESTION, data_url(images[0]), data_url(images[1]))}
    opts = ServeOptions(max_new_tokens=1, limits=Limits(decode_workers=2))
    with TestClient(build_app(counting, scheduler, opts)) as app:  # one event loop for all requests, as uvicorn
        threads = [threading.Thread(target=lambda: codes.append(app.post("/v1/chat/completions", json=body)
                                                                .status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert codes == [200] * 6 and 1 <= counting.most <= 2
