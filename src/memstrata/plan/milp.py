"""milp — the exact planner: exact for recompute-only plans, never worse than greedy.

[Note: what "exact" means here]
The problem every planner states: pick at most one decision per unit (stored,
or one of `unit_modes`: full / selective recompute) and per offloadable saved
activation (keep, or one of `offload_options`), minimising the simulator's
step time (ties to less traffic) within every tier's capacity.  `milp_state`
is exact (returns a proven optimum) for two restricted forms of it, and says
which one it solved (`MilpResult.exact`):

* "menu": the whole menu has at most `ENUMERATE_MAX` combinations; every one
  is simulated.  Exact over the menu, offloads included.
* "recompute": recompute-only plans (no offloads), on traces whose unit
  decisions are *separable* (`separable`): no two candidate units nest; no
  storage a unit's recompute can drop is another candidate unit's input; no
  storage is held past its end by two candidate units.  Then every decision
  changes the lifetimes of its own storages only and adds its own re-run time
  (no copy lanes), so the simulator is exactly additive:
      occupancy(e) = base(e) + sum_o delta_o(e) x_o,  step = base + sum_o t_o x_o,
  with delta_o, t_o from simulating option o alone, and the binary program
      min sum t_o x_o  s.t.  occupancy(e) <= budget for all e,  sum_{o of u} x_o <= 1
  is the problem itself.  HiGHS solves it to a zero gap; the simulator then
  confirms the solution (a mismatch is reported, never hidden).

Anything else -- offloads on a menu too large to enumerate -- is not solved
exactly: copy lanes are FIFO queues whose delays do not add up.  There the
linearised model of [Note: the linearised model] proposes plans, and the
result is the best, as simulated, of: greedy's plan (always computed first,
the incumbent), the exact recompute-only optimum (when separable and feasible),
the linearised MILP's plan (when the simulator accepts it), each polished by
1-opt.  So `milp` is never predicted slower than `greedy` on any graph it
accepts, and `exact` is None in that case.  Segments and op-level replays are
not on the MILP's menu (greedy plans them); when greedy's plan with them wins,
`exact` still describes the menu (solved exactly) and the note says the plan lies outside it.

[Note: the linearised model]
Decision menu (the same one greedy's 1-opt explores): per offloadable saved
activation, keep or one of `offload_options` (each lower tier; evict after the
last access before its longest idle stretch; prefetch as late as possible /
just in time / twice as early, for an uncontended lane); per unit, stored or
one of `unit_modes` (full, selective with compute-bound ops saved, light
selective).  Binary x_o per option, at most one per storage / unit; an
offload of a storage produced inside a unit excludes recomputing that unit.

Each option is simulated *alone*; its effect on every tier's occupancy at
every event (delta vs. all-keep) and its added step time (recompute time, or
its own exposed stall) are taken as additive:
    occupancy_t(e) = base_t(e) + sum_o delta_{o,t}(e) x_o <= capacity_t.
Lane contention is the part that is not additive; for every copy lane L and
every pair (a, b) of a release time a and a deadline b of options using L,
the transfers that must run inside [a, b] (release >= a, deadline <= b) can
not take longer than b - a without delaying compute:
    z_L >= sum_{o in [a,b]} p_o x_o - (b - a),   z_L >= 0,
and z_L (a lower bound on the lateness the lane causes) is added to the
objective.  Up-copies: release = the prefetch event's start, deadline = the
need event's start; down-copies: release = the end of the evict event,
deadline = need start - up time.  Objective = sum of option times + sum z_L
+ a traffic tie-break.  A solution the simulator finds overflowing at an event
gets that event's row tightened by the overflow and is solved again (a few
rounds).

Why it used to predict 1.77x where greedy predicted 1.18x (resnet50, batch
256, h200, 50%): simulating the ~1,000 options alone took most of the time
limit, HiGHS got the second that was left, found no integer point, and the
planner fell back to the *frugal* plan (every unit recomputed, every saved
activation offloaded), which the polish never reached because its deadline
had passed too.  Now the options are built under their own limit (the
linearised step is skipped when they are too many: a count of simulations,
[Note: deterministic planning] in greedy.py), HiGHS gets its own time,
and the fallback is greedy's plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..hardware import Hierarchy
from ..simulate import SimResult
from ..trace.index import TraceIndex
from .greedy import (DEFAULT_WORK, TRAFFIC_WEIGHT, Evaluator, GreedyStuck, State, Work, _valid, cost, greedy_state,
                     offload_options, one_opt, unit_modes)

ENUMERATE_MAX = 4096
LINEARISED_MAX_OPTIONS = 400  # options (each simulated alone) beyond which the linearised model is not built
LANE_ROWS_MAX = 20_000  # lane-contention rows beyond which it is not solved (counts, not clocks)
EXACT_KINDS = ("menu", "recompute")


class MilpFailed(RuntimeError):
    pass


def _menu(ix: TraceIndex, h: Hierarchy, tiers: tuple[int, ...]):
    modes = unit_modes(ix, h)
    opts = {sid: os_ for sid, os_ in offload_options(ix, h, tiers).items() if os_}  # no tiers: no offloads
    return modes, opts


def enumerate_state(ev_: Evaluator, modes, opts) -> tuple[State, SimResult] | None:
    axes: list[list[tuple[str, int, object]]] = []
    for u, ms in modes.items():
        axes.append([("u", u, None)] + [("u", u, m) for m in ms])
    for sid, os_ in opts.items():
        axes.append([("s", sid, None)] + [("s", sid, o) for o in os_])
    best = None
    for combo in itertools.product(*axes):
        st = State()
        for kind, k, v in combo:
            if v is None:
                continue
            if kind == "u":
                st.units[k] = v
            else:
                st.offloads[k] = v
        r = _valid(ev_, st)
        if r is None or not r.feasible:
            continue
        if best is None or cost(r) < cost(best[1]) - 1e-15:
            best = (st, r)
    return best


def _menu_size(modes, opts) -> int:
    n = 1
    for ms in modes.values():
        n *= 1 + len(ms)
    for os_ in opts.values():
        n *= 1 + len(os_)
        if n > 10**9:
            break
    return n




@dataclass(frozen=True)
class MilpResult:
    state: State
    result: SimResult
    exact: str | None  # "menu", "recompute" or None: see [Note: what "exact" means here]
    source: str  # which candidate won: "enumeration", "recompute-milp", "linearised-milp", "greedy"
    note: str  # one line for the plan's notes


def separable(ix: TraceIndex, modes: dict[int, list[tuple[int, ...]]]) -> bool:
    """True if recompute decisions of the candidate units add up exactly; see [Note: what "exact" means here]."""
    cand = sorted(modes, key=lambda u: (ix.units[u].first_op, u))
    for a, b in zip(cand, cand[1:]):
        if ix.units[b].first_op <= ix.units[a].last_op:
            return False  # nested (or overlapping) unit calls: a storage could be dropped by both
    droppable: dict[int, set[int]] = {}
    for u in cand:
        own = frozenset(ix.units[u].inputs)
        droppable[u] = set().union(*(ix.unit_effect(u, m, own).dropped for m in modes[u]))
    holders: dict[int, int] = {}
    for v in cand:
        fb = ix.units[v].first_backward_op
        for sid in ix.units[v].inputs:
            if any(sid in droppable[u] for u in cand if u != v):
                return False  # recomputing v would keep what recomputing u drops
            if fb is not None and fb > int(ix.end[sid]):
                holders[sid] = holders.get(sid, 0) + 1
                if holders[sid] > 1:
                    return False  # two units extend the same storage's life: the longer one wins, not the sum
    return True


def _solve(c, rows, n_vars, time_limit):
    """scipy.optimize.milp on binary variables with `rows` = [(coeffs, lo, hi)]; returns the solution or None."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    A = lil_matrix((max(len(rows), 1), n_vars))
    lo = np.full(max(len(rows), 1), -np.inf)
    hi = np.full(max(len(rows), 1), np.inf)
    for i, (coeffs, l_, h_) in enumerate(rows):
        for k, v in coeffs.items():
            A[i, k] = v
        lo[i], hi[i] = l_, h_
    return milp(np.asarray(c, dtype=float), integrality=np.ones(n_vars), bounds=Bounds(0, 1),
                constraints=[LinearConstraint(A.tocsr(), lo, hi)],
                options={"time_limit": max(time_limit, 0.5), "disp": False, "mip_rel_gap": 0.0})


