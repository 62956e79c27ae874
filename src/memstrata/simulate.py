"""simulate — replay a `Plan` against a `Trace` on a `Hierarchy` -> `Timeline`.

The simulator is the single judge of a plan: the planners call it to price
their decisions, reports draw its timeline, and the runtime's measurements are
compared with it.  It is pure (no torch) and fast: O((ops + storages) log)
with numpy for the occupancy sweeps and a Python loop only over the *managed*
decisions, so a ResNet-50 trace (thousands of ops, ~2k storages) replays in a
few milliseconds.

>>> from memstrata.hardware import profile
>>> from memstrata.plan.schema import Plan
>>> tl = simulate(trace, Plan("none", "h200", budget=trace.observed_peak), profile("h200"))  # doctest: +SKIP
>>> tl.peaks["hbm"] == trace.observed_peak and tl.step_time == trace.step_time           # doctest: +SKIP
True

[Note: simulation semantics]
Events.  Op i of `trace.ops` is event i; events run serially on the *compute
lane*, op i taking `ops[i].duration` seconds.  Each event may be preceded by
extra compute-lane time: a *stall* (waiting for a prefetch to land, or CPU
time a copy takes from the compute cores: bytes x `Tier.host_cost_per_byte`
of every tier it passes, charged when the copy is enqueued; 0 for DMA copies)
and/or a *recompute* (re-running a unit's forward).  Order inside event e:
  1. up-copies whose `prefetch_at == e` are enqueued (at the event's start);
  2. compute waits for prefetches needed by recomputes inserted at e;
  3. recomputes of units whose `first_backward_op == e` run;
  4. compute waits for prefetches needed by op e itself;
  5. op e runs;
  6. down-copies whose `evict_after == e` are enqueued (at the op's end).
`Timeline.event_start[e]` is the time step 1 happens; step time is the end of
the last op (every transfer that matters is waited for by some op).

Copy lanes.  One lane per direction per lower tier: "<tier>:write" moves bytes
from the tier above down into <tier>, "<tier>:read" moves them up from <tier>
to the tier above, at the bandwidth/latency stored on <tier>
(`Tier.transfer_time`).  Each lane is a FIFO (a CUDA stream): a transfer
starts at max(enqueue time, lane free, its dependency done).  Lanes run
concurrently with compute and with each other.

Staging.  Offload to a tier below the next one (nvme, with dram between) is
modelled as *sequential hops*, one per lane on the way: down = dram:write then
nvme:write, up = nvme:read then dram:read.  The intermediate tier holds a
staging copy from the start of the hop into it until the end of the hop out of
it (both ways).  Hops pipeline across storages (the nvme write of A overlaps
the dram write of B), which is what a double-buffered runtime does.

Tier-0 occupancy (event granularity).  A storage occupies tier 0 during the
events [start, end]: start = its producer (event 0 if None), end =
`freed_after` (the last event if None).  With an all-keep plan this is exactly
how the tracer computes `Trace.observed_peak`, so the simulated peak equals it
and the step time equals `trace.step_time`.
* offload (saved activations only): the down-copy is enqueued at the end of
  `evict_after` (>= producer); the tier-0 copy is counted up to and including
  the event during which the first hop completes (an event whose start is
  before that moment), then not at all until `prefetch_at`, from which the
  up-copy's destination buffer is counted (allocated when the copy is issued,
  even if the copy itself queues) until `end`.  If the down-copy ends at or
  after `prefetch_at`'s start, the storage is simply never freed.  The up-copy
  starts no earlier than the end of the whole down chain.  The first access
  after `evict_after` (a forward or backward read/write, or the recompute of a
  recomputed unit that has it as an input) must wait until the up-copy lands;
  that is the *need* event, and `prefetch_at <= need` is required.  The
  destination tier holds the storage from the start of the hop into it until
  the end of the hop out of it.
* recompute (`UnitDecision(u, save_ops=S)`): the *dropped* storages of u are
  those with `saved=True`, produced by an op in [first_op, last_op] that is
  not in S and not written by an op in S, saved only inside the unit (every
  pack index in [pack_start, pack_end); storages without pack indices count as
  inside), and not an input of any recomputed unit.  A dropped storage lives
  in the forward from its producer to min(freed_after, last_op), is absent
  until `first_backward_op` (fb), and is live again from fb to its original
  `end` (if end >= fb).  The unit's inputs live at least until fb.  At fb the
  unit's ops not in S are re-run before op fb: recompute time = sum of their
  durations.  The transient memory of the re-run (its non-dropped outputs:
  temporaries, and the unit's output recomputed afresh) is counted at event fb
  as the peak they reached together in the original forward of the unit.
  Outputs of S ops are kept as in the unmanaged run.  A storage that is
  produced inside a recomputed unit and has an offload decision is rejected
  (ValueError), as are recomputes of units with no backward.
* lower tiers: a time interval [a, b) occupies every event whose time span
  [event_start[e], event_start[e+1]) meets it.

Capacity.  Tier-0 capacity is the plan's budget (the budget *is* the tier-0
capacity for everything live there); lower tiers use `Tier.capacity`.  At
every event every tier's occupancy must be <= its capacity, else
`InfeasiblePlanError` (when `check=True`) names the first event that
overflows, its op, the tier, occupancy vs capacity and the largest storages
live there.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .hardware import Hierarchy, format_size
from .plan.schema import Plan
from .trace.schema import Trace

__all__ = ["simulate", "Timeline", "InfeasiblePlanError", "TraceIndex", "trace_index"]


class InfeasiblePlanError(RuntimeError):
    """A tier overflows at some event under this plan."""

    def __init__(self, message: str, *, event: int, op: str, tier: str, occupancy: int, capacity: int,
                 live: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.event = event
        self.op = op
        self.tier = tier
        self.occupancy = occupancy
        self.capacity = capacity
        self.live = live  # (storage id, bytes), largest first


@dataclass(frozen=True)
class Timeline:
    """What a plan does to one step, event by event.

    Times are seconds from the step start.  `occupancy[tier]` is a pair of
    arrays (event start times, bytes during that event) for a step plot;
    `busy[lane]` lists (start, end) intervals for "compute" and each copy lane;
    `bytes_moved[lane]` counts bytes through each lane.
    """

    step_time: float
    compute_time: float  # sum of op durations (the unmanaged step)
    recompute_time: float
    stall_time: float
    peaks: Mapping[str, int]
    peak_events: Mapping[str, int]
    event_start: np.ndarray
    occupancy: Mapping[str, tuple[np.ndarray, np.ndarray]]
    busy: Mapping[str, tuple[tuple[float, float], ...]]
    stalls: tuple[tuple[int, float], ...]  # (event, seconds)
    recomputes: tuple[tuple[int, int, float], ...]  # (unit, event, seconds)
    bytes_moved: Mapping[str, int]
    overflow: tuple[tuple[str, int, int, int], ...] = ()  # (tier, first event, occupancy, capacity) when check=False

    @property
    def traffic(self) -> int:
        return int(sum(self.bytes_moved.values()))

    @property
    def feasible(self) -> bool:
        return not self.overflow

    def summary(self) -> str:
        peaks = ", ".join(f"{t} {format_size(b)}" for t, b in self.peaks.items())
        return (f"step {self.step_time * 1e3:.3f} ms (compute {self.compute_time * 1e3:.3f}, recompute "
                f"{self.recompute_time * 1e3:.3f}, stalls {self.stall_time * 1e3:.3f}); peaks: {peaks}; "
                f"traffic {format_size(self.traffic)}")


# --------------------------------------------------------------------------------------
# Per-trace index (built once, cached by identity)
# --------------------------------------------------------------------------------------

_HEAVY_NAMES = ("convolution", "conv2d", "conv1d", "conv3d", "mm", "addmm", "bmm", "matmul", "linear",
                "scaled_dot_product", "baddbmm", "einsum")


class TraceIndex:
    """Arrays derived from a Trace that every simulation of it reuses."""

    def __init__(self, trace: Trace) -> None:
        ops, sts = trace.ops, trace.storages
        n = len(ops)
        if n == 0:
            raise ValueError("trace has no ops")
        for i, op in enumerate(ops):
            if op.index != i:
                raise ValueError(f"op at position {i} has index {op.index}")
        for i, s in enumerate(sts):
            if s.id != i:
                raise ValueError(f"storage at position {i} has id {s.id}")
        self.trace = trace
        self.n = n
        self.dur = np.array([op.duration for op in ops], dtype=float)
        self.C = np.concatenate([[0.0], np.cumsum(self.dur)])
        self.step_time = float(self.C[-1])
        self.nbytes = np.array([s.nbytes for s in sts], dtype=np.int64)
        self.start = np.array([0 if s.producer is None else s.producer for s in sts], dtype=np.int64)
        self.end = np.array([n - 1 if s.freed_after is None else s.freed_after for s in sts], dtype=np.int64)
        # freed before its producer ran (the tracer's convention for storages that never became live): such a
        # storage never occupies anything, as in trace.record.live_bytes_per_event
        self.never_live = self.end < self.start
        if self.never_live.any():
            self.end[self.never_live] = self.start[self.never_live]
            self.nbytes[self.never_live] = 0
        acc: list[set[int]] = [set() for _ in sts]
        for i, op in enumerate(ops):
            for sid in op.inputs:
                acc[sid].add(i)
            for sid in op.outputs:
                acc[sid].add(i)
        for s in sts:
            acc[s.id].update(s.backward_reads)
            if s.producer is not None:
                acc[s.id].add(s.producer)
        self.accesses: list[list[int]] = [sorted(a) for a in acc]
        self.offloadable = np.array([s.saved and s.kind == "activation" and bool(s.backward_reads) for s in sts])
        self.offloadable &= ~self.never_live
        # all-keep occupancy
        self.base_occ = _occupancy(n, self.start, self.end, self.nbytes)
        # units
        self.units = trace.units
        self.unit_storages: list[list[int]] = []
        order = np.argsort(self.start, kind="stable")
        starts_sorted = self.start[order]
        produced = np.array([s.producer is not None for s in sts])
        for u in trace.units:
            lo = np.searchsorted(starts_sorted, u.first_op, "left")
            hi = np.searchsorted(starts_sorted, u.last_op, "right")
            ids = [int(i) for i in order[lo:hi] if produced[i]]
            self.unit_storages.append(sorted(ids))
        self.input_of: dict[int, list[int]] = {}
        for u in trace.units:
            for sid in u.inputs:
                self.input_of.setdefault(sid, []).append(u.index)
        self._unit_cache: dict[tuple[int, tuple[int, ...], frozenset[int]], _UnitEffect] = {}

    def heavy_ops(self, u: int, peak_flops: float | None = None, fast_bandwidth: float | None = None) -> tuple[int, ...]:
        """Compute-bound ops of unit u (convolutions, matmuls, or flop-bound by the roofline)."""
        unit = self.units[u]
        out = []
        for j in range(unit.first_op, unit.last_op + 1):
            op = self.trace.ops[j]
            name = op.name.split(".")[1] if op.name.startswith("aten.") else op.name
            heavy = any(name == h or name.startswith(h) for h in _HEAVY_NAMES)
            if not heavy and peak_flops and fast_bandwidth and op.flops > 0:
                heavy = op.flops / peak_flops > op.bytes_accessed / fast_bandwidth
            if heavy:
                out.append(j)
        return tuple(out)

    def unit_effect(self, u: int, save_ops: tuple[int, ...], rec_inputs: frozenset[int]) -> "_UnitEffect":
        key = (u, save_ops, rec_inputs)
        eff = self._unit_cache.get(key)
        if eff is None:
            eff = _UnitEffect(self, u, save_ops, rec_inputs)
            if len(self._unit_cache) > 4096:
                self._unit_cache.clear()
            self._unit_cache[key] = eff
        return eff


class _UnitEffect:
    """What recomputing unit u with save_ops S does (given which storages are unit inputs)."""

    def __init__(self, ix: TraceIndex, u: int, save_ops: tuple[int, ...], rec_inputs: frozenset[int]) -> None:
        unit = ix.units[u]
        trace = ix.trace
        if unit.first_backward_op is None:
            raise ValueError(f"unit {u} ({unit.module}) has no backward: nothing to recompute for")
        S = set(save_ops)
        for j in S:
            if not unit.first_op <= j <= unit.last_op:
                raise ValueError(f"unit {u}: save_op {j} is outside the unit's ops [{unit.first_op}, {unit.last_op}]")
        kept: set[int] = set()
        for j in S:
            kept.update(trace.ops[j].outputs)
        dropped, transient_ids = [], []
        for sid in ix.unit_storages[u]:
            s = trace.storages[sid]
            if s.producer in S or sid in kept:
                continue
            inside = all(unit.pack_start <= p < unit.pack_end for p in s.pack_indices)
            if s.saved and inside and sid not in rec_inputs:
                dropped.append(sid)
            else:
                transient_ids.append(sid)
        self.dropped = tuple(dropped)
        self.fb = int(unit.first_backward_op)
        self.last_op = unit.last_op
        self.time = float(sum(ix.dur[j] for j in range(unit.first_op, unit.last_op + 1) if j not in S))
        # transient: peak of non-dropped re-run outputs during the original forward of the unit
        L = unit.last_op - unit.first_op + 1
        diff = np.zeros(L + 1, dtype=np.int64)
        for sid in transient_ids:
            a = int(ix.start[sid]) - unit.first_op
            b = min(int(ix.end[sid]), unit.last_op) - unit.first_op
            diff[a] += ix.nbytes[sid]
            diff[b + 1] -= ix.nbytes[sid]
        self.transient = int(np.cumsum(diff)[:L].max()) if transient_ids else 0


_INDEX_CACHE: dict[int, tuple[weakref.ref, TraceIndex]] = {}


def trace_index(trace: Trace) -> TraceIndex:
    """The (cached) TraceIndex of a trace."""
    hit = _INDEX_CACHE.get(id(trace))
    if hit is not None and hit[0]() is trace:
        return hit[1]
    ix = TraceIndex(trace)
    if len(_INDEX_CACHE) > 32:
        for k in [k for k, (r, _) in _INDEX_CACHE.items() if r() is None] or list(_INDEX_CACHE)[:16]:
            _INDEX_CACHE.pop(k, None)
    _INDEX_CACHE[id(trace)] = (weakref.ref(trace), ix)
    return ix


def _occupancy(n: int, start: np.ndarray, end: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, start, nbytes)
    np.add.at(diff, end + 1, -nbytes)
    return np.cumsum(diff[:n])


# --------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------


@dataclass
class _Result:
    """Raw simulation output (internal; the planners read it directly)."""

    step_time: float
    recompute_time: float
    stall_time: float
    event_start: np.ndarray
    occ: list[np.ndarray]  # per tier, bytes per event
    capacity: list[int]
    intervals: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per tier (ids, start ev, end ev)
    stalls: list[tuple[int, float]]
    recomputes: list[tuple[int, int, float]]
    lane_log: dict[str, list[tuple[float, float, float, int]]]  # lane -> (enqueue, start, end, bytes)
    down_done_event: dict[int, int]  # offloaded sid -> last tier-0 event of its forward copy
    need: dict[int, int]  # offloaded sid -> need event
    dropped: dict[int, int]  # dropped sid -> unit
    traffic: int = 0
    recompute_starts: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds)
    down_end: dict[int, float] = field(default_factory=dict)  # offloaded sid -> time its whole down chain ends

    def peak(self, tier: int = 0) -> int:
        return int(self.occ[tier].max()) if len(self.occ[tier]) else 0

    def overflow(self) -> list[tuple[int, int]]:
        """(tier, first overflowing event) for every overflowing tier."""
        out = []
        for t, (o, cap) in enumerate(zip(self.occ, self.capacity)):
            bad = np.nonzero(o > cap)[0]
            if len(bad):
                out.append((t, int(bad[0])))
        return out

    @property
    def feasible(self) -> bool:
        return all(int(o.max(initial=0)) <= c for o, c in zip(self.occ, self.capacity))


Offload = tuple[int, int, int]  # (tier index >= 1, evict_after, prefetch_at)


def run(ix: TraceIndex, hierarchy: Hierarchy, budget: int, offloads: Mapping[int, Offload],
        units: Mapping[int, tuple[int, ...]]) -> _Result:
    """Simulate decisions given as plain dicts (sid -> offload, unit -> save_ops).  No capacity check."""
    n = ix.n
    trace = ix.trace
    tiers = hierarchy.tiers
    ntier = len(tiers)

    # ---- recompute resolution
    rec_inputs = frozenset(sid for u in units for sid in ix.units[u].inputs)
    effects = {u: ix.unit_effect(u, tuple(sorted(S)), rec_inputs) for u, S in units.items()}
    dropped: dict[int, int] = {}
    for u, eff in effects.items():
        for sid in eff.dropped:
            dropped[sid] = u
    fb_units: dict[int, list[int]] = {}
    for u, eff in effects.items():
        fb_units.setdefault(eff.fb, []).append(u)

    st = ix.start.copy()
    en = ix.end.copy()
    extra_ids: list[int] = []
    extra_s: list[int] = []
    extra_e: list[int] = []
    extra_b: list[int] = []
    # inputs of recomputed units live until fb
    for u, eff in effects.items():
        for sid in ix.units[u].inputs:
            if en[sid] < eff.fb:
                en[sid] = eff.fb
    for sid, u in dropped.items():
        eff = effects[u]
        orig_end = int(en[sid])
        en[sid] = min(orig_end, eff.last_op)
        if orig_end >= eff.fb:
            extra_ids.append(sid)
            extra_s.append(eff.fb)
            extra_e.append(orig_end)
            extra_b.append(int(ix.nbytes[sid]))
    for u, eff in effects.items():
        if eff.transient:
            extra_ids.append(-1 - u)
            extra_s.append(eff.fb)
            extra_e.append(eff.fb)
            extra_b.append(eff.transient)

    # ---- validate offloads, find need events
    need: dict[int, int] = {}
    items: list[tuple[int, int, int, int]] = []  # (event, phase, key, payload)
    for sid, (ti, ev, pf) in offloads.items():
        s = trace.storages[sid]
        if not (s.saved and s.kind == "activation"):
            raise ValueError(f"storage {sid}: only saved activations can be offloaded (kind {s.kind}, saved {s.saved})")
        if sid in dropped or (s.producer is not None and any(
                ix.units[u].first_op <= s.producer <= ix.units[u].last_op for u in units)):
            raise ValueError(f"storage {sid}: produced inside a recomputed unit and offloaded; pick one")
        if not 1 <= ti < ntier:
            raise ValueError(f"storage {sid}: offload tier index {ti} is not a lower tier")
        if ev < st[sid] or ev >= n:
            raise ValueError(f"storage {sid}: evict_after {ev} is before its producer ({int(st[sid])}) or past the step")
        acc = ix.accesses[sid]
        k = bisect.bisect_right(acc, ev)
        nd = acc[k] if k < len(acc) else None
        for u in ix.input_of.get(sid, ()):
            if u in effects and effects[u].fb > ev and (nd is None or effects[u].fb < nd):
                nd = effects[u].fb
        if nd is None:
            raise ValueError(f"storage {sid}: never accessed after evict_after {ev}; nothing to prefetch for")
        if not ev < pf <= nd:
            raise ValueError(f"storage {sid}: prefetch_at {pf} must be in ({ev}, {nd}] (first access after eviction)")
        if en[sid] <= ev:
            raise ValueError(f"storage {sid}: evict_after {ev} is not before its end of life {int(en[sid])}")
        need[sid] = nd
        items.append((ev, 5, sid, 0))
        items.append((pf, 0, sid, 0))
        wait_phase = 1 if (nd in fb_units and any(sid in ix.units[u].inputs for u in fb_units[nd])) else 3
        items.append((nd, wait_phase, sid, 0))
    for u, eff in effects.items():
        items.append((eff.fb, 2, u, 0))
    items.sort()

    # ---- timing
    C = ix.C
    dur = ix.dur
    X = 0.0
    extra_at: dict[int, float] = {}
    lane_free: dict[str, float] = {}
    lane_log: dict[str, list[tuple[float, float, float, int]]] = {}
    down_hops: dict[int, list[tuple[float, float]]] = {}
    up_hops: dict[int, list[tuple[float, float]]] = {}
    down_end: dict[int, float] = {}
    arrival: dict[int, float] = {}
    stalls: list[tuple[int, float]] = []
    recs: list[tuple[int, int, float]] = []
    rec_starts: list[tuple[float, float]] = []
    rec_time = 0.0
    stall_time = 0.0
    cur_ev = -1
    cursor = 0.0
    traffic = 0
    # compute seconds per byte for a copy between tier 0 and tier ti (every hop in between)
    host_cost = [sum(tiers[i].host_cost_per_byte for i in range(1, ti + 1)) for ti in range(len(tiers))]
    for ev, phase, key, _ in items:
        if ev != cur_ev:
            cur_ev = ev
            cursor = C[ev] + X
        if phase == 0:  # prefetch enqueue
            sid = key
            ti = offloads[sid][0]
            b = int(ix.nbytes[sid])
            t = max(cursor, down_end[sid])
            hops = []
            for i in range(ti, 0, -1):
                lane = tiers[i].name + ":read"
                s0 = max(t, lane_free.get(lane, 0.0))
                t = s0 + tiers[i].transfer_time(b, "read")
                lane_free[lane] = t
                lane_log.setdefault(lane, []).append((cursor, s0, t, b))
                hops.append((s0, t))
                traffic += b
            up_hops[sid] = hops  # order: deepest tier first
            arrival[sid] = t
            cpu = host_cost[ti] * b
            if cpu > 0:  # the copy runs on the compute cores: it delays compute (counted as stall)
                cursor += cpu
                X += cpu
                stall_time += cpu
                extra_at[ev] = extra_at.get(ev, 0.0) + cpu
        elif phase in (1, 3):  # wait for a prefetch
            a = arrival[key]
            if a > cursor:
                w = a - cursor
                cursor = a
                X += w
                stall_time += w
                extra_at[ev] = extra_at.get(ev, 0.0) + w
                if stalls and stalls[-1][0] == ev:
                    stalls[-1] = (ev, stalls[-1][1] + w)
                else:
                    stalls.append((ev, w))
        elif phase == 2:  # recompute
            r = effects[key].time
            cursor += r
            X += r
            rec_time += r
            extra_at[ev] = extra_at.get(ev, 0.0) + r
            recs.append((key, ev, r))
            rec_starts.append((cursor - r, r))
        else:  # phase 5: down enqueue at end of op ev
            sid = key
            ti = offloads[sid][0]
            b = int(ix.nbytes[sid])
            t_enq = cursor + dur[ev]
            t = t_enq
            hops = []
            for i in range(1, ti + 1):
                lane = tiers[i].name + ":write"
                s0 = max(t, lane_free.get(lane, 0.0))
                t = s0 + tiers[i].transfer_time(b, "write")
                lane_free[lane] = t
                lane_log.setdefault(lane, []).append((t_enq, s0, t, b))
                hops.append((s0, t))
                traffic += b
            down_hops[sid] = hops  # order: tier 1 first
            down_end[sid] = t
            cpu = host_cost[ti] * b
            if cpu > 0:  # the copy runs on the compute cores (see the prefetch case): later work moves
                cursor += cpu
                X += cpu
                stall_time += cpu
                extra_at[ev] = extra_at.get(ev, 0.0) + cpu

    if extra_at:
        ex = np.zeros(n, dtype=float)
        for e, v in extra_at.items():
            ex[e] = v
        event_start = C[:n] + np.concatenate([[0.0], np.cumsum(ex)[:-1]])
    else:
        event_start = C[:n].copy()
    step_time = float(C[n] + X)

    # ---- tier 0 intervals for offloaded storages
    down_done_event: dict[int, int] = {}
    for sid, (ti, ev, pf) in offloads.items():
        t1 = down_hops[sid][0][1]
        de = int(np.searchsorted(event_start, t1, "left")) - 1
        de = min(max(de, ev), n - 1)
        down_done_event[sid] = de
        if de < pf - 1:
            e_orig = int(en[sid])
            en[sid] = de
            extra_ids.append(sid)
            extra_s.append(pf)
            extra_e.append(max(e_orig, pf))
            extra_b.append(int(ix.nbytes[sid]))

    all_ids = np.arange(len(st), dtype=np.int64)
    if extra_ids:
        ids0 = np.concatenate([all_ids, np.array(extra_ids, dtype=np.int64)])
        st0 = np.concatenate([st, np.array(extra_s, dtype=np.int64)])
        en0 = np.concatenate([en, np.array(extra_e, dtype=np.int64)])
        b0 = np.concatenate([ix.nbytes, np.array(extra_b, dtype=np.int64)])
    else:
        ids0, st0, en0, b0 = all_ids, st, en, ix.nbytes
    # dropped storages' forward copy may end before... (already clamped); nothing else
    occ = [_occupancy(n, st0, en0, b0)]
    intervals = [(ids0, st0, en0, b0)]

    # ---- lower tiers
    per_tier: list[tuple[list[int], list[float], list[float], list[int]]] = [([], [], [], []) for _ in tiers]
    for sid, (ti, ev, pf) in offloads.items():
        b = int(ix.nbytes[sid])
        dh = down_hops[sid]  # dh[i-1] = hop into tier i
        uh = up_hops[sid]  # uh[0] = hop out of tier ti ... uh[-1] = hop out of tier 1
        for i in range(1, ti + 1):
            hop_out_up = uh[ti - i]
            ids, a_, b_, by = per_tier[i]
            if i == ti:
                ids.append(sid); a_.append(dh[i - 1][0]); b_.append(hop_out_up[1]); by.append(b)
            else:  # staging copies: down (into i .. out of i) and up (into i .. out of i)
                ids.append(sid); a_.append(dh[i - 1][0]); b_.append(dh[i][1]); by.append(b)
                hop_in_up = uh[ti - i - 1]
                ids.append(sid); a_.append(hop_in_up[0]); b_.append(hop_out_up[1]); by.append(b)
    for i in range(1, len(tiers)):
        ids, a_, b_, by = per_tier[i]
        if not ids:
            occ.append(np.zeros(n, dtype=np.int64))
            intervals.append((np.zeros(0, np.int64),) * 4)
            continue
        sa = np.searchsorted(event_start, np.array(a_), "right") - 1
        sb = np.searchsorted(event_start, np.array(b_), "left") - 1
        sa = np.clip(sa, 0, n - 1)
        sb = np.clip(np.maximum(sb, sa), 0, n - 1)
        arr_b = np.array(by, dtype=np.int64)
        occ.append(_occupancy(n, sa, sb, arr_b))
        intervals.append((np.array(ids, dtype=np.int64), sa, sb, arr_b))

    capacity = [int(budget)] + [int(t.capacity) for t in tiers[1:]]
    return _Result(step_time=step_time, recompute_time=rec_time, stall_time=stall_time, event_start=event_start,
                   occ=occ, capacity=capacity, intervals=intervals, stalls=stalls, recomputes=recs,
                   lane_log=lane_log, down_done_event=down_done_event, need=need, dropped=dropped, traffic=traffic,
                   recompute_starts=rec_starts, down_end=down_end)


def plan_to_dicts(plan: Plan, hierarchy: Hierarchy, trace: Trace | None = None) -> tuple[dict[int, Offload], dict[int, tuple[int, ...]]]:
    offloads: dict[int, Offload] = {}
    names = [t.name for t in hierarchy.tiers]
    for d in plan.storages:
        if trace is not None and not 0 <= d.storage < len(trace.storages):
            raise ValueError(f"plan names storage {d.storage}, which the trace does not have")
        if d.action == "keep":
            continue
        if d.storage in offloads:
            raise ValueError(f"storage {d.storage} has more than one decision")
        if d.tier not in names or names.index(d.tier) == 0:
            raise ValueError(f"storage {d.storage}: offload tier {d.tier!r} is not a lower tier of {names}")
        offloads[d.storage] = (names.index(d.tier), int(d.evict_after), int(d.prefetch_at))
    units: dict[int, tuple[int, ...]] = {}
    for u in plan.units:
        if trace is not None and not 0 <= u.unit < len(trace.units):
            raise ValueError(f"plan names unit {u.unit}, which the trace does not have")
        if u.unit in units:
            raise ValueError(f"unit {u.unit} has more than one decision")
        units[u.unit] = tuple(sorted(u.save_ops))
    return offloads, units


def _overflow_error(ix: TraceIndex, hierarchy: Hierarchy, res: _Result, tier: int, ev: int) -> InfeasiblePlanError:
    ids, s, e, b = res.intervals[tier]
    mask = (s <= ev) & (e >= ev)
    live: dict[int, int] = {}
    for sid, by in zip(ids[mask].tolist(), b[mask].tolist()):
        live[sid] = live.get(sid, 0) + by
    top = sorted(live.items(), key=lambda kv: -kv[1])[:5]
    parts = []
    for sid, by in top:
        if sid < 0:
            parts.append(f"recompute transient of unit {-1 - sid} ({format_size(by)})")
        else:
            st = ix.trace.storages[sid]
            parts.append(f"storage {sid} ({st.kind}, {format_size(by)}, from {st.module or '<top>'})")
    tname = hierarchy.tiers[tier].name
    occ, cap = int(res.occ[tier][ev]), res.capacity[tier]
    op = ix.trace.ops[ev].name
    msg = (f"tier {tname!r} overflows at event {ev} ({op}): {format_size(occ)} ({occ} bytes) live > capacity "
           f"{format_size(cap)} ({cap} bytes); {len(live)} storages live, largest: " + "; ".join(parts))
    return InfeasiblePlanError(msg, event=ev, op=op, tier=tname, occupancy=occ, capacity=cap, live=tuple(top))


def simulate(trace: Trace, plan: Plan, hierarchy: Hierarchy, *, check: bool = True) -> Timeline:
    """Replay `plan` on `trace` over `hierarchy` (tier-0 capacity = `plan.budget`); see [Note: simulation semantics].

    Raises ValueError for malformed plans and InfeasiblePlanError (when check) if a tier overflows.
    """
    ix = trace_index(trace)
    offloads, units = plan_to_dicts(plan, hierarchy, trace)
    res = run(ix, hierarchy, plan.budget, offloads, units)
    overflow = res.overflow()
    if check and overflow:
        raise _overflow_error(ix, hierarchy, res, *overflow[0])
    return _timeline(ix, hierarchy, res, overflow)


def _timeline(ix: TraceIndex, hierarchy: Hierarchy, res: _Result, overflow: list[tuple[int, int]]) -> Timeline:
    names = [t.name for t in hierarchy.tiers]
    n = ix.n
    es = res.event_start
    es.setflags(write=False)
    occupancy = {}
    peaks, peak_events = {}, {}
    for i, name in enumerate(names):
        o = res.occ[i]
        o.setflags(write=False)
        occupancy[name] = (es, o)
        peaks[name] = int(o.max()) if n else 0
        peak_events[name] = int(o.argmax()) if n else 0
    # compute lane busy: recompute segments and op executions, contiguous ones merged
    op_end = np.concatenate([es[1:], [res.step_time]])
    op_start = op_end - ix.dur
    segs = [(float(a), float(b)) for a, b in zip(op_start.tolist(), op_end.tolist())]
    segs += [(t0, t0 + r) for t0, r in res.recompute_starts]
    segs.sort()
    busy_c: list[tuple[float, float]] = []
    for a, b in segs:
        if busy_c and a - busy_c[-1][1] <= 1e-12 * max(1.0, abs(a)):
            busy_c[-1] = (busy_c[-1][0], max(b, busy_c[-1][1]))
        else:
            busy_c.append((a, b))
    busy = {"compute": tuple(busy_c)}
    moved = {}
    for lane, log in sorted(res.lane_log.items()):
        busy[lane] = tuple((s, e) for _, s, e, _ in log)
        moved[lane] = int(sum(b for *_, b in log))
    return Timeline(
        step_time=res.step_time, compute_time=ix.step_time, recompute_time=res.recompute_time,
        stall_time=res.stall_time, peaks=peaks, peak_events=peak_events, event_start=es, occupancy=occupancy,
        busy=busy, stalls=tuple(res.stalls), recomputes=tuple(res.recomputes), bytes_moved=moved,
        overflow=tuple((names[t], e, int(res.occ[t][e]), res.capacity[t]) for t, e in overflow),
    )
