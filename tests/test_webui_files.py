"""The web UI reads only what the client uploaded or what ``--allow-local-files`` names: a forged gradio ``FileData``
path (what a remote client can send; gradio_client's own upload step is bypassed to send it) or a server path outside
those folders is refused with one message, whether the file exists or not, and is never copied or decoded.

The server is webui_demo.py on 127.0.0.1 over the demo architecture, randomly initialised (no training launch).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from lavis.chat.engine import ChatEngine
from lavis.chat.webui import REFUSED, WebChat

from .conftest import DEMO_CFG, REPO, free_port, stop_server, wait_until_served

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def folders(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """allowed/ (given to --allow-local-files) and outside/ (not), each holding a real image."""
    root = tmp_path_factory.mktemp("webui-files")
    out = {"allowed": root / "allowed", "outside": root / "outside", "log": root / "server.log"}
    for name in ("allowed", "outside"):
        out[name].mkdir()
    shutil.copy(tiny_data / "images/train/000000.jpg", out["allowed"] / "shape.jpg")
    shutil.copy(tiny_data / "images/train/000001.jpg", out["outside"] / "private.jpg")
    (out["allowed"] / "link.jpg").symlink_to(out["outside"] / "private.jpg")  # a way out of allowed/
    return out


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO))
    with open(folders["log"], "w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "webui_demo.py"), "--cfg-path", str(DEMO_CFG),
                                 "--port", str(port), "--max-new-tokens", "8", "--cpu-only",
                                 "--allow-local-files", str(folders["allowed"])],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(proc, url, folders["log"], "webui_demo.py")
        folders["uploads"] = Path(re.search(r"uploads are kept in (\S+)", folders["log"].read_text())[1])
        yield url
    finally:
        stop_server(proc)


def ask(url: str, api_name: str, file: object, forged: bool = False) -> str:
    """One call through gradio_client; ``forged``: the FileData goes out as written (gradio_client would otherwise
    read the named file on this machine and upload it, which is the client's own access, not the server's)."""
    from gradio_client import Client
    from gradio_client.client import Endpoint

    client = Client(url, verbose=False)
    if not forged:
        return client.predict(file, QUESTION, api_name=api_name)
    upload = Endpoint._upload_file
    Endpoint._upload_file = lambda self, f, data_index: f
    try:
        return client.predict(file, QUESTION, api_name=api_name)
    finally:
        Endpoint._upload_file = upload


def refusal(url: str, api_name: str, file: object, forged: bool = False) -> str:
    with pytest.raises(Exception) as e:  # gradio_client raises its AppError for the server's error
        ask(url, api_name, file, forged)
    return str(e.value)


def file_data(path: Path | str) -> dict:
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.process
def test_forged_file_data_is_refused_and_never_read(server: str, folders: dict[str, Path]) -> None:
    from gradio_client import handle_file

    answer = ask(server, "/answer", handle_file(str(folders["allowed"] / "shape.jpg")))  # a real upload
    assert isinstance(answer, str) and answer.strip()

    private, missing = folders["outside"] / "private.jpg", folders["outside"] / "missing.jpg"
    got = refusal(server, "/answer", file_data(private), forged=True)
    assert refusal(server, "/answer", file_data(missing), forged=True).replace("missing", "private") == got
    for path in (private, f"{folders['allowed']}/../outside/private.jpg", REPO / "README.md"):
        assert "not uploaded" in refusal(server, "/answer", file_data(path), forged=True)
    cached = [p.name for p in folders["uploads"].rglob("*") if p.is_file()]
    assert "shape.jpg" in cached and "private.jpg" not in cached and "README.md" not in cached


@pytest.mark.process
def test_allow_local_files_reads_only_under_its_folder(server: str, folders: dict[str, Path]) -> None:
    from gradio_client import handle_file

    inside = folders["allowed"] / "shape.jpg"
    assert ask(server, "/answer_local", str(inside)) == ask(server, "/answer", handle_file(str(inside)))
    outside = [folders["outside"] / "private.jpg", folders["outside"] / "missing.jpg",
               f"{folders['allowed']}/../outside/private.jpg", folders["allowed"] / "link.jpg", "/etc/passwd"]
    messages = {re.sub(r"\S+: refused", "NAME: refused", refusal(server, "/answer_local", str(p))) for p in outside}
    assert len(messages) == 1 and REFUSED in messages.pop()  # one message: nothing said about the file itself
    cached = [p.name for p in folders["uploads"].rglob("*") if p.is_file()]
    assert "private.jpg" not in cached and "link.jpg" not in cached


def test_load_files_refuses_names_outside_the_upload_folder(tiny_data: Path, tmp_path: Path) -> None:
    """The callbacks' own check (whatever gradio's version checks): a real image outside the upload folder is
    refused with the same note as a missing file."""
    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    uploads.mkdir()
    outside.mkdir()
    shutil.copy(tiny_data / "images/train/000000.jpg", outside / "a.jpg")
    chat = WebChat(ChatEngine.from_files(DEMO_CFG, None, device="cpu"), upload_dir=uploads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request
        media, notes = chat.load_files([str(outside / "a.jpg"), str(outside / "b.jpg")])
    assert media == [] and [n.split(":", 1)[1] for n in notes] == [f" {REFUSED}, left out"] * 2
