"""Shared fixtures: a tiny generated dataset and the demo config pointed at it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from lavis.config.load import load_config
from lavis.config.schema import Config
from lavis.data import shapes
from lavis.data.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
# Annotation indexes (lavis.data.records) of this test session, not the user's ~/.cache; launches inherit it.
os.environ.setdefault("LAVIS_RECORD_INDEX_DIR", tempfile.mkdtemp(prefix="lavis-test-records-"))
# One intra-op thread per test process: the tiny models of the suite gain nothing from a second one, and with two
# xdist workers (or other jobs) on two cores, spinning OpenMP threads cost 10-40x the CPU time of the ops themselves
# (measured: 400 AdamW steps on 4096 weights, 2.7 s of CPU with 2 threads, 0.07 s with 1). Launches through
# `train` or COMMON get the same from `train.num_threads=1` (without it a 1-rank launch takes both cores: a 5-step
# demo run spent 30 s of CPU instead of 12.5 s).
torch.set_num_threads(1)
DEMO_CFG = REPO / "lavis/projects/demo/shapes.yaml"
PRETRAIN_CFG = REPO / "lavis/projects/demo/shapes_pretrain.yaml"


# The two test tiers (`make test-fast` = `-m "not process"`) rest on one marker: a test that starts a process
# (itself or through a fixture it is the first to use) must carry @pytest.mark.process, or it fails here, naming
# the command, so the fast tier can never quietly start launches or servers.
_ACTIVE: list[pytest.Item] = []
_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]
# Libraries probe the system with these (ctypes.util.find_library runs ldconfig): not what the marker is about.
_PROBES = {"ldconfig", "uname", "nvidia-smi", "lscpu"}


def _refuse_unmarked_process(self: subprocess.Popen, args: object, *rest: object, **kw: object) -> None:
    item = _ACTIVE[-1] if _ACTIVE else None
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)  # type: ignore[call-overload]
    probe = bool(argv) and Path(os.fsdecode(argv[0]).split()[0]).name in _PROBES
    if item is not None and not probe and item.get_closest_marker("process") is None:
        raise AssertionError(f"{item.nodeid} starts a process ({str(args)[:120]}) but is not marked "
                             "@pytest.mark.process (tests/conftest.py: the fast tier runs only unmarked tests)")
    _execute_child(self, args, *rest, **kw)


subprocess.Popen._execute_child = _refuse_unmarked_process  # type: ignore[attr-defined]


def _track(item: pytest.Item):
    _ACTIVE.append(item)
    try:
        yield
    finally:
        _ACTIVE.pop()


pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(_track)
pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(_track)
pytest_runtest_teardown = pytest.hookimpl(hookwrapper=True)(_track)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate_dataset(out, num_single=48, num_multi_turn=8, num_pairs=8, num_videos=4, seed=0)
    return out


VLM_TRAIN_SCRIPT = Path(__file__).parent / "scripts" / "vlm_train.py"


def vlm_train(directory: Path, stages: int, partition: str, result: Path, steps: int, *options: str) -> None:
    """``tests/scripts/vlm_train.py`` on a VLM directory under torchrun (one process per stage, CPU); its losses go
    to ``result`` (see the script for ``options``)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(stages),
           str(VLM_TRAIN_SCRIPT), str(directory), str(stages), partition, str(result), str(steps), *options]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{stages} stages failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def data_options(data: Path) -> list[str]:
    return [f"data.train.0.ann_path={data / 'train.json'}", f"data.train.0.vis_root={data}"]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_data: Path) -> Config:
    return load_config(DEMO_CFG, data_options(tiny_data))


