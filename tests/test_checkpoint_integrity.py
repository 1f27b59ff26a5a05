"""What a checkpoint read back is: saved into a temporary directory renamed into place (a kill mid-save, even one that
replaces a tag of an abandoned branch, never tears `latest`), checked against its checksums (bit-rot is refused by
resume and the converter, naming the file), and a failed write (a full disk) is named in one line and cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lavis.engine import checkpoint
from lavis.engine.checkpoint import CHECKSUM_FILE, META_FILE, SAVING_PREFIX, ChecksumError

from .conftest import COMMON, DEMO_CFG, REPO, copy_run, data_options, launch
from .test_preemption import _kill_leftovers

FAULT = REPO / "tests/scripts/fault_in_save.py"


def _args(out: Path, data: Path, steps: int, *extra: str, resume_from: str | None = None) -> list[str]:
    resume = ["--resume-from", resume_from] if resume_from else []
    return ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", str(steps), *resume, "--output-dir",
            str(out), "--options", *COMMON, "train.batch.grad_accum_steps=2", "train.checkpoint.save_every=1",
            "train.checkpoint.keep_last=10",
            *data_options(data), *extra]


@pytest.fixture(scope="module")
def saved_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank run with checkpoints global_step1 .. global_step4 (kept pristine: tests copy it)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    launch(2, _args(out, tiny_data, 4))
    assert checkpoint.read_latest(out) == "global_step4"
    return out


@pytest.mark.process
def test_checksums_cover_every_file_of_a_checkpoint(saved_run: Path) -> None:
    tag_dir = saved_run / "global_step4"
    listed = set(json.loads((tag_dir / CHECKSUM_FILE).read_text())["files"])
    assert listed == {p.name for p in tag_dir.iterdir()} - {CHECKSUM_FILE}
    assert {META_FILE, "layer_00-model_states.pt", "mp_rank_01_model_states.pt"} <= listed
    assert checkpoint.verify_checksums(tag_dir) is None
    assert not list(saved_run.glob(f"{SAVING_PREFIX}*"))


@pytest.mark.process
def test_bitrot_in_a_layer_file_is_refused_by_resume_and_converter(saved_run: Path, tiny_data: Path,
                                                                   tmp_path: Path) -> None:
    from lavis.convert.pipe_to_pth import convert

    run = copy_run(saved_run, tmp_path)
    bad = run / "global_step4" / "layer_01-model_states.pt"
    data = bytearray(bad.read_bytes())
    mid = len(data) // 2  # inside the tensor data: torch.load alone would not notice
    data[mid:mid + 64] = bytes(64)
    bad.write_bytes(bytes(data))
    metrics = (run / "metrics.jsonl").read_text()

    proc = launch(2, _args(run, tiny_data, 6), check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert f"{bad} does not match its checksum" in log, log[-3000:]
    assert "--resume-from global_stepK" in log and "global_step3" in log, log[-3000:]
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained, nothing rotated
    assert (run / "latest").read_text() == "global_step4" and (run / "global_step1").is_dir()

    with pytest.raises(ChecksumError, match=f"{bad} does not match its checksum"):
        convert(run, "model")
    bad.write_bytes(bytes(data[:mid]))  # truncated: named by size before any hashing
    with pytest.raises(ChecksumError, match=f"{bad} has {mid} bytes"):
        checkpoint.verify_checksums(run / "global_step4")


@pytest.mark.process
def test_a_checkpoint_without_checksums_converts_with_a_note(saved_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from lavis.convert.pipe_to_pth import convert

    run = copy_run(saved_run, tmp_path)
    (run / "global_step4" / CHECKSUM_FILE).unlink()  # as written before checksums existed
    convert(run, "model")
    assert f"NOTE: {run / 'global_step4'} has no {CHECKSUM_FILE}" in capsys.readouterr().err
    assert (run / "unfreeze_llm_model.pth").is_file()


def _kill_job_when_stalled(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not marker.is_file():
        assert proc.poll() is None, f"exited ({proc.returncode}) before stalling:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    _kill_leftovers(proc)  # SIGKILL the launcher and every rank, mid-save


@pytest.mark.process
def test_rollback_then_kill_during_the_save_of_an_existing_tag_keeps_latest_whole(saved_run: Path, tiny_data: Path,
                                                                                   tmp_path: Path) -> None:
    """Resume from global_step2 while global_step4 (of the abandoned branch) exists; the new branch saves step 3,
    then is killed while it writes step 4. `latest` must name a complete, verified checkpoint, and the old step 4
    must never have been written into."""
    run = copy_run(saved_run, tmp_path)
    old_meta = (run / "global_step4" / META_FILE).read_bytes()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    branch = ("train.optim.lr=5e-4",)  # the new branch differs from the old one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(FAULT),
           "--stall-in-save", "4", *_args(run, tiny_data, 4, *branch, resume_from="global_step2")]
    log = tmp_path / "stalled.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _kill_job_when_stalled(proc, Path(f"{run}.stalled"), log)
    finally:
        _kill_leftovers(proc)
    assert proc.returncode == -signal.SIGKILL
    assert "global_step4" in Path(f"{run}.stalled").read_text()
    assert (run / f"{SAVING_PREFIX}global_step4").is_dir()  # the partial save went there ...
    assert (run / "global_step4" / META_FILE).read_bytes() == old_meta  # ... never into the existing tag
    latest = checkpoint.read_latest(run)
    assert latest == "global_step3", log.read_text()[-3000:]
    assert checkpoint.verify_checksums(run / latest) is None
    assert json.loads((run / latest / META_FILE).read_text())["config"]["train"]["optim"]["lr"] == 5e-4

    # The requeued job resumes from `latest` and replaces the abandoned step 4 with its own, whole.
    proc2 = launch(2, _args(run, tiny_data, 4, *branch))
    assert f"resumed from {run / 'global_step3'} at step 3" in proc2.stdout + proc2.stderr
    assert checkpoint.read_latest(run) == "global_step4"
    assert json.loads((run / "global_step4" / META_FILE).read_text())["config"]["train"]["optim"]["lr"] == 5e-4
    assert checkpoint.verify_checksums(run / "global_step4") is None
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.is_dir()]


@pytest.mark.process
def test_a_failed_write_names_the_directory_removes_it_and_keeps_latest(tiny_data: Path, tmp_path: Path) -> None:
    """Rank 0 cannot write files over 1 MiB from the save of step 2 on (as on a full disk)."""
    out = tmp_path / "run"
    proc = launch(2, ["--fsize-limit-in-save", "2", *_args(out, tiny_data, 3)], check=False, script=FAULT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert f"error: rank 0: cannot write checkpoint {out / 'global_step2'} (RuntimeError: " in log, log[-3000:]
    assert "B free on" in log and "`latest` still names global_step1" in log, log[-3000:]
    assert "Traceback" not in log.split("cannot write checkpoint")[0][-2000:]
    assert not (out / "global_step2").exists()
    # Rank 0 removed its partial directory; rank 1 may still have been writing its layers into it (which rank gets
    # how far before the run stops is timing): what is left is never complete, and the next save's start removes it.
    partial = out / f"{SAVING_PREFIX}global_step2"
    assert not (partial / META_FILE).exists() and not (partial / CHECKSUM_FILE).exists()
    assert checkpoint.read_latest(out) == "global_step1"
    proc2 = launch(2, _args(out, tiny_data, 3))
    assert checkpoint.read_latest(out) == "global_step3", (proc2.stdout + proc2.stderr)[-3000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(SAVING_PREFIX)]


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_a_whole_directory_for_another(exchange: bool, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:  # a filesystem without renameat2(RENAME_EXCHANGE): moved aside, then replaced
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    old, new = tmp_path / "global_step4", tmp_path / ".saving-global_step4"
    for d, text in ((old, "old"), (new, "new")):
        d.mkdir()
        (d / META_FILE).write_text(text)
    (old / "only_in_old.pt").write_text("x")
    checkpoint.replace_dir(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4"]
    assert [p.name for p in old.iterdir()] == [META_FILE] and (old / META_FILE).read_text() == "new"


def test_rotation_after_a_rollback_keeps_the_new_branch_and_leaves_the_abandoned_tags(tmp_path: Path) -> None:
    for n in range(1, 7):
        (tmp_path / f"global_step{n}").mkdir()
    checkpoint._prune(tmp_path, 2, keep={"global_step3"}, step=3)  # resumed from 2, saved 3; 4-6 are abandoned
    assert [p.name for p in checkpoint.tag_dirs(tmp_path)] == [f"global_step{n}" for n in (2, 3, 4, 5, 6)]
