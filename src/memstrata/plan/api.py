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
  * every unit with a backward is recomputed in its most-freeing mode, except
    units whose recompute *raises* that peak (held inputs, recompute transients),
    and runs of consecutive Sequential children may be recomputed as segments
    instead: the cover with the lowest peak among those `greedy.frugal_search`
    tries ([Note: frugal segments] in plan/greedy.py);
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
from ..simulate import SimResult, run
from ..trace.index import trace_index
from ..trace.space import decision_space
from ..trace.states import STATE_WINDOW_MODULE
from ..trace.schema import Trace
from ..decisions import InfeasibleBudgetError, Plan, ReplayDecision, StorageDecision, UnitDecision
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


def offload_tier_indices(hierarchy: Hierarchy, tiers=None) -> tuple[int, ...]:
    """Indices of the lower tiers named by `tiers` (default: every lower tier); ValueError for unknown ones."""
    return _tier_indices(hierarchy, tiers)


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


def _frugal(trace: Trace, hierarchy: Hierarchy, tiers=None) -> SimResult:
    ix = trace_index(trace)
    ti = _tier_indices(hierarchy, tiers)
    if not ti:
        st = _greedy.State(units={u: ms[0] for u, ms in _greedy.unit_modes(ix, hierarchy).items()})
    else:
        st = _greedy.frugal_state(ix, hierarchy, ti, 2**62)
    return run(ix, hierarchy, 2**62, st.offloads, st.units)


_KIND_NAMES = {"parameter": "parameters", "gradient": "gradients", "optimizer_state": "optimizer states",
               "buffer": "buffers", "input": "inputs", "temporary": "temporaries"}


def explain_minimum(trace: Trace, hierarchy: Hierarchy, *, tiers=None) -> str:
    """One line: what is still in tier 0 at the worst event of the most frugal plan, and why memstrata cannot
    free it (kinds it does not move, activations of units it cannot recompute, ...)."""
    from ..hardware import format_size

    ix = trace_index(trace)
    space = decision_space(trace)
    res = _frugal(trace, hierarchy, tiers)
    occ = res.occ[0]
    p = int(occ.argmax())
    ids, s, e, b = res.intervals[0]
    mask = (s <= p) & (e >= p)
    groups: dict[str, int] = {}
    for sid, by in zip(ids[mask].tolist(), b[mask].tolist()):
        if sid < 0:
            key = "recompute transients"
        else:
            st = trace.storages[sid]
            if sid in res.dropped:
                u = ix.units[res.dropped[sid]]
                key = (f"activations re-created by recomputing {u.module or '<top>'} during its backward "
                       f"(one unit of {u.last_op - u.first_op + 1} ops: smaller units would hold less)")
            elif st.module == STATE_WINDOW_MODULE:
                key = "optimizer states of tiered buckets on their way through tier 0 (the state window)"
            elif st.kind != "activation":
                key = f"{_KIND_NAMES.get(st.kind, st.kind)} (not moved by memstrata)"
            elif not st.saved:
                key = "activations in use by the current op (not saved for backward)"
            elif st.unit is not None and not space.recomputable[st.unit]:
                key = f"saved activations of units that cannot be recomputed ({space.why_not(st.unit)})"
            elif st.unit is None:
                key = "saved activations outside every recompute unit, not offloadable here"
            else:
                key = "saved activations still needed at that event"
        groups[key] = groups.get(key, 0) + int(by)
    by_unit: dict[int, int] = {}
    for sid, by in zip(ids[mask].tolist(), b[mask].tolist()):
        if sid >= 0 and trace.storages[sid].saved and trace.storages[sid].unit is not None:
            by_unit[trace.storages[sid].unit] = by_unit.get(trace.storages[sid].unit, 0) + int(by)
    total = int(occ[p]) or 1
    parts = sorted(groups.items(), key=lambda kv: -kv[1])[:3]
    what = "; ".join(f"{format_size(by)} {k} ({100 * by / total:.0f}%)" for k, by in parts)
    units = len(trace.units)
    extra = ""
    if units <= 1:
        extra = f"; the model has {units} recompute unit(s): its layers are not split into units"
    elif by_unit:
        u, by = max(by_unit.items(), key=lambda kv: kv[1])
        unit = trace.units[u]
        share = (unit.last_op - unit.first_op + 1) / max(1, trace.forward_end + 1)
        if by > total // 3:
            extra = (f"; {format_size(by)} of it belongs to one recompute unit, {unit.module or '<top>'} "
                     f"({100 * share:.0f}% of the forward ops): memstrata cannot split it")
    return (f"the smallest plan still holds {format_size(total)} at event {p} ({trace.ops[p].name}): {what}{extra}")


def to_plan(trace: Trace, hierarchy: Hierarchy, budget: int, st: "_greedy.State", res: SimResult, planner: str,
            notes=()) -> Plan:
    names = [t.name for t in hierarchy.tiers]
    decisions = tuple(StorageDecision(sid, "offload", names[ti], ev, pf)
                      for sid, (ti, ev, pf) in sorted(st.offloads.items()))
    ix = trace_index(trace)
    units = []
    for u, S in sorted(st.units.items()):
        a, b = ix.span(u)
        units.append(UnitDecision(a, tuple(S), end_unit=b if b != a else None))
    replays = tuple(ReplayDecision(sid, tuple(c)) for sid, c in sorted(st.replays.items()))
    peaks = tuple((names[i], res.peak(i)) for i in range(len(names)))
    return Plan(planner=planner, hierarchy=hierarchy.name, budget=int(budget), storages=decisions,
                units=tuple(sorted(units, key=lambda d: d.unit)), replays=replays, predicted_step_time=res.step_time, predicted_peaks=peaks, notes=tuple(notes))


