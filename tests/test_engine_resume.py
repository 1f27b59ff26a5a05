"""Crash safety and resume with the real launcher: SIGKILL mid-run, then resume (same and different stage count)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import COMMON, DEMO_CFG, REPO, copy_run, data_options, launch, losses, train

STEPS = 12


def _launch_and_kill_after(out: Path, data: Path, kill_after_step: int) -> None:
    """Start a 12-step PP2 run saving every 6 steps; SIGKILL the whole process group once `latest` names step 6."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_pipeline.py"), "--cfg-path", str(DEMO_CFG), "--num-stages", "2",
           "--max-steps", str(STEPS), "--output-dir", str(out), "--options", *COMMON, "train.batch.grad_accum_steps=4",
           *data_options(data), f"train.checkpoint.save_every={kill_after_step}"]
    log = open(out.parent / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    latest = out / "latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() == f"global_step{kill_after_step}":
            break
        time.sleep(0.005)
    # torchrun starts its workers in sessions of their own: kill every process of the job, workers first.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (out.parent / "killed.log").read_text()[-3000:]
    assert not (out / f"global_step{STEPS}").exists(), "the run finished before it was killed"


@pytest.mark.process
def test_sigkill_then_resume_reproduces_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    full = losses(train(tmp_path, "full", 2, 2, gas=4, data=tiny_data, steps=STEPS))
    out = tmp_path / "killed"
    out.mkdir()
    _launch_and_kill_after(out, tiny_data, kill_after_step=6)
    survived = losses(out)  # metrics rows written before the kill; steps after 6 get truncated on resume
    assert len(survived) >= 6 and survived[:6] == full[:6]
    backup = tmp_path / "at_step6"
    shutil.copytree(out, backup)

    proc = launch(2, ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", str(STEPS), "--resume",
                      "--output-dir", str(out), "--options", *COMMON, "train.batch.grad_accum_steps=4",
                      *data_options(tiny_data), "train.checkpoint.save_every=6"])
    assert f"resumed from {out / 'global_step6'} at step 6" in proc.stdout + proc.stderr
    resumed = losses(out)
    assert len(resumed) == STEPS
    for a, b in zip(full[6:], resumed[6:]):
        assert abs(a - b) <= 1e-6 * abs(a), (full, resumed)

    # The same checkpoint under one stage: weights and the optimizer state (re-mapped per parameter) load and the run
    # says so; it continues the uninterrupted run (tests/test_relayout.py covers more layouts).
    proc = launch(1, ["--cfg-path", str(DEMO_CFG), "--num-stages", "1", "--max-steps", str(STEPS),
                      "--stop-at-step", "8", "--output-dir", str(backup), "--options", *COMMON,
                      "train.batch.grad_accum_steps=4", *data_options(tiny_data)])
    log = proc.stdout + proc.stderr
    assert ("resuming global_step6 written with 2 stages x 1 replica on 1 stage x 1 replica; optimizer state "
            "re-mapped per parameter") in log
    one_stage = losses(backup)
    assert len(one_stage) == 8
    for a, b in zip(full[6:8], one_stage[6:8]):
        assert abs(a - b) <= 1e-5 * abs(a), (one_stage, full)
    assert (backup / "latest").read_text() == "global_step8"


# The next two tests damage a copy of the session's finished 2-stage run (conftest `runs`, checkpoint at step 6)
# instead of each training one of their own.
@pytest.mark.process
def test_interrupted_save_never_becomes_latest(runs: dict[str, Path], tmp_path: Path) -> None:
    """A tag directory without our metadata (a save killed half-way) is never resumed from."""
    from lavis.engine import checkpoint

    run = copy_run(runs["pp2"], tmp_path)
    assert checkpoint.read_latest(run) == "global_step6"
    partial = run / "global_step8"
    partial.mkdir()
    (partial / "layer_00-model_states.pt").write_bytes(b"half")
    assert checkpoint.read_latest(run) == "global_step6"  # `latest` is written last, atomically
    (run / "latest").write_text("global_step8")  # simulate a corrupted pointer: refused with a clear error
    try:
        checkpoint.read_latest(run)
    except FileNotFoundError as e:
        assert "incomplete" in str(e)
    else:
        raise AssertionError("a pointer to an incomplete checkpoint was accepted")


@pytest.mark.process
def test_resume_refuses_a_layer_file_missing_trained_weights(runs: dict[str, Path], tiny_data: Path,
                                                             tmp_path: Path) -> None:
    """Layer files are loaded non-strict (frozen weights are not saved), so a trained weight missing from one must
    be caught by our own check, not silently left at its initial value."""
    import pytest
    import torch

    run = copy_run(runs["pp2"], tmp_path)  # 2 stages, GAS 4: resumed below with the same settings
    f = run / "global_step6" / "layer_02-model_states.pt"
    state = torch.load(f, weights_only=True)
    dropped = next(k for k in state if k.endswith("up_proj.weight"))
    del state[dropped]
    torch.save(state, f)
    (f.parent / "checksums.json").unlink()  # as an older version wrote it (else the edit is refused as damage)
    with pytest.raises(AssertionError, match=f"trainable weights missing \\['{dropped}'\\]"):
        train(tmp_path, "run", 2, 2, gas=4, data=tiny_data, steps=7)
