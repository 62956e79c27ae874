"""Optimizer states as trace records: grouped per parameter, bucketed, and tiered in a derived trace.

Plain data in, plain data out (no torch objects): the joint planner
(plan/joint.py) and the simulator read a trace's optimizer states through
these functions, the Manager appends them to a measured trace that did not
see the optimizer step.

[Note: optimizer states as trace records]
* A state record is a storage of kind "optimizer_state" with `param_index`
  set: the optimizer's index of its parameter (state_dict order).  The tracer
  sets it when the optimizer step runs inside the traced step (`trace_step`
  with an optimizer, every `trace_model` trace); `with_optimizer_phase` adds
  the records and one optimizer op to a trace of forward + backward only
  (the Manager's measured trace: the user steps the optimizer after the
  `with mgr.step()` block), with the measured optimizer-step time.
* Tier-0 occupancy under a state placement (`tier_states`): a tiered state
  is not in tier 0 between steps, so its record becomes never-live; in its
  place one "state window" record is live over the optimizer phase, sized
  like the runtime's window ([Note: the state window] in runtime/states.py:
  while bucket k steps, k+1 is being read and k-1 written: the largest sum
  of three consecutive tiered buckets, two where the write is a host copy
  that completes in the step), and a write-behind record of the last two
  NVMe buckets is live at the step's first event (their writes overlap the
  next forward).  Kept states are untouched.  Storage ids do not change (the new
  records are appended), so activation decisions mean the same storages.
* Time (`state_stall_seconds`): each tiered bucket is read once before its
  update and written once after it; the I/O of a tier adds up
  (bytes/read_bw + bytes/write_bw + 2 x latency per bucket; on a CPU
  hierarchy a copy "to" tier 0 is a host-buffer copy at tier 0's
  bandwidth) and overlaps the optimizer step's own compute (the optimizer
  ops' durations): stall = max(0, io - step compute), plus the CPU cost of
  the disk path (`host_cost_per_byte`, unhidden) and a per-bucket launch
  overhead.  A perfect pipeline, so a lower bound, as in plan/states.py.
* Deferred updates below a device (`deferred_forward_seconds`): on a device
  hierarchy with every gradient kept, the runtime applies the moved buckets'
  updates in the next forward, read ahead and written behind on the copy
  streams ([Note: deferred host buckets] in runtime/deferred.py), so their
  copies overlap the forward's compute too: the stall above is taken against
  the optimizer compute *plus* the forward's (as plan/states.py prices the
  NVMe ring's deferral window with ``forward_seconds``).  Memory: the
  forward then holds a moving window of the bucket being updated and the one
  read ahead: one more record, the largest two consecutive moved buckets,
  live over the whole forward (an over-estimate at the forward's end, where
  nothing is read ahead any more).  A CPU hierarchy (host RAM is tier 0) is
  priced as before: its NVMe ring's deferral is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..decisions import ParamDecision, Plan, StateDecision
from ..hardware import Hierarchy
from .grads import GRAD_WINDOW_MODULE, all_keep_peak, grad_stall_seconds, host_step, tier_grads
from .params import param_groups, tier_params
from .schema import OpRecord, StorageRecord, Trace

__all__ = ["StateGroup", "state_groups", "state_buckets", "optimizer_span", "with_optimizer_phase", "tier_states",
           "state_stall_seconds", "planned_trace", "moved_state_bytes", "placement_stall_seconds",
           "defers_updates", "deferred_forward_seconds",
           "STATE_WINDOW_MODULE", "PER_BUCKET_SECONDS", "MAX_STATE_BUCKET_BYTES"]

WRITE_BEHIND = 2  # buckets whose writes overlap the next forward
PER_BUCKET_SECONDS = 50e-6  # Python / launch overhead of one bucket's step (as plan/states.py)
MAX_STATE_BUCKET_BYTES = 64 * 1024 * 1024
STATE_WINDOW_MODULE = "<optimizer state window>"  # the module name of tier_states' window records
MIN_BUCKETS = 16  # state buckets at least (when there are that many parameters): a small window


@dataclass(frozen=True)
class StateGroup:
    """The optimizer states of one parameter (or one state record whose parameter is unknown)."""

    param: int | None  # the optimizer's parameter index
    storages: tuple[int, ...]
    nbytes: int


def state_groups(trace: Trace) -> tuple[StateGroup, ...]:
    """Optimizer-state records grouped by parameter, in parameter order (unknown parameters last, one each)."""
    by: dict[int, list[StorageRecord]] = {}
    loose: list[StorageRecord] = []
    for s in trace.storages:
        if s.kind != "optimizer_state" or s.nbytes <= 0 or not s.shape:
            continue
        if s.freed_after is not None and s.freed_after < (s.producer or 0):
            continue  # never live
        if s.param_index is None:
            loose.append(s)
        else:
            by.setdefault(s.param_index, []).append(s)
    out = [StateGroup(p, tuple(r.id for r in rs), sum(r.nbytes for r in rs)) for p, rs in sorted(by.items())]
    out += [StateGroup(None, (s.id,), s.nbytes) for s in loose]
    return tuple(out)


def state_buckets(trace: Trace, bucket_bytes: int | None = None) -> tuple[tuple[StateGroup, ...], ...]:
    """Consecutive groups of about `bucket_bytes` state bytes (default: total / 16, at most 64 MiB)."""
    groups = state_groups(trace)
    total = sum(g.nbytes for g in groups)
    if bucket_bytes is None:
        bucket_bytes = max(1, min(MAX_STATE_BUCKET_BYTES, total // MIN_BUCKETS))
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    out: list[tuple[StateGroup, ...]] = []
    cur: list[StateGroup] = []
    acc = 0
    for g in groups:
        if cur and acc + g.nbytes > bucket_bytes:
            out.append(tuple(cur))
            cur, acc = [], 0
        cur.append(g)
        acc += g.nbytes
    if cur:
        out.append(tuple(cur))
    return tuple(out)


def optimizer_span(trace: Trace) -> tuple[int, int] | None:
    """(first, last) event of the optimizer phase, or None when the trace has none."""
    idx = [op.index for op in trace.ops if op.phase == "optimizer"]
    return (idx[0], idx[-1]) if idx else None


def with_optimizer_phase(trace: Trace, state_bytes: Sequence[Sequence[int]], step_seconds: float,
                         dtypes: Sequence[str] | None = None) -> Trace:
    """`trace` with one optimizer op appended and a state record per state tensor ([Note: optimizer states ...]).

    `state_bytes[i]`: bytes of each tensor state of parameter i (optimizer order); `step_seconds`: the
    optimizer step's time.  A trace that already has optimizer-state records is returned as it is.
    """
    if any(s.kind == "optimizer_state" for s in trace.storages):
        return trace
    if step_seconds < 0:
        raise ValueError(f"step_seconds must be >= 0, got {step_seconds}")
    n = len(trace.ops)
    sid = len(trace.storages)
    new: list[StorageRecord] = []
    for i, sizes in enumerate(state_bytes):
        dt = dtypes[i] if dtypes is not None else "float32"
        for b in sizes:
            if b <= 0:
                continue
            new.append(StorageRecord(id=sid, nbytes=int(b), dtype=dt, shape=(int(b),), kind="optimizer_state",
                                     producer=None, last_use=n, persistent=True, param_index=i))
            sid += 1
    if not new:
        return trace
    ids = tuple(s.id for s in new)
    total = sum(s.nbytes for s in new)
    op = OpRecord(index=n, name="memstrata.optimizer_step", phase="optimizer", module="", unit=None, flops=0.0,
                  bytes_accessed=float(3 * total), duration=float(step_seconds), inputs=ids, outputs=ids)
    return replace(trace, ops=trace.ops + (op,), storages=trace.storages + tuple(new),
                   observed_peak=int(trace.observed_peak) + total)


def tier_states(trace: Trace, tiered: Sequence[Sequence[int]], *,
                written_behind: Sequence[bool] | None = None, window_bytes: Sequence[int] | None = None) -> Trace:
    """The trace as tier 0 sees it when the buckets `tiered` (storage ids, stepping order) live below.

    `written_behind[i]`: bucket i's write finishes asynchronously (NVMe; default True for all); a host
    copy is complete when the bucket's step ends.  `window_bytes[i]`: what bucket i brings into tier 0
    for its update (default: its states; plus its gradients, or 0 for a host step: trace/grads.py).
    """
    keep_b = [i for i, b in enumerate(tiered) if b]
    buckets = [tuple(tiered[i]) for i in keep_b]
    if not buckets:
        return trace
    behind = [True] * len(buckets) if written_behind is None else [bool(written_behind[i]) for i in keep_b]
    span = optimizer_span(trace)
    if span is None:
        raise ValueError("tier_states: the trace has no optimizer phase (trace the optimizer step, or "
                         "with_optimizer_phase)")
    sts = list(trace.storages)
    sizes = []
    for b in buckets:
        acc = 0
        for sid in b:
            s = sts[sid]
            if s.kind != "optimizer_state":
                raise ValueError(f"tier_states: storage {sid} is a {s.kind}, not an optimizer state")
            acc += s.nbytes
            sts[sid] = replace(s, freed_after=(s.producer or 0) - 1, persistent=False)  # never on tier 0
        sizes.append(acc)
    if window_bytes is not None:
        sizes = [int(window_bytes[i]) for i in keep_b]
    # [Note: the state window] in runtime/states.py: while bucket k steps, k+1 is read and k-1 written.
    win = max(sum(sizes[max(0, k - 1): k + 2]) if behind[max(0, k - 1)] or k == 0 else sum(sizes[k: k + 2])
              for k in range(len(sizes)))
    tail = sum(sz for sz, w in list(zip(sizes, behind))[-WRITE_BEHIND:] if w)
    nid = len(sts)
    sts.append(StorageRecord(id=nid, nbytes=win, dtype="uint8", shape=(win,), kind="optimizer_state",
                             producer=span[0], last_use=span[1], freed_after=span[1], module=STATE_WINDOW_MODULE))
    if tail:
        sts.append(StorageRecord(id=nid + 1, nbytes=tail, dtype="uint8", shape=(tail,), kind="temporary",
                                 producer=None, last_use=0, freed_after=0, module=STATE_WINDOW_MODULE))
    out = replace(trace, storages=tuple(sts))
    return replace(out, observed_peak=all_keep_peak(out))


def state_stall_seconds(trace: Trace, hierarchy: Hierarchy, buckets: Sequence[tuple[int, int]],
                        forward_seconds: float = 0.0) -> tuple[float, float]:
    """(exposed seconds, I/O seconds) of tiered state buckets given as (tier index, bytes) pairs.

    Tier index 0 is a host-buffer copy on a CPU hierarchy (tier 0's bandwidth both ways).  `forward_seconds`:
    the forward's compute when the updates are deferred to it (`deferred_forward_seconds`).
    """
    compute = float(sum(op.duration for op in trace.ops if op.phase == "optimizer")) + forward_seconds
    io = host = 0.0
    for ti, nb in buckets:
        if ti == 0:
            io += 2 * nb / hierarchy.fast_bandwidth
            continue
        t = hierarchy.tiers[ti]
        io += nb / t.read_bandwidth + nb / t.write_bandwidth + 2 * t.latency
        host += 2 * nb * t.host_cost_per_byte
    over = PER_BUCKET_SECONDS * len(buckets)
    return max(0.0, io - compute) + host + over, io


def planned_trace(trace: Trace, states: "Plan | Sequence[StateDecision]", hierarchy: Hierarchy,
                  params: "Sequence[ParamDecision]" = ()) -> Trace:
    """The trace as tier 0 sees it under a plan's state, gradient and parameter decisions (what its activation
    half was planned on).  `params`: parameter decisions when `states` is a sequence (a Plan brings its own)."""
    decisions = states.states if isinstance(states, Plan) else tuple(states)
    pdecs = states.params if isinstance(states, Plan) else tuple(params)
    names = [t.name for t in hierarchy.tiers]
    if pdecs:  # [Note: parameters in the plan] (trace/params.py): tiered parameters are resident only when used
        for pd in pdecs:
            if pd.tier not in names or names.index(pd.tier) < 1:
                raise ValueError(f"parameters of {pd.module!r}: {pd.tier!r} is not a lower tier of {hierarchy.name!r}")
        by = {g.module: g for g in param_groups(trace)}
        missing = [pd.module for pd in pdecs if pd.module not in by]
        if missing:
            raise ValueError(f"parameters of {missing[0]!r} cannot be tiered in this trace (not a tierable module)")
        trace = tier_params(trace, [by[pd.module] for pd in pdecs])
    for d in decisions:
        if d.tier is not None and d.tier not in names:
            raise ValueError(f"state bucket {d.params}: unknown tier {d.tier!r}; hierarchy {hierarchy.name!r} has {names}")
    for d in decisions:
        if d.grads is not None and d.grads not in names:
            raise ValueError(f"gradient bucket {d.params}: unknown tier {d.grads!r}; hierarchy {hierarchy.name!r} "
                             f"has {names}")
    # [Note: gradients in the plan] (trace/grads.py): tiered gradients leave tier 0 when final
    if not decisions:
        return trace
    trace = tier_grads(trace, [s for d in decisions if d.grads is not None for s in d.grad_storages])
    moved = [d for d in decisions if d.tier is not None and names.index(d.tier) >= 1]
    window = [0 if host_step(hierarchy, d) else d.nbytes + (d.grad_nbytes if d.grads is not None else 0)
              for d in moved]
    out = tier_states(trace, [d.storages for d in moved],
                      written_behind=[hierarchy.tiers[names.index(d.tier)].kind == "nvme" for d in moved],
                      window_bytes=window if any(d.grads is not None for d in moved) else None)
    if defers_updates(hierarchy, decisions) and moved:  # [Note: deferred host buckets]: a window in the forward
        out = _deferred_window(out, [d.nbytes for d in moved])
    back = sum(d.grad_nbytes for d in decisions if d.grads is not None and (d.tier is None or names.index(d.tier) < 1))
    span = optimizer_span(out)
    if back and span is not None:  # gradients of kept-state buckets come back for the kept step
        nid = len(out.storages)
        rec = StorageRecord(id=nid, nbytes=back, dtype="uint8", shape=(back,), kind="gradient", producer=span[0],
                            last_use=span[1], freed_after=span[1], module=GRAD_WINDOW_MODULE)
        out = replace(out, storages=out.storages + (rec,))
        out = replace(out, observed_peak=all_keep_peak(out))
    return out


def defers_updates(hierarchy: Hierarchy, decisions: Sequence[StateDecision]) -> bool:
    """Whether the runtime defers the moved buckets' updates to the next forward under `decisions`, as this
    module prices it ([Note: optimizer states as trace records]): below a device, every gradient kept."""
    return (not hierarchy.host_is_tier0 and all(d.grads is None for d in decisions)
            and any(d.tier is not None for d in decisions))


def deferred_forward_seconds(trace: Trace, hierarchy: Hierarchy, decisions: Sequence[StateDecision]) -> float:
    """The forward's compute that also hides the state copies when the updates are deferred to it (else 0)."""
    if not defers_updates(hierarchy, decisions):
        return 0.0
    return float(sum(op.duration for op in trace.ops if op.phase == "forward"))


