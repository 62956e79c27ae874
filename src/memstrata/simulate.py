"""simulate — replay a `Plan` against a `Trace` on a `Hierarchy` -> `Timeline`.

The simulator is the single judge of a plan: the planners call it to price
their decisions, reports draw its timeline, and the runtime's measurements are
compared with it.  It is pure (no torch) and fast: O((ops + storages) log)
with numpy for the occupancy sweeps and a Python loop only over the *managed*
decisions, so a ResNet-50 trace (thousands of ops, ~2k storages) replays in a
few milliseconds.

>>> from memstrata.hardware import profile
>>> from memstrata.decisions import Plan
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
  Outputs of S ops are kept as in the unmanaged run and, where that run did
  not save them, held until fb (SAC caches them: [Note: SAC holds what it
  caches] in trace/index.py).  A storage that is
  produced inside a recomputed unit and has an offload decision is rejected
  (ValueError), as are recomputes of units with no backward.
* segment (`UnitDecision(u, save_ops, end_unit=v)`): exactly a recompute of
  the span u..v read as one unit (ops [u.first_op, v.last_op], packs
  [u.pack_start, v.pack_end), u's inputs, fb = the earliest first backward op
  of its members); `trace.index.segment_spans`.
* replay (`ReplayDecision(s, ops)`): s lives in the forward from its producer
  to its last forward access, is absent until its *replay event* R (its first
  backward read, or the replay event of a replay that reads it, whichever is
  earlier), and is live again from R to its original end.  The storages the
  replay holds (`DecisionSpace.replay_inputs`, not replayed themselves) live at
  least until R.  At R, before op R, the chain re-runs: eager, the sum of its
  ops' durations; with `Hierarchy.fused_replay` (a compiled, fused replay),
  one pass over the held inputs and the output at `fast_bandwidth` plus one
  `kernel_overhead`.  Its transient (every other storage the chain's ops write, also one that a run of its
  own replays: this run makes it afresh and drops it) is counted at R, less what op R itself allocates
  ([Note: a replay runs before its op]).  Replays with the same ops are one run ([Note: shared replays] in
  trace/space.py): at the earliest replay event of its members, priced once; every member lives from there.
  A sign replay ([Note: sign replays] in runtime/signs.py; `DecisionSpace.sign_replays`) runs no chain and holds
  nothing: its bits (one per element) live from its producer to R, with a transient of two bytes per element
  at the producer (the pack) and at R (the unpack); it costs twice its ReLU's time (a compare and bit-packing
  pass, a table lookup pass).

[Note: a replay runs before its op]
The unpack hook that runs a recipe fires when autograd's node first needs the saved tensor, before op R
allocates anything, so while the chain runs the live set is the occupancy at R less op R's own outputs.  The
largest transient at an event is therefore counted less the bytes op R makes (once per event; the others in
full).  Before, the transient left out the chain outputs that another replay regenerates (the stem
convolution's output inside the stem ReLU's chain, max-pool's output inside its indices' replay), which the
runtime does allocate: ResNet-18 b64 112 px, 49 MiB at the stem ReLU's replay.
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

import enum
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

from .decisions import Offload, Plan, PlanError
from .hardware import Hierarchy, format_size
from .trace.index import TraceIndex, UnitEffect, occupancy, trace_index
from .trace.schema import Trace
from .trace.space import decision_space, is_replayable_op
from .trace.params import param_stall_seconds
from .trace.states import placement_stall_seconds, planned_trace

__all__ = ["simulate", "Timeline", "InfeasiblePlanError", "SimResult", "Phase", "run", "try_run", "plan_to_dicts",
           "TraceIndex", "trace_index"]


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
    recomputes: tuple[tuple[int, int, float], ...]  # (span, event, seconds); a replay of storage s: span -1 - s
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
# Core
# --------------------------------------------------------------------------------------


@dataclass
class SimResult:
    """Raw simulation output of `run`: what planners read (the `Timeline` is its public, read-only view)."""

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
    replayed: dict[int, int] = field(default_factory=dict)  # replayed sid -> replay event

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


class Phase(enum.IntEnum):
    """What happens inside one event, in this order ([Note: simulation semantics], steps 1-6)."""

    PREFETCH = 0  # up-copies whose prefetch_at is this event are enqueued
    WAIT_FOR_RECOMPUTE = 1  # compute waits for prefetches a recompute at this event reads
    RECOMPUTE = 2  # units whose first backward op is this event are re-run
    WAIT_FOR_OP = 3  # compute waits for prefetches the op itself reads
    REPLAY = 4  # replays (op-level recompute) of storages first needed at this event re-run their chains
    EVICT = 5  # down-copies whose evict_after is this event are enqueued (at the op's end)


_Step = tuple[int, int, int]  # (event, Phase, storage id or unit index): plain tuples, sorted in the hot loop
_PREFETCH, _WAIT_RECOMPUTE, _RECOMPUTE, _WAIT_OP, _REPLAY, _EVICT = (int(p) for p in Phase)


@dataclass(frozen=True)
class ReplayEffect:
    """What replaying one storage does ([Note: simulation semantics], replay)."""

    storage: int
    event: int  # R: the replay runs before this op
    forward_end: int  # last forward access: the storage is freed after it
    time: float
    transient: int
    held: tuple[int, ...]  # storages the recipe holds until R (not replayed themselves)
    signs: int = 0  # a sign replay: bytes of its bits, live from the producer to R ([Note: sign replays])


def replay_time(ix: TraceIndex, hierarchy: Hierarchy, sid: int, chain: tuple[int, ...],
                also: tuple[int, ...] = (), sign: bool | None = None) -> float:
    """Seconds one replay of sid adds ([Note: simulation semantics], replay): its chain's ops eager, or one
    fused pass over what it reads and writes with `Hierarchy.fused_replay`.  `also`: the other storages the
    same run regenerates ([Note: shared replays] in trace/space.py); a fused pass writes them too.  `sign`: it
    runs as a sign replay (None: when it would on its own, `DecisionSpace.sign_replays`)."""
    if sign is None:
        sign = not also and bool(decision_space(ix.trace).sign_replays({sid: chain}))
    if sign:
        # [Note: sign replays]: a compare + bit-packing pass at the pack, a table lookup at the unpack: each
        # about one pass of the ReLU that made it (measured on the trace, so the box's bandwidth is in it)
        return 2.0 * float(ix.dur[ix.trace.storages[sid].producer])
    if hierarchy.fused_replay:
        # a heavy op of the chain (the stem convolution: [Note: replays from the batch] in trace/space.py) is
        # not fused: it costs what it cost in the forward, and the fused pass starts from its output
        ops = ix.trace.ops
        heavy = [j for j in chain if not is_replayable_op(ops[j].name)]
        cheap = [j for j in chain if j not in heavy]
        t = float(sum(ix.dur[j] for j in heavy)) + hierarchy.kernel_overhead * len(heavy)
        if not cheap:  # the heavy op alone (conv1's output from the batch): no fused pass
            return t
        space = decision_space(ix.trace)
        heavy_out = {o for j in heavy for o in ops[j].outputs}
        read = set(space.replay_inputs(sid)) & {x for j in cheap for x in ops[j].inputs}
        # the pass reads what it holds and the heavy ops' outputs, and writes every replayed storage it makes
        moved = sum(int(ix.nbytes[x]) for x in read | heavy_out) + sum(
            int(ix.nbytes[o]) for o in ({sid} | set(also)) - heavy_out)
        return t + moved / hierarchy.fast_bandwidth + hierarchy.kernel_overhead
    return float(sum(ix.dur[j] for j in chain))


def run_transient(ix: TraceIndex, ops: tuple[int, ...], members) -> int:
    """Bytes one run of `ops` holds beyond the storages it regenerates (`members`, live from the run on), at
    its worst step: the runtime drops a chain value after its last reader in the chain (`Recipe.materialize`),
    so at step k the run holds what earlier steps made that step k or a later one reads, and what step k makes
    ([Note: simulation semantics], replay)."""
    trace = ix.trace
    chain = set(ops)
    mset = set(members)
    made = [o for j in ops for o in dict.fromkeys(trace.ops[j].outputs) if trace.storages[o].producer == j]
    last_read = {o: max([j for j in ops if o in trace.ops[j].inputs or o in trace.ops[j].outputs], default=-1)
                 for o in made}
    total_members = sum(int(ix.nbytes[m]) for m in mset if trace.storages[m].producer in chain)
    worst = 0
    for j in ops:
        live = 0
        for o in made:
            p = trace.storages[o].producer
            if o in mset:
                live += int(ix.nbytes[o]) if p <= j else 0
            elif p <= j <= last_read[o]:
                live += int(ix.nbytes[o])
        worst = max(worst, live - total_members)
    return worst


def replay_effects(ix: TraceIndex, hierarchy: Hierarchy, replays: Mapping[int, tuple[int, ...]]
                   ) -> dict[int, ReplayEffect]:
    """Effects of legal replays (sid -> ops); the replay events propagate from readers to what they read.

    Replays with the same ops are one run ([Note: shared replays] in trace/space.py): before the earliest
    replay event of its members, priced once (on its host), holding what its chain holds; every member
    lives from there.  The run's transient is every other storage its ops write (also one replayed by a run
    of its own: this run makes it afresh and drops it)."""
    if not replays:
        return {}
    trace = ix.trace
    space = decision_space(trace)
    fe = trace.forward_end
    groups = space.replay_groups(replays)
    sign = space.sign_replays(replays)
    signs = {ops: members[0] for ops, members in groups.items() if len(members) == 1 and members[0] in sign}
    # a sign replay holds nothing but its bits ([Note: sign replays])
    held_of = {ops: () if ops in signs else space.replay_inputs(members[0]) for ops, members in groups.items()}
    R = {sid: min(trace.storages[sid].backward_reads) for sid in replays}
    E: dict[tuple[int, ...], int] = {}
    for ops in sorted(groups, key=lambda c: -c[-1]):  # readers are produced after what they read
        E[ops] = min(R[m] for m in groups[ops])
        for x in held_of[ops]:
            if x in R:
                R[x] = min(R[x], E[ops])
    transient = {ops: (sign_transient(ix, signs[ops]) if ops in signs else run_transient(ix, ops, members))
                 for ops, members in groups.items()}
    # [Note: a replay runs before its op]: op R's own outputs are not allocated while the chain runs; the
    # occupancy at R counts them, so the largest transient at R is counted less what op R makes (once per event)
    by_event: dict[int, list[tuple[int, ...]]] = {}
    for ops in groups:
        by_event.setdefault(E[ops], []).append(ops)
    for ev, runs in by_event.items():
        made = sum(int(ix.nbytes[o]) for o in trace.ops[ev].outputs if trace.storages[o].producer == ev)
        top = max(runs, key=lambda c: transient[c])
        transient[top] = max(0, transient[top] - made)
    out = {}
    for ops, members in groups.items():
        host = members[0]
        held = tuple(x for x in held_of[ops] if x not in replays)
        t = replay_time(ix, hierarchy, host, ops, also=tuple(members[1:]), sign=ops in signs)
        for m in members:
            fwd = [a for a in ix.accesses[m] if a <= fe]
            out[m] = ReplayEffect(m, E[ops], max(fwd) if fwd else int(ix.start[m]), t if m == host else 0.0,
                                  transient[ops] if m == host else 0, held,
                                  sign_bytes(ix, m) if ops in signs else 0)
    return out


def sign_bytes(ix: TraceIndex, sid: int) -> int:
    """Bytes a sign replay keeps for storage sid: one bit per element ([Note: sign replays])."""
    s = ix.trace.storages[sid]
    itemsize = int(np.dtype(s.dtype).itemsize) if s.dtype != "bfloat16" else 2
    return (int(ix.nbytes[sid]) // itemsize + 7) // 8


def sign_transient(ix: TraceIndex, sid: int) -> int:
    """A sign replay's pack and unpack each hold two bytes per element for a moment ([Note: sign replays])."""
    return 16 * sign_bytes(ix, sid)