def recompute_exact(ev_: Evaluator, modes: dict[int, list[tuple[int, ...]]], time_limit: float = 10.0
                    ) -> tuple[tuple[State, SimResult] | None, bool]:
    """The optimal recompute-only plan when `separable(ix, modes)`: (best or None, proven).

    proven=True with None: no recompute-only plan fits the budget.  proven=False: HiGHS stopped early, or
    the simulator disagreed with the additive model (then the plan, if feasible, is still returned).
    """
    ix = ev_.ix
    base = ev_(State())
    cap = int(ev_.budget)
    if base.peak(0) <= cap:
        return (State(), base), True
    base0 = base.occ[0].astype(np.int64)
    O: list[tuple[int, tuple[int, ...]]] = []
    deltas, times = [], []
    for u, ms in modes.items():
        for m in ms:
            r = _valid(ev_, State(units={u: m}))
            if r is None:
                continue
            O.append((u, m))
            deltas.append(r.occ[0].astype(np.int64) - base0)
            times.append(r.step_time - base.step_time)
    if not O:
        return None, True
    D = np.array(deltas)  # options x events
    events = np.nonzero(base0 + np.clip(D, 0, None).sum(axis=0) > cap)[0]
    rows: list[tuple[dict[int, float], float, float]] = []
    seen = set()
    for e in events.tolist():
        col = D[:, e]
        nz = np.nonzero(col)[0]
        key = (tuple(nz.tolist()), tuple(col[nz].tolist()), int(base0[e]))
        if key in seen:
            continue
        seen.add(key)
        if not len(nz):
            return None, True  # over the budget where no recompute changes anything
        rows.append(({int(k): float(col[k]) for k in nz}, -np.inf, float(cap - base0[e])))
    groups: dict[int, list[int]] = {}
    for k, (u, _) in enumerate(O):
        groups.setdefault(u, []).append(k)
    rows += [({k: 1.0 for k in ks}, -np.inf, 1.0) for ks in groups.values() if len(ks) > 1]
    sol = _solve(np.array(times) * 1e6, rows, len(O), time_limit)  # microseconds: the objective's tolerance is absolute
    if sol.status == 2:
        return None, True
    if sol.x is None:
        return None, False
    st = State(units={O[k][0]: O[k][1] for k in range(len(O)) if sol.x[k] > 0.5})
    r = _valid(ev_, st)
    if r is None or not r.feasible:
        return None, False
    predicted = base.step_time + sum(times[k] for k in range(len(O)) if sol.x[k] > 0.5)
    proven = sol.status == 0 and abs(r.step_time - predicted) <= 1e-9 * max(r.step_time, 1e-12)
    return (st, r), proven


