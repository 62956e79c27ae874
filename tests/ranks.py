"""Two gloo ranks on localhost for the distributed tests: each worker writes `rank{i}.json` under the test's
tmp_path and ends with barrier -> destroy_process_group -> os._exit(0)."""

from __future__ import annotations

import json
import socket

import torch.multiprocessing as mp


def run_two_ranks(worker, tmp_path) -> list[dict]:
    """Spawn `worker(rank, world=2, port, out_dir, nvme_dir)` on two processes; return each rank's JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    mp.start_processes(worker, args=(2, port, str(tmp_path), str(nvme)), nprocs=2, join=True,
                       start_method="spawn")
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
