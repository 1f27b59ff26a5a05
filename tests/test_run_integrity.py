"""Run integrity: a training run never silently wastes or loses work.

Real 2-rank launches where the failure is distributed (NaN stop and skip, resume refusals, unsafe pickles, the run
lock, SIGTERM); the run directory's rules (resume point, config diff, metrics file) are also tested directly.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lavis.engine import checkpoint
from lavis.engine.metrics import read_metric_rows, truncate_metrics
from lavis.engine.run_dir import (
    LOCK_FILE,
    RunDirError,
    RunLock,
    config_changes,
    find_resume_tag,
)

from .conftest import COMMON, DEMO_CFG, REPO, copy_run, data_options, launch, losses

POISON = REPO / "tests/scripts/poison_train.py"


def _args(out: Path, data: Path, steps: int, *extra: str, stop_at: int | None = None) -> list[str]:
    stop = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
    return ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", str(steps), *stop,
            "--output-dir", str(out), "--options", *COMMON, "train.batch.grad_accum_steps=2", *data_options(data),
            *extra]


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


# --- non-finite guard ------------------------------------------------------------------------------------------------

@pytest.mark.process
def test_nonfinite_step_stops_the_run_without_a_nan_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    proc = launch(2, ["--poison-steps", "2", *_args(out, tiny_data, 4, "train.checkpoint.save_every=1")], check=False,
                  script=POISON)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "step 2: non-finite training values (loss nan" in log and "lower train.optim.lr" in log, log[-3000:]
    root_cause = log[log.index("Root Cause"):]  # whichever rank torchrun names, it quotes the real values
    assert "non-finite training values (loss nan, gradient norm" in root_cause and "loss ?" not in log, root_cause
    assert (out / "latest").read_text() == "global_step1"
    assert not (out / "global_step2").exists()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["nonfinite"] is True and rows[1]["loss"] is None


@pytest.mark.process
def test_nonfinite_steps_are_skipped_up_to_the_limit(tiny_data: Path, tmp_path: Path) -> None:
    """A poisoned step (as a corrupt batch would be) is logged and skipped; training goes on."""
    from lavis.engine.optim import warmup_cosine

    out = tmp_path / "skip"
    proc = launch(2, ["--poison-steps", "2", *_args(out, tiny_data, 4, "train.max_nonfinite_steps=1")],
                  script=POISON)
    assert "Skipped (1 of at most 1)" in proc.stdout + proc.stderr
    rows = _rows(out)
    assert [r.get("nonfinite", False) for r in rows] == [False, True, False, False]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in rows[2:])
    assert (out / "latest").read_text() == "global_step4"
    # The step-2 update was skipped and did not advance the LR schedule: step 4 runs at the rate of schedule step 3.
    assert rows[3]["lr"] == pytest.approx(warmup_cosine(2, warmup=2, total=4, lr=1e-3, min_lr=0.0))
    assert rows[3]["lr"] != pytest.approx(warmup_cosine(3, warmup=2, total=4, lr=1e-3, min_lr=0.0))


# --- resume: explicit about what changed; refusals write nothing ----------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run stopped with its checkpoint after step 2 (kept pristine: tests copy it)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    launch(2, _args(out, tiny_data, 4, stop_at=2))
    assert (out / "latest").read_text() == "global_step2"
    return out


@pytest.mark.process
def test_resume_applies_a_new_learning_rate_and_says_so(stopped_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    from lavis.engine.optim import warmup_cosine

    run = copy_run(stopped_run, tmp_path)
    proc = launch(2, _args(run, tiny_data, 4, "train.optim.lr=5e-4", "train.optim.min_lr=1e-5"))
    log = proc.stdout + proc.stderr
    assert "resume: train.optim.lr: 0.001 -> 0.0005 (from step 2 on)" in log, log[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows[2:]:
        want = warmup_cosine(r["step"] - 1, warmup=2, total=4, lr=5e-4, min_lr=1e-5)
        assert r["lr"] == pytest.approx(want, rel=1e-9), rows
    assert "lr: 0.0005" in (run / "config.yaml").read_text()


@pytest.mark.process
def test_resume_refuses_a_model_change_before_writing_anything(stopped_run: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    run = copy_run(stopped_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = launch(2, _args(run, tiny_data, 4, "model.llm.hf_config.intermediate_size=384", "train.seed=7"),
                  check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "model.llm.hf_config.intermediate_size" in log and "train.seed: 42 -> 7" in log, log[-3000:]
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK_FILE}
    assert after == {k: v for k, v in before.items() if k != LOCK_FILE}


class _Marker:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LAVIS_TEST_MARKER']}",))


@pytest.mark.process
def test_malicious_pickle_in_a_checkpoint_is_refused_not_executed(stopped_run: Path, tiny_data: Path,
                                                                   tmp_path: Path) -> None:
    run = copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    os.environ["LAVIS_TEST_MARKER"] = str(marker)
    try:
        bad = run / "global_step2" / "mp_rank_00_model_states.pt"
        with open(bad, "wb") as fh:
            pickle.dump({"module": None, "x": _Marker()}, fh)
        checkpoint.write_checksums(bad.parent)  # a hostile file comes with matching checksums
    finally:
        del os.environ["LAVIS_TEST_MARKER"]
    proc = launch(2, _args(run, tiny_data, 4), check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"refused to load {bad}" in log, log[-3000:]
    assert not marker.exists()


@pytest.mark.process
def test_missing_latest_is_refused_with_the_checkpoints_found(stopped_run: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    run = copy_run(stopped_run, tmp_path)
    (run / "latest").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    proc = launch(2, _args(run, tiny_data, 4), check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "holds checkpoints but no `latest` file" in log and "--resume-from global_step2" in log, log[-3000:]
    assert (run / "metrics.jsonl").read_text() == metrics


@pytest.mark.process
def test_a_second_run_on_a_locked_directory_fails_at_once(stopped_run: Path, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    run = copy_run(stopped_run, tmp_path)
    holder = RunLock(run)
    holder.acquire()
    try:
        proc = launch(2, _args(run, tiny_data, 4), check=False)
    finally:
        holder.release()
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"is in use by another run (pid {os.getpid()} on host" in log, log[-3000:]
    assert (run / "latest").read_text() == "global_step2"


# --- preemption ------------------------------------------------------------------------------------------------------

@pytest.mark.process
def test_sigterm_saves_and_exits_zero_then_resume_matches(runs: dict[str, Path], tiny_data: Path,
                                                          tmp_path: Path) -> None:
    """Same arguments as the session's uninterrupted `pp2` run (6 steps, GAS 4); SIGTERM one worker mid-run."""
    import psutil

    out = tmp_path / "term"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    args = ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", "6", "--output-dir", str(out),
            "--options", *COMMON, "train.batch.grad_accum_steps=4", *data_options(tiny_data)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_pipeline.py"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.01)
    # As a scheduler does: SIGTERM to one rank and every process under it (its data-loader workers).
    ranks = sorted(psutil.Process(proc.pid).children(recursive=False), key=lambda p: p.pid)
    assert len(ranks) == 2, ranks
    for p in [ranks[-1], *ranks[-1].children(recursive=True)]:
        p.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "stopped by a signal after step" in log
    stopped = int((out / "latest").read_text().removeprefix("global_step"))
    assert 1 <= stopped < 6, log[-3000:]
    launch(2, args)  # resume
    full = losses(runs["pp2"])
    resumed = losses(out)
    assert len(resumed) == 6
    for a, b in zip(full, resumed):
        assert abs(a - b) <= 1e-6 * abs(a), (full, resumed)