def _linearised(ev_: Evaluator, modes, opts, seconds: float, rounds: int = 8,
                max_options: int = LINEARISED_MAX_OPTIONS) -> tuple[State, SimResult] | None:
    """The linearised MILP of [Note: the linearised model]; None when it finds nothing the simulator accepts.

    Its options are simulated one by one: with more than `max_options` of them the model is not built at all,
    and with more than `LANE_ROWS_MAX` lane rows not solved (counts, not clocks: [Note: deterministic planning] in
    greedy.py); every round's HiGHS solve gets `seconds` / `rounds` (the rounds run whatever the clock says: only
    a solve that reaches its own limit depends on the box's speed)."""
    if sum(map(len, modes.values())) + sum(map(len, opts.values())) > max_options:
        return None  # the model would not leave HiGHS any time: greedy's plan stands
    ix, hierarchy, budget = ev_.ix, ev_.h, ev_.budget
    base = ev_(State())
    ntier = len(hierarchy.tiers)
    # ---- options and their isolated effects
    O: list[tuple[str, int, object]] = []
    deltas: list[list[np.ndarray]] = []
    times: list[float] = []
    lane_jobs: dict[str, list[tuple[int, float, float, float]]] = {}  # lane -> (option, release, deadline, secs)
    T = base.event_start
    Tend = np.concatenate([T[1:], [base.step_time]])
    for u, ms in modes.items():
        for m in ms:
            r = _valid(ev_, State(units={u: m}))
            if r is None:
                continue
            O.append(("u", u, m))
            deltas.append([r.occ[t] - base.occ[t] for t in range(ntier)])
            times.append(r.step_time - base.step_time)
    for sid, os_ in opts.items():
        for o in os_:
            r = _valid(ev_, State(offloads={sid: o}))
            if r is None:
                continue
            k = len(O)
            O.append(("s", sid, o))
            deltas.append([r.occ[t] - base.occ[t] for t in range(ntier)])
            times.append(r.step_time - base.step_time + TRAFFIC_WEIGHT * r.traffic)
            ti, ev, pf = o
            need = r.need[sid]
            b = int(ix.nbytes[sid])
            up_total = 0.0
            for i in range(1, ti + 1):
                up = hierarchy.tiers[i].transfer_time(b, "read")
                up_total += up
                lane_jobs.setdefault(hierarchy.tiers[i].name + ":read", []).append((k, float(T[pf]), float(T[need]), up))
            for i in range(1, ti + 1):
                dn = hierarchy.tiers[i].transfer_time(b, "write")
                lane_jobs.setdefault(hierarchy.tiers[i].name + ":write", []).append(
                    (k, float(Tend[ev]), float(T[need]) - up_total, dn))
    nO = len(O)
    if nO == 0:
        return None
    lanes = sorted(lane_jobs)
    nz = len(lanes)
    nv = nO + nz
    caps = [int(budget)] + [int(t.capacity) for t in hierarchy.tiers[1:]]

    # ---- static constraints
    rows: list[tuple[dict[int, float], float, float]] = []  # (coeffs, lo, hi)
    groups: dict[tuple[str, int], list[int]] = {}
    for k, (kind, key, _) in enumerate(O):
        groups.setdefault((kind, key), []).append(k)
    for ks in groups.values():
        if len(ks) > 1:
            rows.append(({k: 1.0 for k in ks}, -np.inf, 1.0))
    for k, (kind, key, _) in enumerate(O):
        if kind != "s":
            continue
        for k2, (kind2, u, _) in enumerate(O):
            if kind2 == "u" and key in ix.unit_storages[u]:
                rows.append(({k: 1.0, k2: 1.0}, -np.inf, 1.0))
    for zi, lane in enumerate(lanes):
        jobs = lane_jobs[lane]
        jk = np.array([j[0] for j in jobs])
        jr = np.array([j[1] for j in jobs])
        jd = np.array([j[2] for j in jobs])
        jp = np.array([j[3] for j in jobs])
        seen = set()
        for a in np.unique(jr).tolist():
            if len(rows) > LANE_ROWS_MAX:
                return None
            after = jr >= a
            for bnd in np.unique(jd[after]).tolist():
                if bnd <= a:
                    continue
                inside = after & (jd <= bnd)
                key = inside.tobytes()
                if not inside.any() or key in seen:
                    continue
                seen.add(key)
                coeffs: dict[int, float] = {}
                for k, p_ in zip(jk[inside].tolist(), jp[inside].tolist()):
                    coeffs[k] = coeffs.get(k, 0.0) + p_
                coeffs[nO + zi] = -1.0
                rows.append((coeffs, -np.inf, bnd - a))

    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    extra_cut: dict[tuple[int, int], int] = {}
    c = np.array(times + [1.0] * nz)
    integrality = np.array([1] * nO + [0] * nz)
    bounds = Bounds(np.zeros(nv), np.array([1.0] * nO + [np.inf] * nz))
    left = max(0.5, seconds / max(rounds, 1))
    for _ in range(rounds):
        cap_rows = list(rows)
        for t in range(ntier):
            D = np.array([deltas[k][t] for k in range(nO)])  # nO x n
            pos = np.clip(D, 0, None).sum(axis=0)
            ev_idx = np.nonzero(base.occ[t] + pos > caps[t])[0]
            if t == 0:
                ev_idx = np.union1d(ev_idx, np.array([e for (tt, e) in extra_cut if tt == 0], dtype=int))
            seen_rows = set()
            for e in ev_idx.tolist():
                col = D[:, e]
                key = (tuple(np.nonzero(col)[0].tolist()), tuple(col[col != 0].tolist()))
                rhs = caps[t] - int(base.occ[t][e]) - extra_cut.get((t, e), 0)
                if (key, rhs) in seen_rows:
                    continue
                seen_rows.add((key, rhs))
                cap_rows.append(({k: float(col[k]) for k in np.nonzero(col)[0].tolist()}, -np.inf, float(rhs)))
        A = lil_matrix((len(cap_rows), nv))
        lo = np.empty(len(cap_rows))
        hi = np.empty(len(cap_rows))
        for r_i, (coeffs, l_, h_) in enumerate(cap_rows):
            for k, v in coeffs.items():
                A[r_i, k] = v
            lo[r_i], hi[r_i] = l_, h_
        sol = milp(c, integrality=integrality, bounds=bounds,
                   constraints=[LinearConstraint(A.tocsr(), lo, hi)] if len(cap_rows) else [],
                   options={"time_limit": left, "disp": False})
        if sol.x is None:
            break
        st = State()
        for k in range(nO):
            if sol.x[k] > 0.5:
                kind, key, v = O[k]
                if kind == "u":
                    st.units[key] = v
                else:
                    st.offloads[key] = v
        r = _valid(ev_, st)
        if r is None:
            break
        if r.feasible:
            return st, r
        for t, e in r.overflow():
            over = int(r.occ[t][e]) - caps[t]
            extra_cut[(t, e)] = extra_cut.get((t, e), 0) + over
    return None


