"""Markdown tables from this folder's `memstrata bench --scenario recipe` JSON files (python summarise.py FILE.json)."""

import json
import statistics
import sys


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(path):
    rows = json.load(open(path))
    r0 = rows[0]
    print(f"{r0['model']}, {r0['res']} px, batch {r0['batch']}, {r0['epochs']} epochs, {r0['images']} training / "
          f"{r0['val_images']} validation images, {r0['classes']} classes, source noise {r0.get('source_noise')}, "
          f"{r0['workers']} workers on {r0['cores']} cores, torch threads seen {r0['torch_threads_seen']}\n")
    print("| contender | repeats | wall s (median) | vs baseline | images/s epochs 2.. (median) | vs baseline "
          "| data wait | top-1 | Δ top-1 points |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['repeats']} | {r['wall_s']:.1f} | {r['wall_s_ratio']:.2f}x | {r['samples_per_s']:.1f} "
              f"| {r['samples_per_s_ratio']:.2f}x | {100 * r['data_wait_fraction']:.0f}% | {100 * r['top1']:.1f}% "
              f"| {r['top1_delta_points']:+.1f} |")
    print("\nPer repeat (ABBA order; ratios against the baseline run of the same repeat):\n")
    print("| contender | repeat | wall s | images/s | data wait | top-1 | epoch 1 train s | epochs 2.. train s (median) "
          "| val s (median) | pipeline share of CPU, epochs 2.. | wall ratio | images/s ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wr = r.get("wall_s_pair_ratios") or [None] * len(r["runs"])
        sr = r.get("samples_per_s_pair_ratios") or [None] * len(r["runs"])
        for k, x in enumerate(r["runs"]):
            if x["status"] != "ok":
                print(f"| {r['name']} | {x['repeat']} | {x['status']}: {x['reason']} |")
                continue
            ep = x["per_epoch"]
            later = [e for e in ep if e["epoch"] >= 2]
            cpu = sum(e.get("cpu_s", 0) + e.get("children_cpu_s", 0) for e in later)
            # the baseline's DataLoader workers are child processes: their CPU is the pipeline's.  memstrata's
            # loader threads share its process with the step's second intra-op thread: not separable ("-")
            share = (f"{100 * sum(e.get('children_cpu_s', 0) for e in later) / cpu:.0f}%"
                     if r["name"] == "baseline" and cpu else "-")
            w = f"{wr[k]:.2f}" if k < len(wr) and wr[k] is not None else "-"
            s = f"{sr[k]:.2f}" if k < len(sr) and sr[k] is not None else "-"
            print(f"| {r['name']} | {x['repeat']} | {x['wall_s']:.1f} | {x['samples_per_s']:.1f} "
                  f"| {100 * x['data_wait_fraction']:.0f}% | {100 * x['top1']:.1f}% | {ep[0]['train_s']:.1f} "
                  f"| {med([e['train_s'] for e in later]):.2f} | {med([e['val_s'] for e in ep]):.2f} | {share} | {w} | {s} |")
    print("\ntop-1 per epoch (repeat 1):\n")
    for r in rows:
        x = next(x for x in r["runs"] if x["status"] == "ok")
        print(f"- {r['name']}: " + " / ".join(f"{100 * e['top1']:.1f}" for e in x["per_epoch"]))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"### {p}\n")
        main(p)
        print()