# --- the run directory's rules, directly ----------------------------------------------------------------------------

def test_find_resume_tag_rules(tmp_path: Path) -> None:
    assert find_resume_tag(tmp_path, require=False, resume_from=None) is None
    with pytest.raises(RunDirError, match="--resume: no checkpoint"):
        find_resume_tag(tmp_path, require=True, resume_from=None)
    for n in (3, 6):
        (tmp_path / f"global_step{n}").mkdir()
        (tmp_path / f"global_step{n}" / "lavis_meta.json").write_text("{}")
    (tmp_path / "global_step9").mkdir()  # incomplete: no metadata
    with pytest.raises(RunDirError, match=r"Checkpoints found: global_step3, global_step6\. .*--resume-from "
                                          r"global_step6"):
        find_resume_tag(tmp_path, require=False, resume_from=None)
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(RunDirError, match="not a complete checkpoint"):
        find_resume_tag(tmp_path, require=False, resume_from=None)
    assert find_resume_tag(tmp_path, require=False, resume_from="global_step3") == "global_step3"
    (tmp_path / "latest").write_text("global_step6")
    assert find_resume_tag(tmp_path, require=True, resume_from=None) == "global_step6"


def test_config_changes_refuses_model_and_data_order_keys_only() -> None:
    saved = {"model": {"llm": {"hf_config": {"hidden_size": 128}, "path": "a", "frozen": False}},
             "train": {"optim": {"lr": 1e-3}, "seed": 42, "max_steps": 10}, "data": {"train": [{"ann_path": "x"}]}}
    new = {"model": {"llm": {"hf_config": {"hidden_size": 256}, "path": "b", "frozen": True}, "lora": None},
           "train": {"optim": {"lr": 1e-4}, "seed": 42, "max_steps": 20, "eval": 5},
           "data": {"train": [{"ann_path": "y"}]}}
    ch = config_changes(saved, new, defaults={"model": {"lora": None}, "train": {"eval": 0}})
    assert ch.refused == ["model.llm.frozen: False -> True", "model.llm.hf_config.hidden_size: 128 -> 256"]
    assert [c.split(":")[0] for c in ch.applied] == ["data.train", "model.llm.path", "train.eval", "train.max_steps",
                                                     "train.optim.lr"]


