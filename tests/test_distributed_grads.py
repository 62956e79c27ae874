"""Tiered gradients under DistributedDataParallel and FSDP2 (gloo, 2 ranks on localhost): reduced first, then sent
down (host / NVMe), DDP's bucket storage freed until the next backward, FSDP2's reduce-scatter outputs freed with
their last shard; parameters and optimizer states equal (`torch.equal`) to the unmanaged run after AdamW steps with
2-step accumulation (`no_sync` / `set_requires_gradient_sync(False)`), clipping and an LR schedule
([Note: tiered gradients under DDP], [Note: tiered gradients under FSDP2] in runtime/ddp_grads.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

from ranks import run_two_ranks


def _forced_plan(tr, h, b):
    """A plan that tiers the gradients of two buckets in three (NVMe) and the states of two (NVMe, DRAM)."""
    from memstrata.plan.joint import joint_plan
    from memstrata.trace.states import state_buckets

    n = len(state_buckets(tr))
    return joint_plan(tr, h, b, states=[("nvme", "dram", None)[i % 3] for i in range(n)],
                      grads=[("nvme", None, "nvme")[i % 3] for i in range(n)])

pytestmark = pytest.mark.slow

STEPS = 5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(12, 32), nn.Tanh()), nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
                         nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 4))


class _Branchy(nn.Module):
    """`_net()` plus a Linear only rank 1 uses (locally unused on rank 0) and one nobody uses."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.body = _net()
        self.extra = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.rank = rank

    def forward(self, x):
        y = self.body(x)
        return y + self.extra(y) if self.rank == 1 else y


def _ddp(model: nn.Module, **kw) -> nn.Module:
    # small buckets: several per model, so some hold tiered gradients only
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=0.004, **kw)


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1, foreach=False)


