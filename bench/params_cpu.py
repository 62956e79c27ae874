"""Parameter tiering on this box: vgg11 with every Linear/Conv module's parameters in NVMe files between uses.

One process per arm (`--arm unmanaged|keep|params`; keep: the Manager with nothing tiered), SGD momentum, batch 8 at 64 px, one thread: 2 warm-up/trace
steps, then `--steps` timed steps.  Prints one JSON line: median step seconds, the process's peak RSS, the
Manager's measured heap growth above the step's start (memstrata arm), and a hash of the final parameters
(the arms must print the same one: training is bit-exact).

    flock /work/bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src \
        python bench/params_cpu.py --arm params --nvme-dir /tmp/x
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import tempfile
import time

import torch
import torchvision
from torch import nn

from memstrata import Manager
from memstrata.plan.joint import joint_plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=("unmanaged", "keep", "params"), required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--nvme-dir", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=1000)
    model.classifier[2].p = 0.0  # dropout off: the arms draw the same random numbers anyway, keep it simple
    model.classifier[5].p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=False)
    mgr = None
    d = tempfile.mkdtemp(dir=a.nvme_dir)
    if a.arm != "unmanaged":  # keep: the same Manager, nothing tiered (the heap baseline of the params arm)
        params = "all" if a.arm == "params" else None
        mgr = Manager(model, budget="100%", nvme_dir=d, optimizer=opt, tune=False, warmup_steps=1,
                      planner=lambda tr, h, b: joint_plan(tr, h, b, states="keep", params=params))
        opt = mgr.optimizer
    times = []
    for step in range(2 + a.steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(a.batch, 3, a.res, a.res, generator=g)
        y = torch.randint(0, 1000, (a.batch,), generator=g)
        t0 = time.perf_counter()
        with (mgr.step(x) if mgr is not None else torch.enable_grad()):
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    out = {"arm": a.arm, "median_step_s": statistics.median(times), "steps_s": times,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params_sha256": h.hexdigest()}
    if mgr is not None:
        rep = mgr.report()
        managed = [s for s in rep["steps"] if s["mode"] == "managed"]
        out["heap_above_start_mib"] = [round(s["peak_above_start_bytes"] / 2**20, 1) for s in managed]
        out["predicted_peak_mib"] = round((managed[-1].get("predicted_peak_bytes") or 0) / 2**20, 1)
        out["peak_bytes_mib"] = round(managed[-1]["peak_bytes"] / 2**20, 1)
        out["observed_peak_mib"] = round(mgr.trace.observed_peak / 2**20, 1)
        out["params"] = mgr._params.describe() if mgr._params is not None else ""
        out["modes"] = [s["mode"] for s in rep["steps"]]
        mgr.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
