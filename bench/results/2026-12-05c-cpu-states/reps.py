"""Per repeat: wall s/step (median) and process CPU s/step (median) of each arm, and the ratio of unmanaged's
wall s/step to memstrata's.   usage: python reps.py LOG_DIR"""
import glob
import json
import os
import statistics
import sys

reps = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "rep*-*.result.json"))):
    rep, arm = os.path.basename(path).split(".")[0].split("-", 1)
    r = json.load(open(path))
    if r.get("status") == "ok":
        reps.setdefault(rep, {})[arm] = (r["step_time_median"], statistics.median(r["step_cpu_times"]))
print("| repeat | unmanaged wall (CPU) s/step | memstrata wall (CPU) s/step | ratio |")
print("|---|---|---|---|")
for rep, arms in sorted(reps.items()):
    u, m = arms.get("unmanaged"), arms.get("memstrata")
    if u and m:
        print(f"| {rep} | {u[0]:.2f} ({u[1]:.2f}) | {m[0]:.2f} ({m[1]:.2f}) | {u[0] / m[0]:.2f}x |")
