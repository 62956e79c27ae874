"""The optimizer-step cost of fp32 master weights on this CPU: `MasterWeights(bf16 params, AdamW)` vs a plain
fp32 AdamW over the same number of elements (foreach=False, one thread), alternating, medians.

    flock /work/bench.lock python bench/master_step_cpu.py [--elements 33554432] [--params 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from memstrata import MasterWeights


def make(dtype: torch.dtype, n: int, k: int):
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(k):
        p = torch.randn(n // k, generator=g).mul_(0.02).to(dtype).requires_grad_()
        p.grad = torch.randn(n // k, generator=g).mul_(1e-3).to(dtype)
        ps.append(p)
    if dtype == torch.float32:
        return torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=False)
    return MasterWeights(ps, torch.optim.AdamW, lr=1e-4, weight_decay=0.1, foreach=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=1 << 25)
    ap.add_argument("--params", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    arms = {"adamw_fp32": make(torch.float32, a.elements, a.params),
            "masterweights_bf16": make(torch.bfloat16, a.elements, a.params)}
    for o in arms.values():
        o.step()  # the states (and the masters) are made here
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(a.repeats):
        for k, o in arms.items():
            t = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"torch": torch.__version__, "elements": a.elements, "params": a.params, "repeats": a.repeats,
                      "step_s": times, "median_s": med,
                      "ratio_masterweights_to_fp32": med["masterweights_bf16"] / med["adamw_fp32"]}, indent=1))


if __name__ == "__main__":
    main()
