"""greedy — the fast planner: peel the peak, cheapest seconds per byte first.

[Note: greedy planning]
State = offload decisions (storage -> tier, evict, prefetch) and recompute
decisions (unit -> save_ops).  Start all-keep and simulate.  While tier 0
overflows somewhere, look at the *worst* event p (largest occupancy) and list
what could free bytes there:

* offload s (a saved activation live at p, not produced in a recomputed
  unit): evict right after its last access before p, need = its first access
  after p; worth it only if the down-copy, queued FIFO behind what the lane
  already carries, lands before p starts.  Cost = the stall it is expected to
  expose: its up-copy time plus the up-lane's existing load inside its window
  [down done, need start], minus the window length (0 when it hides).
* recompute unit u fully (save_ops=()) or selectively (save the outputs of
  compute-bound ops: convolutions/matmuls or flop-bound by the roofline; re-run
  the cheap normalisation/elementwise ops), freeing the dropped storages live
  at p minus what it adds at p (inputs held until fb, transients at fb).
  Cost = the added recompute time.

Score = cost / bytes freed at p (+ a traffic tie-break).  Candidates are taken
cheapest-first until the estimated freed bytes cover p's excess, with the
lane load of already-taken offloads counted against later ones in the batch;
then prefetch points are re-derived for *all* offloads by packing the up-lanes
just in time, backwards from each need (latest start that still lands on
time), and the plan is re-simulated.  The simulator, not the estimate, decides
what happens next.  This converges in a few dozen simulations on a ResNet-50
trace (milliseconds each).

If a batch does not lower the peak (copies landing late, lower tiers full
with staging copies), `_probe` lets the simulator judge the dozen most
promising single moves instead.  Offloads chosen to free event p get a
prefetch *floor* p+1 so that later just-in-time re-packing never brings them
back before p; `schedule_and_run` additionally postpones early prefetches that
make tier 0 overflow (trading a stall for room).

When tier 0 fits, a clean-up pass drops decisions (most expensive first) whose
removal keeps the plan feasible without making it slower, downgrades full
recomputes to selective ones, swaps a recompute for offloads of what it
dropped (then prunes those), and moves offloads up a tier, whenever that is
cheaper and still fits.  On small problems an exhaustive 1-opt pass (every
single-decision change, plus nudging each prefetch point by one event) follows.

If peeling gets stuck, the planner falls back to the most frugal plan
(`frugal_plan`, the one that defines `minimum_budget`) and cleans it up, so it
succeeds at every budget >= minimum_budget.  Monotonicity in the budget is
*not* guaranteed (a heuristic can land on a worse local optimum with more
room); the API enforces the weaker property that a plan never predicts slower
than the frugal fallback cleaned up at the same budget.

[Note: frugal segments]
The frugal plan recomputes every unit in its most-freeing mode and offloads the
rest.  On a flat Sequential (VGG's `features`) each unit is one layer, so
recomputing a unit frees nothing and every activation waits in the host link's
copy queue: the forward peak is the queue.  A fully recomputed *segment* keeps
only its input, so far fewer bytes queue, at the price of re-creating the whole
segment during its backward.  `frugal_search` therefore tries covers: the
per-unit one, each maximal run of segmentable units cut into segments of L
units (L = 2..MAX_SEGMENT_UNITS), then single-cut moves (add or remove one cut)
from the best uniform cut while they lower the simulated peak, for at most
FRUGAL_SEARCH_EVALS simulations (a count, not a clock: the minimum must not
depend on the box's load).  The per-unit cover is always a candidate, so the
minimum is never higher than without segments.

[Note: deterministic planning]
The search phases (peel, clean-up, the seeds, replay pruning and sharing,
1-opt) used to stop at wall-clock deadlines (`time_limit`, 4 s, and shares of
it after it).  On the shared 2-core box a loaded planning run therefore got
through fewer simulations and returned a different plan for the same trace
and budget: Swin-T b32 128 px at 50%, 629 simulations (3-4 s quiet) give 18
NVMe offloads and 41 replays; stopped after 1 s, 58 offloads and 5 units;
after 0.3 s, 48 offloads.  Now they stop at counts of simulations
(`Evaluator.calls`, memoised states not counted): `work` simulations for the
first phases, shares of it after, as the deadlines were (`Work`), so a plan is
a function of the trace, the hierarchy and the budget.  The default
(`DEFAULT_WORK`) is above what the bench's models need to finish on their own
(the iteration and round counts end the search) and bounds planning on very
large graphs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np

from ..hardware import Hierarchy
from ..trace.schema import UnitRecord
from ..decisions import Offload
from ..simulate import SimResult, replay_time, run, try_run
from ..trace.index import MAX_SEGMENT_UNITS, TraceIndex
from ..trace.space import decision_space

TRAFFIC_WEIGHT = 1e-15  # seconds per byte moved: breaks ties towards less traffic, never beats a real second


@dataclass
class State:
    offloads: dict[int, Offload] = field(default_factory=dict)
    units: dict[int, tuple[int, ...]] = field(default_factory=dict)
    floors: dict[int, int] = field(default_factory=dict)  # sid -> earliest prefetch event (it must be gone there)
    replays: dict[int, tuple[int, ...]] = field(default_factory=dict)  # sid -> chain (op-level recompute)

    def copy(self) -> "State":
        return State(dict(self.offloads), dict(self.units), dict(self.floors), dict(self.replays))

    def key(self) -> tuple:
        return (tuple(sorted(self.offloads.items())), tuple(sorted(self.units.items())),
                tuple(sorted(self.replays.items())))


def assign_unit(ix: TraceIndex, st: State, u: int, m: tuple[int, ...]) -> None:
    """Recompute span u in mode m; spans sharing a unit with it, and replays inside it, are dropped."""
    space = decision_space(ix.trace)
    for k in [k for k in st.units if k != u and space.overlap(k, u)]:
        del st.units[k]
    a, b = ix.span(u)
    first, last = ix.units[u].first_op, ix.units[u].last_op
    trace = ix.trace
    for sid in [s for s, c in st.replays.items()
                if any(a <= v <= b for v in space.replay_units(s))
                or any(trace.storages[x].producer is not None and first <= trace.storages[x].producer <= last
                       for x in space.replay_inputs(s))]:
        del st.replays[sid]
    drop_orphans(ix, st)
    st.units[u] = m


def drop_orphans(ix: TraceIndex, st: State) -> None:
    """Drop shared replays whose host is gone ([Note: shared replays] in trace/space.py)."""
    space = decision_space(ix.trace)
    for sid in [s for s, c in st.replays.items()
                if c != space.replay_chain(s) and space.replay_host(c, st.replays) is None]:
        del st.replays[sid]


def replay_held(ix: TraceIndex, st: State) -> set[int]:
    """Storages the state's replays hold (they may not be offloaded)."""
    space = decision_space(ix.trace)
    return {x for sid in st.replays for x in space.replay_inputs(sid)}


