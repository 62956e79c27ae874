"""Compiled models under the Manager on this box (CPU inductor): peaks vs budget, step times, largest difference.

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=1048576 OMP_NUM_THREADS=1 PYTHONPATH=src \
        python bench/compiled_check.py resnet18 32 128 50% 16 /path/to/nvme_dir [tier]

One process: the same model twice (same seed), one compiled and unmanaged, one compiled under the Manager,
stepping alternately on the same batches.  The unmanaged one runs the same compiled graphs as the managed one
(after each managed step its `PartitionerBudget` is set to the fraction and split that step ran at), so
"bit-exact" compares equal graphs; a setting change runs the unmanaged model at the new graphs too.  The
optional nvme_dir is the Manager's lower tier on CPU (offloading split graphs' saves).  Peaks: the Manager's reading (its basis: bytes at the step's start +
sampled heap growth) and an independent one (VmHWM above the step's start, `bench/peak.py`; exact with the
allocator settings above).  `tier`: the Manager also holds the optimizer with tier_grads=True and
tier_params=True (gradients and split units' parameters may leave tier 0 at the offload rung); the tiered
gradients are brought back into p.grad after the step's block (outside the measured window) for the
comparison.  `frames`: dynamo's compiled graphs so far (a managed step that adds one recompiled).
Prints one JSON line per step and a summary.
"""
import json, sys, time

import torch
import torchvision
from torch import nn

from memstrata import Manager
from memstrata.bench.peak import PeakMeter, exact_host_allocator_active
from memstrata.runtime.compiled import PartitionerBudget


def build(name: str, res: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        from torchvision.models.vision_transformer import VisionTransformer
        return VisionTransformer(image_size=res, patch_size=8, num_layers=4, num_heads=4, hidden_dim=128,
                                 mlp_dim=512, num_classes=10)
    return torchvision.models.get_model(name, num_classes=10)


def _diff(ref: nn.Module, model: nn.Module) -> dict:
    """Largest gradient difference, absolute and relative to the largest gradient entry of that parameter."""
    d = [((a.grad - b.grad).abs().max().item(), b.grad.abs().max().item())
         for a, b in zip(ref.parameters(), model.parameters())]
    return {"max_abs": max(x for x, _ in d), "max_rel": max(x / m for x, m in d if m > 0),
            "bit_exact": all(x == 0 for x, _ in d)}


def main() -> None:
    name, batch, res, budget, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    ref, model = build(name, res), build(name, res)
    cref, cm = torch.compile(ref), torch.compile(model)
    oref = torch.optim.SGD(ref.parameters(), lr=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    nvme_dir = sys.argv[6] if len(sys.argv) > 6 else None
    tier = len(sys.argv) > 7 and sys.argv[7] == "tier"
    if tier:
        mgr = Manager(cm, budget=budget, nvme_dir=nvme_dir, optimizer=opt, tier_grads=True, tier_params=True)
        opt = mgr.optimizer
    else:
        mgr = Manager(cm, budget=budget, nvme_dir=nvme_dir)
    from torch._dynamo.utils import counters
    ref_budget = PartitionerBudget(cref)
    rt = mgr._compiled_life.runtime
    g = torch.Generator().manual_seed(1)
    meter = PeakMeter(torch.device("cpu"))
    rows = []
    for i in range(steps):
        x, y = torch.randn(batch, 3, res, res, generator=g), torch.randint(0, 10, (batch,), generator=g)
        meter.start(); t0 = time.perf_counter()
        with mgr.step(x):
            nn.functional.cross_entropy(cm(x), y).backward()
        t_mgr = time.perf_counter() - t0; p_mgr = meter.stop()
        if tier:
            opt.grads.gather(range(len(list(model.parameters()))))  # the tiered gradients, for the comparison
        prev = None
        if (rt.budget.fraction, rt.budget.split) != (ref_budget.fraction, ref_budget.split):
            # The managed step ran new graphs: first the unmanaged model's previous graphs on the same batch and
            # parameters (buffers put back after), to say how far a different compiled graph lands.
            saved = [b.clone() for b in ref.buffers()]
            nn.functional.cross_entropy(cref(x), y).backward()
            prev = _diff(ref, model)
            ref.zero_grad()
            with torch.no_grad():
                for b, v in zip(ref.buffers(), saved):
                    b.copy_(v)
        ref_budget.set(rt.budget.fraction, rt.budget.split)  # the graphs the managed step ran
        meter.start(); t0 = time.perf_counter()
        nn.functional.cross_entropy(cref(x), y).backward()
        t_ref = time.perf_counter() - t0; p_ref = meter.stop()
        diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), model.parameters()))
        same = all(torch.equal(a.grad, b.grad) for a, b in zip(ref.parameters(), model.parameters()))
        for o in (oref, opt):
            o.step(); o.zero_grad()
        s = mgr.report()["steps"][-1]
        st = s["stats"] or {}
        row = dict(step=i, mode=s["mode"], fraction=st.get("fraction"), split=rt.budget.split,
                   offload=st.get("offload"), grads_tiered=bool(tier and opt.grads.placement.buckets),
                   params_tiered=st.get("params_tiered"), frames=int(counters["stats"]["unique_graphs"]),
                   predicted_MiB=round((s["predicted_peak_bytes"] or 0) / 2**20, 1),
                   whatif_MiB=[round((x + (st.get("bytes_at_start") or 0)) / 2**20, 1)
                               for x in (st.get("whatif_peaks") or ())], offloaded_MiB=round((st.get("offloaded_bytes") or 0) / 2**20, 1),
                   restore_wait_s=round(st.get("restore_wait_seconds") or 0.0, 3), graphs=st.get("graphs"),
                   ref_s=round(t_ref, 3), mgr_s=round(t_mgr, 3),
                   ref_peak_above_start_MiB=round(p_ref.peak_bytes / 2**20, 1),
                   mgr_peak_above_start_MiB=round(p_mgr.peak_bytes / 2**20, 1),
                   manager_reading_MiB=round((s["peak_bytes"] or 0) / 2**20, 1),
                   budget_MiB=round((s["budget_bytes"] or 0) / 2**20, 1),
                   bytes_at_start_MiB=round(((s["stats"] or {}).get("bytes_at_start") or 0) / 2**20, 1),
                   saved_act_MiB=round(((s["stats"] or {}).get("saved_activation_bytes") or 0) / 2**20, 1),
                   grads_bit_exact=same, grads_max_abs_diff=diff,
                   vs_previous_graphs=prev,
                   params_bit_exact=all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters())),
                   buffers_bit_exact=all(torch.equal(a, b) for a, b in zip(ref.buffers(), model.buffers())))
        rows.append(row)
        print(json.dumps(row), flush=True)
    (shape,) = mgr.report()["shapes"].values()
    print(json.dumps({"exact_allocator": exact_host_allocator_active(), "model": name, "batch": batch, "res": res,
                      "budget": budget, "notes": shape.get("notes"), "plan": shape.get("plan"),
                      "trace": shape.get("trace"),
                      "measured_peaks": shape.get("measured_peaks"), "misaligned_steps": shape.get("misaligned_steps")}, default=str), flush=True)
    mgr.close()


if __name__ == "__main__":
    main()