@dataclass
class _Recompute:
    """Tier-0 life of every storage once recomputes are applied (before offloads)."""

    effects: dict[int, UnitEffect]
    dropped: dict[int, int]  # dropped sid -> unit
    fb_units: dict[int, list[int]]  # first backward event -> units recomputed there
    start: np.ndarray
    end: np.ndarray
    extra: list[tuple[int, int, int, int]] = field(default_factory=list)  # (id, start ev, end ev, bytes) second lives
    replays: dict[int, ReplayEffect] = field(default_factory=dict)


def _apply_replays(ix: TraceIndex, r: _Recompute) -> None:
    for sid, eff in r.replays.items():
        for x in eff.held:
            if r.end[x] < eff.event:
                r.end[x] = eff.event
    for sid, eff in r.replays.items():
        orig_end = int(r.end[sid])
        r.end[sid] = min(orig_end, eff.forward_end)
        if orig_end >= eff.event:
            r.extra.append((sid, eff.event, orig_end, int(ix.nbytes[sid])))
        if eff.transient:
            r.extra.append((-1 - len(ix.units) - sid, eff.event, eff.event, eff.transient))
        if eff.signs:  # the bits, from the pack to R; the pack's transient at the producer
            n = len(ix.trace.storages)
            p = int(ix.start[sid])
            r.extra.append((-1 - len(ix.units) - n - sid, p, eff.event, eff.signs))
            r.extra.append((-1 - len(ix.units) - 2 * n - sid, p, p, eff.transient))


