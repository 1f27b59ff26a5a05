"""DeepSpeed's JIT-built CPU comm op is built once per Python environment, not at every launch: checkouts with their
own virtual environments no longer rebuild it in a shared ``~/.cache/torch_extensions`` at each other's launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavis.engine import distributed

from .conftest import REPO

PROBE = ("import os; from lavis.engine.distributed import init_distributed, shutdown; init_distributed(); "
         "print('EXT=' + os.environ['TORCH_EXTENSIONS_DIR']); shutdown()")


def test_the_extensions_dir_is_keyed_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    mine = distributed.use_private_extensions_dir()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")
    other = distributed.use_private_extensions_dir()
    assert mine != other and Path(mine).parent == Path(other).parent
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen/by/the/user")
    assert distributed.use_private_extensions_dir() == "/chosen/by/the/user"


@pytest.mark.process
def test_a_second_launch_does_not_rebuild_the_comm_op() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TORCH_EXTENSIONS_DIR", None)

    def start() -> Path:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("EXT="))[4:])

    ext = start()
    built = ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    assert built.is_file(), sorted(ext.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in built.parent.iterdir() if p.suffix in (".so", ".o", ".ninja")}
    assert start() == ext
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing compiled or linked again
