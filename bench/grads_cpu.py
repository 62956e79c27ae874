"""Gradients below tier 0 on the CPU box: step time and memory of a GPT-2 step with AdamW, clipping.

Arms (each repeat of each arm in its own process, arms alternating, medians):

* ``unmanaged``: AdamW (``foreach=False``), `torch.nn.utils.clip_grad_norm_`.
* ``states_nvme``: `GradTieredOptimizer`, every state bucket in NVMe files, gradients kept.
* ``grads_states_nvme``: the same with every bucket's gradients in NVMe files from their hook to their step
  (clipped by `GradTieredOptimizer.clip_grad_norm_`).

Per arm: median step time, the process's resident-set peak in the timed (steady-state) steps (VmHWM reset
after the warm-up, whole process), the warm-up's peak above the built model, the losses (all arms must print
the same: bit-exact).

    flock /work/bench.lock env OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python bench/grads_cpu.py \
        --out bench/results/2026-12-05-cpu-grads [--model gpt2-124m --seq 64 --steps 3 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ARMS = ("unmanaged", "states_nvme", "grads_states_nvme")


def worker(arm: str, model_name: str, seq: int, steps: int, warmup: int, nvme_dir: str) -> dict:
    import torch

    from memstrata.bench import gpt2
    from memstrata.bench.peak import PeakMeter, use_default_host_allocator
    from memstrata.runtime.grads import GradTieredOptimizer
    from memstrata.runtime.states import DEFAULT_BUCKET_BYTES, StatePlacement, buckets_by_size

    torch.set_num_threads(1)
    use_default_host_allocator()  # glibc's steady-state thresholds on every arm (as the state bench)
    torch.manual_seed(0)
    model = gpt2.build(model_name).train()
    cfg = gpt2.GPT2_MODELS[model_name]
    idx = torch.randint(0, cfg.vocab, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    meter = PeakMeter(torch.device("cpu"))
    meter.start()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=False)
    clip = torch.nn.utils.clip_grad_norm_
    if arm != "unmanaged":
        sizes = [p.numel() * p.element_size() for p in params]
        buckets = buckets_by_size(sizes, max(1, min(DEFAULT_BUCKET_BYTES, sum(sizes) // 16)))
        every = StatePlacement(buckets, ("nvme",) * len(buckets))
        grads = every if arm == "grads_states_nvme" else StatePlacement((), ())
        opt = GradTieredOptimizer(opt, every, grads=grads, nvme_dir=nvme_dir)
        clip = opt.clip_grad_norm_
    losses, times = [], []
    first = None
    for i in range(warmup + steps):
        if i == warmup:  # the steady state's peak: arenas and buffers made in the warm-up count, its transients not
            first = meter.stop()
            meter = PeakMeter(torch.device("cpu"))
            meter.start()
        t0 = time.perf_counter()
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
    reading = meter.stop()
    out = {"arm": arm, "step_times": times, "median": statistics.median(times), "losses": losses,
           "peak_bytes": reading.peak_total_bytes, "peak_method": reading.method,
           "warmup_peak_above_model_bytes": first.peak_bytes if first is not None else None,
           "param_bytes": sum(p.numel() * p.element_size() for p in params)}
    if arm != "unmanaged":
        out["grad_stats"] = repr(opt.grads.stats)
        out["state_stats"] = {"reads_waited_s": opt.stats.reads_waited_s, "writes_waited_s": opt.stats.writes_waited_s}
        opt.close(keep_states=False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nvme-dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arm:
        print(json.dumps(worker(a.arm, a.model, a.seq, a.steps, a.warmup, a.nvme_dir)))
        return 0
    os.makedirs(a.out, exist_ok=True)
    runs: list[dict] = []
    for r in range(a.repeats):
        for arm in ARMS:
            with tempfile.TemporaryDirectory(dir=os.environ.get("MEMSTRATA_NVME_DIR")) as d:
                cp = subprocess.run([sys.executable, __file__, "--out", a.out, "--model", a.model, "--seq",
                                     str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--arm", arm,
                                     "--nvme-dir", d], capture_output=True, text=True)
            if cp.returncode != 0:
                print(cp.stderr[-2000:], file=sys.stderr)
                return 1
            res = json.loads(cp.stdout.strip().splitlines()[-1])
            res["repeat"] = r
            runs.append(res)
            print(f"repeat {r} {arm}: median {res['median']:.3f} s, steady peak RSS {res['peak_bytes'] / 2**20:.0f} MiB",
                  flush=True)
    summary = {}
    base = statistics.median(x["median"] for x in runs if x["arm"] == "unmanaged")
    for arm in ARMS:
        mine = [x for x in runs if x["arm"] == arm]
        med = statistics.median(x["median"] for x in mine)
        summary[arm] = {"median_step_s": med, "vs_unmanaged": base / med,
                        "steady_peak_rss_MiB": statistics.median(x["peak_bytes"] for x in mine) / 2**20,
                        "warmup_peak_above_model_MiB": statistics.median(
                            x["warmup_peak_above_model_bytes"] for x in mine) / 2**20,
                        "losses_equal_unmanaged": all(x["losses"] == runs[0]["losses"] for x in mine)}
    with open(os.path.join(a.out, f"grads_cpu_{a.model}.json"), "w") as f:
        json.dump({"model": a.model, "seq": a.seq, "steps": a.steps, "repeats": a.repeats, "summary": summary,
                   "runs": runs}, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