def _apply_recomputes(ix: TraceIndex, effects: dict[int, UnitEffect]) -> _Recompute:
    dropped = {sid: u for u, eff in effects.items() for sid in eff.dropped}
    fb_units: dict[int, list[int]] = {}
    for u, eff in effects.items():
        fb_units.setdefault(eff.fb, []).append(u)
    r = _Recompute(effects, dropped, fb_units, ix.start.copy(), ix.end.copy())
    for u, eff in effects.items():  # inputs of recomputed units, and what SAC caches, live until fb
        for sid in (*ix.units[u].inputs, *eff.held):
            if r.end[sid] < eff.fb:
                r.end[sid] = eff.fb
    for sid, u in dropped.items():  # a dropped storage: forward life, then again from fb
        eff = effects[u]
        orig_end = int(r.end[sid])
        r.end[sid] = min(orig_end, eff.last_op)
        if orig_end >= eff.fb:
            r.extra.append((sid, eff.fb, orig_end, int(ix.nbytes[sid])))
    for u, eff in effects.items():  # the re-run's transient, at fb
        if eff.transient:
            r.extra.append((-1 - u, eff.fb, eff.fb, eff.transient))
    return r


def _steps(ix: TraceIndex, offloads: Mapping[int, Offload], needs: Mapping[int, int], rc: _Recompute) -> list[_Step]:
    """Every copy enqueue, wait and recompute as (event, phase, key), in execution order."""
    out: list[_Step] = []
    for sid, off in offloads.items():
        nd = needs[sid]
        out.append((off.evict_after, _EVICT, sid))
        out.append((off.prefetch_at, _PREFETCH, sid))
        read_by_recompute = nd in rc.fb_units and any(sid in ix.units[u].inputs for u in rc.fb_units[nd])
        out.append((nd, _WAIT_RECOMPUTE if read_by_recompute else _WAIT_OP, sid))
    for u, eff in rc.effects.items():
        out.append((eff.fb, _RECOMPUTE, u))
    for sid, reff in rc.replays.items():
        if reff.time > 0 or reff.transient:  # the other members of a shared run cost nothing of their own
            out.append((reff.event, _REPLAY, sid))
    out.sort()
    return out


