"""`python -m lavis.bench --suite gpu --device cpu`: the GPU check's dry run (same code paths, tiny sizes) writes
one JSON report with the comparison, the memory estimate, a chat answer from synthetic real-layout files, and the
8-bit part marked skipped (no CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


@pytest.mark.process
def test_gpu_suite_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lavis.bench", "--suite", "gpu", "--device", "cpu", "--output-dir",
           str(tmp_path / "suite"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["dry_run"] and rep["device"] == "cpu"
    for part in ("compare", "memory", "chat_bf16"):
        assert "error" not in rep[part], (part, rep[part])
    cmp = rep["compare"]
    assert cmp["useful_tokens_per_s_ratio"] > 0 and "--compare" in cmp["args"]
    assert cmp["ours"]["non_pad_tokens_per_s"] > 0 and cmp["predecessor"]["non_pad_tokens_per_s"] > 0
    assert rep["memory"]["planner_estimate_gib"] > 0 and rep["memory"]["measured_peak_gib"] > 0
    chat = rep["chat_bf16"]
    assert isinstance(chat["answer"], str) and chat["dtype"] == "torch.float32" and chat["device"] == "cpu"
    assert "skipped" in rep["chat_8bit"]
