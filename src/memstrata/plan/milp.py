"""milp — the exact planner for small graphs (scipy.optimize.milp / HiGHS).

[Note: the MILP]
Decision menu (the same one greedy's 1-opt explores): per offloadable saved
activation, keep or one of `offload_options` (each lower tier; evict after the
last access before its longest idle stretch; prefetch as late as possible /
just in time / twice as early, for an uncontended lane); per unit, stored or
one of `unit_modes` (full, selective with compute-bound ops saved, light
selective).  Binary x_o per option, at most one per storage / unit; an
offload of a storage produced inside a unit excludes recomputing that unit.

Linearisation.  Each option is simulated *alone*; its effect on every tier's
occupancy at every event (delta vs. all-keep) and its added step time
(recompute time, or its own exposed stall) are taken as additive:
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
+ a traffic tie-break.

The model is exact for isolated decisions and a lower bound for lanes, not for
every interaction (overlapping recomputes, FIFO head-of-line blocking), so the
solution is *checked with the simulator*: when it overflows at an event, that
event's row is tightened by the overflow and the MILP is solved again (up to
a few rounds).  The simulated result is then polished by exhaustive 1-opt
(single-decision changes judged by the simulator).  When the whole menu has
at most `ENUMERATE_MAX` combinations it is enumerated exhaustively instead:
that is exact over the menu.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from ..hardware import Hierarchy
from ..simulate import SimResult
from ..trace.index import TraceIndex
from .greedy import (TRAFFIC_WEIGHT, Evaluator, State, _valid, cost, frugal_state, offload_options, one_opt,
                     unit_modes)

ENUMERATE_MAX = 4096


class MilpFailed(RuntimeError):
    pass


def _menu(ix: TraceIndex, h: Hierarchy, tiers: tuple[int, ...]):
    modes = unit_modes(ix, h)
    opts = offload_options(ix, h, tiers)
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


def milp_state(ix: TraceIndex, hierarchy: Hierarchy, budget: int, tiers: tuple[int, ...], *,
               time_limit: float = 10.0, rounds: int = 8, polish: bool = True) -> tuple[State, SimResult]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    t0 = time.perf_counter()
    ev_ = Evaluator(ix, hierarchy, budget, tiers)
    modes, opts = _menu(ix, hierarchy, tiers)
    if _menu_size(modes, opts) <= ENUMERATE_MAX:
        best = enumerate_state(ev_, modes, opts)
        if best is None:
            raise MilpFailed("no combination of the decision menu fits the budget")
        return best

    base = ev_(State())
    n = ix.n
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
        raise MilpFailed("nothing to decide")
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
        rel = sorted({j[1] for j in jobs})
        dl = sorted({j[2] for j in jobs})
        seen = set()
        for a in rel:
            for bnd in dl:
                if bnd <= a:
                    continue
                inside = tuple(sorted(j[0] for j in jobs if j[1] >= a and j[2] <= bnd))
                if not inside or inside in seen:
                    continue
                seen.add(inside)
                coeffs = {}
                for j in jobs:
                    if j[1] >= a and j[2] <= bnd:
                        coeffs[j[0]] = coeffs.get(j[0], 0.0) + j[3]
                coeffs[nO + zi] = -1.0
                rows.append((coeffs, -np.inf, bnd - a))

    extra_cut: dict[tuple[int, int], int] = {}
    c = np.array(times + [1.0] * nz)
    integrality = np.array([1] * nO + [0] * nz)
    bounds = Bounds(np.zeros(nv), np.array([1.0] * nO + [np.inf] * nz))
    best: tuple[State, SimResult] | None = None
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
        left = max(1.0, time_limit - (time.perf_counter() - t0))
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
            best = (st, r)
            break
        for t, e in r.overflow():
            over = int(r.occ[t][e]) - caps[t]
            extra_cut[(t, e)] = extra_cut.get((t, e), 0) + over
    if best is None:  # the linear model kept missing an interaction: start from the frugal plan instead
        fr = frugal_state(ix, hierarchy, tiers, budget)
        r = _valid(ev_, fr)
        if r is None or not r.feasible:
            raise MilpFailed("the MILP found no plan that the simulator accepts")
        best = (fr, r)
    if polish:
        best = one_opt(ev_, best[0], best[1], modes, opts, deadline=t0 + 2 * time_limit)
    return best