def milp_solve(ix: TraceIndex, hierarchy: Hierarchy, budget: int, tiers: tuple[int, ...], *,
               time_limit: float = 10.0, rounds: int = 8, polish: bool = True, replays: bool = False,
               work: int = DEFAULT_WORK) -> MilpResult:
    """The exact planner; see [Note: what "exact" means here].  Raises MilpFailed if nothing fits.

    replays: let the greedy incumbent choose op-level replays (`plan()` passes its own flag, so `milp` is
    never slower than the `greedy` plan the same call would have made).  work: simulations for the greedy
    incumbent and for the 1-opt polish, each ([Note: deterministic planning] in greedy.py); the linearised
    model is built for at most `LINEARISED_MAX_OPTIONS` options; time_limit: seconds for the HiGHS solves."""
    ev_ = Evaluator(ix, hierarchy, budget, tiers)
    modes, opts = _menu(ix, hierarchy, tiers)
    cands: list[tuple[str, tuple[State, SimResult]]] = []
    try:  # the incumbent: whatever else happens, never return a plan slower than greedy's
        cands.append(("greedy", greedy_state(ix, hierarchy, budget, tiers, work=work, replays=replays)))
    except GreedyStuck:
        pass
    exact: str | None = None
    size = _menu_size(modes, opts)
    if size <= ENUMERATE_MAX:
        best = enumerate_state(ev_, modes, opts)
        if best is not None:
            cands.append(("enumeration", best))
        exact = "menu"
    else:
        if separable(ix, modes):
            rc, proven = recompute_exact(ev_, modes, time_limit=max(1.0, time_limit / 3))
            if rc is not None:
                cands.append(("recompute-milp", rc))
            if proven and not opts:
                exact = "recompute"
        if opts:
            lin = _linearised(ev_, modes, opts, seconds=max(1.0, time_limit / 3), rounds=rounds)
            if lin is not None:
                cands.append(("linearised-milp", lin))
    if not cands:
        raise MilpFailed("no plan from the menu, the MILP or greedy fits the budget")
    source, (st, res) = min(cands, key=lambda c: cost(c[1][1]))
    if polish and exact is None:
        st2, res2 = one_opt(ev_, st, res, modes, opts, work=Work(ev_, ev_.calls + work))
        if cost(res2) < cost(res):
            st, res, source = st2, res2, source + "+1-opt"
    if exact == "menu":
        note = f"milp: exact over the decision menu ({size} combinations simulated)"
    elif exact == "recompute":
        note = "milp: exact over recompute-only plans (separable units, HiGHS optimal, simulator agrees)"
    else:
        note = f"milp: not proven optimal (offloads on a {size:.2g}-combination menu); best of greedy and the MILP: {source}"
    if st.replays or any(u >= ix.num_units for u in st.units):
        # `exact` is about the MILP's menu (units and offloads); greedy's plan, with segments / op-level replays
        # outside that menu, beat its optimum
        note += "; the plan returned is greedy's, with segments / op-level replays (outside the menu)"
    return MilpResult(st, res, exact, source, note)


def milp_state(ix: TraceIndex, hierarchy: Hierarchy, budget: int, tiers: tuple[int, ...], *,
               time_limit: float = 10.0, rounds: int = 8, polish: bool = True, work: int = DEFAULT_WORK
               ) -> tuple[State, SimResult]:
    r = milp_solve(ix, hierarchy, budget, tiers, time_limit=time_limit, rounds=rounds, polish=polish, work=work)
    return r.state, r.result