def _train(ddp, opt, xs, ys, *, step_ctx=None, clip=None, after_backward=None, after_no_sync=None,
           after_step=None, no_sync=True) -> None:
    """STEPS optimizer steps, each over 2 micro-batches (the first under no_sync, unless `no_sync=False`: then
    both are reduced and the second adds to the first's reduced gradient)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    for s in range(STEPS):
        for m in range(2):
            ctx = ddp.no_sync() if m == 0 and no_sync else torch.enable_grad()
            with ctx:
                inner = step_ctx(xs[m]) if step_ctx is not None else torch.enable_grad()
                with inner:
                    nn.functional.mse_loss(ddp(xs[m]), ys[m]).backward()
            if m == 0 and after_no_sync is not None:
                after_no_sync(s)
        if after_backward is not None:
            after_backward(s)
        (clip or nn.utils.clip_grad_norm_)(ddp.parameters(), 0.05)
        opt.step()
        sched.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(s)


def _mismatches(ref, ref_opt, model, opt) -> list[str]:
    out = [n for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters())
           if not torch.equal(a.detach(), b.detach())]
    sa, sb = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    if sa.keys() != sb.keys():
        return out + ["<state keys>"]
    out += [f"state[{i}][{k}]" for i in sa for k, v in sa[i].items() if not torch.equal(v, sb[i].get(k))]
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, nvme_dir: str) -> None:
    import torch.distributed as dist

    from memstrata import Manager
    from memstrata.runtime.grads import GradTieredOptimizer
    from memstrata.runtime.states import StatePlacement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res: dict = {}
    try:
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        xs = [torch.randn(16, 12, generator=g) for _ in range(2)]
        ys = [torch.randn(16, 4, generator=g) for _ in range(2)]
        ref = _ddp(_net())
        ref_opt = _adamw(ref.parameters())
        _train(ref, ref_opt, xs, ys)

        # 1. the runtime: GradTieredOptimizer(ddp=...), gradients of the first three Linears below (host, NVMe)
        model = _ddp(_net())
        d = os.path.join(nvme_dir, f"rt{rank}")
        os.makedirs(d)
        tiered = StatePlacement(((0, 1), (2, 3), (4, 5)), ("host", "nvme", "host"))
        opt = GradTieredOptimizer(_adamw(model.parameters()), StatePlacement(((2, 3),), ("nvme",)),
                                  grads=tiered, nvme_dir=d, ddp=model)
        seen: dict = {"none": [], "freed": [], "resident": [], "freed_no_sync": []}
        params = list(model.parameters())

        def look(_s):
            seen["none"].append([params[i].grad is None for i in range(8)])
            seen["freed"].append(opt.grads.reduction.freed_bytes)
            seen["resident"].append(sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None))

        _train(model, opt, xs, ys, clip=opt.clip_grad_norm_, after_backward=look,
               after_no_sync=lambda s: seen["freed_no_sync"].append(opt.grads.reduction.freed_bytes))
        res["runtime"] = {"mismatches": _mismatches(ref, ref_opt, model, opt), **seen,
                          "down": opt.grads.stats.bytes_down, "up": opt.grads.stats.bytes_up,
                          "nvme_written": opt.mover.store.bytes_written}
        opt.close()
        res["runtime"]["left"] = os.listdir(d)

        # 2. the Manager: a forced plan tiers gradients (and states) of some buckets
        model = _ddp(_net())
        d = os.path.join(nvme_dir, f"mgr{rank}")
        os.makedirs(d)

        mgr = Manager(model, budget="100%", nvme_dir=d, planner=_forced_plan, tier_grads=True,
                      optimizer=_adamw(model.parameters()))
        none: list = []
        _train(model, mgr.optimizer, xs, ys, step_ctx=mgr.step, clip=mgr.optimizer.clip_grad_norm_,
               after_backward=lambda s: none.append(sum(p.grad is None for p in model.parameters())))
        mopt = mgr.optimizer
        res["manager"] = {"mismatches": _mismatches(ref, ref_opt, model, mopt), "none": none,
                          "grad_tiers": sorted({str(dd.grads) for dd in mgr.plan.states}),
                          "modes": [s["mode"] for s in mgr.report()["steps"]],
                          "down": mopt.grads.stats.bytes_down, "freed": mopt.grads.reduction.peak_freed_bytes,
                          "at_end": mgr.trace.grads_at_backward_end}
        mgr.close()
        res["manager"]["left"] = os.listdir(d)

        # 3. find_unused_parameters=True: a parameter one rank does not use, one no rank uses (both tiered)
        ref = _ddp(_Branchy(rank), find_unused_parameters=True)
        ref_opt = _adamw(ref.parameters())
        _train(ref, ref_opt, xs, ys)
        model = _ddp(_Branchy(rank), find_unused_parameters=True)
        opt = GradTieredOptimizer(_adamw(model.parameters()), grads=StatePlacement(((0, 1, 2, 3, 8, 9, 10, 11),), ("nvme",)),
                                  nvme_dir=d, ddp=model)
        nones: list = []
        _train(model, opt, xs, ys, clip=opt.clip_grad_norm_,
               after_backward=lambda s: nones.append([p.grad is None for p in model.parameters()]))
        res["unused"] = {"mismatches": _mismatches(ref, ref_opt, model, opt), "none": nones,
                         "ref_none": [p.grad is None for p in ref.parameters()],
                         "freed": opt.grads.reduction.peak_freed_bytes}
        opt.close()

        # 4. what stays unsupported: one-line errors
        errs = []
        for kw in ({"gradient_as_bucket_view": False}, {"gradient_as_bucket_view": True, "static_graph": True}):
            m = nn.parallel.DistributedDataParallel(_net(), **kw)
            try:
                Manager(m, optimizer=_adamw(m.parameters()), tier_grads=True, nvme_dir=d)
            except ValueError as e:
                errs.append(str(e))
        m = _ddp(_net())
        try:
            Manager(m, optimizer=_adamw(m.parameters()), tier_params=True, nvme_dir=d)
        except ValueError as e:
            errs.append(str(e))
        res["errors"] = errs
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_ddp_tiered_grads_reduced_then_sent_down_equal_unmanaged(tmp_path):
    ranks = run_two_ranks(_worker, tmp_path)
    for i, r in enumerate(ranks):
        rt = r["runtime"]
        assert rt["mismatches"] == [], (i, rt)
        # after each step's backwards the tiered gradients (params 0-5) are below, the last Linear's kept
        assert rt["none"] == [[True] * 6 + [False] * 2] * STEPS, rt["none"]
        # DDP starts with one bucket for all (holding kept gradients: not freed); from its rebuild on (second
        # forward) buckets of ~1000 floats: the first two Linears' buckets hold tiered gradients only and are
        # freed, the third Linear's shares its bucket with the kept last Linear and stays (one storage, seen
        # through the last Linear's weight and bias gradients)
        first, second, third, last = 12 * 32 + 32, 32 * 32 + 32, 32 * 32 + 32, 32 * 4 + 4
        assert rt["freed"] == [0] + [4 * (first + second)] * (STEPS - 1), rt["freed"]
        # a no_sync() backward writes no bucket: the freed ones stay freed through it
        assert rt["freed_no_sync"] == [0, 0] + [4 * (first + second)] * (STEPS - 2), rt["freed_no_sync"]
        assert rt["resident"] == [2 * 4 * (first + second + third + last)] + [2 * 4 * (third + last)] * (STEPS - 1), rt
        assert rt["down"] > 0 and rt["up"] > 0 and rt["nvme_written"] > 0, rt
        assert rt["left"] == [], rt
        m = r["manager"]
        assert m["mismatches"] == [], (i, m)
        assert m["modes"] == ["warmup", "trace"] + ["managed"] * (2 * STEPS - 2), m  # one Manager step per micro-batch
        assert m["grad_tiers"] == ["None", "nvme"], m
        assert m["down"] > 0 and m["freed"] > 0, m
        assert m["at_end"] is True, m  # the plan prices them as leaving at the end of the backward
        # the plan's tiered gradients leave tier 0 from the first optimizer step run wholly under it
        assert m["none"] == [0] + [m["none"][1]] * (STEPS - 1) and 0 < m["none"][1] < 8, m
        assert m["left"] == [], m
        u = r["unused"]
        assert u["mismatches"] == [], (i, u)
        # every tiered gradient below after backward (rank 0's extra: DDP's reduced view of rank 1's gradient);
        # the never-used Linear has none, as in unmanaged DDP
        tiered = [True] * 4 + [False] * 4 + [True] * 4
        assert u["none"] == [tiered] * STEPS, u["none"]
        assert u["freed"] > 0, u
        assert len(r["errors"]) == 3 and all("\n" not in e for e in r["errors"]), r["errors"]
        assert "gradient_as_bucket_view=True" in r["errors"][0] and "static_graph=False" in r["errors"][1], r
        assert "tier_params" in r["errors"][2], r


def _fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for m in list(model)[:-1]:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_fsdp2(model, opt, xs, ys, *, step_ctx=None, clip=None, after_backward=None) -> None:
    """As `_train`, the first micro-batch without gradient reduction (`set_requires_gradient_sync(False)`)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    for s in range(STEPS):
        for m in range(2):
            model.set_requires_gradient_sync(m == 1)
            inner = step_ctx(xs[m]) if step_ctx is not None else torch.enable_grad()
            with inner:
                nn.functional.mse_loss(model(xs[m]), ys[m]).backward()
        if after_backward is not None:
            after_backward(s)
        (clip or nn.utils.clip_grad_norm_)(model.parameters(), 0.05)
        opt.step()
        sched.step()
        opt.zero_grad()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _fsdp2_worker(rank: int, world: int, port: int, out_dir: str, nvme_dir: str) -> None:
    import torch.distributed as dist

    from memstrata import Manager
    from memstrata.runtime.grads import GradTieredOptimizer
    from memstrata.runtime.states import StatePlacement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res: dict = {}
    try:
        g = torch.Generator().manual_seed(100 + rank)
        xs = [torch.randn(16, 12, generator=g) for _ in range(2)]
        ys = [torch.randn(16, 4, generator=g) for _ in range(2)]

        def mism(ref, ref_opt, model, opt):
            out = [n for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters())
                   if not torch.equal(_local(a.detach()), _local(b.detach()))]
            sa, sb = ref_opt.state_dict()["state"], opt.state_dict()["state"]
            out += [f"state[{i}][{k}]" for i in sa for k, v in sa[i].items()
                    if not torch.equal(_local(v), _local(sb[i][k]))]
            return out

        ref = _fsdp2(_net())
        ref_opt = _adamw(ref.parameters())
        _train_fsdp2(ref, ref_opt, xs, ys)

        # 1. the runtime: the sharded gradients of the first three Linears below once reduce-scattered
        model = _fsdp2(_net())
        d = os.path.join(nvme_dir, f"rt{rank}")
        os.makedirs(d)
        opt = GradTieredOptimizer(_adamw(model.parameters()), StatePlacement(((2, 3),), ("nvme",)),
                                  grads=StatePlacement(((0, 1), (2, 3), (4, 5)), ("host", "nvme", "host")), nvme_dir=d)
        nones: list = []
        held: list = []

        def look(_s):
            nones.append([p.grad is None for p in model.parameters()])
            held.append(sorted({_local(p.grad).untyped_storage().nbytes() for p in model.parameters()
                                if p.grad is not None}))

        _train_fsdp2(model, opt, xs, ys, clip=opt.clip_grad_norm_, after_backward=look)
        res["runtime"] = {"mismatches": mism(ref, ref_opt, model, opt), "none": nones, "held": held,
                          "down": opt.grads.stats.bytes_down, "acc": opt.grads.stats.accumulations}
        opt.close()
        res["runtime"]["left"] = os.listdir(d)

        # 2. the Manager, a forced plan that tiers gradients and states
        model = _fsdp2(_net())
        d = os.path.join(nvme_dir, f"mgr{rank}")
        os.makedirs(d)

        mgr = Manager(model, budget="100%", nvme_dir=d, planner=_forced_plan, tier_grads=True,
                      optimizer=_adamw(model.parameters()))
        none: list = []
        _train_fsdp2(model, mgr.optimizer, xs, ys, step_ctx=mgr.step, clip=mgr.optimizer.clip_grad_norm_,
                     after_backward=lambda s: none.append(sum(p.grad is None for p in model.parameters())))
        res["manager"] = {"mismatches": mism(ref, ref_opt, model, mgr.optimizer), "none": none,
                          "grad_tiers": sorted({str(dd.grads) for dd in mgr.plan.states}),
                          "down": mgr.optimizer.grads.stats.bytes_down, "at_end": mgr.trace.grads_at_backward_end}
        mgr.close()
        res["manager"]["left"] = os.listdir(d)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_fsdp2_tiered_sharded_grads_after_reduce_scatter_equal_unmanaged(tmp_path):
    ranks = run_two_ranks(_fsdp2_worker, tmp_path)
    for i, r in enumerate(ranks):
        rt = r["runtime"]
        assert rt["mismatches"] == [], (i, rt)
        assert rt["none"] == [[True] * 6 + [False] * 2] * STEPS, rt["none"]
        # what stays on tier 0 after backward: one reduce-scatter output, the root group's (this rank's shard
        # of the last Linear: 2 of its 4 rows and 2 of its biases); the other groups' outputs went with their views
        assert rt["held"] == [[4 * (2 * 32 + 2)]] * STEPS, rt["held"]
        assert rt["down"] > 0 and rt["left"] == [], rt
        m = r["manager"]
        assert m["mismatches"] == [], (i, m)
        assert m["grad_tiers"] == ["None", "nvme"], m
        assert m["none"] == [0] + [m["none"][1]] * (STEPS - 1) and 0 < m["none"][1] < 8, m
        assert m["down"] > 0 and m["left"] == [], m
        assert m["at_end"] is False, m  # FSDP2: each group's gradients leave after its reduce-scatter


