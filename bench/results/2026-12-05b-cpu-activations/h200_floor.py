"""The h200 profile after shared and heavy replays: bytes freed per millisecond of each mechanism, and the plans.

ResNet-50, batch 256, 224 px, float32 (the `memstrata plan` default) or bfloat16, meta trace: no GPU is used.
Run: PYTHONPATH=src python bench/results/2026-12-05b-cpu-activations/h200_floor.py [float32|bfloat16]
(writes h200_floor_<dtype>.json next to it).  The planner variants switch the new moves off in-process
(`HEAVY_REPLAYS`, the greedy share pass); plans get a 30 s time limit (the CLI 4 s) so that the load of a shared box does not change them.
"""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import replace

import torch

from memstrata.plan import greedy
from memstrata.trace import space as space_mod
from memstrata.hardware import Budget, profile
from memstrata.plan.api import plan
from memstrata.plan.forced import forced_plan
from memstrata.simulate import replay_effects
from memstrata.trace.index import trace_index
from memstrata.trace.record import trace_model
from memstrata.trace.space import decision_space, is_heavy_op

GiB = 2**30


def plans_for(trace, h, budget, *, heavy: bool, share: bool, replays: bool = True) -> dict:
    old_heavy, old_share = space_mod.HEAVY_REPLAYS, greedy.share_replays
    space_mod.HEAVY_REPLAYS = heavy
    space_mod._SPACE_CACHE.clear()
    if not share:
        greedy.share_replays = lambda ev_, st, res, deadline=None: (st, res)
    try:
        p = plan(trace, h, budget, replays=replays, time_limit=30.0)  # load-proof; the CLI uses 4 s
        space = decision_space(trace)
        rp = space.replays_of(p)
        groups = space.replay_groups(rp)
        ix = trace_index(trace)
        eff = replay_effects(ix, h, rp)
        heavy_n = sum(1 for s, c in rp.items() if len(c) == 1 and is_heavy_op(trace.ops[c[0]].name))
        return {"slowdown": p.predicted_step_time / trace.step_time, "step_ms": p.predicted_step_time * 1e3,
                "counts": p.counts(), "runs": len(groups), "shared": len(rp) - len(groups), "heavy": heavy_n,
                "replay_ms": sum(e.time for e in eff.values()) * 1e3,
                "units": [ix.units[ix.span_of(u.unit, u.end_unit)].module for u in p.units],
                "offload_gib": sum(trace.storages[d.storage].nbytes for d in p.storages if d.action != "keep") / GiB,
                "notes": list(p.notes)}
    finally:
        space_mod.HEAVY_REPLAYS, greedy.share_replays = old_heavy, old_share
        space_mod._SPACE_CACHE.clear()


def main(dtype: str = "float32") -> None:
    h = profile("h200")
    trace = trace_model("resnet50", 256, 224, profile="h200", dtype=getattr(torch, dtype))
    ix, space = trace_index(trace), decision_space(trace)
    t1 = h.tiers[1]
    rows = [{"mechanism": "offload to dram (copy lane, overlapped)", "bytes": None, "ms": None,
             "gib_per_ms": t1.write_bandwidth / GiB / 1e3, "note": "lane time, not compute time"}]
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
    every = {s: space.replay_chain(s) for s in space.replayable_storages() if trace.storages[s].nbytes >= 1 << 16}
    heavy = {s: c for s, c in every.items() if any(not space_mod.is_replayable_op(trace.ops[j].name) for j in c)
             and not (len(c) == 1 and trace.ops[c[0]].inputs and any(trace.storages[x].kind == "input"
                                                                    for x in trace.ops[c[0]].inputs))}
    heavy_alone = {s: c for s, c in heavy.items() if len(c) == 1}
    cheap = {s: c for s, c in every.items() if s not in heavy_alone}
    shared = space.shared_chains(list(cheap))
    for label, rp, hh in (("op-level replay, cheap chains (eager)", cheap, h),
                          ("op-level replay, cheap chains (fused)", cheap, replace(h, fused_replay=True)),
                          ("  the same with every run shared (fused)", shared, replace(h, fused_replay=True)),
                          ("heavy replay: one conv from its kept input", heavy_alone, h)):
        effs = replay_effects(ix, hh, rp)
        freed = sum(int(ix.nbytes[s]) for s in effs)
        ms = sum(e.time for e in effs.values()) * 1e3
        rows.append({"mechanism": label, "bytes": freed, "ms": ms, "gib_per_ms": freed / GiB / ms,
                     "note": f"{len(effs)} storages, {len(space.replay_groups(rp))} runs"})
    budget = Budget.parse("50%").resolve(trace)
    plans = {}
    fused = replace(h, fused_replay=True)
    plans["no replays"] = plans_for(trace, h, budget, heavy=False, share=False, replays=False)
    plans["eager, cheap replays"] = plans_for(trace, h, budget, heavy=False, share=False)
    plans["eager, + shared"] = plans_for(trace, h, budget, heavy=False, share=True)
    plans["eager, + shared + heavy (default)"] = plans_for(trace, h, budget, heavy=True, share=True)
    plans["fused, cheap replays"] = plans_for(trace, fused, budget, heavy=False, share=False)
    plans["fused, + shared"] = plans_for(trace, fused, budget, heavy=False, share=True)
    plans["fused, + shared + heavy (default)"] = plans_for(trace, fused, budget, heavy=True, share=True)
    out = {"model": "resnet50", "batch": 256, "res": 224, "profile": "h200", "dtype": dtype, "budget_bytes": budget,
           "unmanaged_ms": trace.step_time * 1e3,
           "saved_bytes": sum(s.nbytes for s in trace.saved_storages()), "mechanisms": rows, "plans": plans}
    path = pathlib.Path(__file__).with_name(f"h200_floor_{dtype}.json")
    path.write_text(json.dumps(out, indent=1))
    for r in rows:
        b = f"{r['bytes'] / GiB:6.2f} GiB" if r["bytes"] is not None else "      —   "
        t = f"{r['ms']:7.2f} ms" if r["ms"] is not None else "      —   "
        print(f"{r['mechanism']:48s} {b} {t} {r['gib_per_ms']:.3f} GiB/ms  {r['note']}")
    for k, v in plans.items():
        print(f"{k:36s} {v['slowdown']:.4f}x {v['step_ms']:.2f} ms  {v['counts']} runs {v['runs']} shared {v['shared']} "
              f"heavy {v['heavy']} replay {v['replay_ms']:.2f} ms units {v['units']} offload {v['offload_gib']:.2f} GiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
