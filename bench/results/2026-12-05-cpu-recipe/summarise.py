"""Per-seed tables of the recipe bench JSON files: `python summarise.py FILE.json ...` (one file per seed)."""

from __future__ import annotations

import json
import math
import statistics
import sys

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36}  # two-sided t quantiles


def rows(path):
    data = json.load(open(path))
    return {r["name"]: r for r in data}


def main(paths):
    deltas, ratios, walls, tops = [], [], [], {"baseline": [], "memstrata": []}
    print("| seed | baseline top-1 | memstrata top-1 | Δ points | baseline top-1 per epoch | memstrata top-1 per epoch "
          "| loss last epoch b / m | images/s b / m | images/s ratio | wall s b / m | wall ratio | step s median b / m "
          "| pair waits s b / m | load |")
    print("|" + "---|" * 14)
    for p in paths:
        rs = rows(p)
        b, m = rs["baseline"], rs["memstrata"]
        rb, rm = b["runs"][0], m["runs"][0]
        if rb["status"] != "ok" or rm["status"] != "ok":
            print(f"| {b['seed']} | {rb['status']} | {rm['status']} | | | | | | | | | | | |")
            continue
        d = 100 * (rm["top1"] - rb["top1"])
        deltas.append(d)
        ratios.append(rm["samples_per_s"] / rb["samples_per_s"])
        walls.append(rm["wall_s"] / rb["wall_s"])
        tops["baseline"].append(100 * rb["top1"])
        tops["memstrata"].append(100 * rm["top1"])
        ep = lambda r: " / ".join(f"{100 * e['top1']:.1f}" for e in r["per_epoch"])  # noqa: E731
        loads = [x for x in (b.get("load_values") or []) + (m.get("load_values") or []) if x is not None]
        print(f"| {b['seed']} | {100 * rb['top1']:.1f}% | {100 * rm['top1']:.1f}% | {d:+.1f} | {ep(rb)} | {ep(rm)} "
              f"| {rb['per_epoch'][-1]['loss']:.3f} / {rm['per_epoch'][-1]['loss']:.3f} "
              f"| {rb['samples_per_s']:.2f} / {rm['samples_per_s']:.2f} | **{ratios[-1]:.3f}** "
              f"| {rb['wall_s']:.0f} / {rm['wall_s']:.0f} | {walls[-1]:.3f} "
              f"| {rb['step_s_median']:.3f} / {rm['step_s_median']:.3f} "
              f"| {rb.get('pair_wait_s') or 0:.1f} / {rm.get('pair_wait_s') or 0:.1f} "
              f"| {min(loads):.1f}-{max(loads):.1f} |" if loads else "| |")
    n = len(deltas)
    if n == 0:
        return
    val_n = rows(paths[0])["baseline"]["val_images"]
    print()
    for name, xs in tops.items():
        sd = statistics.stdev(xs) if n > 1 else float("nan")
        print(f"{name}: top-1 mean {statistics.mean(xs):.2f}%, sd over seeds {sd:.2f} points")
    mean = statistics.mean(deltas)
    if n > 1:
        sd = statistics.stdev(deltas)
        half = T95.get(n - 1, 2.0) * sd / math.sqrt(n)
        print(f"Δ top-1 (memstrata - baseline) over {n} seeds: mean {mean:+.2f}, sd {sd:.2f}, "
              f"95% CI [{mean - half:+.2f}, {mean + half:+.2f}] points; min {min(deltas):+.1f}, max {max(deltas):+.1f}")
    p = statistics.mean(tops["baseline"]) / 100
    print(f"evaluation noise alone: binomial sd of one top-1 at {100 * p:.0f}% on {val_n} images = "
          f"{100 * math.sqrt(p * (1 - p) / val_n):.2f} points (of a difference of two: x1.41)")
    print(f"images/s ratio memstrata / baseline per seed: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f}, min {min(ratios):.3f}")
    print(f"wall ratio per seed: {', '.join(f'{r:.3f}' for r in walls)}")




def train_pairs(paths):
    """`python summarise.py --train recipe-accuracy-*.json`: `memstrata train --json` outputs, one per arm and seed."""
    runs = {}
    for p in paths:
        try:
            r = json.loads(open(p).read().strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"{p}: not finished")
            continue
        runs[(r["config"]["seed"], r["name"])] = r
    seeds = sorted({s for s, _ in runs})
    deltas, tops = [], {"baseline": [], "memstrata": []}
    print("| seed | baseline top-1 per epoch (%) | memstrata top-1 per epoch (%) | Δ last epoch (points) "
          "| training loss last epoch b / m |")
    print("|---|---|---|---|---|")
    for s in seeds:
        b, m = runs.get((s, "baseline")), runs.get((s, "memstrata"))
        if b is None or m is None:
            continue
        ep = lambda r: " / ".join(f"{100 * e['top1']:.1f}" for e in r["per_epoch"])  # noqa: E731
        d = 100 * (m["top1"] - b["top1"])
        deltas.append(d)
        tops["baseline"].append(100 * b["top1"])
        tops["memstrata"].append(100 * m["top1"])
        print(f"| {s} | {ep(b)} | {ep(m)} | **{d:+.1f}** | {b['per_epoch'][-1]['loss']:.3f} / "
              f"{m['per_epoch'][-1]['loss']:.3f} |")
    n = len(deltas)
    if not n:
        return
    print()
    for name, xs in tops.items():
        print(f"{name}: top-1 mean {statistics.mean(xs):.2f}%" + (f", sd over seeds {statistics.stdev(xs):.2f} points"
                                                                 if n > 1 else ""))
    mean = statistics.mean(deltas)
    if n > 1:
        sd = statistics.stdev(deltas)
        half = T95.get(n - 1, 2.0) * sd / math.sqrt(n)
        print(f"Δ (memstrata - baseline) over {n} seeds: mean {mean:+.2f}, sd {sd:.2f}, 95% CI "
              f"[{mean - half:+.2f}, {mean + half:+.2f}]; min {min(deltas):+.1f}, max {max(deltas):+.1f}")
    any_run = next(iter(runs.values()))
    p = statistics.mean(tops["baseline"]) / 100
    vn = any_run["val_images"]
    print(f"binomial sd of one top-1 at {100 * p:.0f}% on {vn} images: {100 * math.sqrt(p * (1 - p) / vn):.2f} points")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train"]:
        train_pairs(sys.argv[2:])
    else:
        main(sys.argv[1:])
