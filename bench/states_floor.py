"""Per repeat of the acceptance run: the memstrata arm's timed steps against the disk and the unmanaged arm.

usage: python floor.py LOG_DIR   (the --log-dir of `memstrata bench`; prints a markdown table and the floor)
"""
import glob
import json
import os
import statistics
import sys

rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.result.json"))):
    r = json.load(open(path))
    rows[os.path.basename(path).split(".")[0]] = r
print("| run | s/step (median) | opt step s | AdamW compute s | stall s | moved GB/step | disk busy s | GB/s while busy | ring | predicted stall s |")
print("|---|---|---|---|---|---|---|---|---|---|")
floors = []
for name, r in rows.items():
    if r.get("status") != "ok":
        print(f"| {name} | {r.get('status')}: {r.get('reason')} |")
        continue
    n = r.get("notes") or {}
    med = n.get("timed_step_medians") or {}
    line = f"| {name} | {r['step_time_median']:.2f} |"
    if med:
        moved = med["bytes_read"] + med["bytes_written"]
        gbps = moved / med["disk_busy_s"] / 1e9 if med["disk_busy_s"] else float("nan")
        line += (f" {med['opt_step_s']:.2f} | {med['compute_s']:.2f} | {med['opt_step_s'] - med['compute_s']:.2f} |"
                 f" {moved / 1e9:.2f} | {med['disk_busy_s']:.2f} | {gbps:.2f} | {n.get('ring')} |"
                 f" {n.get('predicted_stall_s', float('nan')):.2f} |")
        # the floor of the optimizer step: the disk moving `moved` at the bandwidth it showed, or the compute
        floors.append((name, max(med["compute_s"], moved / (gbps * 1e9)), med["opt_step_s"], moved, gbps))
    else:
        line += " - | - | - | - | - | - | - | - |"
    print(line)
for name, floor, got, moved, gbps in floors:
    print(f"{name}: opt-step floor {floor:.2f} s (max of compute, {moved / 1e9:.2f} GB at {gbps:.2f} GB/s); measured {got:.2f} s")