def test_run_lock_reports_holder_and_takes_over_a_stale_lock(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("pid 999999 on host gone, started yesterday")  # left by a crashed run
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.stale == "pid 999999 on host gone, started yesterday"
    second = RunLock(tmp_path)
    with pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        second.acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with open(tmp_path / "probe", "w") as fh:  # the lock really was released
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_metrics_torn_last_line_is_dropped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(f, 4)
    assert [r["step"] for r in read_metric_rows(f)] == [1, 2, 3, 4]
    assert f"{f}:6: dropping a torn last line" in capsys.readouterr().err
    f.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{f}:2: damaged metrics row"):
        truncate_metrics(f, 2)


def test_fresh_start_keeps_an_earlier_metrics_file(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n')
    truncate_metrics(f, 0)
    assert not f.exists() and (tmp_path / "metrics.jsonl.old-1").read_text() == '{"step": 1}\n'


def test_config_changes_sees_a_section_saved_in_another_shape_as_present() -> None:
    """A LoRA run saves `model.llm.lora` as a mapping; its default (None) must not count as a difference."""
    saved = {"model": {"llm": {"lora": {"r": 8}}}}
    assert config_changes(saved, saved, defaults={"model": {"llm": {"lora": None}}}).refused == []
    assert config_changes({"model": {"llm": {}}}, saved, defaults={"model": {"llm": {"lora": None}}}).refused == [
        "model.llm.lora: None -> '<absent>'", "model.llm.lora.r: '<absent>' -> 8"]


@pytest.mark.process
def test_bf16_zero1_checkpoint_resumes_through_the_restricted_unpickler(tiny_data: Path, tmp_path: Path) -> None:
    """ZeRO-1's optimizer files hold DeepSpeed objects (loss scaler, ...): the allow-list must cover them."""
    out = tmp_path / "z1"
    extra = ("train.precision=bf16", "train.optim.zero_stage=1")
    launch(2, _args(out, tiny_data, 3, *extra, stop_at=2))
    proc = launch(2, _args(out, tiny_data, 3, *extra))
    assert f"resumed from {out / 'global_step2'} at step 2" in proc.stdout + proc.stderr
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
