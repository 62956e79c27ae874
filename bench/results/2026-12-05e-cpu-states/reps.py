"""Per repeat and arm: wall and process-CPU s/step (medians), the machine's steal share over the timed steps,
and for memstrata the disk's busy seconds per timed step and what [Note: steal while the disk is busy] predicts
for the training thread's loss (sigma x busy).   usage: python reps.py LOG_DIR [SIGMA, default 0.31]"""
import glob
import json
import os
import statistics
import sys

sigma = float(sys.argv[2]) if len(sys.argv) > 2 else 0.31
reps = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "rep*-*.result.json"))):
    rep, arm = os.path.basename(path).split(".")[0].split("-", 1)
    r = json.load(open(path))
    if r.get("status") == "ok":
        reps.setdefault(rep, {})[arm] = r
print("| repeat | unmanaged wall (CPU) s/step, steal | memstrata wall (CPU) s/step, steal | ratio | memstrata wall - CPU s | "
      "disk busy s/step | GB/s while busy | sigma x busy s | stall s |")
print("|---|---|---|---|---|---|---|---|---|")
for rep, arms in sorted(reps.items()):
    u, m = arms.get("unmanaged"), arms.get("memstrata")
    if not (u and m):
        continue
    uw, uc = u["step_time_median"], statistics.median(u["step_cpu_times"])
    mw, mc = m["step_time_median"], statistics.median(m["step_cpu_times"])
    med = (m.get("notes") or {}).get("timed_step_medians") or {}
    busy = med.get("disk_busy_s", float("nan"))
    moved = med.get("bytes_read", 0) + med.get("bytes_written", 0)
    st = lambda r: "-" if r.get("steal_share") is None else f"{100 * r['steal_share']:.0f}%"  # noqa: E731
    print(f"| {rep} | {uw:.2f} ({uc:.2f}), {st(u)} | {mw:.2f} ({mc:.2f}), {st(m)} | {uw / mw:.2f}x | {mw - mc:.2f} | "
          f"{busy:.2f} | {moved / busy / 1e9 if busy else float('nan'):.2f} | {sigma * busy:.2f} | "
          f"{med.get('opt_step_s', float('nan')) - med.get('compute_s', float('nan')):.2f} |")
