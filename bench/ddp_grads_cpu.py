"""Tiered gradients under DDP on a CPU box (gloo, 2 ranks): tier-0 heap after backward and step time, unmanaged DDP
vs memstrata's `GradTieredOptimizer(ddp=...)` with the gradients of all but the last Linear on NVMe (states kept),
and the same with them in "host" buffers (on a CPU box the same RAM: what the mechanism costs without the I/O).

    python bench/ddp_grads_cpu.py --nvme-dir /tmp/x --width 1024 --layers 8 --steps 8 --reps 3 --out result.json

Per rank and arm: the heap in use (glibc mallinfo2) minus the heap before the model was built, right after each
step's backward, after the gradient writes landed (memstrata: waited for, untimed), and after the step; the wall time of a whole step (forward, backward with DDP's all-reduce, clip,
AdamW step, zero_grad); medians over the steps after the first two.  Arms alternate, `--reps` times each.  The
final parameters of the two arms are compared with torch.equal (same seed, same data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from torch import nn


def _net(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(width, 8))


def _arm(name: str, args, rank: int, x, y) -> dict:
    from memstrata.runtime.grads import GradTieredOptimizer
    from memstrata.runtime.memory import heap_in_use
    from memstrata.runtime.states import StatePlacement

    base = heap_in_use()
    ddp = nn.parallel.DistributedDataParallel(_net(args.width, args.layers), gradient_as_bucket_view=True)
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-3, foreach=False)
    d = None
    if name.startswith("memstrata"):
        n = len(list(ddp.parameters()))
        d = os.path.join(args.nvme_dir, f"r{rank}")
        os.makedirs(d, exist_ok=True)
        tier = "host" if name.endswith("host") else "nvme"
        buckets = tuple((i, i + 1) for i in range(0, n - 2, 2))  # one bucket per Linear (stepped one by one)
        opt = GradTieredOptimizer(inner, grads=StatePlacement(buckets, (tier,) * len(buckets)), nvme_dir=d, ddp=ddp)
        clip = opt.clip_grad_norm_
    else:
        opt, clip = inner, nn.utils.clip_grad_norm_
    heaps: dict[str, list[int]] = {"heap_after_backward": [], "heap_settled": [], "heap_after_step": []}
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        nn.functional.mse_loss(ddp(x), y).backward()
        heaps["heap_after_backward"].append(heap_in_use() - base)
        if name.startswith("memstrata"):  # (not timed) the gradient writes landed: what stays below until the step
            t1 = time.perf_counter()
            for g in opt.grads._grads.values():
                if g.rec is not None and g.rec.write is not None:
                    g.rec.write.result()
            t0 += time.perf_counter() - t1
        heaps["heap_settled"].append(heap_in_use() - base)
        clip(ddp.parameters(), 1.0)
        opt.step()
        heaps["heap_after_step"].append(heap_in_use() - base)
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    params = [p.detach().clone() for p in ddp.parameters()]
    out = {k: statistics.median(v[2:]) for k, v in heaps.items()}
    out.update(step_s=statistics.median(times[2:]), params=params)
    if name.startswith("memstrata"):
        out["freed_bucket_bytes"] = opt.grads.reduction.freed_bytes
        out["grad_bytes_down_per_step"] = opt.grads.stats.bytes_down // args.steps
        opt.close()
        shutil.rmtree(d)
    return out


def _worker(rank: int, args, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, 8, generator=g)
    arms = ("unmanaged", "memstrata", "memstrata_host")
    rows: dict[str, list] = {a: [] for a in arms}
    equal = True
    _arm("unmanaged", args, rank, x, y)  # warm-up (one-time allocations of gloo, DDP, autograd), not recorded
    for _ in range(args.reps):
        got = {}
        for name in arms:
            got[name] = _arm(name, args, rank, x, y)
            rows[name].append({k: v for k, v in got[name].items() if k != "params"})
        equal = equal and all(torch.equal(a, b) for m in arms[1:]
                              for a, b in zip(got["unmanaged"]["params"], got[m]["params"]))
    res = {"rank": rank, "equal": equal,
           "arms": {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}}
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvme-dir", required=True)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="ddp_grads_cpu.json")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args, port), nprocs=2, join=True, start_method="spawn")
    ranks = []
    for r in range(2):
        with open(f"{args.out}.rank{r}") as f:
            ranks.append(json.load(f))
        os.remove(f"{args.out}.rank{r}")
    out = {"torch": torch.__version__, "args": vars(args), "ranks": ranks}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
