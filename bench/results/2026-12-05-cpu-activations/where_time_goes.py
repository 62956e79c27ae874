"""Where the step time goes at 50%act on the CPU box, and bytes freed per ms of each mechanism.

Input: resnet18-b64-trace.json.gz next to this file, the Manager's measured trace of ResNet-18, batch 64, 112 px
(captured on 2026-12-05 through `Manager(planner=callable)`, op durations scaled to the quiet box's untraced step
of 1057.9 ms from 2026-12-02-cpu-quiet, the trace step that run planned on), and the bench's Manager budget
(trace.observed_peak - measured reduction 175030018 B = 257439718 B).
Run: PYTHONPATH=src python bench/results/2026-12-05-cpu-activations/where_time_goes.py  (-> where_time_goes.json)
"""

from __future__ import annotations

import gzip
import json
import pathlib

from memstrata.hardware import profile
from memstrata.plan.api import plan
from memstrata.plan.forced import forced_plan
from memstrata.simulate import replay_effects, simulate
from memstrata.trace.index import trace_index
from memstrata.trace.schema import Trace
from memstrata.trace.space import decision_space

MiB = 2**20
HERE = pathlib.Path(__file__).parent
BUDGET = 257439718


def main() -> None:
    trace = Trace.from_json(gzip.decompress((HERE / "resnet18-b64-trace.json.gz").read_bytes()).decode())
    h = profile("cpu")
    ix, space = trace_index(trace), decision_space(trace)
    nv = h.nvme_tier()
    rows = [{"mechanism": "offload to NVMe", "mib": None, "ms": None,
             "mib_per_ms": 1e-3 / nv.host_cost_per_byte / MiB,
             "note": f"CPU copy {nv.host_cost_per_byte * 1e9:.1f} ns/B on the compute lane; lanes write "
                     f"{nv.write_bandwidth / 1e9:.1f} GB/s, read {nv.read_bandwidth / 1e9:.1f} GB/s (stalls where "
                     "the read of an early activation meets the end of the backward)"}]
    for kind, label in (("recompute", "whole-unit recompute"), ("selective", "selective (heavy outputs kept)"),
                        ("segment", "segment (runs of blocks, heavy outputs kept)")):
        p = forced_plan(trace, kind, h)
        freed = ms = 0.0
        for d in p.units:
            k = ix.span_of(d.unit, d.end_unit)
            eff = ix.unit_effect(k, tuple(sorted(d.save_ops)), frozenset(ix.units[k].inputs))
            freed += sum(int(ix.nbytes[s]) for s in eff.dropped)
            ms += eff.time * 1e3
        rows.append({"mechanism": label, "mib": freed / MiB, "ms": ms, "mib_per_ms": freed / MiB / ms if ms else None,
                     "note": f"{len(p.units)} decisions"})
    rp = {r.storage: r.ops for r in forced_plan(trace, "replay", h).replays
          if trace.storages[r.storage].nbytes >= 1 << 16}
    effs = replay_effects(ix, h, rp)

    def group(sid: int) -> str:
        names = [trace.ops[j].name.split(".")[1] for j in rp[sid]]
        if "convolution" in names:
            return "replay from the batch (stem conv[, bn, relu])"
        if names[0].startswith("max_pool"):
            return "replay of max-pool (output / indices)"
        return "replay of BatchNorm[+add]+ReLU chains"
    groups: dict[str, list[int]] = {}
    for sid in effs:
        groups.setdefault(group(sid), []).append(sid)
    for g, sids in sorted(groups.items()):
        freed = sum(int(ix.nbytes[s]) for s in sids)
        ms = sum(effs[s].time for s in sids) * 1e3
        rows.append({"mechanism": g, "mib": freed / MiB, "ms": ms, "mib_per_ms": freed / MiB / ms,
                     "note": f"{len(sids)} storages"})
    plans = {}
    for name, kw in (("default (replays)", {}), ("--no-replays", {"replays": False})):
        p = plan(trace, h, BUDGET, **kw)
        r = simulate(trace, p, h)
        added = []
        for u in p.units:
            k = ix.span_of(u.unit, u.end_unit)
            eff = ix.unit_effect(k, tuple(sorted(u.save_ops)), frozenset(ix.units[k].inputs))
            added.append({"what": f"recompute {ix.units[k].module}", "mib": sum(int(ix.nbytes[s]) for s in eff.dropped) / MiB,
                          "ms": eff.time * 1e3})
        pe = replay_effects(ix, h, {q.storage: q.ops for q in p.replays})
        for q in p.replays:
            added.append({"what": f"replay {'+'.join(trace.ops[j].name.split('.')[1] for j in q.ops)} "
                                  f"(storage {q.storage})", "mib": trace.storages[q.storage].nbytes / MiB,
                          "ms": pe[q.storage].time * 1e3})
        for d in p.storages:
            added.append({"what": f"NVMe offload (storage {d.storage})", "mib": trace.storages[d.storage].nbytes / MiB,
                          "ms": trace.storages[d.storage].nbytes * nv.host_cost_per_byte * 1e3})
        plans[name] = {"step_ms": r.step_time * 1e3, "unmanaged_ms": trace.step_time * 1e3,
                       "slowdown": r.step_time / trace.step_time, "recompute_ms": r.recompute_time * 1e3,
                       "stall_ms": r.stall_time * 1e3, "counts": p.counts(), "added": added}
    out = {"model": "resnet18", "batch": 64, "res": 112, "budget_bytes": BUDGET, "mechanisms": rows, "plans": plans}
    (HERE / "where_time_goes.json").write_text(json.dumps(out, indent=1))
    for r in rows:
        b = f"{r['mib']:7.1f} MiB" if r["mib"] is not None else "       —   "
        t = f"{r['ms']:7.1f} ms" if r["ms"] is not None else "       —  "
        print(f"{r['mechanism']:46s} {b} {t} {r['mib_per_ms']:.2f} MiB/ms  {r['note']}")
    for k, v in plans.items():
        print(f"{k}: {v['step_ms']:.1f} ms ({v['slowdown']:.3f}x of {v['unmanaged_ms']:.1f}), recompute "
              f"{v['recompute_ms']:.1f} ms, stalls {v['stall_ms']:.1f} ms, {v['counts']}")
        for a in sorted(v["added"], key=lambda a: -a["ms"]):
            print(f"    {a['what']:60s} {a['mib']:6.1f} MiB {a['ms']:6.1f} ms")


if __name__ == "__main__":
    main()