class _Clock:
    """The compute lane and the copy lanes while the steps replay ([Note: simulation semantics], copy lanes)."""

    def __init__(self, ix: TraceIndex, hierarchy: Hierarchy) -> None:
        self.ix = ix
        self.tiers = hierarchy.tiers
        self.X = 0.0  # compute-lane time added so far (stalls, recomputes, CPU copy cost)
        self.cursor = 0.0
        self.extra_at: dict[int, float] = {}
        self.lane_free: dict[str, float] = {}
        self.lane_log: dict[str, list[tuple[float, float, float, int]]] = {}
        self.down_hops: dict[int, list[tuple[float, float]]] = {}
        self.up_hops: dict[int, list[tuple[float, float]]] = {}
        self.down_end: dict[int, float] = {}
        self.arrival: dict[int, float] = {}
        self.stalls: list[tuple[int, float]] = []
        self.recs: list[tuple[int, int, float]] = []
        self.rec_starts: list[tuple[float, float]] = []
        self.rec_time = 0.0
        self.stall_time = 0.0
        self.traffic = 0
        # compute seconds per byte for a copy between tier 0 and tier ti (every hop in between)
        self.host_cost = [sum(self.tiers[i].host_cost_per_byte for i in range(1, ti + 1))
                          for ti in range(len(self.tiers))]

    def _compute(self, ev: int, seconds: float) -> None:
        self.cursor += seconds
        self.X += seconds
        self.extra_at[ev] = self.extra_at.get(ev, 0.0) + seconds

    def _hops(self, sid: int, t: float, t_enq: float, tier_range, direction: str) -> tuple[float, list]:
        b = int(self.ix.nbytes[sid])
        hops = []
        for i in tier_range:
            lane = f"{self.tiers[i].name}:{direction}"
            s0 = max(t, self.lane_free.get(lane, 0.0))
            t = s0 + self.tiers[i].transfer_time(b, direction)
            self.lane_free[lane] = t
            self.lane_log.setdefault(lane, []).append((t_enq, s0, t, b))
            hops.append((s0, t))
            self.traffic += b
        return t, hops

    def _copy_cpu_cost(self, ev: int, ti: int, sid: int) -> None:
        cpu = self.host_cost[ti] * int(self.ix.nbytes[sid])
        if cpu > 0:  # the copy runs on the compute cores: it delays compute (counted as stall)
            self._compute(ev, cpu)
            self.stall_time += cpu

    def prefetch(self, ev: int, sid: int, ti: int) -> None:
        t, hops = self._hops(sid, max(self.cursor, self.down_end[sid]), self.cursor, range(ti, 0, -1), "read")
        self.up_hops[sid] = hops  # order: deepest tier first
        self.arrival[sid] = t
        self._copy_cpu_cost(ev, ti, sid)

    def wait(self, ev: int, sid: int) -> None:
        a = self.arrival[sid]
        if a > self.cursor:
            w = a - self.cursor
            self._compute(ev, w)
            self.stall_time += w
            if self.stalls and self.stalls[-1][0] == ev:
                self.stalls[-1] = (ev, self.stalls[-1][1] + w)
            else:
                self.stalls.append((ev, w))

    def recompute(self, ev: int, u: int, seconds: float) -> None:
        self._compute(ev, seconds)
        self.rec_time += seconds
        self.recs.append((u, ev, seconds))
        self.rec_starts.append((self.cursor - seconds, seconds))

    def evict(self, ev: int, sid: int, ti: int) -> None:
        t_enq = self.cursor + self.ix.dur[ev]
        t, hops = self._hops(sid, t_enq, t_enq, range(1, ti + 1), "write")
        self.down_hops[sid] = hops  # order: tier 1 first
        self.down_end[sid] = t
        self._copy_cpu_cost(ev, ti, sid)

    def event_start(self) -> np.ndarray:
        n, C = self.ix.n, self.ix.C
        if not self.extra_at:
            return C[:n].copy()
        ex = np.zeros(n, dtype=float)
        for e, v in self.extra_at.items():
            ex[e] = v
        return C[:n] + np.concatenate([[0.0], np.cumsum(ex)[:-1]])


