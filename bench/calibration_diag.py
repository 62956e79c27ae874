"""Where the Manager's step prediction goes wrong, op by op, in one process and the same minutes.

    PYTHONPATH=src python bench/calibration_diag.py resnet18:64:112 [--settle 6] [--rounds 4] [--budget 50%]

After the Manager has settled (warm-up, trace, `--settle` managed steps), each round runs, in this order:
plain (no Manager), managed, plain under an op timer, managed under the op timer.  The op timer is a
TorchDispatchMode that times every aten op (it slows both steps alike); from it:

* ops / op seconds of the plain step vs the managed step: the managed step's extra ops are its recompute
  and replays (measured), against the simulator's `recompute_time`;
* wall - op seconds: time outside aten ops (Python, hooks, pack/unpack, copies on CPU); the managed step's
  excess over the plain step's is the runtime's own overhead, which the simulator prices only as copies.

One JSON line per config: medians over rounds, and the Manager's prediction split into compute / recompute /
stalls by the simulator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from memstrata import Manager
from memstrata.simulate import simulate


class OpTimer(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - t0
        self.n += 1
        return out


def one_step(m, opt, x, y, ctx=None, timer: OpTimer | None = None) -> tuple[float, int, float]:
    opt.zero_grad(set_to_none=False)
    import contextlib
    t0 = time.perf_counter()
    with (ctx if ctx is not None else contextlib.nullcontext()):
        with (timer if timer is not None else contextlib.nullcontext()):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
    wall = time.perf_counter() - t0
    opt.step()
    return wall, (timer.n if timer else 0), (timer.seconds if timer else 0.0)


def diag(name: str, batch: int, res: int, budget: str, settle: int, rounds: int) -> dict:
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    mgr = Manager(m, budget=budget, nvme_dir=tempfile.mkdtemp())
    for _ in range(2 + settle):
        one_step(m, opt, x, y, mgr.step(x))
    st = mgr._current
    tl = simulate(st.trace, st.plan, mgr.hierarchy, check=False)
    rows = []
    for _ in range(rounds):
        r = {}
        r["plain"], _, _ = one_step(m, opt, x, y)
        r["managed"], _, _ = one_step(m, opt, x, y, mgr.step(x))
        t = OpTimer()
        r["plain_t"], r["plain_ops"], r["plain_op_s"] = one_step(m, opt, x, y, timer=t)
        t = OpTimer()
        r["managed_t"], r["managed_ops"], r["managed_op_s"] = one_step(m, opt, x, y, mgr.step(x), timer=t)
        rows.append(r)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    rep = mgr.report()
    last = [s for s in rep["steps"] if s["mode"].startswith("managed")][-1]
    out = {
        "model": name, "batch": batch, "res": res, "budget": budget,
        "predicted": {"step": st.predicted_seconds, "compute": tl.compute_time, "recompute": tl.recompute_time,
                      "stall": tl.stall_time, "runtime_overhead": st.overhead_seconds, "trace_ops": len(st.trace.ops), "time_scale": st.time_scale,
                      "recalibrations": st.recalibrations},
        "counts": st.plan.counts(), "stats": last["stats"] and {k: last["stats"][k] for k in
                                                                ("packs", "kept", "offloaded", "recomputed_units",
                                                                 "replayed", "prefetches", "demand_fetches",
                                                                 "overhead_seconds", "wait_seconds")},
        "median": {k: round(v, 4) for k, v in med.items()},
        "derived": {
            "plain_vs_trace_compute": round(med["plain"] / tl.compute_time, 3),
            "managed_vs_predicted": round(med["managed"] / st.predicted_seconds, 3),
            "managed_minus_plain": round(med["managed"] - med["plain"], 4),
            "predicted_minus_compute": round(st.predicted_seconds - tl.compute_time, 4),
            "unexplained": round((med["managed"] - med["plain"]) - (st.predicted_seconds - tl.compute_time), 4),
            "extra_ops": med["managed_ops"] - med["plain_ops"],
            "extra_op_s": round(med["managed_op_s"] - med["plain_op_s"], 4),
            "plain_outside_ops_s": round(med["plain_t"] - med["plain_op_s"], 4),
            "managed_outside_ops_s": round(med["managed_t"] - med["managed_op_s"], 4),
        },
        "rounds": rows, "notes": rep["shapes"][next(iter(rep["shapes"]))].get("notes", []),
    }
    mgr.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--settle", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    for c in a.configs:
        n, b, r = c.split(":")
        print(json.dumps(diag(n, int(b), int(r), a.budget, a.settle, a.rounds)), flush=True)


if __name__ == "__main__":
    main()
