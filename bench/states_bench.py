"""Optimizer-state tiering benchmark: unmanaged AdamW vs memstrata's TieredOptimizer with states on NVMe.

A GPT-2-style decoder (torch.nn, randomly initialised, nothing downloaded), AdamW, fp32, on this CPU box.
Each arm runs in its own process; arms alternate over repeats; medians of the measured steps are reported.

    PYTHONPATH=src python bench/states_bench.py --model gpt2-124m --seq 64 --batch 1 --repeats 2 \\
        --nvme-dir /tmp/ms-nvme --nvme-fraction 0.5 --json out.json

`--nvme-fraction 0.5` sets the fast-tier budget for states to half the AdamW states; `plan_states`
(plan/states.py) picks the NVMe buckets from that budget and the cpu profile's NVMe bandwidths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {  # (layers, d_model, heads)
    "gpt2-124m": (12, 768, 12),
    "gpt2-350m": (24, 1024, 16),
    "tiny": (2, 128, 4),
}
VOCAB, CTX = 50257, 1024


def build(model: str):
    import torch
    from torch import nn

    n_layer, d, h = MODELS[model]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, h, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

        def forward(self, x, mask):
            y = self.ln1(x)
            x = x + self.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(CTX, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, VOCAB, bias=False)
            self.head.weight = self.wte.weight  # tied, as in GPT-2

        def forward(self, idx):
            t = idx.shape[1]
            mask = torch.full((t, t), float("-inf")).triu(1)
            x = self.wte(idx) + self.wpe(torch.arange(t))
            for b in self.blocks:
                x = b(x, mask)
            return self.head(self.ln(x))

    torch.manual_seed(0)
    return GPT()


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    plan_desc = None
    if args.arm == "memstrata":
        from memstrata.hardware import profile
        from memstrata.plan.states import plan_states
        from memstrata.runtime.states import StatePlacement, TieredOptimizer

        numels = [p.numel() for p in params]
        budget = int(sum(numels) * 8 * (1 - args.nvme_fraction))
        plan = plan_states(numels, state_bytes_per_element=8, fast_budget=budget, hierarchy=profile("cpu"),
                           bucket_bytes=args.bucket_mb << 20)
        plan_desc = plan.describe()
        opt = TieredOptimizer(opt, StatePlacement.from_plan(plan), nvme_dir=args.nvme_dir)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g)
    times, opt_times = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if step >= args.warmup:
            times.append(t2 - t0)
            opt_times.append(t2 - t1)
    out = {"arm": args.arm, "step_s": times, "opt_step_s": opt_times, "loss": float(loss)}
    if args.arm == "memstrata":
        s = opt.stats
        store = opt.mover.store
        out.update(plan=plan_desc, bytes_written=store.bytes_written if store else 0,
                   bytes_read=store.bytes_read if store else 0, steps=s.steps,
                   reads_waited_s=s.reads_waited_s, writes_waited_s=s.writes_waited_s,
                   peak_resident_state_bytes=s.peak_resident_bytes, o_direct=bool(store and store.direct))
        opt.close(keep_states=False)
    import resource
    out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2-124m")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nvme-dir", default="/tmp/memstrata-states-bench")
    ap.add_argument("--nvme-fraction", type=float, default=0.5)
    ap.add_argument("--bucket-mb", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--arm", choices=["unmanaged", "memstrata"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 0 <= args.nvme_fraction <= 1:
        ap.error("--nvme-fraction must be in [0, 1]")
    if args.arm:
        print(json.dumps(worker(args)))
        return
    os.makedirs(args.nvme_dir, exist_ok=True)
    runs: dict[str, list[dict]] = {"unmanaged": [], "memstrata": []}
    for r in range(args.repeats):
        for arm in (("unmanaged", "memstrata") if r % 2 == 0 else ("memstrata", "unmanaged")):
            cmd = [sys.executable, __file__, "--arm", arm] + sys.argv[1:]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{arm} worker failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}")
            runs[arm].append(json.loads(res.stdout.strip().splitlines()[-1]))
    summary = {}
    for arm, rs in runs.items():
        steps = [t for r in rs for t in r["step_s"]]
        opts = [t for r in rs for t in r["opt_step_s"]]
        summary[arm] = {"median_step_s": statistics.median(steps), "median_opt_step_s": statistics.median(opts),
                        "samples_per_s": args.batch / statistics.median(steps),
                        "max_rss_gib": max(r["max_rss_bytes"] for r in rs) / 2**30, "n_steps": len(steps)}
    m = runs["memstrata"][0]
    summary["memstrata"].update({k: m[k] for k in ("plan", "peak_resident_state_bytes", "o_direct")})
    summary["memstrata"]["nvme_gb_per_step"] = (m["bytes_written"] + m["bytes_read"]) / m["steps"] / 1e9
    summary["ratio_samples_per_s"] = summary["memstrata"]["samples_per_s"] / summary["unmanaged"]["samples_per_s"]
    report = {"args": {k: v for k, v in vars(args).items() if k != "arm"}, "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
