"""Two "nodes" on this machine: two torchrun agents (``--nnodes 2 --node-rank 0/1``, c10d rendezvous on
127.0.0.1), two processes each, train PP2 x DP2 and give the one-node losses (docs/MULTINODE.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import COMMON, DEMO_CFG, REPO, data_options, losses
from .test_train_launch import reference_losses

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.process
def test_two_node_pp2_dp2_matches_one_node(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    args = ["--cfg-path", str(DEMO_CFG), "--num-stages", "2", "--max-steps", str(STEPS), "--output-dir", str(out),
            "--options", *COMMON, "train.batch.grad_accum_steps=2", *data_options(tiny_data)]
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "lavis-two-node-test", str(REPO / "train_pipeline.py"), *args]
        log = (tmp_path / f"node{node}.log").open("w")
        agents.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in agents:
        try:
            rc = proc.wait(timeout=600)
        finally:
            log.close()
        assert rc == 0, "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    node0 = (tmp_path / "node0.log").read_text()
    # DeepSpeed's PipeDataParallelTopology: the data axis is contiguous, so node 0 (ranks 0, 1) holds both replicas
    # of stage 0 and node 1 (ranks 2, 3) both replicas of stage 1.
    assert "pipeline: 2 stage(s) x 2 data-parallel replica(s)" in node0
    assert "rank 0 (stage 0)" in node0 and "rank 1 (stage 0)" in node0 and "rank 2 (stage 1)" in node0
    got = losses(out)
    ref = reference_losses(tiny_data, gas=4, steps=STEPS)  # = the one-node PP2 x DP2 run (test_train_launch)
    assert len(got) == STEPS
    for a, r in zip(got, ref):
        assert abs(a - r) / abs(r) <= 1e-5, (got, ref)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples"] == 16 for r in rows)
    assert (out / "latest").read_text() == f"global_step{STEPS}"  # one checkpoint, written by all ranks together
