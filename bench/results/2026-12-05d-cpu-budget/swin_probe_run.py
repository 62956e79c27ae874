"""Run a pickled (trace, plan) with ActivationRuntime directly; record heap vs event; compare to simulator occupancy."""
import pickle, sys, tempfile, torch, torchvision, numpy as np
from memstrata.runtime.activations import ActivationRuntime
from memstrata.runtime import activations as A
from memstrata.simulate import simulate
from memstrata.trace.units import out_of_place_activations
name, pkl = sys.argv[1], sys.argv[2]
planfile = sys.argv[3] if len(sys.argv) > 3 else None
d = pickle.load(open(pkl, "rb"))
trace, h = d["trace"], d["h"]
plan = d["plan"]
import dataclasses
var = planfile or "all"
if var == "offloads": plan = dataclasses.replace(plan, replays=())
elif var == "replays": plan = dataclasses.replace(plan, storages=())
elif var.startswith("rep:"):
    keep = set(var[4:].split(","))
    ops = lambda r: trace.ops[r.ops[-1]].name.split(".")[1]
    plan = dataclasses.replace(plan, storages=(), replays=tuple(r for r in plan.replays if ops(r) in keep))
print(var, plan.counts())
torch.manual_seed(0)
m = getattr(torchvision.models, name)(num_classes=10)
out_of_place_activations(m)
x = torch.randn(32, 3, 128, 128); y = torch.randint(0, 10, (32,))
tl = simulate(trace, plan, h, check=False)
occ = tl.occupancy[h.fast.name][1]
rt = ActivationRuntime(m, trace, plan, h, nvme_dir=tempfile.mkdtemp(), track_live_bytes=True)
A.ActivationRuntime._SAMPLE_INTERVAL = 0.0
log = []
orig = A.ActivationRuntime._sample_heap
def sh(self, st, rate_limited=False):
    orig(self, st, False)
    log.append((st.event, A.heap_in_use() - st.heap_base, st.live_bytes + self.mover.restored_bytes))
A.ActivationRuntime._sample_heap = sh
# warm-up plain step
loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward(); m.zero_grad(set_to_none=True)
for step in range(1):
    log.clear()
    with rt.step() as stats:
        loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward()
    m.zero_grad(set_to_none=True)
    s = rt.last_stats
    meas = trace.bytes_at_start + s.heap_peak_bytes
    print("stats", {k: v for k, v in vars(s).items() if k in ("packs","kept","replayed","deduplicated","offloaded")} if hasattr(s,"__dict__") else s)
    print(f"step {step}: measured {meas/2**20:.1f} MiB = {meas/plan.budget:.3f} budget; predicted {tl.peaks[h.fast.name]/2**20:.1f} MiB at ev {tl.peak_events[h.fast.name]} ({trace.ops[tl.peak_events[h.fast.name]].name}), misaligned {s.misaligned}")
# per-event: max measured heap vs predicted
ev = np.array([e for e, _, _ in log]); hp = np.array([v for _, v, _ in log])
best = {}
for e, v, lv in log:
    if e not in best or v > best[e][0]: best[e] = (v, lv)
rows = []
for e, (v, lv) in sorted(best.items()):
    if e < 0: continue
    rows.append((e, (trace.bytes_at_start + v) / 2**20, occ[e] / 2**20))
rows.sort(key=lambda r: -(r[1] - r[2]))
print("top events by measured - predicted (MiB):")
for e, mm, pp in rows[:25]:
    op = trace.ops[e]
    print(f"  ev {e} {op.name} {op.phase} unit={op.unit} measured {mm:.1f} predicted {pp:.1f} diff {mm-pp:+.1f}")
pickle.dump({"log": log, "occ": occ}, open(pkl + ".probe", "wb"))
print("NOTES", rt.notes[:12])
rt.close()