def launch(nproc: int, args: list[str], timeout: int = 600, check: bool = True,
           script: Path = REPO / "train_pipeline.py") -> subprocess.CompletedProcess:
    """Run train_pipeline.py (or ``script``) under torchrun with ``nproc`` CPU ranks (gloo); ``check``: raise unless
    it exits 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


STEPS = 6
COMMON = ["train.batch.micro_batch_size=4", "train.optim.warmup_steps=2", "train.optim.lr=1e-3",
          "train.optim.grad_clip=1.0",
          "train.precision=fp32", "train.checkpoint.save_every=0", "train.num_threads=1"]


def losses(run: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def train(tmp: Path, name: str, nproc: int, stages: int, gas: int, data: Path, steps: int = STEPS,
          cfg: Path = DEMO_CFG, extra: tuple[str, ...] = (), stop_at: int | None = None) -> Path:
    out = tmp / name
    stop = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
    proc = launch(nproc, ["--cfg-path", str(cfg), "--num-stages", str(stages), "--max-steps", str(steps), *stop,
                          "--output-dir", str(out), "--options", *COMMON, f"train.batch.grad_accum_steps={gas}",
                          *data_options(data), *extra])
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)  # beside the run: `<name>.log`
    return out


def train_stopped_and_resumed(tmp: Path, name: str, nproc: int, stages: int, gas: int, data: Path,
                              steps: int = STEPS, stop_at: int = 3, **kw: object) -> Path:
    """The run of ``train`` stopped after step ``stop_at`` (with a checkpoint) and resumed in the same directory to
    ``steps``: two launches. The first launch's log is ``<name>_first.log``, the resumed one's ``<name>.log``."""
    train(tmp, name, nproc, stages, gas, data, steps, stop_at=stop_at, **kw)  # type: ignore[arg-type]
    (tmp / f"{name}.log").rename(tmp / f"{name}_first.log")
    return train(tmp, name, nproc, stages, gas, data, steps, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "pp2": train(tmp, "pp2", 2, 2, gas=4, data=tiny_data, steps=6),
        "pp1dp2": train(tmp, "pp1dp2", 2, 1, gas=2, data=tiny_data, steps=6),
        "pp1": train(tmp, "pp1", 1, 1, gas=4, data=tiny_data, steps=6),
        "pp2dp2": train(tmp, "pp2dp2", 4, 2, gas=2, data=tiny_data, steps=6),
    }


@pytest.fixture(scope="session")
def chat_checkpoint(runs: dict[str, Path]) -> tuple[Path, Path]:
    """(config.yaml, unfreeze_llm_model.pth) of the PP=2 run, for the chat front ends."""
    from lavis.convert.pipe_to_pth import convert

    run = runs["pp2"]
    pth = run / "unfreeze_llm_model.pth"
    if not pth.is_file():
        convert(run, "model")
    return run / "config.yaml", pth


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a run directory at ``tmp_path/run``, for a test that damages or resumes it."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def recipe_with_options(path: Path, base: Path, options: list[str]) -> Path:
    """A recipe file at ``path``: ``base:`` plus ``options`` (``key=value``, as ``--options`` takes them) written
    as nested YAML, which is what a user passes as ``--cfg-path``."""
    overrides: dict = {"base": str(base)}
    for item in options:
        key, value = item.split("=")
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(overrides))
    return path


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A syntactically valid PNG that declares a huge size but holds (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) +
                     chunk(b"IEND", b""))


def wait_until_served(proc: subprocess.Popen, url: str, log: Path, name: str, timeout: float = 180) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or stays silent."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise AssertionError(f"{name} did not serve {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def byte_level_tokenizer(specials: list[str]) -> TextTokenizer:
    """A byte-level tokenizer without merges (one id per byte, so ids are easy to predict) plus ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return TextTokenizer(tok, source="test:bytes")


QWEN_TIKTOKEN = REPO.parent / "shared/data/qwen.tiktoken"
"""The real Qwen vocabulary (151643 BPE ranks, shared by Qwen v1/2/2.5/3); read in tests, never copied."""


@pytest.fixture(scope="session")
def qwen_vl_processor_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2.5-VL and Qwen3-VL processor directories (real vocabulary, published chat templates, small pixel
    budgets) saved by transformers, keyed by family; skips where ``qwen.tiktoken`` is absent."""
    from lavis.testing.synthetic_vlm import FAMILIES, write_qwen_vl_processor

    if not QWEN_TIKTOKEN.is_file():
        pytest.skip(f"{QWEN_TIKTOKEN} (the real Qwen BPE ranks) is absent")
    root = tmp_path_factory.mktemp("qwen_vl_processors")
    return {family: write_qwen_vl_processor(root / family, QWEN_TIKTOKEN, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def qwen_vl_processors(qwen_vl_processor_dirs: dict[str, Path]) -> dict[str, object]:
    """The processors of ``qwen_vl_processor_dirs`` loaded once by ``AutoProcessor`` (a load takes seconds)."""
    from transformers import AutoProcessor

    return {family: AutoProcessor.from_pretrained(d) for family, d in qwen_vl_processor_dirs.items()}
