"""cli_demo.py interactive mode driven through a pseudo-terminal (pexpect), as a user types into it.

The streamed-answer check is real: with ``min_new_tokens`` far beyond what can be generated in the test, the answer
cannot finish on its own, so text that reaches the terminal in several reads before any new prompt was streamed
while generation was still running; Ctrl-C then stops that answer and the program keeps going.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

pexpect = pytest.importorskip("pexpect", reason="pexpect is in the dev extra: pip install -e '.[dev]'")

TIMEOUT = 120


def spawn(cfg: Path, pth: Path) -> pexpect.spawn:
    env = dict(os.environ, TERM="dumb", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, [str(REPO / "cli_demo.py"), "--cfg-path", str(cfg), "-c", str(pth),
                                           "--max-new-tokens", "8"],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 400))
    child.expect_exact("img> ")
    return child


def read_some(child: pexpect.spawn, timeout: float) -> str:
    """Whatever the program writes next (blocks until at least one byte, up to ``timeout``)."""
    return child.read_nonblocking(size=65536, timeout=timeout)


@pytest.mark.process
def test_cli_in_a_terminal(chat_checkpoint: tuple[Path, Path], tiny_data: Path, tmp_path: Path) -> None:
    img1, img2 = tiny_data / "images/train/000000.jpg", tiny_data / "images/train/000001.jpg"
    child = spawn(*chat_checkpoint)
    try:
        for img in (img1, img2):
            child.sendline(str(img))
            child.expect_exact(f"attached {img}")
            child.expect_exact("img> ")
        child.sendline(str(tmp_path / "missing.png"))  # bad path: message, new prompt, nothing attached
        child.expect_exact("missing.png: image file not found")
        child.expect_exact("img> ")
        child.sendline(":f")
        child.expect_exact("2 media attached")
        child.expect_exact("you> ")

        child.sendline("What is in the image?")
        child.expect_exact("assistant: ")
        child.expect_exact("you> ")
        answer = child.before.strip()
        assert answer, "empty answer"

        child.sendline(":his")
        child.expect(r"\[1\] user \[(.*)\]: What is in the image\?")
        assert child.match.group(1) == f"{img1}, {img2}"
        child.expect_exact(f"[1] assistant: {answer}")
        child.expect_exact("you> ")

        # :img mid-conversation, with one bad path among good ones
        child.sendline(f":img {img2} {tmp_path / 'nope.jpg'}")
        child.expect_exact(f"attached {img2}")
        child.expect_exact("nope.jpg: image file not found")
        child.expect_exact("you> ")

        child.sendline(":conf temperature=0.5")
        child.expect(r"settings: .*temperature=0\.5")
        child.expect_exact("you> ")
        marker = tmp_path / "pwned_marker"
        child.sendline(f":conf temperature=__import__('os').system('touch {marker}')")
        child.expect_exact("is not a literal value")
        child.expect_exact("(settings unchanged)")
        child.expect(r"settings: .*temperature=0\.5")
        child.expect_exact("you> ")
        assert not marker.exists(), ":conf evaluated its value"

        # A streamed answer that cannot end by itself: see it grow, then stop it with Ctrl-C.
        child.sendline(":conf min_new_tokens=100000 max_new_tokens=100000")
        child.expect(r"settings: .*min_new_tokens=100000")
        child.expect_exact("you> ")
        child.sendline("Describe it at length.")
        child.expect_exact("assistant: ")
        first = read_some(child, timeout=TIMEOUT)
        time.sleep(1.0)
        second = read_some(child, timeout=TIMEOUT)
        assert first.strip() and second.strip(), (first, second)
        assert "you> " not in first + second, "the answer finished: nothing was streamed mid-answer"
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("you> ")
        assert child.isalive()

        child.sendline(":his")
        child.expect_exact(f"[2] user [{img2}]: Describe it at length.")
        child.expect(r"\[2\] assistant: .+ \[stopped\]")
        child.expect_exact("you> ")

        child.sendline(":clh")
        child.expect_exact("history cleared")
        child.expect_exact("img> ")
        child.sendline(":his")
        child.expect_exact("(empty)")
        child.expect_exact("img> ")

        child.sendintr()  # Ctrl-C at the prompt: a hint and a new prompt, not an exit
        child.expect_exact("Ctrl-C again")
        child.expect_exact("img> ")
        assert child.isalive()
        child.sendline(":q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
