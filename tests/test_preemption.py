"""Preemption and lost launchers, with real 2-rank launches: every SIGTERM pattern a scheduler produces ends with a
checkpoint at the step reached and exit 0; ranks whose launcher was SIGKILLed exit and release the run's lock.

No test depends on which rank is signalled first or on step timing: each waits (generously) for files and rows, and
the step reached is read back from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lavis.engine import checkpoint
from lavis.engine.guards import StopSignal
from lavis.engine.run_dir import RunLock

from .conftest import COMMON, DEMO_CFG, REPO, data_options, launch

pytestmark = pytest.mark.process

LONG = 400  # more steps than any test lets run: the run is always stopped by the signal


def _args(out: Path, data: Path, *extra: str, stop_at: int | None = None) -> list[str]:
    stop = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
    return ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", str(LONG), *stop, "--output-dir",
            str(out), "--options", *COMMON, "train.batch.grad_accum_steps=2", *data_options(data), *extra]


def _start(out: Path, data: Path, launcher: str) -> tuple[subprocess.Popen, Path]:
    """Start a long 2-rank run under ``launcher`` (a module run with ``python -m``) in a session of its own."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node", "2", str(REPO / "train_pipeline.py"),
           *_args(out, data)]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _rows(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.endswith("}")]


def _wait_for_rows(proc: subprocess.Popen, out: Path, log: Path, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(_rows(out)) < n:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {n} steps within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    ranks = psutil.Process(proc.pid).children(recursive=False)
    assert len(ranks) == 2, ranks
    return ranks


def _term_ranks(ranks: list[psutil.Process]) -> None:
    """As a scheduler does: SIGTERM every rank and every process under it (its data-loader workers)."""
    for rank in ranks:
        try:
            tree = [rank, *rank.children(recursive=True)]
        except psutil.NoSuchProcess:  # it already finished
            continue
        for p in tree:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill_leftovers(proc)
    return log.read_text()


def _kill_leftovers(proc: subprocess.Popen) -> None:
    """Test hygiene only: SIGKILL what this test started and is still running (the launcher, then its ranks)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.wait(timeout=60)


def _gone(p: psutil.Process) -> bool:
    """Exited (a zombie counts: an orphan's new parent reaps it when it pleases)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_saved_at_step_reached(out: Path, log: str) -> int:
    reached = len(_rows(out))
    assert reached >= 1, log[-3000:]
    assert "stopped by a signal after step" in log, log[-3000:]
    assert "exiting now" not in log, log[-3000:]
    assert checkpoint.read_latest(out) == f"global_step{reached}", log[-3000:]
    assert checkpoint.verify_checksums(out / f"global_step{reached}") is None
    assert not (out / ".lock").exists()  # released on a clean exit
    return reached


@pytest.mark.parametrize("pattern", ["ranks_first", "launcher_first", "both"])
def test_any_sigterm_pattern_saves_the_step_reached_and_exits_zero(pattern: str, tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, log = _start(out, tiny_data, "lavis.engine.launch")
    try:
        _wait_for_rows(proc, out, log, 2)
        ranks = _ranks(proc)
        if pattern == "ranks_first":
            _term_ranks(ranks)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
        elif pattern == "launcher_first":
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            _term_ranks(ranks)
        else:
            proc.send_signal(signal.SIGTERM)
            _term_ranks(ranks)
    finally:
        text = _finish(proc, log)
    assert proc.returncode == 0, text[-3000:]
    if pattern != "ranks_first":  # (ranks signalled first may be gone before the launcher's signal arrives)
        assert "launcher: SIGTERM received, forwarded to 2 rank process(es)" in text, text[-3000:]
    _assert_saved_at_step_reached(out, text)


def test_plain_torchrun_loses_no_steps_when_the_whole_job_is_signalled(tiny_data: Path, tmp_path: Path) -> None:
    """torchrun forwards its own SIGTERM to ranks that already have one: the ranks take it as the same request and
    save at the step reached (torchrun itself still exits 1 because it was signalled: lavis.engine.launch fixes
    that)."""
    out = tmp_path / "run"
    proc, log = _start(out, tiny_data, "torch.distributed.run")
    try:
        _wait_for_rows(proc, out, log, 2)
        _term_ranks(_ranks(proc))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    finally:
        text = _finish(proc, log)
    _assert_saved_at_step_reached(out, text)
    # The forwarded copy is recognised ("again within") while the rank is still finishing its step, or ignored once it
    # has stopped (which comes first depends on the machine's load); either way it never kills a rank.
    assert not re.search(r"exitcode\s*:\s*-15", text), text[-3000:]


def test_ranks_exit_and_release_the_lock_when_the_launcher_is_killed(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, log = _start(out, tiny_data, "torch.distributed.run")
    ranks: list[psutil.Process] = []
    try:
        _wait_for_rows(proc, out, log, 2)
        ranks = _ranks(proc)
        proc.send_signal(signal.SIGKILL)  # an OOM kill of torchrun
        proc.wait(timeout=60)
        deadline = time.monotonic() + 180
        while not all(_gone(p) for p in ranks):
            assert time.monotonic() < deadline, f"ranks still running 180 s after the launcher died:\n" \
                                                f"{log.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        for p in ranks:
            if not _gone(p):
                p.kill()
    text = log.read_text()
    assert "the launcher (pid" in text and "is gone" in text, text[-3000:]
    lock = RunLock(out)
    lock.acquire()  # nobody holds it any more
    lock.release()
    latest = checkpoint.read_latest(out)
    assert latest is not None and checkpoint.verify_checksums(out / latest) is None
    # The requeued job resumes from it.
    step = int(latest.removeprefix("global_step"))
    proc2 = launch(2, _args(out, tiny_data, stop_at=step + 1))
    assert f"resumed from {out / latest} at step {step}" in proc2.stdout + proc2.stderr
    assert checkpoint.read_latest(out) == f"global_step{step + 1}"


def test_stop_signal_counts_repeated_sigterms_as_one_and_a_later_one_or_a_second_sigint_as_exit() -> None:
    s = StopSignal(grace_s=60)
    assert not s.forces_exit(signal.SIGTERM)
    s.received, s._first_at = signal.SIGTERM, time.monotonic()
    assert not s.forces_exit(signal.SIGTERM)  # the launcher's forwarded copy
    assert not s.forces_exit(signal.SIGINT)
    s._first_at -= 61
    assert s.forces_exit(signal.SIGTERM)  # an explicit second signal after the grace period
    ctrl_c = StopSignal(grace_s=60)
    ctrl_c.received, ctrl_c._first_at = signal.SIGINT, time.monotonic()
    assert ctrl_c.forces_exit(signal.SIGINT)


CHILD = """
import signal, sys, time
from lavis.engine.distributed import watch_launcher
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank stuck where the graceful stop cannot finish
watch_launcher(poll_s=0.1, exit_after_s=1.0)
print("ready", flush=True)
time.sleep(600)
"""
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
print(child.pid, flush=True)
child.wait()
"""


def test_an_orphaned_rank_that_cannot_stop_gracefully_exits_anyway(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), RANK="1")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()  # the launcher is SIGKILLed
        parent.wait(timeout=60)
        deadline = time.monotonic() + 120
        while not _gone(child):
            assert time.monotonic() < deadline, "the orphan did not exit"
            time.sleep(0.2)
    finally:
        if not _gone(child):
            child.kill()
    err = parent.stderr.read()
    parent.stderr.close()
    parent.stdout.close()
    assert "[rank 1] the launcher (pid" in err and "exiting without a checkpoint" in err, err
