"""Issue 9 "calibrated predictions" on CPU: the Manager's steady-state predicted step against the measured one.

    PYTHONPATH=src python bench/calibration.py resnet18:64:112 mobilenet_v3_small:32:64 [--steps 10] [--budget 50%]

For each MODEL:BATCH:RES: one Manager(budget=...), SGD-momentum steps on random data (`train_steps`), then one
JSON line with every step's mode, measured seconds and the Manager's predicted seconds (the prediction the
Manager held when the step began: after re-calibration/re-planning it is the new plan's), and the verdict:

* steady predicted: the prediction of the last managed step (what the Manager predicts from then on);
* steady measured: the median of the last `--tail` managed steps;
* error: steady predicted / steady measured - 1 (issue 9's bar: |error| <= 15%).

Both are whole step times (the wall time of the `with mgr.step(x)` block: forward, backward and optimizer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torchvision

from memstrata import Manager
from memstrata.runtime.check import train_steps


def measure(name: str, batch: int, res: int, steps: int, budget: str, tail: int) -> dict:
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 10, (batch,))
    mgr = Manager(m, budget=budget, nvme_dir=tempfile.mkdtemp())
    t0 = time.time()
    train_steps(m, x, y, steps=steps, step_ctx=lambda: mgr.step(x))
    r = mgr.report()
    sh = next(iter(r["shapes"].values()))
    rows = [{"mode": s["mode"], "s": round(s["seconds"], 4),
             "pred": None if s.get("predicted_seconds") is None else round(s["predicted_seconds"], 4)}
            for s in r["steps"]]
    man = [row for row in rows if row["mode"].startswith("managed")]
    measured = statistics.median(row["s"] for row in man[-tail:])
    predicted = man[-1]["pred"]
    mgr.close()
    return {"model": name, "batch": batch, "res": res, "budget": budget, "steps": rows,
            "steady_measured_s": measured, "steady_predicted_s": predicted,
            "error": None if predicted is None else round(predicted / measured - 1, 4),
            "notes": sh.get("notes", []), "counts": sh["plan"]["counts"], "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+", help="MODEL:BATCH:RES")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tail", type=int, default=4)
    ap.add_argument("--budget", default="50%")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    for c in a.configs:
        name, b, r = c.split(":")
        print(json.dumps(measure(name, int(b), int(r), a.steps, a.budget, a.tail)), flush=True)


if __name__ == "__main__":
    main()
