"""The eager floor on the h200 profile: bytes freed per millisecond of each mechanism, and the plans.

ResNet-50, batch 256, 224 px, float32 (the `memstrata plan` default) or bfloat16, meta trace: no GPU is used.
Run: PYTHONPATH=src python bench/results/2026-12-05-cpu-activations/h200_floor.py [float32|bfloat16]
(writes h200_floor_<dtype>.json next to it)
"""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import replace

import torch

from memstrata.hardware import Budget, profile
from memstrata.plan.api import plan
from memstrata.plan.forced import forced_plan
from memstrata.simulate import replay_effects
from memstrata.trace.index import trace_index
from memstrata.trace.record import trace_model
from memstrata.trace.space import decision_space

GiB = 2**30


def main(dtype: str = "float32") -> None:
    h = profile("h200")
    trace = trace_model("resnet50", 256, 224, profile="h200", dtype=getattr(torch, dtype))
    ix, space = trace_index(trace), decision_space(trace)
    rows = []
    t1 = h.tiers[1]
    rows.append({"mechanism": "offload to dram (copy lane, overlapped)", "bytes": None, "ms": None,
                 "gib_per_ms": t1.write_bandwidth / GiB / 1e3, "note": "lane time, not compute time"})
    for kind, label in (("recompute", "whole-unit recompute"), ("selective", "selective (heavy outputs kept)"),
                        ("segment", "segment (runs of blocks, heavy outputs kept)")):
        p = forced_plan(trace, kind, h)
        freed = ms = 0.0
        for d in p.units:
            k = ix.span_of(d.unit, d.end_unit)
            eff = ix.unit_effect(k, tuple(sorted(d.save_ops)), frozenset(ix.units[k].inputs))
            freed += sum(int(ix.nbytes[s]) for s in eff.dropped)
            ms += eff.time * 1e3
        rows.append({"mechanism": label, "bytes": freed, "ms": ms, "gib_per_ms": freed / GiB / ms if ms else None,
                     "note": f"{len(p.units)} decisions"})
    rp = {r.storage: r.ops for r in forced_plan(trace, "replay", h).replays
          if trace.storages[r.storage].nbytes >= 1 << 16}  # what the planner considers (not BN statistics)
    for fused in (False, True):
        effs = replay_effects(ix, replace(h, fused_replay=fused), rp)
        freed = sum(int(ix.nbytes[s]) for s in effs)
        ms = sum(e.time for e in effs.values()) * 1e3
        rows.append({"mechanism": f"op-level replay ({'fused' if fused else 'eager'})", "bytes": freed, "ms": ms,
                     "gib_per_ms": freed / GiB / ms, "note": f"{len(effs)} storages"})
    budget = Budget.parse("50%").resolve(trace)
    plans = {}
    for fused in (False, True):
        hh = replace(h, fused_replay=fused)
        p = plan(trace, hh, budget)
        plans["fused" if fused else "eager"] = {
            "slowdown": p.predicted_step_time / trace.step_time, "step_ms": p.predicted_step_time * 1e3,
            "unmanaged_ms": trace.step_time * 1e3, "counts": p.counts(), "notes": list(p.notes)}
    out = {"model": "resnet50", "batch": 256, "res": 224, "profile": "h200", "dtype": dtype, "budget_bytes": budget,
           "saved_bytes": sum(s.nbytes for s in trace.saved_storages()), "mechanisms": rows, "plans": plans}
    path = pathlib.Path(__file__).with_name(f"h200_floor_{dtype}.json")
    path.write_text(json.dumps(out, indent=1))
    for r in rows:
        b = f"{r['bytes'] / GiB:6.2f} GiB" if r["bytes"] is not None else "      —   "
        t = f"{r['ms']:7.2f} ms" if r["ms"] is not None else "      —   "
        print(f"{r['mechanism']:48s} {b} {t} {r['gib_per_ms']:.3f} GiB/ms  {r['note']}")
    for k, v in plans.items():
        print(k, f"{v['slowdown']:.3f}x", v["counts"], v["notes"][0])


if __name__ == "__main__":
    main(*sys.argv[1:])
