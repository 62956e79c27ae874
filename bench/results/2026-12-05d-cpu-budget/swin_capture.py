"""Capture swin_t trace (b32 128px) as the Manager sees it (calibrated), pickle it, plus its plan."""
import pickle, sys, tempfile, time, torch, torchvision
from memstrata import Manager
from memstrata.plan.api import plan as make_plan
from memstrata.runtime.check import train_steps
name = sys.argv[1] if len(sys.argv) > 1 else "swin_t"
torch.manual_seed(0)
m = getattr(torchvision.models, name)(num_classes=10)
x = torch.randn(32, 3, 128, 128); y = torch.randint(0, 10, (32,))
saved = {}
def planner(trace, h, budget):
    saved.update(trace=trace, h=h, budget=budget)
    t0 = time.time(); p = make_plan(trace, h, budget); saved["plan_s"] = time.time() - t0
    saved["plan"] = p
    return p
mgr = Manager(m, budget="50%", nvme_dir=tempfile.mkdtemp(), planner=planner)
train_steps(m, x, y, steps=3, step_ctx=lambda: mgr.step(x))
r = mgr.report()
man = [s for s in r["steps"] if s["mode"].startswith("managed")]
print("budget", saved["budget"], "peaks", [s["peak_bytes"] / saved["budget"] for s in man], "counts", saved["plan"].counts(), "plan_s", saved["plan_s"])
pickle.dump(saved, open(f"/tmp/swin/{name}.pkl", "wb"))
mgr.close()