def _replay(ix: TraceIndex, hierarchy: Hierarchy, offloads: Mapping[int, Offload], rc: _Recompute,
            steps: list[_Step]) -> _Clock:
    clock = _Clock(ix, hierarchy)
    cur_ev = -1
    for ev, phase, key in steps:
        if ev != cur_ev:
            cur_ev = ev
            clock.cursor = ix.C[ev] + clock.X
        if phase == _PREFETCH:
            clock.prefetch(ev, key, offloads[key].tier)
        elif phase == _WAIT_RECOMPUTE or phase == _WAIT_OP:
            clock.wait(ev, key)
        elif phase == _RECOMPUTE:
            clock.recompute(ev, key, rc.effects[key].time)
        elif phase == _REPLAY:
            clock.recompute(ev, -1 - key, rc.replays[key].time)
        else:
            clock.evict(ev, key, offloads[key].tier)
    return clock


def _tier0_intervals(ix: TraceIndex, offloads: Mapping[int, Offload], rc: _Recompute, clock: _Clock,
                     event_start: np.ndarray) -> tuple[tuple[np.ndarray, ...], dict[int, int]]:
    """Tier-0 (id, start, end, bytes) intervals with offloads applied; and each offload's down-done event."""
    n = ix.n
    st, en = rc.start, rc.end
    extra = list(rc.extra)
    down_done_event: dict[int, int] = {}
    for sid, (ti, ev, pf) in offloads.items():
        t1 = clock.down_hops[sid][0][1]
        de = int(np.searchsorted(event_start, t1, "left")) - 1
        de = min(max(de, ev), n - 1)
        down_done_event[sid] = de
        if de < pf - 1:  # freed between the landing of the copy down and the prefetch
            e_orig = int(en[sid])
            en[sid] = de
            extra.append((sid, pf, max(e_orig, pf), int(ix.nbytes[sid])))
    ids = np.arange(len(st), dtype=np.int64)
    if extra:
        ex = np.array(extra, dtype=np.int64)
        return (np.concatenate([ids, ex[:, 0]]), np.concatenate([st, ex[:, 1]]), np.concatenate([en, ex[:, 2]]),
                np.concatenate([ix.nbytes, ex[:, 3]])), down_done_event
    return (ids, st, en, ix.nbytes), down_done_event