def plan(trace: Trace, hierarchy: Hierarchy, budget: int, *, planner: str = "auto", tiers=None,
         time_limit: float = 4.0, replays: bool = True, work: int = _greedy.DEFAULT_WORK) -> Plan:
    """Decide where every saved activation lives and which units are recomputed, within `budget` tier-0 bytes.

    planner: "greedy" (fast heuristic), "milp" (exact for stated restricted problems, never worse than greedy;
    see [Note: what "exact" means here] in milp.py) or
    "auto" (milp when there are <= 60 candidate storages + units, else greedy).  `tiers` restricts the
    lower tiers used for offload (names; default all).  The returned plan carries the simulator's
    predicted step time and per-tier peaks.  Raises InfeasibleBudgetError below minimum_budget().

    replays: let greedy choose op-level replays (`ReplayDecision`), on by default ([Note: replays in the
    default plan] below); False plans with units, segments and offloads only.

    work: simulations the greedy's search phases may run (a count, so the plan does not depend on the box's
    load: [Note: deterministic planning] in greedy.py).  time_limit: seconds for the MILP solver (milp only).
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
        raise InfeasibleBudgetError(budget, minimum, explain_minimum(trace, hierarchy, tiers=tiers))
    if planner == "auto":
        n_cand = int(decision_space(trace).offloadable.sum()) + len(_greedy.unit_modes(ix, hierarchy))
        planner = "milp" if n_cand <= AUTO_MILP_MAX else "greedy"
    exactness = ()
    if planner == "milp":
        mr = _milp.milp_solve(ix, hierarchy, budget, ti, time_limit=max(time_limit, 10.0), replays=replays,
                              work=work)
        st, res, exactness = mr.state, mr.result, (mr.note,)
    else:
        st, res = _greedy.greedy_state(ix, hierarchy, budget, ti, work=work, replays=replays)
    if not res.feasible:  # pragma: no cover - the planners only return feasible states
        raise RuntimeError(f"{planner} planner returned an infeasible plan")
    dt = time.perf_counter() - t0
    segs = sum(1 for u in st.units if u >= ix.num_units)
    notes = (f"{planner}: {len(st.offloads)} offloads, {len(st.units) - segs} recomputed units, {segs} segments, "
             f"{len(st.replays)} replays, planned in {dt * 1e3:.0f} ms",
             f"predicted step {res.step_time * 1e3:.3f} ms vs unmanaged {ix.step_time * 1e3:.3f} ms "
             f"({res.step_time / ix.step_time:.3f}x); peak {res.peak(0)} <= budget {budget}") + exactness
    return to_plan(trace, hierarchy, budget, st, res, planner, notes)


def least_budget_within(trace: Trace, hierarchy: Hierarchy, slowdown: float, *, planner: str = "auto", tiers=None,
                        rel_tol: float = 0.02) -> int:
    """The least tier-0 budget whose plan is predicted to run within `slowdown` x the unmanaged step.

    Bisection between `minimum_budget` and the unmanaged peak on the planner's predictions (a plan's
    predicted step falls, not always strictly, as the budget grows; the answer is the smallest budget
    found whose plan meets the target, to within `rel_tol` of the peak).
    """
    if slowdown < 1.0:
        raise ValueError(f"slowdown must be >= 1.0, got {slowdown}")
    peak = int(trace_index(trace).base_occ.max())
    target = slowdown * trace.step_time
    lo = minimum_budget(trace, hierarchy, tiers=tiers)

    def ok(b: int) -> bool:
        p = plan(trace, hierarchy, b, planner=planner, tiers=tiers)
        return p.predicted_step_time is not None and p.predicted_step_time <= target * (1 + 1e-9)

    if ok(lo):
        return lo
    hi = peak  # the unmanaged step fits: predicted = unmanaged <= target
    while hi - lo > max(1, int(rel_tol * peak)):
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


# [Note: replays in the default plan]
# Op-level replay (`ReplayDecision`) was opt-in from 2026-12-02 to 2026-12-05: forced replay plans measured
# *more* heap on CPU than without them, where the simulator predicted less (mobilenet_v3_small b8 64 px
# -1.35 MB measured against 3.25 MB predicted; resnet18 -5.49 against 0.46), because the recipes held more
# than the replay model counts (a copy of every in-place chain op's argument, the replayed storage itself,
# every materialised value until the end of the step).  The runtime now holds exactly what the simulator
# counts ([Note: what a recipe holds] in runtime/replay.py; measured 4.35 vs 4.30 MB and 4.45 vs 4.20 MB,
# `test_replay_frees_what_the_simulator_predicts`), so greedy chooses replays by default again; it drops
# replays that pin a storage at an event where nothing else can be freed (`replays_pinning`).