def cost(res: SimResult) -> float:
    """The objective: predicted step time, ties to less traffic."""
    return res.step_time + TRAFFIC_WEIGHT * res.traffic


DEFAULT_WORK = 1500  # simulations before the search phases stop ([Note: deterministic planning])


class Work(NamedTuple):
    """Where a search phase stops: after `limit` simulations of `ev_` in all ([Note: deterministic planning])."""

    ev_: "Evaluator"
    limit: int

    def spent(self) -> bool:
        return self.ev_.calls >= self.limit

    def share(self, f: float) -> "Work":
        """The same evaluator, stopping at `f` x `limit` simulations (later phases get more than the first)."""
        return Work(self.ev_, int(f * self.limit))


class Evaluator:
    """Memoised simulation of states."""

    def __init__(self, ix: TraceIndex, hierarchy: Hierarchy, budget: int, tiers: tuple[int, ...]) -> None:
        self.ix, self.h, self.budget, self.tiers = ix, hierarchy, int(budget), tiers
        self.cache: dict[tuple, SimResult] = {}
        self.calls = 0

    def __call__(self, st: State) -> SimResult:
        r = self.try_(st)
        if r is None:  # a planner bug: every state it builds must be legal
            run(self.ix, self.h, self.budget, st.offloads, st.units, st.replays)  # raises PlanError naming it
        assert r is not None
        return r

    def try_(self, st: State) -> SimResult | None:
        """The (memoised) simulation, or None for decisions outside the decision space."""
        k = st.key()
        if k in self.cache:
            return self.cache[k]
        self.calls += 1
        r = try_run(self.ix, self.h, self.budget, st.offloads, st.units, st.replays)
        if len(self.cache) > 20000:
            self.cache.clear()
        self.cache[k] = r
        return r


# --------------------------------------------------------------------------------------
# Shared helpers (also used by milp.py and api.py)
# --------------------------------------------------------------------------------------


def light_save_ops(ix: TraceIndex, u: int, heavy: tuple[int, ...]) -> tuple[int, ...]:
    """save_ops that drop only the outputs of cheap (not compute-bound) ops and re-run only their writers.

    Every op that does not write such a storage is saved (not re-run); an op that must be re-run reads only
    storages that are kept anyway (saved, produced outside the unit) or re-run before it, otherwise its
    producer is re-run too (fixpoint).
    """
    unit = ix.units[u]
    trace = ix.trace
    eff_full = ix.unit_effect(u, (), frozenset(unit.inputs))
    heavy_set = set(heavy)
    drop = {sid for sid in eff_full.dropped if trace.storages[sid].producer not in heavy_set}
    if not drop:
        return ()
    ops = range(unit.first_op, unit.last_op + 1)
    # re-run an op only if everything it writes is droppable or scratch (re-running a writer of a kept
    # activation, e.g. a batch norm whose output leaves the unit, to drop its tiny stats does not pay)
    rerun = {j for j in ops if any(o in drop for o in trace.ops[j].outputs)
             and all(o in drop or not trace.storages[o].saved for o in trace.ops[j].outputs)}
    if not rerun:
        return ()
    changed = True
    while changed:
        changed = False
        for j in sorted(rerun):
            for sid in trace.ops[j].inputs:
                s = trace.storages[sid]
                p = s.producer
                if p is None or not unit.first_op <= p <= unit.last_op or s.saved or p in rerun:
                    continue
                rerun.add(p)
                changed = True
    return tuple(j for j in ops if j not in rerun)


# seconds of re-run time per byte of output above which an op's output is kept
_COST_PER_BYTE_LADDER = (0.25e-9, 0.5e-9, 1e-9, 2e-9, 4e-9)


def _expensive_ops(ix: TraceIndex, u: UnitRecord, theta: float) -> tuple[int, ...]:
    """Ops of unit u whose duration per byte of newly produced output exceeds theta."""
    trace = ix.trace
    out = []
    for j in range(u.first_op, u.last_op + 1):
        op = trace.ops[j]
        if op.duration <= 0:
            continue
        produced = sum(int(ix.nbytes[s]) for s in op.outputs if trace.storages[s].producer == j)
        if produced == 0 or op.duration / produced > theta:
            out.append(j)
    return tuple(out)


def unit_modes(ix: TraceIndex, hierarchy: Hierarchy, segments: bool = False) -> dict[int, list[tuple[int, ...]]]:
    """Recompute options per unit: full (), selective with compute-bound ops saved, and 'light' selective
    (only the outputs of cheap ops dropped); deduplicated, most bytes freed first (dropped less held).  With
    `segments`, the legal segments too (span indices >= len(trace.units); a state holds at most one span per unit)."""
    out: dict[int, list[tuple[int, ...]]] = {}
    space = decision_space(ix.trace)
    for u in (ix.units if segments else ix.units[: ix.num_units]):
        if not space.recomputable[u.index]:
            continue
        nops = u.last_op - u.first_op + 1
        heavy = space.heavy_ops(u.index, hierarchy)
        cands = [()]
        if heavy and len(heavy) < nops:
            cands.append(heavy)
            light = light_save_ops(ix, u.index, heavy)
            if light and len(light) < nops:
                cands.append(light)
        # Cost-per-byte ladders: keep only the outputs of ops that are expensive to
        # re-run for the bytes they hold (a 3x3 conv), re-run the rest (1x1 convs,
        # norms, activations are often cheaper to recompute per byte than to keep).
        for theta in _COST_PER_BYTE_LADDER:
            keep = _expensive_ops(ix, u, theta)
            if keep and len(keep) < nops:
                m = light_save_ops(ix, u.index, keep)
                if m and len(m) < nops:
                    cands.append(m)
        # Only ops whose outputs SAC can really cache may be saved (trace/sac.py): the
        # runtime re-runs the others, so the plan must charge their time too.
        cacheable = space.cacheable_ops(u.index)
        cands = list(dict.fromkeys(tuple(j for j in m if j in cacheable) for m in cands))
        # Each mode also without the save ops whose outputs the unmanaged step never saved: SAC would hold
        # those until the re-run ([Note: SAC holds what it caches] in trace/index.py).
        saved = ix.trace.storages
        cands += [t for t in (tuple(j for j in m if any(saved[s].saved for s in ix.trace.ops[j].outputs))
                              for m in cands) if t not in cands]
        # dropped set -> (mode, net bytes freed, time): the fastest mode per dropped set
        seen: dict[tuple[int, ...], tuple[tuple[int, ...], int, float]] = {}
        for m in cands:
            eff = ix.unit_effect(u.index, m, frozenset(u.inputs))
            net = int(sum(int(ix.nbytes[s]) for s in eff.dropped)) - int(sum(int(ix.nbytes[s]) for s in eff.held))
            if not eff.dropped or net <= 0:
                continue
            key = tuple(sorted(eff.dropped))
            if key not in seen or (eff.time, -net) < (seen[key][2], -seen[key][1]):
                seen[key] = (m, net, eff.time)
        if seen:
            out[u.index] = [m for m, _, _ in sorted(seen.values(), key=lambda v: -v[1])]
    return out


