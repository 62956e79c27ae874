import json, sys, time, torch, torchvision
from torch import nn
from memstrata import Manager
from memstrata.runtime import compiled as RC
name, batch, res, steps, nvme = "resnet18", 32, 128, int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = torchvision.models.get_model(name, num_classes=10)
cm = torch.compile(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
mgr = Manager(cm, budget="50%", nvme_dir=nvme, optimizer=opt, tier_grads=True, tier_params=True)
opt = mgr.optimizer
rt = mgr._compiled_life.runtime
MiB = 2**20
cur = {}
orig_init = RC._HeapPoller.__init__
def init(self, *a, **k):
    orig_init(self, *a, **k)
    self.base0 = self.peak; self.at_peak = None; self.at_w3 = None
    cur["p"] = self
RC._HeapPoller.__init__ = init
orig_take = RC._HeapPoller._take
def take(self, h):
    prev = self.peak; prev3 = self.whatif_peaks[3]
    orig_take(self, h)
    st = rt._state
    def snap():
        off, g, p = self.whatif() if self.whatif else (0, 0, 0)
        ob = rt.offloader
        live = [r for r, _ in ob._live.values()]
        pend = sum(r.nbytes for r in live if r.write is not None and not r.write.done())
        held = sum(r.nbytes for r, w in ob._live.values() if w() is not None and not r.released)
        return dict(h=(h - self.base0) / MiB, off=off / MiB, grads=g / MiB, params=p / MiB,
                    restored=ob.mover.restored_bytes / MiB, pending_writes=pend / MiB, held_by_forward=held / MiB,
                    pool_in_use=ob.pool.in_use_bytes / MiB, pool_alloc=ob.pool.allocated_bytes / MiB,
                    bwd_graph=getattr(st, "backward_graph", None), graphs=getattr(getattr(st, "stats", None), "graphs", None))
    if h > prev:
        self.at_peak = snap()
    if self.whatif is not None and self.whatif_peaks[3] > prev3:
        self.at_w3 = snap()
RC._HeapPoller._take = take
g = torch.Generator().manual_seed(1)
for i in range(steps):
    x, y = torch.randn(batch, 3, res, res, generator=g), torch.randint(0, 10, (batch,), generator=g)
    with mgr.step(x):
        nn.functional.cross_entropy(cm(x), y).backward()
    opt.step(); opt.zero_grad()
    r = mgr.report()["steps"][-1]
    p = cur.get("p")
    print(json.dumps({"i": i, "mode": r["mode"], "peak": (r["peak_bytes"] or 0) / MiB, "pred": (r.get("predicted_peak_bytes") or 0) / MiB,
                      "budget": (r.get("budget_bytes") or 0) / MiB, "setting": (rt.budget.fraction, rt.budget.split, rt.offload),
                      "whatif": [w / MiB - p.base0 / MiB for w in p.whatif_peaks] if p else None,
                      "at_peak": p.at_peak if p else None, "at_w3": p.at_w3 if p else None}), flush=True)
print(json.dumps(mgr.report()["shapes"], default=str)[:3000])
mgr.close()
