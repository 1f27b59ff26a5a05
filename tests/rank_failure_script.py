"""Launched by tests/test_errors.py under torchrun with 2 ranks: rank 1 fails with a user error while rank 0 waits
for it in a receive, so rank 0 then fails only because rank 1 is gone (gloo: "Connection closed by peer")."""

import torch
import torch.distributed as dist

from lavis.engine.errors import run_rank


def main() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("bad record in /data/ann.json:7 (id r7)")
    dist.recv(torch.zeros(1), src=1)


if __name__ == "__main__":
    run_rank(main)
