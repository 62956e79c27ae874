"""torch.distributed (gloo, 2 ranks on localhost) with optimizer states in the plan: DDP and FSDP2
(`fully_shard`) under the Manager, states tiered per rank on host and NVMe, equal (`torch.equal`) to the
unmanaged run on parameters and optimizer states after a few steps of AdamW."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

from ranks import run_two_ranks

pytestmark = pytest.mark.slow

STEPS = 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(12, 32), nn.Tanh()), nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
                         nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 4))


def _wrap(mode: str, model: nn.Module) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for m in list(model)[:-1]:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _train(model, opt, x, y, step_ctx=None) -> None:
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    for _ in range(STEPS):
        ctx = step_ctx(x) if step_ctx is not None else torch.enable_grad()
        with ctx:
            nn.functional.mse_loss(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()


def _mismatches(ref_model, ref_opt, model, opt) -> list[str]:
    if hasattr(opt, "flush"):  # the Manager's optimizer: deferred updates wait for the next forward until then
        opt.flush()
    out = []
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        if not torch.equal(_local(a.detach()), _local(b.detach())):
            out.append(n)
    sa, sb = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    if sa.keys() != sb.keys():
        return out + ["<state keys>"]
    for i in sa:
        for k, v in sa[i].items():
            w = sb[i].get(k)
            if w is None or not torch.equal(_local(v), _local(w)):
                out.append(f"state[{i}][{k}]")
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, nvme_dir: str) -> None:
    import torch.distributed as dist

    from memstrata import Manager
    from memstrata.plan.joint import joint_plan
    from memstrata.trace.states import state_buckets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    try:
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)

        def mixed(tr, h, b):  # states on NVMe and host (tier 0's copy on a CPU box), some kept
            n = len(state_buckets(tr))
            return joint_plan(tr, h, b, states=[("nvme", "dram", None)[i % 3] for i in range(n)])

        for mode in ("ddp", "fsdp2"):
            ref = _wrap(mode, _net())
            ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2, weight_decay=0.1, foreach=False)
            _train(ref, ref_opt, x, y)
            model = _wrap(mode, _net())
            d = os.path.join(nvme_dir, f"{mode}{rank}")
            os.makedirs(d)
            mgr = Manager(model, budget="100%", nvme_dir=d, planner=mixed,
                          optimizer=torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1, foreach=False))
            _train(model, mgr.optimizer, x, y, step_ctx=mgr.step)
            opt = mgr.optimizer
            kinds = {s.kind for s in mgr.trace.storages}
            res[mode] = {"mismatches": _mismatches(ref, ref_opt, model, opt),
                         "modes": [s["mode"] for s in mgr.report()["steps"]],
                         "tiers": sorted({str(dd.tier) for dd in mgr.plan.states}),
                         "written": opt.stats.bytes_written, "read": opt.stats.bytes_read,
                         "nvme_written": opt.mover.store.bytes_written if opt.mover.store else 0,
                         "saved_weights": sorted({s.kind for s in mgr.trace.storages
                                                  if s.saved and s.nbytes == 32 * 32 * 4}),
                         "param_records": sum(1 for s in mgr.trace.storages if s.kind == "parameter"),
                         "kinds": sorted(kinds)}
            mgr.close()
            res[mode]["left"] = os.listdir(d)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_ddp_and_fsdp2_with_tiered_states_equal_unmanaged(tmp_path):
    ranks = run_two_ranks(_worker, tmp_path)
    for i, r in enumerate(ranks):
        for mode in ("ddp", "fsdp2"):
            m = r[mode]
            assert m["mismatches"] == [], (i, mode, m)
            assert m["modes"] == ["warmup", "trace", "managed", "managed"], m
            assert m["tiers"] == ["None", "dram", "nvme"], m
            assert m["written"] > 0 and m["read"] > 0 and m["nvme_written"] > 0, m
            assert m["left"] == [], m
        # FSDP2's unsharded parameters (saved for backward by the matmuls) are parameters in the trace, not
        # activations (so never offloaded or dropped by the activation plan)
        assert r["fsdp2"]["saved_weights"] == ["parameter"], r["fsdp2"]
        assert r["ddp"]["saved_weights"] == ["parameter"], r["ddp"]
