"""`python -m lavis.bench` on the tiny config: it runs real steps and its report is internally consistent.

Not a timed test: nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PRETRAIN_CFG, REPO


@pytest.mark.process
def test_bench_reports_throughput_padding_memory_and_balance(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lavis.bench", "--cfg-path", str(PRETRAIN_CFG), "--random-init", "--synthetic-data",
           "--seq-len", "96", "--steps", "3", "--warmup", "1", "--num-stages", "2", "--output-dir", str(out),
           "--peak-tflops", "1.0", "--options", "train.batch.micro_batch_size=4", "train.batch.grad_accum_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads((out / "bench.json").read_text())
    assert "non-pad tokens/s" in proc.stdout and "MFU" in proc.stdout
    assert rep["measured_steps"] == 3 and rep["num_stages"] == 2 and rep["dp"] == 1
    assert [s["stage"] for s in rep["stages"]] == [0, 1]
    assert rep["stages"][0]["layers"][0] == 0 and rep["stages"][1]["layers"][1] == 5
    for s in rep["stages"]:
        assert s["peak_memory_gib"] > 0.1 and s["compute_seconds"] > 0
        assert {"ForwardPass", "BackwardPass", "OptimizerStep"} <= set(s["instruction_seconds"])
    assert 0.5 < rep["padding_efficiency"] <= 1.0  # lengths uniform in [48, 96], padded to multiples of 16
    assert rep["samples_per_s"] > 0 and rep["non_pad_tokens_per_s"] > 0
    assert 0 < rep["mfu"] < 1 and rep["stage_time_balance"] >= 1.0
    # Every synthetic sample fits --seq-len; metrics rows of the measured steps carry the padding counters.
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 < r["real_tokens_r0"] <= r["padded_tokens_r0"] for r in rows)
    assert all(r["padded_tokens_r0"] <= 4 * 2 * 96 for r in rows)
    assert not list(out.glob("global_step*"))  # the bench never writes checkpoints