def _lower_tier_intervals(ix: TraceIndex, hierarchy: Hierarchy, offloads: Mapping[int, Offload], clock: _Clock,
                          event_start: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Per lower tier (index 1..), (id, start ev, end ev, bytes): held copies and staging copies."""
    n = ix.n
    tiers = hierarchy.tiers
    per_tier: list[tuple[list[int], list[float], list[float], list[int]]] = [([], [], [], []) for _ in tiers]
    for sid, (ti, ev, pf) in offloads.items():
        b = int(ix.nbytes[sid])
        dh = clock.down_hops[sid]  # dh[i-1] = hop into tier i
        uh = clock.up_hops[sid]  # uh[0] = hop out of tier ti ... uh[-1] = hop out of tier 1
        for i in range(1, ti + 1):
            hop_out_up = uh[ti - i]
            ids, a_, b_, by = per_tier[i]
            if i == ti:
                ids.append(sid); a_.append(dh[i - 1][0]); b_.append(hop_out_up[1]); by.append(b)
            else:  # staging copies: down (into i .. out of i) and up (into i .. out of i)
                ids.append(sid); a_.append(dh[i - 1][0]); b_.append(dh[i][1]); by.append(b)
                hop_in_up = uh[ti - i - 1]
                ids.append(sid); a_.append(hop_in_up[0]); b_.append(hop_out_up[1]); by.append(b)
    out = []
    for i in range(1, len(tiers)):
        ids, a_, b_, by = per_tier[i]
        if not ids:
            out.append((np.zeros(0, np.int64),) * 4)
            continue
        sa = np.searchsorted(event_start, np.array(a_), "right") - 1
        sb = np.searchsorted(event_start, np.array(b_), "left") - 1
        sa = np.clip(sa, 0, n - 1)
        sb = np.clip(np.maximum(sb, sa), 0, n - 1)
        out.append((np.array(ids, dtype=np.int64), sa, sb, np.array(by, dtype=np.int64)))
    return out


def try_run(ix: TraceIndex, hierarchy: Hierarchy, budget: int, offloads: Mapping[int, Offload],
            units: Mapping[int, tuple[int, ...]], replays: Mapping[int, tuple[int, ...]] | None = None
            ) -> SimResult | None:
    """`run`, but None for decisions outside the decision space (for planners exploring states)."""
    return _run(ix, hierarchy, budget, offloads, units, replays, strict=False)


def run(ix: TraceIndex, hierarchy: Hierarchy, budget: int, offloads: Mapping[int, Offload],
        units: Mapping[int, tuple[int, ...]], replays: Mapping[int, tuple[int, ...]] | None = None) -> SimResult:
    """Simulate decisions given as plain dicts (sid -> Offload, span -> save_ops, sid -> replay chain).

    No capacity check.  Raises `PlanError` for decisions outside the decision space (trace/space.py).
    """
    res = _run(ix, hierarchy, budget, offloads, units, replays, strict=True)
    assert res is not None
    return res


def _run(ix: TraceIndex, hierarchy: Hierarchy, budget: int, offloads: Mapping[int, Offload],
         units: Mapping[int, tuple[int, ...]], replays: Mapping[int, tuple[int, ...]] | None, *,
         strict: bool) -> SimResult | None:
    effects, needs, problem = decision_space(ix.trace).resolve(hierarchy, offloads, units, replays)
    if problem:
        if strict:
            raise PlanError(problem)
        return None
    # Offloads to tier 0 (the host pool of a CPU hierarchy) copy within tier 0: they free nothing and cost nothing
    # the model sees, so they are simulated as keeps.
    moving = {sid: (o if type(o) is Offload else Offload(*o)) for sid, o in offloads.items() if o[0] >= 1}
    needs = {sid: needs[sid] for sid in moving}
    rc = _apply_recomputes(ix, effects)
    if replays:
        rc.replays = replay_effects(ix, hierarchy, replays)
        _apply_replays(ix, rc)
    clock = _replay(ix, hierarchy, moving, rc, _steps(ix, moving, needs, rc))
    event_start = clock.event_start()
    t0, down_done_event = _tier0_intervals(ix, moving, rc, clock, event_start)
    intervals = [t0] + _lower_tier_intervals(ix, hierarchy, moving, clock, event_start)
    occ = [occupancy(ix.n, s, e, b) if len(ids) else np.zeros(ix.n, dtype=np.int64) for ids, s, e, b in intervals]
    capacity = [int(budget)] + [int(t.capacity) for t in hierarchy.tiers[1:]]
    return SimResult(step_time=float(ix.C[ix.n] + clock.X), recompute_time=clock.rec_time,
                     stall_time=clock.stall_time, event_start=event_start, occ=occ, capacity=capacity,
                     intervals=intervals, stalls=clock.stalls, recomputes=clock.recs, lane_log=clock.lane_log,
                     down_done_event=down_done_event, need=needs, dropped=rc.dropped, traffic=clock.traffic,
                     recompute_starts=clock.rec_starts, down_end=clock.down_end,
                     replayed={sid: e.event for sid, e in rc.replays.items()})

def plan_to_dicts(plan: Plan, hierarchy: Hierarchy, trace: Trace) -> tuple[dict[int, Offload], dict[int, tuple[int, ...]]]:
    """(sid -> Offload, unit -> save_ops) of a plan, checked against the decision space (`PlanError`)."""
    return decision_space(trace).decisions_of(plan, hierarchy)


def _overflow_error(ix: TraceIndex, hierarchy: Hierarchy, res: SimResult, tier: int, ev: int) -> InfeasiblePlanError:
    ids, s, e, b = res.intervals[tier]
    mask = (s <= ev) & (e >= ev)
    live: dict[int, int] = {}
    for sid, by in zip(ids[mask].tolist(), b[mask].tolist()):
        live[sid] = live.get(sid, 0) + by
    top = sorted(live.items(), key=lambda kv: -kv[1])[:5]
    parts = []
    for sid, by in top:
        if sid < -len(ix.units):
            parts.append(f"replay transient of storage {-1 - len(ix.units) - sid} ({format_size(by)})")
        elif sid < 0:
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
    A plan with optimizer-state decisions is replayed on the trace as tier 0 sees it under them, and its
    step time includes their exposed I/O ([Note: optimizer states as trace records] in trace/states.py).
    """
    if plan.states or plan.params:
        stall, _ = placement_stall_seconds(trace, hierarchy, plan.states)  # states and gradients
        stall += param_stall_seconds(hierarchy, plan.params)[0]  # parameters ([Note: parameters in the plan])
        tl = simulate(planned_trace(trace, plan, hierarchy), replace(plan, states=(), params=()), hierarchy,
                      check=check)
        return replace(tl, step_time=tl.step_time + stall, stall_time=tl.stall_time + stall)
    ix = trace_index(trace)
    offloads, units = plan_to_dicts(plan, hierarchy, trace)
    res = run(ix, hierarchy, plan.budget, offloads, units, decision_space(trace).replays_of(plan))
    overflow = res.overflow()
    if check and overflow:
        raise _overflow_error(ix, hierarchy, res, *overflow[0])
    return _timeline(ix, hierarchy, res, overflow)


def _timeline(ix: TraceIndex, hierarchy: Hierarchy, res: SimResult, overflow: list[tuple[int, int]]) -> Timeline:
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
