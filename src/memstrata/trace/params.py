"""Parameters as trace records: grouped per module, with the windows in which the runtime holds them.

Plain data in, plain data out, like trace/states.py and trace/grads.py.

[Note: parameters in the plan]
* A parameter group is the parameter storages of one module the runtime can
  tier (`Trace.param_modules`, [Note: which modules' parameters may be
  tiered] in trace/param_modules.py): one record per managed thing, the
  module.  A module qualifies here too only if every forward op that reads
  its parameters runs inside it (a weight used elsewhere, e.g. tied or read
  by the loss, is not tiered).
* A tiered group is in tier 0 only while the runtime holds it
  (runtime/params.py), three windows per step:
  - from the step's start to the module's last forward op (the parameters are
    resident between steps; the forward hook writes them down if the
    optimizer changed them, then releases them);
  - its backward: from the earliest of its first backward read and the first
    backward op of any unit or segment containing its forward ops (a
    recompute re-runs the module's forward there and fetches them) to the
    later of its last backward read and the backward ops that make its
    parameters' gradients (the autograd node is one, the runtime releases
    after it);
  - from the end of backward on (fetched when the step's block exits, so the
    optimizer step, clipping and everything outside the step see them).
  `tier_params` turns the group's records never-live and appends one record
  per window (kind "parameter"); storage ids do not change.  A replay may not
  read a tiered parameter (trace/space.py): its recipe would run in another
  module's backward, where the parameter is not resident.
* Time (`param_stall_seconds`): per step and group one write down (the
  optimizer changed them) and two reads up (backward, step end), at the lower
  tier's bandwidths plus its latency and host cost per byte; the runtime does
  them synchronously, so all of it is exposed (no overlap is claimed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Sequence

from ..hardware import Hierarchy
from .grads import all_keep_peak
from .index import segment_spans
from .schema import StorageRecord, Trace

if TYPE_CHECKING:  # pragma: no cover
    from ..decisions import ParamDecision

__all__ = ["ParamGroup", "param_groups", "tier_params", "param_stall_seconds", "PARAM_WINDOW_MODULE"]

PARAM_WINDOW_MODULE = " (resident)"  # suffix of the module name of tier_params' window records


@dataclass(frozen=True)
class ParamGroup:
    """The parameters of one module and the events between which the runtime holds them when tiered."""

    module: str
    storages: tuple[int, ...]
    nbytes: int
    forward_end: int  # the module's last forward op (released after it)
    backward: tuple[int, int]  # (first, last) event of its backward window


def _live(s: StorageRecord) -> bool:
    return s.nbytes > 0 and not (s.freed_after is not None and s.freed_after < (s.producer or 0))


def param_groups(trace: Trace) -> tuple[ParamGroup, ...]:
    """The tierable parameter groups of `trace`, in module order ([Note: parameters in the plan])."""
    mods = set(trace.param_modules)
    if not mods:
        return ()
    by: dict[str, list[StorageRecord]] = {}
    for s in trace.storages:
        if s.kind == "parameter" and s.module in mods and s.producer is None and _live(s):
            by.setdefault(s.module, []).append(s)
    reads_f: dict[int, list[int]] = {}
    reads_b: dict[int, list[int]] = {}
    mod_ops: dict[str, list[int]] = {}
    for op in trace.ops:
        if op.phase == "forward":
            mod_ops.setdefault(op.module, []).append(op.index)
        for sid in op.inputs + op.outputs:
            if op.phase == "forward":
                reads_f.setdefault(sid, []).append(op.index)
            elif op.phase == "backward":
                reads_b.setdefault(sid, []).append(op.index)
    spans = [(u.first_op, u.last_op, u.first_backward_op) for u in trace.units]
    spans += [(r.first_op, r.last_op, r.first_backward_op) for _, _, r in segment_spans(trace)]
    grads = [s for s in trace.storages if s.kind == "gradient" and s.producer is not None]
    out = []
    for m in trace.param_modules:
        recs = by.get(m)
        if not recs:
            continue
        fwd = sorted({j for s in recs for j in reads_f.get(s.id, ())})
        bwd = sorted({j for s in recs for j in reads_b.get(s.id, ())})
        if not fwd or not bwd or any(trace.ops[j].module != m for j in fwd):
            continue  # unused, not trained, or read outside its module
        start = bwd[0]
        for a, b, fb in spans:
            if fb is not None and any(a <= j <= b for j in fwd):
                start = min(start, fb)
        end = bwd[-1]
        for s in recs:  # the node that reads the weight also makes the parameters' gradients
            made = [g.producer for g in grads if g.nbytes == s.nbytes and g.producer >= bwd[0]]
            if made:
                end = max(end, min(made))
        out.append(ParamGroup(m, tuple(s.id for s in recs), sum(s.nbytes for s in recs),
                              max(mod_ops.get(m, fwd)), (start, end)))
    return tuple(out)


def tier_params(trace: Trace, groups: Iterable[ParamGroup]) -> Trace:
    """The trace as tier 0 sees it when `groups` live below it between their uses."""
    gs = list(groups)
    if not gs:
        return trace
    sts = list(trace.storages)
    n = len(trace.ops)
    after = trace.backward_end + 1
    for g in gs:
        for sid in g.storages:
            s = sts[sid]
            if s.kind != "parameter":
                raise ValueError(f"tier_params: storage {sid} is a {s.kind}, not a parameter")
            sts[sid] = replace(s, freed_after=(s.producer or 0) - 1, persistent=False)  # never on tier 0 itself
        name = g.module + PARAM_WINDOW_MODULE
        windows = [(None, g.forward_end), (g.backward[0], g.backward[1])]
        if after < n:
            windows.append((after, None))
        for prod, freed in windows:
            sts.append(StorageRecord(id=len(sts), nbytes=g.nbytes, dtype="uint8", shape=(g.nbytes,),
                                     kind="parameter", producer=prod, last_use=freed if freed is not None else n - 1,
                                     freed_after=freed, persistent=freed is None, module=name))
    out = replace(trace, storages=tuple(sts))
    return replace(out, observed_peak=all_keep_peak(out))


def param_stall_seconds(hierarchy: Hierarchy, decisions: Sequence["ParamDecision"]) -> tuple[float, float]:
    """(exposed seconds, I/O seconds) of tiered parameter groups: one write and two reads each, per step."""
    io = 0.0
    for d in decisions:
        t = hierarchy.tier(d.tier)
        nb = d.nbytes
        if t.write_bandwidth > 0:
            io += nb / t.write_bandwidth + t.latency
        if t.read_bandwidth > 0:
            io += 2 * (nb / t.read_bandwidth + t.latency)
        io += 3 * nb * t.host_cost_per_byte
    return io, io
