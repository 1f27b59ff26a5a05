"""webui_demo.py served on 127.0.0.1 and driven in real headless Chromium (Debian's package, via Playwright), plus
a gradio_client call to the same server's ``/answer`` endpoint; refused uploads are deleted at once and the upload
folder is gone once the server stops.

Chromium comes from the system (``.ci/run`` installs it when missing); Playwright only drives it (never
``playwright install``). Without Chromium the browser test skips, except under CI (env ``CI`` set), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, free_port, stop_server, wait_until_served

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "What is in the image?"
UPLOADS: dict[str, Path] = {}  # "dir": the running server's upload folder (from its log)


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and under CI the browser test must run")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def server(chat_checkpoint: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg, pth = chat_checkpoint
    port = free_port()
    log = tmp_path_factory.mktemp("webui") / "server.log"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "webui_demo.py"), "--cfg-path", str(cfg), "-c", str(pth),
                                 "--port", str(port), "--max-new-tokens", "8", "--cpu-only"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(proc, url, log, "webui_demo.py")
        UPLOADS["dir"] = Path(re.search(r"uploads are kept in (\S+)", log.read_text())[1])
        yield url
    finally:
        stop_server(proc)
    assert "dir" in UPLOADS and not UPLOADS["dir"].exists(), "the upload folder outlived the server"


@pytest.fixture(scope="module")
def api_answer(server: str, tiny_data: Path) -> str:
    """The ``/answer`` endpoint through gradio_client: one image and a question."""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    answer = client.predict(handle_file(str(tiny_data / "images/train/000000.jpg")), QUESTION, api_name="/answer")
    assert isinstance(answer, str) and answer.strip()
    return answer


@pytest.mark.process
def test_gradio_client_answer_and_refusal(server: str, api_answer: str, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="notes.png: not a readable image"):
        Client(server, verbose=False).predict(handle_file(str(bad)), QUESTION, api_name="/answer")
    uploaded = sorted(p.name for p in UPLOADS["dir"].rglob("*") if p.is_file())
    assert "000000.jpg" in uploaded and "notes.png" not in uploaded  # the refused upload was deleted


@pytest.mark.process
def test_browser_upload_ask_and_bad_upload(server: str, api_answer: str, tiny_data: Path, tmp_path: Path) -> None:
    chromium = chromium_path()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is in the dev extra: pip install -e '.[dev]'")
    img = tiny_data / "images/train/000000.jpg"
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not an image")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                    headless=True, args=CHROMIUM_FLAGS)
        try:
            page = ctx.new_page()
            page.goto(server)
            page.locator("#files input[type=file]").set_input_files([str(img), str(bad)])
            status = page.locator("#status textarea")
            expect(status).to_have_value("000000.jpg: attached\nnotes.png: not a readable image, left out "
                                         "(cannot identify image (not a recognised image format))", timeout=60_000)
            expect(page.get_by_text("notes.png: not a readable image").first).to_be_visible()  # warning toast

            page.locator("#question textarea").fill(QUESTION)
            page.locator("#send").click()
            bot = page.locator('#chatbot [data-testid="bot"]')
            expect(bot).to_have_count(1, timeout=60_000)
            expect(bot).to_have_text(api_answer, timeout=60_000)  # greedy: the same answer as /answer
            user = page.locator('#chatbot [data-testid="user"]')
            expect(user.get_by_text(QUESTION)).to_be_visible()
            expect(user.locator("img")).to_have_count(1)  # the uploaded image is shown in the chat
            expect(page.locator("#files")).not_to_contain_text("000000.jpg")  # the box emptied after sending

            page.locator("#clear").click()
            expect(bot).to_have_count(0)
        finally:
            ctx.close()
