"""plan — one entry point for every planner.

>>> from memstrata.hardware import profile
>>> from memstrata.plan import plan, minimum_budget
>>> p = plan(trace, profile("h200"), budget=trace.observed_peak // 2)   # doctest: +SKIP
>>> p.predicted_step_time / trace.step_time                                # doctest: +SKIP
1.09

[Note: minimum budget]
`minimum_budget(trace, hierarchy)` is the tier-0 peak of memstrata's most
memory-frugal plan (`greedy.frugal_state`), as the simulator predicts it with
tier 0 unbounded:
  * every unit with a backward is recomputed fully (save_ops=()), except units
    whose recompute *raises* that peak (held inputs, recompute transients);
  * every saved activation with a backward read that is not dropped by a
    recompute is offloaded to the first allowed lower tier (deeper ones where
    that tier would overflow) around its longest idle stretch, evicted right
    after the last access before it and prefetched as late as possible (at the
    event that needs it: no tier-0 copy in between, at the price of a stall).
Everything else (parameters, gradients, optimizer states, inputs, temporaries)
stays where the trace has it.  The guarantee: `plan()` succeeds at every
budget >= minimum_budget (the frugal plan itself is a fallback), and raises
`InfeasibleBudgetError(budget, minimum_budget)` below it.  It is an upper
bound on the true minimum over all conceivable plans (e.g. plans that free
gradients early are outside memstrata's decision space).
"""

from __future__ import annotations

import time

from ..hardware import Hierarchy
from ..simulate import _Result, run, trace_index
from ..trace.schema import Trace
from .schema import InfeasibleBudgetError, Plan, StorageDecision, UnitDecision
from . import greedy as _greedy
from . import milp as _milp

PLANNERS = ("auto", "greedy", "milp")
AUTO_MILP_MAX = 60  # candidate storages + units for which "auto" uses the exact planner


def _tier_indices(hierarchy: Hierarchy, tiers) -> tuple[int, ...]:
    names = [t.name for t in hierarchy.tiers]
    if tiers is None:
        out = tuple(range(1, len(names)))
    else:
        out = []
        for t in tiers:
            if t not in names:
                raise ValueError(f"unknown tier {t!r}; hierarchy {hierarchy.name!r} has {names}")
            i = names.index(t)
            if i == 0:
                raise ValueError(f"tier {t!r} is tier 0 (the budget); offload tiers must be lower tiers")
            out.append(i)
        out = tuple(sorted(set(out)))
    return out


def minimum_budget(trace: Trace, hierarchy: Hierarchy, *, tiers=None) -> int:
    """The smallest tier-0 budget memstrata can plan for; see [Note: minimum budget]."""
    ix = trace_index(trace)
    ti = _tier_indices(hierarchy, tiers)
    if not ti:
        st = _greedy.State(units={u: ms[0] for u, ms in _greedy.unit_modes(ix, hierarchy).items()})
        res = run(ix, hierarchy, 2**62, st.offloads, st.units)
        base = int(ix.base_occ.max())
        return min(res.peak(0), base)
    st = _greedy.frugal_state(ix, hierarchy, ti, 2**62)
    res = run(ix, hierarchy, 2**62, st.offloads, st.units)
    return min(res.peak(0), int(ix.base_occ.max()))


def to_plan(trace: Trace, hierarchy: Hierarchy, budget: int, st: "_greedy.State", res: _Result, planner: str,
            notes=()) -> Plan:
    names = [t.name for t in hierarchy.tiers]
    decisions = tuple(StorageDecision(sid, "offload", names[ti], ev, pf)
                      for sid, (ti, ev, pf) in sorted(st.offloads.items()))
    units = tuple(UnitDecision(u, tuple(S)) for u, S in sorted(st.units.items()))
    peaks = tuple((names[i], res.peak(i)) for i in range(len(names)))
    return Plan(planner=planner, hierarchy=hierarchy.name, budget=int(budget), storages=decisions, units=units,
                predicted_step_time=res.step_time, predicted_peaks=peaks, notes=tuple(notes))


def plan(trace: Trace, hierarchy: Hierarchy, budget: int, *, planner: str = "auto", tiers=None,
         time_limit: float = 4.0) -> Plan:
    """Decide where every saved activation lives and which units are recomputed, within `budget` tier-0 bytes.

    planner: "greedy" (fast heuristic), "milp" (exact for stated restricted problems, never worse than greedy;
    see [Note: what "exact" means here] in milp.py) or
    "auto" (milp when there are <= 60 candidate storages + units, else greedy).  `tiers` restricts the
    lower tiers used for offload (names; default all).  The returned plan carries the simulator's
    predicted step time and per-tier peaks.  Raises InfeasibleBudgetError below minimum_budget().
    """
    if planner not in PLANNERS:
        raise ValueError(f"planner must be one of {PLANNERS}, got {planner!r}")
    budget = int(budget)
    t0 = time.perf_counter()
    ix = trace_index(trace)
    ti = _tier_indices(hierarchy, tiers)
    base = run(ix, hierarchy, budget, {}, {})
    if base.feasible:
        return to_plan(trace, hierarchy, budget, _greedy.State(), base, planner if planner != "auto" else "keep",
                       notes=("unmanaged step fits the budget",))
    minimum = minimum_budget(trace, hierarchy, tiers=tiers)
    if budget < minimum:
        raise InfeasibleBudgetError(budget, minimum)
    if planner == "auto":
        n_cand = int(ix.offloadable.sum()) + len(_greedy.unit_modes(ix, hierarchy))
        planner = "milp" if n_cand <= AUTO_MILP_MAX else "greedy"
    exactness = ()
    if planner == "milp":
        mr = _milp.milp_solve(ix, hierarchy, budget, ti, time_limit=max(time_limit, 10.0))
        st, res, exactness = mr.state, mr.result, (mr.note,)
    else:
        st, res = _greedy.greedy_state(ix, hierarchy, budget, ti, time_limit=time_limit)
    if not res.feasible:  # pragma: no cover - the planners only return feasible states
        raise RuntimeError(f"{planner} planner returned an infeasible plan")
    dt = time.perf_counter() - t0
    notes = (f"{planner}: {len(st.offloads)} offloads, {len(st.units)} recomputed units, planned in {dt * 1e3:.0f} ms",
             f"predicted step {res.step_time * 1e3:.3f} ms vs unmanaged {ix.step_time * 1e3:.3f} ms "
             f"({res.step_time / ix.step_time:.3f}x); peak {res.peak(0)} <= budget {budget}") + exactness
    return to_plan(trace, hierarchy, budget, st, res, planner, notes)
