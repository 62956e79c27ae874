"""Tables (markdown) and one figure from the `memstrata bench --scenario recipe` JSON files of this folder.

    python bench/results/2026-12-02-cpu-recipe/summarise.py bench/results/2026-12-02-cpu-recipe/recipe-*.json

Per file (one seed, or one sequential series): every run's images/s, wall, top-1, step-time median, CPU
seconds per image (training thread / pipeline), load; per seed the memstrata - baseline top-1 gap; over
the seeds the mean and spread.  The figure (`recipe-seeds.png`): per seed, top-1 of both arms and the
per-repeat images/s ratio.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def _fill_pairs(b, m):
    """Per-repeat ratios for files written before the bench computed them."""
    if "samples_per_s_pair_ratios" in m:
        return
    bb = {x["repeat"]: x for x in b["runs"] if x["status"] == "ok"}
    pairs = [(x, bb[x["repeat"]]) for x in m["runs"] if x["status"] == "ok" and x["repeat"] in bb]
    m["samples_per_s_pair_ratios"] = [x["samples_per_s"] / y["samples_per_s"] for x, y in pairs]
    m["wall_s_pair_ratios"] = [x["wall_s"] / y["wall_s"] for x, y in pairs]


def _step_median(x):
    if x.get("step_s_median") is not None:
        return x["step_s_median"]
    v = [e["step_s_median"] for e in x["per_epoch"] if e["epoch"] >= 2 and e.get("step_s_median") is not None]
    return statistics.median(v) if v else None


def main(paths):
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        by = {r["name"]: r for r in data}
        b, m = by.get("baseline"), by.get("memstrata")
        if not b or not m or b["status"] != "ok" or m["status"] != "ok":
            print(f"{p}: incomplete, skipped")
            continue
        _fill_pairs(b, m)
        rows.append((Path(p).stem, b, m))
    print("| file | seed | mode | contender | repeat | wall s | images/s (ep 2+) | step s median | "
          "CPU ms/image: step / pipeline | load | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for stem, b, m in rows:
        for r in (b, m):
            for x in r["runs"]:
                if x["status"] != "ok":
                    continue
                eps = [e for e in x["per_epoch"] if e["epoch"] >= 2]
                load = statistics.mean([v for e in x["per_epoch"] for v in (e.get("load_start"), e.get("load_end"))
                                        if v is not None] or [float("nan")])
                cc, pc = x.get("compute_cpu_s_per_image"), x.get("pipeline_cpu_s_per_image")
                cpu = f"{_f(cc and 1000 * cc, '.1f')} / {_f(pc and 1000 * pc, '.1f')}" if cc else \
                    f"{_f(x.get('cpu_s_per_image') and 1000 * x['cpu_s_per_image'], '.1f')} (all)"
                print(f"| {stem} | {r['seed']} | {'concurrent' if r.get('concurrent') else 'sequential'} | {r['name']} "
                      f"| {x['repeat']} | {x['wall_s']:.0f} | {x['samples_per_s']:.2f} | {_f(_step_median(x), '.2f')} "
                      f"| {cpu} | {load:.1f} | {100 * x['top1']:.1f}% |")
    print()
    print("| file | seed | images/s ratio per repeat | wall ratio per repeat | top-1 baseline | top-1 memstrata | Δ points |")
    print("|---|---|---|---|---|---|---|")
    deltas, ratios = [], []
    for stem, b, m in rows:
        d = 100 * (m["top1"] - b["top1"])
        deltas.append(d)
        ratios += m["samples_per_s_pair_ratios"]
        print(f"| {stem} | {m['seed']} | {', '.join(f'{v:.3f}' for v in m['samples_per_s_pair_ratios'])} | "
              f"{', '.join(f'{v:.3f}' for v in m['wall_s_pair_ratios'])} | {100 * b['top1']:.1f}% | "
              f"{100 * m['top1']:.1f}% | {d:+.1f} |")
    if deltas:
        sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        print(f"\nΔ top-1 over {len(deltas)} files: mean {statistics.mean(deltas):+.2f} points, sd {sd:.2f}, "
              f"range {min(deltas):+.1f} .. {max(deltas):+.1f}")
        print(f"images/s ratio over {len(ratios)} pairs: median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}")
        _figure(rows, Path(paths[0]).parent / "recipe-seeds.png")


def _figure(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(rows))
    labels = [f"seed {m['seed']}" + (" seq" if not m.get("concurrent") else "") for _, _, m in rows]
    a1.bar([x - 0.2 for x in xs], [100 * b["top1"] for _, b, _ in rows], 0.4, label="baseline", color="#ff7f0e")
    a1.bar([x + 0.2 for x in xs], [100 * m["top1"] for _, _, m in rows], 0.4, label="memstrata", color="#1f77b4")
    lo = min(100 * min(b["top1"], m["top1"]) for _, b, m in rows)
    a1.set_ylim(max(0, lo - 10), 100)
    a1.set_xticks(list(xs), labels, rotation=30)
    a1.set_ylabel(f"val top-1 after {rows[0][2]['epochs']} epochs (%)", fontsize=9)
    a1.legend()
    a1.grid(alpha=0.3, axis="y")
    for x, (_, _, m) in zip(xs, rows):
        a2.plot([x] * len(m["samples_per_s_pair_ratios"]), m["samples_per_s_pair_ratios"], "o", color="#1f77b4")
    a2.axhline(0.97, color="red", lw=1, ls="--", label="0.97x")
    a2.axhline(1.0, color="grey", lw=1)
    a2.set_xticks(list(xs), labels, rotation=30)
    a2.set_ylabel("images/s ratio, epochs 2+ (memstrata / baseline)", fontsize=9)
    a2.legend()
    a2.grid(alpha=0.3, axis="y")
    m0 = rows[0][2]
    fig.suptitle(f"{m0['model']} {m0['res']} px, {m0['images']} train / {m0['val_images']} val images, "
                 f"{m0['classes']} classes, batch {m0['batch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"figure: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
