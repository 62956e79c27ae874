"""Minimum feasible budget of every torchvision classifier, planned on `meta`.

For each model in `torchvision.models.list_models(module=torchvision.models)`:
trace one SGD-momentum step on `meta` (batch 32, the model's default
resolution, profile a100-80gb), then report

* units: recompute units the trace found (calls),
* min/peak: `memstrata.plan.minimum_budget` over the unmanaged peak
  (`Trace.observed_peak`, what `--budget 100%` means),
* with states: `memstrata.plan.joint.joint_minimum_budget(..., tier_grads=False, tier_params=False)`
  over the same peak: the minimum when the optimizer's states are in the plan
  too (SGD momentum buffers below tier 0 between steps, [Note: states in the plan]),
* with gradients: `joint_minimum_budget(..., tier_params=False)` with gradients
  in the plan as well (a bucket's gradients below tier 0 once final, the bucket
  stepped on the host; [Note: gradients in the plan] in trace/grads.py),
* with parameters: `joint_minimum_budget` with parameters in the plan as well
  (a Linear/Conv module's parameters in host DRAM between their uses;
  [Note: parameters in the plan] in trace/params.py), and the joint plan's
  predicted slowdown at 60% of the peak,
* slowdown@50%: the greedy plan's predicted step time at half the unmanaged
  peak over the unmanaged step time ("infeasible" when 50% < minimum), planned
  with `--time-limit` seconds (default 20: greedy's deadlines otherwise make
  the result depend on how loaded the box is).

The default resolution is the model's own input size where it has one
(ViT's `image_size`, MaxViT's 224), else the crop size of its default
torchvision weights (e.g. 600 for efficientnet_b7, 299 for inception_v3).

    PYTHONPATH=src python bench/all_models_min_budget.py --out bench/results/2026-12-01-cpu [--models a,b]
        [--joint-plans a,b] [--jobs 2]

`--jobs N` plans N models at once in worker processes (rows come back in the
models' order; the results do not depend on it: the minimum uses no clock, and
the slowdown's greedy deadline is per plan).

writes all_models_min_budget.json and all_models_min_budget.md there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torchvision

from memstrata.hardware import profile
from memstrata.plan import minimum_budget, plan
from memstrata.plan.joint import joint_minimum_budget, joint_plan
from memstrata.decisions import InfeasibleBudgetError
from memstrata.trace import trace_model
from memstrata.trace.record import classification_models

BATCH = 32
PROFILE = "a100-80gb"
LIMIT = 0.60  # the bar: minimum <= 60% of the unmanaged peak


def default_resolution(name: str) -> int:
    """The model's own input size, else its default weights' crop size, else 224."""
    if name.startswith("vit_") or name.startswith("maxvit"):
        return 224  # built with weights=None these models take 224x224 (image_size=224)
    try:
        w = torchvision.models.get_model_weights(name).DEFAULT
        crop = w.transforms.keywords.get("crop_size")
        if crop:
            return int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    except Exception:  # pragma: no cover - a model without registered weights
        pass
    return 224


def measure(name: str, time_limit: float = 20.0, grads_plan: bool = False) -> dict:
    res = default_resolution(name)
    h = profile(PROFILE)
    t0 = time.perf_counter()
    tr = trace_model(name, BATCH, res, h)
    t_trace = time.perf_counter() - t0
    peak = int(tr.observed_peak)
    t0 = time.perf_counter()
    mb = int(minimum_budget(tr, h))
    t_min = time.perf_counter() - t0
    row = {"model": name, "res": res, "units": len(tr.units), "peak_bytes": peak, "min_bytes": mb,
           "min_over_peak": mb / peak, "trace_s": round(t_trace, 2), "min_s": round(t_min, 2)}
    t0 = time.perf_counter()
    ms = int(joint_minimum_budget(tr, h, tier_grads=False, tier_params=False))
    row.update(min_states_bytes=ms, min_states_over_peak=ms / peak, min_states_s=round(time.perf_counter() - t0, 2))
    t0 = time.perf_counter()
    mg = int(joint_minimum_budget(tr, h, tier_params=False))
    row.update(min_grads_bytes=mg, min_grads_over_peak=mg / peak, min_grads_s=round(time.perf_counter() - t0, 2))
    t0 = time.perf_counter()
    mp_ = int(joint_minimum_budget(tr, h))
    row.update(min_params_bytes=mp_, min_params_over_peak=mp_ / peak, min_params_s=round(time.perf_counter() - t0, 2))
    if grads_plan:
        t0 = time.perf_counter()
        try:
            jp = joint_plan(tr, h, int(LIMIT * peak), planner="greedy", time_limit=time_limit)
            row["joint_slowdown_at_60"] = jp.predicted_step_time / tr.step_time
            row["joint_counts_at_60"] = jp.counts()
        except InfeasibleBudgetError:
            row["joint_slowdown_at_60"] = None
        row["joint_plan_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    try:
        p = plan(tr, h, peak // 2, planner="greedy", time_limit=time_limit)
        row["slowdown_at_50"] = p.predicted_step_time / tr.step_time
    except InfeasibleBudgetError:
        row["slowdown_at_50"] = None
    row["plan_s"] = round(time.perf_counter() - t0, 2)
    return row


def _row(work: tuple[str, float, bool]) -> dict:
    name, time_limit, grads_plan = work
    try:
        return measure(name, time_limit, grads_plan=grads_plan)
    except Exception as e:  # a model that cannot be traced is reported, not skipped
        return {"model": name, "res": default_resolution(name), "error": f"{type(e).__name__}: {str(e)[:120]}"}


def best(r: dict) -> float:
    """The least minimum over peak: activations only, with states, with states and gradients, with parameters."""
    return min(r["min_over_peak"], r["min_states_over_peak"], r.get("min_grads_over_peak", 1.0),
               r.get("min_params_over_peak", 1.0))


def to_markdown(rows: list[dict], meta: dict) -> str:
    ok = sum(1 for r in rows if "error" not in r and best(r) <= LIMIT)
    lines = [f"# Minimum feasible budget, torchvision classifiers ({meta['commit']})", "",
             f"batch {BATCH}, default resolution, profile {PROFILE}, traced on `meta`; "
             f"torch {meta['torch']}, torchvision {meta['torchvision']}.  "
             f"{ok} of {len(rows)} models at or below {LIMIT:.0%} (best column).", "",
             "| model | res | units | peak (MiB) | minimum (MiB) | min/peak | with states in the plan | "
             "with states and gradients | with parameters too | slowdown @50% | joint plan @60% |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('res', '')} | | | | error: {r['error']} | | |")
            continue
        sd = "infeasible" if r["slowdown_at_50"] is None else f"{r['slowdown_at_50']:.3f}x"
        mark = "" if best(r) <= LIMIT else " **(> 60%)**"
        js = r.get("joint_slowdown_at_60", "")
        js = "infeasible" if js is None else (f"{js:.3f}x" if js != "" else "")
        lines.append(f"| {r['model']} | {r['res']} | {r['units']} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{r['min_bytes'] / 2**20:.0f} | {r['min_over_peak']:.1%} | "
                     f"{r['min_states_over_peak']:.1%} | {r['min_grads_over_peak']:.1%} | "
                     f"{r.get('min_params_over_peak', float('nan')):.1%}{mark} | {sd} | {js} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for all_models_min_budget.{json,md}")
    ap.add_argument("--models", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--joint-plans", default="",
                    help="comma-separated models to also plan jointly at 60%% of the peak (predicted slowdown)")
    ap.add_argument("--time-limit", type=float, default=20.0,
                    help="greedy's time limit per plan, seconds (its deadlines make a loaded box change results)")
    ap.add_argument("--jobs", type=int, default=1, help="models planned at once (worker processes)")
    a = ap.parse_args(argv)
    names = [n for n in a.models.split(",") if n] or classification_models()
    os.makedirs(a.out, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except Exception:  # pragma: no cover
        commit = "unknown"
    meta = {"commit": commit, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "batch": BATCH, "profile": PROFILE,
            "greedy_time_limit_s": a.time_limit, "jobs": a.jobs}
    joint = set(a.joint_plans.split(","))
    work = [(n, a.time_limit, n in joint) for n in names]
    rows = []
    if a.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(a.jobs, maxtasksperchild=4) as pool:
            for r in pool.imap(_row, work):
                rows.append(r)
                print(json.dumps(r), flush=True)
    else:
        for w in work:
            rows.append(_row(w))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(a.out, "all_models_min_budget.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(a.out, "all_models_min_budget.md"), "w") as f:
        f.write(to_markdown(rows, meta))
    bad = [r["model"] for r in rows if "error" in r or best(r) > LIMIT]
    print(f"{len(rows) - len(bad)}/{len(rows)} at or below {LIMIT:.0%}; above or failed: {', '.join(bad) or 'none'}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
