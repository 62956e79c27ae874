"""torch.distributed (gloo, 2 ranks on localhost): the Manager on a DDP-wrapped model is bit-exact against plain
DDP, every rank runs rank 0's plan, and the report knows its rank."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from torch import nn

from ranks import run_two_ranks

pytestmark = pytest.mark.slow


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _worker(rank: int, world: int, port: int, out_dir: str, nvme_dir: str) -> None:
    import torch.distributed as dist

    from memstrata import Manager
    from memstrata.plan.forced import forced_plan
    from memstrata.runtime.check import state_mismatches, train_steps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        plain = nn.parallel.DistributedDataParallel(_net())
        managed = nn.parallel.DistributedDataParallel(_net())
        train_steps(plain, x, y, steps=5)
        mgr = Manager(managed, budget="100%", nvme_dir=nvme_dir, warmup_steps=1,
                      planner=lambda tr, h, b: forced_plan(tr, "mixed", h))
        train_steps(managed, x, y, steps=5, step_ctx=lambda: mgr.step(x))
        rep = mgr.report()
        res = {"mismatches": state_mismatches(plain.module, managed.module), "rank": rep["rank"],
               "world": rep["world_size"], "modes": [s["mode"] for s in rep["steps"]],
               "counts": mgr.plan.counts(), "plan": mgr.plan.to_json(),
               "recomputed": rep["steps"][-1]["stats"]["recomputed_units"]}
        mgr.close()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_manager_on_ddp_is_bit_exact_and_agrees_on_the_plan(tmp_path):
    r = run_two_ranks(_worker, tmp_path)
    for i, res in enumerate(r):
        assert res["mismatches"] == [], res
        assert (res["rank"], res["world"]) == (i, 2)
        assert res["modes"] == ["warmup", "trace", "managed", "managed", "managed"]
        assert res["recomputed"] > 0 and res["counts"]["recompute_units"] > 0
    assert r[0]["plan"] == r[1]["plan"]
    assert not any((tmp_path / "nvme").iterdir())
