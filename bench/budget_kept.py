"""Issue 9 "budget kept" on CPU: `python bench/budget_kept.py MODEL` (batch 32, 128 px, Manager(budget="50%"), 8 steps)
prints one JSON line: the budget, the measured peak of every managed step on the budget's basis, times, notes."""
import json, sys, tempfile, time, torch, torchvision
from memstrata import Manager
from memstrata.runtime.check import train_steps
name = sys.argv[1]
torch.manual_seed(0)
m = getattr(torchvision.models, name)(num_classes=10)
x = torch.randn(32, 3, 128, 128); y = torch.randint(0, 10, (32,))
mgr = Manager(m, budget="50%", nvme_dir=tempfile.mkdtemp())
t0 = time.time()
train_steps(m, x, y, steps=8, step_ctx=lambda: mgr.step(x))
r = mgr.report()
sh = next(iter(r["shapes"].values()))
man = [s for s in r["steps"] if s["mode"].startswith("managed")]
out = {"model": name, "budget": sh["budget_bytes"], "unmanaged_peak": sh["observed_peak"],
       "peaks": [s["peak_bytes"] for s in man], "seconds": [round(s["seconds"], 3) for s in man],
       "predicted": [round(s["predicted_seconds"], 3) for s in man], "notes": sh.get("notes", []),
       "counts": sh["plan"]["counts"], "misaligned": [ (s["stats"] or {}).get("misaligned") for s in man],
       "replayed": [(s["stats"] or {}).get("replayed") for s in man],  # packs stored as replay recipes, per step
       "plan_seconds": round(sh["plan"]["plan_seconds"], 2), "runtime": sh.get("runtime"),
       "wall_s": round(time.time() - t0, 1)}
print(json.dumps(out))
mgr.close()