def in_unit(ix: TraceIndex, sid: int, units: Iterable[int]) -> bool:
    p = ix.trace.storages[sid].producer
    if p is None:
        return False
    return any(ix.units[u].first_op <= p <= ix.units[u].last_op for u in units)


def accesses_with(ix: TraceIndex, sid: int, units: Iterable[int]) -> list[int]:
    acc = ix.accesses[sid]
    extra = [ix.units[u].first_backward_op for u in ix.input_of.get(sid, ()) if u in units]
    return sorted(set(acc) | set(e for e in extra if e is not None)) if extra else acc


def main_gap(ix: TraceIndex, sid: int, units: Iterable[int] = ()) -> tuple[int, int] | None:
    """(evict_after, need) around the longest idle stretch of a storage (by unmanaged time), if any."""
    acc = accesses_with(ix, sid, units)
    start, end = int(ix.start[sid]), int(ix.end[sid])
    best, bt = None, 0.0
    prev = start
    for a in acc:
        if a > prev + 1:
            t = ix.C[a] - ix.C[prev + 1]
            if t > bt and prev < end:
                best, bt = (prev, a), t
        prev = max(prev, a)
    return best


def chain_time(hierarchy: Hierarchy, ti: int, nbytes: int, direction: str) -> float:
    return sum(hierarchy.tiers[i].transfer_time(nbytes, direction) for i in range(1, ti + 1))


def nostall_starts(res: SimResult) -> np.ndarray:
    """Event start times with the stalls taken out (recomputes kept)."""
    if not res.stalls:
        return res.event_start
    ex = np.zeros(len(res.event_start))
    for e, w in res.stalls:
        ex[e] += w
    return res.event_start - np.concatenate([[0.0], np.cumsum(ex)[:-1]])


def schedule_prefetches(ix: TraceIndex, hierarchy: Hierarchy, st: State, res: SimResult, slack: float = 0.0) -> None:
    """Re-derive every offload's prefetch_at: pack the up-lanes just in time, backwards from each need."""
    if not st.offloads:
        return
    T = nostall_starts(res)
    n = ix.n
    units = st.units
    items = []
    for sid, (ti, ev, _) in list(st.offloads.items()):
        acc = accesses_with(ix, sid, units)
        k = bisect.bisect_right(acc, ev)
        if k >= len(acc):
            # Nothing reads it after the eviction any more: its only later reader was the
            # recompute of a unit that a move just stopped recomputing.  Keeping is exact and
            # costs nothing (the storage dies at its last access).
            del st.offloads[sid]
            continue
        need = acc[k]
        items.append((need, sid, ti, ev))
    items.sort(reverse=True)
    lane_next: dict[int, float] = {}  # tier index -> start of the next (later) transfer on that read lane
    for need, sid, ti, ev in items:
        b = int(ix.nbytes[sid])
        deadline = T[need]
        t = deadline
        for i in range(1, ti + 1):  # hop out of tier 1 is last; walk backwards from it
            t = min(t, lane_next.get(i, float("inf")))
            t -= hierarchy.tiers[i].transfer_time(b, "read") * (1.0 + slack)
            lane_next[i] = t
        # never issue before the down chain has landed: a stream waiting on it would block the lane
        t = max(t, res.down_end.get(sid, 0.0))
        e = int(np.searchsorted(T, t, "right")) - 1
        if T[max(e, 0)] < t and e + 1 <= need and res.down_end.get(sid, 0.0) > T[max(e, 0)]:
            e += 1
        e = min(max(e, ev + 1, st.floors.get(sid, 0)), need)
        st.offloads[sid] = Offload(ti, ev, e)


def frugal_state(ix: TraceIndex, hierarchy: Hierarchy, tiers: tuple[int, ...], budget: int | None = None) -> State:
    """The most memory-frugal plan memstrata knows (see api.minimum_budget and [Note: frugal segments])."""
    st, _ = frugal_search(ix, hierarchy, tiers, budget)
    return st


def frugal_search(ix: TraceIndex, hierarchy: Hierarchy, tiers: tuple[int, ...],
                  budget: int | None = None) -> tuple[State, int]:
    """(the most frugal recompute cover found, its tier-0 peak); see [Note: frugal segments]."""
    cap0 = budget if budget is not None else int(ix.base_occ.max())
    modes = unit_modes(ix, hierarchy)
    base = {u: ms[0] for u, ms in modes.items()}
    cache: dict[tuple, tuple[State, int]] = {}

    def evaluate(cover: dict[int, tuple[int, ...]], prune: bool = False) -> tuple[State, int]:
        k = (prune, tuple(sorted(cover.items())))
        if k not in cache:
            st = _frugal_with(ix, hierarchy, tiers, cap0, cover, prune=prune)
            cache[k] = (st, run(ix, hierarchy, cap0, st.offloads, st.units, st.replays).peak(0))
        return cache[k]

    per_unit = evaluate(base, prune=True)
    runs = segment_runs(ix)
    if not runs:
        return per_unit
    # the search compares covers without the pruning pass (one simulation per span): it is re-run on the winner
    best = evaluate(base)
    # start from the best uniform cut (every run cut into segments of L units), then move single cuts
    best_cuts: tuple[tuple[int, ...], ...] | None = None
    for L in range(2, MAX_SEGMENT_UNITS + 1):
        cuts = tuple(tuple(range(L, len(r), L)) for r in runs)
        cover = _cover_of(ix, base, runs, cuts)
        if cover is None:
            continue
        cand = evaluate(cover)
        if cand[1] < best[1]:
            best, best_cuts = cand, cuts
    if best_cuts is None:  # no uniform cut helps: start from every unit alone (the per-unit cover)
        best_cuts = tuple(tuple(range(1, len(r))) for r in runs)
    evals = 0
    improved = True
    while improved and evals < FRUGAL_SEARCH_EVALS:
        improved = False
        for i, r in enumerate(runs):
            for pos in range(1, len(r)):
                cs = set(best_cuts[i]) ^ {pos}  # add or remove the cut before r[pos]
                cuts = best_cuts[:i] + (tuple(sorted(cs)),) + best_cuts[i + 1:]
                cover = _cover_of(ix, base, runs, cuts)
                if cover is None:
                    continue
                evals += 1
                cand = evaluate(cover)
                if cand[1] < best[1]:
                    best, best_cuts, improved = cand, cuts, True
                if evals >= FRUGAL_SEARCH_EVALS:
                    break
            if evals >= FRUGAL_SEARCH_EVALS:
                break
    found = evaluate(_cover_of(ix, base, runs, best_cuts) or base, prune=True)
    return found if found[1] < per_unit[1] else per_unit


