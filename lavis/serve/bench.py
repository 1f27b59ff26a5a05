"""Throughput of the API server, measured with the ``openai`` client: ``python -m lavis.serve.bench``.

For each ``--max-batch`` value it starts ``python -m lavis.serve`` on the model (default: the demo architecture,
randomly initialised, on the CPU unless ``--gpu``), then for each ``--clients`` count runs that many client threads
that together send ``--requests`` greedy requests (one image as a base64 data URL and a question, ``--max-tokens``
answer tokens each), and reports requests/s and generated tokens/s (``usage.completion_tokens``) over the wall time.
Prints a markdown table; ``--out`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

from lavis.data import shapes

DEMO_CFG = Path(__file__).resolve().parents[1] / "projects/demo/shapes.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lavis.serve", "--cfg-path", str(args.cfg_path), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256"]
    if args.checkpoint_path:
        cmd += ["-c", str(args.checkpoint_path)]
    if not args.gpu:
        cmd.append("--cpu-only")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            if time.time() > deadline:
                proc.terminate()
                raise SystemExit(f"the server did not start within 600 s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def measure(url: str, clients: int, requests: int, messages: list[list[ChatCompletionMessageParam]],
            max_tokens: int) -> dict:
    """``requests`` requests spread over ``clients`` threads; each thread sends its share one after another."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    tokens = [0] * clients

    def client(k: int) -> None:
        for i in range(k, requests, clients):
            res = api.chat.completions.create(model="bench", messages=messages[i % len(messages)], temperature=0,
                                              max_tokens=max_tokens)
            assert res.usage is not None  # lavis.serve reports usage with every answer
            tokens[k] += res.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(sum(tokens) / wall, 1)}


def sample_messages(n: int, tmp: Path) -> list[list[ChatCompletionMessageParam]]:
    out: list[list[ChatCompletionMessageParam]] = []
    for path, _ in shapes.generate_eval_images(tmp, n, seed=0):
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is in the image?"}]}])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", type=Path, default=DEMO_CFG, help="model config (default: the demo, random init)")
    p.add_argument("-c", "--checkpoint-path", type=Path, help="weights (.pth); default: the config's seeded init")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens per request")
    p.add_argument("--gpu", action="store_true", help="let the server use a GPU (default: CPU)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lavis-serve-bench-") as tmp:
        messages = sample_messages(8, Path(tmp))
        for max_batch in args.max_batch:
            port = free_port()
            proc = start_server(args, max_batch, port, Path(tmp) / f"server-{max_batch}.log")
            try:
                url = f"http://127.0.0.1:{port}"
                measure(url, 1, 1, messages, args.max_tokens)  # warm-up
                for clients in args.clients:
                    row = {"max_batch": max_batch, **measure(url, clients, args.requests, messages, args.max_tokens)}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print("| --max-batch | clients | requests/s | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_batch']} | {r['clients']} | {r['requests_per_s']} | {r['tokens_per_s']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