def _deferred_window(trace: Trace, sizes: Sequence[int]) -> Trace:
    """One record live over the forward: the largest two consecutive moved buckets (updated + read ahead)."""
    fwd = [op.index for op in trace.ops if op.phase == "forward"]
    win = max((sum(sizes[k:k + 2]) for k in range(len(sizes))), default=0)
    if not fwd or not win:
        return trace
    rec = StorageRecord(id=len(trace.storages), nbytes=win, dtype="uint8", shape=(win,), kind="optimizer_state",
                        producer=fwd[0], last_use=fwd[-1], freed_after=fwd[-1], module=STATE_WINDOW_MODULE)
    out = replace(trace, storages=trace.storages + (rec,))
    return replace(out, observed_peak=all_keep_peak(out))


def moved_state_bytes(hierarchy: Hierarchy, decisions: Sequence[StateDecision]) -> list[tuple[int, int]]:
    """(tier index, bytes) of the state buckets whose states cross into tier 0 and back for their update."""
    names = [t.name for t in hierarchy.tiers]
    return [(names.index(d.tier), d.nbytes) for d in decisions if d.tier is not None
            and not host_step(hierarchy, d)]  # a host step over host-resident states moves nothing


def placement_stall_seconds(trace: Trace, hierarchy: Hierarchy,
                            decisions: Sequence[StateDecision]) -> tuple[float, float]:
    """(exposed seconds, I/O seconds) of a placement of states and gradients (the joint plan's time term)."""
    stall, io = state_stall_seconds(trace, hierarchy, moved_state_bytes(hierarchy, decisions),
                                    deferred_forward_seconds(trace, hierarchy, decisions))
    gstall, gio, _ = grad_stall_seconds(trace, hierarchy, decisions)
    return stall + gstall, io + gio