def _one_rank_worker(rank: int, port: int, out_dir: str, device: str) -> None:
    """DDP over one rank on `device` (gloo on CPU, NCCL on CUDA): the same mechanism, the device's copy paths."""
    import torch.distributed as dist

    from memstrata.runtime.grads import GradTieredOptimizer
    from memstrata.runtime.states import StatePlacement

    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    res: dict = {}
    try:
        dev = torch.device(device)
        g = torch.Generator().manual_seed(7)
        xs = [torch.randn(16, 12, generator=g).to(dev) for _ in range(2)]
        ys = [torch.randn(16, 4, generator=g).to(dev) for _ in range(2)]
        kw = {"device_ids": [0]} if device == "cuda" else {}
        allocated: dict = {}

        def run(tiered: bool, no_sync: bool = True):
            model = _ddp(_net().to(dev), **kw)
            inner = _adamw(model.parameters())
            opt = (GradTieredOptimizer(inner, grads=StatePlacement(((0, 1), (2, 3)), ("host", "host")), ddp=model)
                   if tiered else inner)
            seen: list = []

            def look(_s):  # between steps: unmanaged DDP keeps its buckets, the tiered run freed two of them
                if device == "cuda":
                    torch.cuda.synchronize(dev)
                seen.append(torch.cuda.memory_allocated(dev) if device == "cuda" else 0)

            _train(model, opt, xs, ys, clip=opt.clip_grad_norm_ if tiered else None, after_step=look, no_sync=no_sync)
            allocated["tiered" if tiered else "ref"] = seen
            return model, opt

        # two reduced backwards per step: the second adds to the first's reduced gradient (brought back from below)
        ref, ref_opt = run(False, no_sync=False)
        model, opt = run(True, no_sync=False)
        twice = _mismatches(ref, ref_opt, model, opt)
        accumulations = opt.grads.stats.accumulations
        opt.close()
        ref, ref_opt = run(False)
        model, opt = run(True)
        res = {"mismatches": _mismatches(ref, ref_opt, model, opt), "twice": twice, "accumulations": accumulations,
               "freed": opt.grads.reduction.peak_freed_bytes, "allocated": allocated}
        opt.close()
        with open(os.path.join(out_dir, "rank0.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_ddp_one_rank_tiered_grads_equal_unmanaged(device, tmp_path):
    """One rank (the GPU tier's case: one device, NCCL): tiered gradients through (pinned) host buffers equal
    unmanaged DDP; on CUDA the freed buckets show in torch.cuda.memory_allocated between steps."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_one_rank_worker, args=(port, str(tmp_path), device), nprocs=1, join=True,
                       start_method="spawn")
    r = json.loads((tmp_path / "rank0.json").read_text())
    assert r["mismatches"] == [] and r["twice"] == [], r
    assert r["accumulations"] == 4 * STEPS, r  # params 0-3, once per step
    first, second = 12 * 32 + 32, 32 * 32 + 32
    assert r["freed"] == 4 * (first + second), r
    if device == "cuda":
        ref, got = r["allocated"]["ref"], r["allocated"]["tiered"]
        # from the second step on (after DDP's rebuild) the two freed buckets are missing (at least the larger one:
        # the allocator's rounding and memstrata's own small tensors blur the smaller)
        assert all(a - b >= 4 * second for a, b in zip(ref[1:], got[1:])), (ref, got)