FRUGAL_SEARCH_EVALS = 120  # simulations of single-cut moves the frugal search may spend (deterministic: no clock)


def segment_runs(ix: TraceIndex) -> list[list[int]]:
    """Maximal runs (>= 2) of consecutive units any two neighbours of which some traced segment spans."""
    nxt = {a: b for (a, b) in ix.segments if b == a + 1}
    runs: list[list[int]] = []
    u = 0
    while u < ix.num_units:
        r = [u]
        while r[-1] in nxt:
            r.append(nxt[r[-1]])
        if len(r) >= 2:
            runs.append(r)
        u = r[-1] + 1
    return runs


def _cover_of(ix: TraceIndex, base: dict[int, tuple[int, ...]], runs: list[list[int]],
              cuts: tuple[tuple[int, ...], ...]) -> dict[int, tuple[int, ...]] | None:
    """base with each run split at its cuts: a piece of >= 2 units becomes one fully recomputed segment, a
    single unit keeps its base mode; None if a piece has no legal segment."""
    space = decision_space(ix.trace)
    cover = dict(base)
    for r, cs in zip(runs, cuts):
        bounds = (0, *cs, len(r))
        for lo, hi in zip(bounds, bounds[1:]):
            if hi - lo < 2:
                continue
            span = ix.segments.get((r[lo], r[hi - 1]))
            if span is None or not space.recomputable[span]:
                return None
            for m in r[lo:hi]:
                cover.pop(m, None)
            cover[span] = ()
    return cover


def _frugal_with(ix: TraceIndex, hierarchy: Hierarchy, tiers: tuple[int, ...], cap0: int,
                 units: dict[int, tuple[int, ...]], prune: bool = True) -> State:
    """The frugal plan for one recompute cover: offload what stays outside it, fix lower tiers, drop spans
    whose recompute raises the peak."""
    st = State(units=dict(units))
    if not tiers:  # recompute only: no tier to offload to
        return st
    t1 = tiers[0]
    for sid in np.nonzero(decision_space(ix.trace).offloadable)[0].tolist():
        if in_unit(ix, sid, st.units):
            continue
        g = main_gap(ix, sid, st.units)
        if g is None:
            continue
        ev, need = g
        st.offloads[sid] = Offload(t1, ev, need)
    res = run(ix, hierarchy, cap0, st.offloads, st.units)
    # lower tiers overflowing: push the largest offending storages deeper, or keep them
    for _ in range(200):
        bad = [(t, e) for t, e in res.overflow() if t > 0]
        if not bad:
            break
        t, e = bad[0]
        ids, s, en, by = res.intervals[t]
        live = sorted({int(i) for i, a, z in zip(ids, s, en) if a <= e <= z and int(i) in st.offloads},
                      key=lambda i: -int(ix.nbytes[i]))
        deeper = [d for d in tiers if d > t]
        moved = False
        for sid in live[:max(1, len(live) // 4)]:
            ti, ev, pf = st.offloads[sid]
            if deeper and ti < deeper[0]:
                st.offloads[sid] = Offload(deeper[0], ev, pf)
            else:
                del st.offloads[sid]
            moved = True
        if not moved:
            break
        res = run(ix, hierarchy, cap0, st.offloads, st.units)
    # units whose recompute raises the peak (transients, held inputs): drop them
    for u in sorted(st.units) if prune else ():
        trial = State(st.offloads, {k: v for k, v in st.units.items() if k != u})
        r2 = try_run(ix, hierarchy, cap0, trial.offloads, trial.units)
        if r2 is None:
            continue
        if r2.peak(0) < res.peak(0) and not [t for t, _ in r2.overflow() if t > 0]:
            st, res = trial, r2
    return st


# --------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------


class OffloadMove(NamedTuple):
    """An offload the greedy may add: the decision, and what it costs on the lanes around the freed event."""

    tier: int
    evict_after: int
    need: int  # first access after eviction (the latest prefetch point)
    down_time: float  # seconds of the copy down
    window_start: float  # the copy up runs in [window_start, window_end]
    window_end: float
    up_time: float  # seconds of the copy up
    lane_busy: float  # seconds other copies already use the read lane in that window
    enqueue_time: float  # when the copy down is enqueued


@dataclass
class _Cand:
    score: float
    freed: int
    kind: str  # "off" | "unit"
    key: int
    value: "OffloadMove | tuple[int, ...]"  # an OffloadMove, or a unit's save_ops
    cost: float
    lane_load: float = 0.0
    touches: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int, int], ...] = ()  # (lower tier, first event, last event) it occupies


class GreedyStuck(RuntimeError):
    def __init__(self, message: str, event: int | None = None) -> None:
        super().__init__(message)
        self.event = event  # the overflowing event nothing could be freed at, when known


def _lane_free_lookup(res: SimResult) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for lane, log in res.lane_log.items():
        enq = [e for e, *_ in log]
        ends = list(np.maximum.accumulate(np.array([z for _, _, z, _ in log])))
        out[lane] = (enq, ends)
    return out


def _busy_in(log: list, a: float, b: float) -> float:
    tot = 0.0
    for _, s, z, _ in log:
        lo, hi = max(s, a), min(z, b)
        if hi > lo:
            tot += hi - lo
    return tot


def _candidates(ix: TraceIndex, h: Hierarchy, st: State, res: SimResult, p: int, modes, tiers,
                excess: int = 1 << 62, deep_first: bool = True, relaxed: bool = False) -> list[_Cand]:
    n = ix.n
    ids, s0, e0, b0 = res.intervals[0]
    mask = (s0 <= p) & (e0 >= p)
    live: dict[int, int] = {}
    for sid, by in zip(ids[mask].tolist(), b0[mask].tolist()):
        if sid >= 0:
            live[sid] = live.get(sid, 0) + by
    T = res.event_start
    Tend = np.concatenate([T[1:], [res.step_time]])
    Tp = T[p]
    cands: list[_Cand] = []
    rec = st.units
    # units
    rec_inputs_now = frozenset(sid for u in rec for sid in ix.units[u].inputs)
    for u, ms in modes.items():
        cur = rec.get(u)
        unit = ix.units[u]
        fb = unit.first_backward_op
        if p >= fb or p <= unit.last_op:
            continue
        ri = rec_inputs_now | frozenset(unit.inputs)
        cur_eff = ix.unit_effect(u, cur, ri) if cur is not None else None
        cur_time = cur_eff.time if cur_eff else 0.0
        cur_dropped = set(cur_eff.dropped) if cur_eff else set()
        for m in ms:
            if m == cur:
                continue
            eff = ix.unit_effect(u, m, ri)
            if any(sid in st.offloads for sid in ix.unit_storages[u]):
                continue
            new_dropped = set(eff.dropped)
            freed = 0
            for sid in new_dropped - cur_dropped:
                if min(int(ix.end[sid]), unit.last_op) < p:
                    freed += live.get(sid, 0)
            for sid in cur_dropped - new_dropped:
                if min(int(ix.end[sid]), unit.last_op) < p <= int(ix.end[sid]):
                    freed -= int(ix.nbytes[sid])
            if cur is None:
                for sid in unit.inputs:
                    if sid not in live and int(ix.end[sid]) < p and sid not in st.offloads:
                        freed -= int(ix.nbytes[sid])
            if freed <= 0:
                continue
            c = max(eff.time - cur_time, 0.0)
            cands.append(_Cand(c / freed, freed, "unit", u, m, c, touches=tuple(ix.unit_storages[u]) + (-1 - u,)))
    # offloads
    if len(h.tiers) < 2:  # tier 0 only (a CPU Manager without nvme_dir): nothing to offload to
        cands.sort(key=lambda c: (c.score, -c.freed))
        return cands
    lanes = _lane_free_lookup(res)
    t1 = h.tiers[1]
    # below this size an offload is mostly latency: not worth a decision
    min_bytes = min(int(8 * t1.latency * max(t1.write_bandwidth, 1.0)), max(1, excess // 16))
    held = replay_held(ix, st) if st.replays else set()
    for sid, by in live.items():
        if (not decision_space(ix.trace).offloadable[sid] or sid in st.offloads or sid in res.dropped
                or sid in st.replays or sid in held or in_unit(ix, sid, rec)):
            continue
        acc = accesses_with(ix, sid, rec)
        k = bisect.bisect_left(acc, p)
        if k >= len(acc) or acc[k] == p or k == 0:
            continue
        ev, need = acc[k - 1], acc[k]
        if ev >= p:
            continue
        b = int(ix.nbytes[sid])
        if b < min_bytes:
            continue
        t_enq = float(Tend[ev])
        lane = h.tiers[1].name + ":write"
        free = t_enq
        if lane in lanes:
            enq, ends = lanes[lane]
            j = bisect.bisect_right(enq, t_enq)
            if j:
                free = max(free, ends[j - 1])
        for ti in tiers:
            down1 = h.tiers[1].transfer_time(b, "write")
            done1 = free + down1
            if done1 > Tp and not relaxed:
                continue
            down_all = done1 + chain_time(h, ti, b, "write") - down1
            up = chain_time(h, ti, b, "read")
            # room in the destination tier over the whole gap, and in the tiers in between while staging
            e_down = min(int(np.searchsorted(T, down_all, "right")), n - 1)
            e_up = max(int(np.searchsorted(T, float(T[need]) - up, "right")) - 1, ev + 1)
            ranges = [(ti, ev + 1, need)]
            for i in range(1, ti):
                ranges += [(i, ev + 1, e_down), (i, e_up, need)]
            if not relaxed and any(int(res.occ[i][a:z + 1].max(initial=0)) + b > res.capacity[i] for i, a, z in ranges):
                continue
            # to be gone at p the up-copy starts after p: its window is [end of p, need]
            w0, w1 = max(down_all, float(Tend[p])), float(T[need])
            busy = _busy_in(res.lane_log.get(h.tiers[1].name + ":read", []), w0, w1)
            stall = max(0.0, up + busy - (w1 - w0))
            # equal stalls: prefer the deeper tier (keeps the faster tier free for what needs it); the
            # clean-up pass moves offloads back up where that fits, for less traffic
            c = stall + TRAFFIC_WEIGHT * 2 * b * ((len(h.tiers) - ti) if deep_first else ti)
            cands.append(_Cand(c / by, by, "off", sid, OffloadMove(ti, ev, need, Tp, w0, w1, up, busy, t_enq), c,
                               lane_load=down1, touches=(sid,), ranges=tuple(ranges)))
    cands.sort(key=lambda c: (c.score, -c.freed))
    return cands


class _DownLane:
    """The first-hop down lane as a FIFO of (enqueue time, seconds, must-land-by), for batch admission."""

    def __init__(self, res: SimResult, lane: str, Tp: float) -> None:
        self.ntier = len(res.occ)
        self.items = [(e, z - s, (z if z > Tp else Tp)) for e, s, z, _ in res.lane_log.get(lane, [])]
        self.items.sort()

    def admits(self, t_enq: float, dur: float, Tp: float) -> bool:
        items = self.items[:]
        bisect.insort(items, (t_enq, dur, Tp))
        free = 0.0
        for e, d, by in items:
            free = max(free, e) + d
            if free > by + 1e-12:
                return False
        self.pending = items
        return True

    def commit(self) -> None:
        self.items = self.pending


def _apply_batch(st: State, cands: list[_Cand], excess: int, lane: "_DownLane | None" = None, floor: int = 0,
                 res: SimResult | None = None, deep_first: bool = True, ix: TraceIndex | None = None) -> int:
    """Take candidates cheapest-first (lazily re-priced) until `excess` bytes are freed at the peak."""
    low = [o.copy() for o in res.occ] if res is not None else None
    caps = res.capacity if res is not None else None
    import heapq

    got = 0
    ntier = 3 if lane is None else lane.ntier
    taken: set[int] = set()
    ups: list[tuple[float, float]] = []  # (need time, up seconds) of offloads taken in this batch
    heap = [(c.score, -c.freed, i) for i, c in enumerate(cands)]
    heapq.heapify(heap)

    def price(c: _Cand) -> float:
        ti, ev, need, Tp, w0, w1, up, busy, t_enq = c.value
        extra = sum(u for t, u in ups if w0 <= t <= w1)
        stall = max(0.0, up + busy + extra - (w1 - w0))
        return (stall + TRAFFIC_WEIGHT * 2 * c.freed * ((ntier - ti) if deep_first else ti)) / c.freed

    while heap and got < excess:
        sc, _, i = heapq.heappop(heap)
        c = cands[i]
        if any(t in taken for t in c.touches):
            continue
        if c.kind == "off":
            new = price(c)
            if new > sc + 1e-18 and heap and new > heap[0][0]:
                heapq.heappush(heap, (new, -c.freed, i))
                continue
            ti, ev, need, Tp, w0, w1, up, busy, t_enq = c.value
            b = int(c.freed)
            if low is not None and any(int(low[i][a:z + 1].max(initial=0)) + b > caps[i] for i, a, z in c.ranges):
                continue  # the lower tiers (destination, staging) are full there with this batch
            if lane is not None:
                if not lane.admits(t_enq, c.lane_load, Tp):  # would land after the peak (or push others past it)
                    continue
                lane.commit()
            if low is not None:
                for i, a, z in c.ranges:
                    low[i][a:z + 1] += b
            ups.append((w1, up))
            st.offloads[c.key] = Offload(ti, ev, need)
            st.floors[c.key] = max(st.floors.get(c.key, 0), floor)
        else:
            if any(t in st.offloads for t in c.touches):
                continue
            if ix is not None:
                assign_unit(ix, st, c.key, c.value)
            else:
                st.units[c.key] = c.value
        taken.update(c.touches)
        got += c.freed
    return got


def _worst_event(res: SimResult) -> int:
    over = res.occ[0] - res.capacity[0]
    return int(np.argmax(over))


def peel(ev_: Evaluator, st: State, modes, max_iter: int = 400, work: Work | None = None,
         deep_first: bool = True) -> tuple[State, SimResult]:
    ix, h = ev_.ix, ev_.h
    res = ev_(st)
    for _ in range(max_iter):
        if res.feasible:
            return st, res
        low = [(t, e) for t, e in res.overflow() if t > 0]
        if low:  # a lower tier overflows: undo the offloads live there, largest first
            t, e = low[0]
            ids, s, en, by = res.intervals[t]
            live = sorted({int(i) for i, a, z in zip(ids, s, en) if a <= e <= z}, key=lambda i: -int(ix.nbytes[i]))
            over = int(res.occ[t][e]) - res.capacity[t]
            for sid in live:
                if over <= 0:
                    break
                st.offloads.pop(sid, None)
                over -= int(ix.nbytes[sid])
            res = ev_(st)
            continue
        p = _worst_event(res)
        excess = int(res.occ[0][p]) - res.capacity[0]
        cands = _candidates(ix, h, st, res, p, modes, ev_.tiers, excess, deep_first)
        nst, nres = st, res
        if cands:
            nst = st.copy()
            lane = (_DownLane(res, h.tiers[1].name + ":write", float(res.event_start[p])) if len(h.tiers) > 1
                    else None)
            if _apply_batch(nst, cands, excess, lane, p + 1, res, deep_first, ix=ev_.ix):
                schedule_prefetches(ix, h, nst, res)
                nres = ev_(nst)
        if nst is st or (int(nres.occ[0][p]) >= int(res.occ[0][p]) and nres.peak(0) >= res.peak(0)):
            # the estimate-driven batch did not help (copies landing late, lower tiers full, ...): let the
            # simulator judge the most promising single moves, lower-tier checks relaxed
            nst, nres = _probe(ev_, st, res, p, modes, deep_first)
        st, res = nst, nres
        if work is not None and work.spent():
            break
    if not res.feasible:
        raise GreedyStuck("iteration limit")
    return st, res


def _over(res: SimResult) -> tuple[int, int]:
    """(bytes over capacity in lower tiers, bytes over the budget in tier 0) at their worst events."""
    low = sum(max(0, int(o.max(initial=0)) - c) for o, c in zip(res.occ[1:], res.capacity[1:]))
    return low, max(0, res.peak(0) - res.capacity[0])


def _probe(ev_: Evaluator, st: State, res: SimResult, p: int, modes, deep_first: bool, k: int = 12) -> tuple[State, SimResult]:
    """One simulator-judged step: try the k best single candidates at p (relaxed), keep the best progress."""
    ix, h = ev_.ix, ev_.h
    cands = _candidates(ix, h, st, res, p, modes, ev_.tiers, deep_first=deep_first, relaxed=True)
    base_over = _over(res)
    best = None
    for c in cands[:k]:
        t = st.copy()
        if c.kind == "off":
            ti, ev, need = c.value.tier, c.value.evict_after, c.value.need
            t.offloads[c.key] = Offload(ti, ev, need)
            t.floors[c.key] = p + 1
        else:
            assign_unit(ev_.ix, t, c.key, c.value)
        r = schedule_and_run(ev_, t, res)
        if r is None:
            continue
        ov = _over(r)
        if ov >= base_over or ov[0] > base_over[0]:
            continue
        gain = (base_over[0] - ov[0]) * 4 + (base_over[1] - ov[1])
        score = (max(cost(r) - cost(res), 0.0) + 1e-18) / max(gain, 1)
        if best is None or score < best[0]:
            best = (score, t, r)
    if best is None:
        raise GreedyStuck(f"nothing left to free at event {p}", event=int(p))
    return best[1], best[2]


def _valid(ev_: Evaluator, st: State) -> SimResult | None:
    """The simulation of `st`, or None when its decisions are outside the decision space."""
    return ev_.try_(st)


def schedule_and_run(ev_: Evaluator, st: State, ref: SimResult) -> SimResult | None:
    """Just-in-time prefetch points (from `ref`'s timeline), simulated; then, while tier 0 overflows at an
    event where some prefetched copy is already back early, postpone the one needed last to after that event
    (trading a possible stall for room).  Mutates st; None if the state is malformed."""
    schedule_prefetches(ev_.ix, ev_.h, st, ref)
    r = _valid(ev_, st)
    for _ in range(4 * len(st.offloads)):
        if r is None or r.feasible:
            break
        over0 = [e for t, e in r.overflow() if t == 0]
        if not over0:
            break
        e = over0[0]
        early = [(r.need[sid], sid) for sid, (ti, ev, pf) in st.offloads.items() if pf <= e < r.need[sid]]
        if not early:
            break
        _, sid = max(early)
        ti, ev, pf = st.offloads[sid]
        st.offloads[sid] = Offload(ti, ev, e + 1)
        st.floors[sid] = e + 1
        r = _valid(ev_, st)
    return r


def _prune(ev_: Evaluator, st: State, res: SimResult, sids: list[int]) -> tuple[State, SimResult]:
    """Drop the given offloads one by one (largest first) while the plan stays feasible and not slower."""
    ix = ev_.ix
    for sid in sorted(sids, key=lambda i: -int(ix.nbytes[i])):
        t = st.copy()
        del t.offloads[sid]
        r = schedule_and_run(ev_, t, res)
        if r is not None and r.feasible and cost(r) <= cost(res) + 1e-12:
            st, res = t, r
    return st, res


def cleanup(ev_: Evaluator, st: State, res: SimResult, modes, work: Work | None = None) -> tuple[State, SimResult]:
    """Drop decisions that are not needed; downgrade full recomputes to selective where it pays."""
    ix, h = ev_.ix, ev_.h
    best = cost(res)
    # most expensive first: units by recompute time, offloads by bytes
    order = [("unit", u) for u in sorted(st.units, key=lambda u: -ix.unit_effect(u, st.units[u], frozenset()).time)]
    order += [("off", s) for s in sorted(st.offloads, key=lambda s: -int(ix.nbytes[s]))]
    for kind, k in order:
        if work is not None and work.spent():
            break
        trials = []
        if kind == "unit" and k in st.units:
            t = st.copy(); del t.units[k]; trials.append(t)
            cur = st.units[k]
            for m in modes.get(k, []):
                if m != cur and len(m) > len(cur):
                    t = st.copy(); assign_unit(ix, t, k, m); trials.append(t)
            for ti in ev_.tiers:  # swap: offload what the unit's recompute dropped instead
                t = st.copy(); del t.units[k]
                for sid in ix.unit_storages[k]:
                    if decision_space(ix.trace).offloadable[sid] and sid not in t.offloads:
                        g = main_gap(ix, sid, t.units)
                        if g is not None:
                            t.offloads[sid] = Offload(ti, g[0], g[1])
                trials.append(t)
        elif kind == "off" and k in st.offloads:
            t = st.copy(); del t.offloads[k]; trials.append(t)
            ti, e, pf = st.offloads[k]
            for up in ev_.tiers:
                if up < ti:
                    t = st.copy(); t.offloads[k] = Offload(up, e, pf); trials.append(t)
        for t in trials:
            r = schedule_and_run(ev_, t, res)
            if r is not None and r.feasible and len(t.offloads) > len(st.offloads):
                t, r = _prune(ev_, t, r, [s_ for s_ in t.offloads if s_ not in st.offloads])
            if r is not None and r.feasible and cost(r) <= best + 1e-12:
                st, res, best = t, r, cost(r)
                break
    return st, res


def one_opt(ev_: Evaluator, st: State, res: SimResult, modes, options: dict[int, list[Offload]],
            work: Work | None = None, rounds: int = 3) -> tuple[State, SimResult]:
    """Exhaustive single-decision changes (small problems): best improvement, repeated."""
    best = cost(res)
    for _ in range(rounds):
        improved = None
        moves: list[State] = []
        for u, ms in modes.items():
            for m in [None] + ms:
                if st.units.get(u) == m:
                    continue
                t = st.copy()
                if m is None:
                    t.units.pop(u, None)
                else:
                    assign_unit(ev_.ix, t, u, m)
                    for sid in ev_.ix.unit_storages[u]:  # repair: a recomputed unit's storages are not offloaded
                        t.offloads.pop(sid, None)
                moves.append(t)
        for sid, o in st.offloads.items():  # nudge prefetch points (lane order matters on slow links)
            ti, ev, pf = o
            for d in (-1, 1):
                if ev < pf + d and (sid not in options or pf + d <= max(x[2] for x in options[sid])):
                    t = st.copy()
                    t.offloads[sid] = Offload(ti, ev, pf + d)
                    moves.append(t)
        for sid, opts in options.items():
            for o in [None] + opts:
                if st.offloads.get(sid) == o:
                    continue
                t = st.copy()
                if o is None:
                    t.offloads.pop(sid, None)
                else:
                    t.offloads[sid] = o
                    for u in list(t.units):  # repair: offloading a storage un-recomputes its unit
                        if in_unit(ev_.ix, sid, (u,)):
                            del t.units[u]
                moves.append(t)
        for t in moves:
            if work is not None and work.spent():
                return st, res
            r = _valid(ev_, t)
            if r is not None and r.feasible and cost(r) < best - 1e-12:
                best, improved = cost(r), (t, r)
        if improved is None:
            break
        st, res = improved
    return st, res


def offload_options(ix: TraceIndex, h: Hierarchy, tiers: tuple[int, ...], units: Iterable[int] = (),
                    n_prefetch: int = 3) -> dict[int, list[Offload]]:
    """A small menu of offload decisions per storage (main gap; prefetch late, just in time, early)."""
    units = list(units)
    out: dict[int, list[Offload]] = {}
    C = ix.C
    for sid in np.nonzero(decision_space(ix.trace).offloadable)[0].tolist():
        if in_unit(ix, sid, units):
            continue
        g = main_gap(ix, sid, units)
        if g is None:
            continue
        ev, need = g
        b = int(ix.nbytes[sid])
        opts = []
        for ti in tiers:
            up = chain_time(h, ti, b, "read")
            pfs = [need]
            for mult in (1.0, 2.0)[: max(0, n_prefetch - 1)]:
                t = C[need] - mult * up
                e = int(np.searchsorted(C[:-1], t, "right")) - 1
                pfs.append(min(max(e, ev + 1), need))
            for pf in dict.fromkeys(pfs):
                opts.append(Offload(ti, ev, pf))
        out[sid] = opts
    return out


def ratio_seed(ev_: Evaluator, modes) -> State:
    """Units in their best bytes-per-second recompute mode, best first, until tier 0 fits."""
    ix = ev_.ix
    best: list[tuple[float, int, tuple[int, ...]]] = []
    for u, ms in modes.items():
        inputs = frozenset(ix.units[u].inputs)
        scored = []
        for m in ms:
            eff = ix.unit_effect(u, m, inputs)
            freed = sum(int(ix.nbytes[sid]) for sid in eff.dropped)
            if freed > 0:
                scored.append((freed / max(eff.time, 1e-12), m))
        if scored:
            ratio, m = max(scored, key=lambda x: x[0])
            best.append((ratio, u, m))
    st = State()
    for _, u, m in sorted(best, key=lambda x: -x[0]):
        if ev_(st).peak(0) <= ev_.budget:
            break
        trial = st.copy()
        assign_unit(ix, trial, u, m)
        if ev_(trial).peak(0) < ev_(st).peak(0):
            st = trial
    return st


REPLAY_MIN_BYTES = 1 << 16  # smaller saved storages (BatchNorm statistics) are not worth a recipe (tiny models:
# 1/256 of the activation peak)


def replay_seed(ev_: Evaluator, work: Work | None = None) -> State:
    """Replays of every replayable storage worth one, best bytes per second first, until tier 0 fits."""
    ix = ev_.ix
    space = decision_space(ix.trace)
    scored = []
    floor = min(REPLAY_MIN_BYTES, ix.trace.activation_peak // 256)
    for sid in space.replayable_storages():
        b = int(ix.nbytes[sid])
        if b < floor:
            continue
        t = replay_time(ix, ev_.h, sid, space.replay_chain(sid))  # priced as the simulator prices it
        scored.append((b / max(t, 1e-12), sid))
    st = State()
    for _, sid in sorted(scored, reverse=True):
        if ev_(st).peak(0) <= ev_.budget or (work is not None and work.spent()):
            break
        trial = st.copy()
        trial.replays[sid] = space.replay_chain(sid)
        r = ev_.try_(trial)
        if r is not None and r.peak(0) <= ev_(st).peak(0):
            st = trial
    return st


def replays_pinning(ev_: Evaluator, st: State, event: int) -> list[int]:
    """The state's replays that hold a storage live at `event` past its own last read before the replay."""
    ix = ev_.ix
    space = decision_space(ix.trace)
    out = []
    for sid in st.replays:
        for x in space.replay_inputs(sid):
            if int(ix.start[x]) <= event <= int(ix.end[x]) and int(ix.nbytes[x]) >= REPLAY_MIN_BYTES:
                out.append(sid)
                break
    return out


def prune_replays(ev_: Evaluator, st: State, res: SimResult, work: Work | None = None
                  ) -> tuple[State, SimResult]:
    """Drop replays the plan does not need (most expensive first)."""
    ix = ev_.ix
    best = cost(res)
    for sid in sorted(st.replays, key=lambda s: -replay_time(ix, ev_.h, s, st.replays[s])):
        if work is not None and work.spent():
            break
        t = st.copy()
        del t.replays[sid]
        r = schedule_and_run(ev_, t, res)
        if r is not None and r.feasible and cost(r) <= best + 1e-12:
            st, res, best = t, r, cost(r)
    return st, res


def share_replays(ev_: Evaluator, st: State, res: SimResult, work: Work | None = None
                  ) -> tuple[State, SimResult]:
    """Let another replay's run regenerate a storage ([Note: shared replays] in trace/space.py): a replayed
    storage stops running its own chain, or a storage not replayed yet is added at no compute cost, where that
    lowers the cost and stays feasible (the storage then lives from the shared run to its last read)."""
    ix = ev_.ix
    space = decision_space(ix.trace)
    floor = min(REPLAY_MIN_BYTES, ix.trace.activation_peak // 256)
    best = cost(res)
    for sid in sorted(space.replayable_storages(), key=lambda s: -int(ix.nbytes[s])):
        if work is not None and work.spent():
            break
        if int(ix.nbytes[sid]) < floor:
            continue
        own = space.replay_chain(sid)
        if sid in st.replays and (st.replays[sid] != own
                                  or any(g != sid and c == own for g, c in st.replays.items())):
            continue  # already shared, or the host of a shared run
        for h in space.shared_options(sid, st.replays):
            if st.replays[h] != space.replay_chain(h):
                continue
            t = st.copy()
            t.replays[sid] = st.replays[h]
            r = schedule_and_run(ev_, t, res)
            if r is not None and r.feasible and cost(r) < best - 1e-12:
                st, res, best = t, r, cost(r)
                break
    return st, res


def greedy_state(ix: TraceIndex, hierarchy: Hierarchy, budget: int, tiers: tuple[int, ...], *,
                 work: int = DEFAULT_WORK, small: int = 60, replays: bool = False) -> tuple[State, SimResult]:
    """The greedy's plan state.  `work`: simulations before the search phases stop (a count, not a clock:
    [Note: deterministic planning]); later phases run on to shares above it, as before."""
    ev_ = Evaluator(ix, hierarchy, budget, tiers)
    w = Work(ev_, int(work))
    modes = unit_modes(ix, hierarchy, segments=True)
    results: list[tuple[State, SimResult]] = []
    n_cand = int(decision_space(ix.trace).offloadable.sum()) + len(modes)
    # tie-break variants: offload deep first (keeps fast tiers free), or shallow first; both on small graphs
    variants = (True, False) if (n_cand <= small and len(hierarchy.tiers) > 2) else (True,)
    for deep_first in variants:
        try:
            st, res = peel(ev_, State(), modes, work=w, deep_first=deep_first)
            st, res = cleanup(ev_, st, res, modes, work=w)
            results.append((st, res))
        except GreedyStuck:
            pass
    # Ratio seed: recompute units in their cheapest-per-byte mode, best ratio first, until
    # the peak fits; then peel finishes with offloads.  The peel above picks by the worst
    # event only and can lock in expensive full recomputes early; this variant cannot.
    try:
        seed = ratio_seed(ev_, modes)
        st, res = peel(ev_, seed, modes, work=w.share(1.25), deep_first=True)
        results.append(cleanup(ev_, st, res, modes, work=w.share(1.5)))
    except GreedyStuck:
        pass
    # Replay seed: op-level recompute of every cheap-to-regenerate saved storage (best bytes per second
    # first, until the peak fits), then the peel above on top; unneeded replays are pruned.
    # A replay pins what it reads until it runs; where the peel finds nothing left to free at an event, the
    # replays pinning storages live there are dropped from the seed and the peel runs again.
    seed = replay_seed(ev_, work=w) if replays and not w.spent() else State()
    for _ in range(4):  # within the shares the other variants already have: planning work does not grow
        if not seed.replays:
            break
        try:
            st, res = peel(ev_, seed, modes, work=w.share(1.25), deep_first=True)
            st, res = prune_replays(ev_, st, res, work=w.share(1.5))
            results.append((st, res))
            # one run for what several replays regenerate ([Note: shared replays] in trace/space.py), then
            # what that made unnecessary
            shared = share_replays(ev_, st, res, work=w.share(1.5))
            if shared[0].key() != st.key():
                st, res = prune_replays(ev_, *shared, work=w.share(1.6))
                results.append(cleanup(ev_, st, res, modes, work=w.share(1.7)))
            break
        except GreedyStuck as e:
            if e.event is None or w.share(1.25).spent():
                break
            pinned = replays_pinning(ev_, seed, e.event)
            if not pinned:
                break
            for sid in pinned:
                seed.replays.pop(sid, None)
            drop_orphans(ix, seed)
    fr0 = frugal_state(ix, hierarchy, tiers, budget)  # a search ([Note: frugal segments]): run it once
    fr = fr0.copy()
    r = schedule_and_run(ev_, fr, ev_(fr))
    if r is None or not r.feasible:
        fr = fr0
        r = ev_(fr)
    if r.feasible and (not results or not w.spent()):
        results.append(cleanup(ev_, fr, r, modes, work=w.share(1.5)))
    if not results:
        raise GreedyStuck("no feasible plan found")
    st, res = min(results, key=lambda sr: cost(sr[1]))
    if n_cand <= small:
        opts = offload_options(ix, hierarchy, tiers)
        st, res = one_opt(ev_, st, res, modes, opts, work=w)
    return st, res
