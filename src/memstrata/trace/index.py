"""TraceIndex — arrays derived once from a `Trace`, shared by the decision space, planners and simulator.

Public and free of planning heuristics: what a storage's life is (start/end
events, bytes, every access), the all-keep occupancy, which storages each unit
produces, and what recomputing a unit does (`UnitEffect`).  Built once per
trace and cached by identity (`trace_index`).
"""

from __future__ import annotations

import weakref

import numpy as np

from ..decisions import PlanError
from dataclasses import replace

from .schema import Trace, UnitRecord

__all__ = ["TraceIndex", "UnitEffect", "trace_index", "occupancy", "segment_spans", "MAX_SEGMENT_UNITS"]

MAX_SEGMENT_UNITS = 8  # longest run of units one segment may span (the candidates grow with its square)


def segment_spans(trace: Trace, max_units: int = MAX_SEGMENT_UNITS) -> list[tuple[int, int, UnitRecord]]:
    """(first unit, last unit, span record) of every run of >= 2 consecutive units that a segment may cover.

    Consecutive children of one plain `nn.Sequential` (`UnitRecord.parent` / `position`), called one right
    after the other (no op between them, none nested).  The span record reads like a unit: ops
    [first.first_op, last.last_op], packs [first.pack_start, last.pack_end), the first unit's inputs, the
    earliest first backward op of its members.  Structure only: which are legal is `trace/space.py`'s call.
    """
    units = trace.units
    out: list[tuple[int, int, UnitRecord]] = []
    n = len(units)
    for a in range(n):
        ua = units[a]
        if ua.position < 0:
            continue
        for b in range(a + 1, min(n, a + max_units)):
            prev, ub = units[b - 1], units[b]
            if (ub.position != prev.position + 1 or ub.parent != prev.parent or ub.first_op != prev.last_op + 1
                    or ub.pack_start != prev.pack_end):
                break
            members = units[a : b + 1]
            fbs = [m.first_backward_op for m in members if m.first_backward_op is not None]
            rec = UnitRecord(
                index=-1, module=f"{ua.module}..{ub.module}", first_op=ua.first_op, last_op=ub.last_op,
                pack_start=ua.pack_start, pack_end=ub.pack_end, inputs=ua.inputs,
                first_backward_op=min(fbs) if fbs else None,
                recompute_time=float(sum(m.recompute_time for m in members)), parent=ua.parent, position=ua.position)
            out.append((a, b, rec))
    return out



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
        # all-keep occupancy
        self.base_occ = occupancy(n, self.start, self.end, self.nbytes)
        # units, then segments (span index >= len(trace.units)): one "unit" each for the planners and the simulator
        segs = segment_spans(trace)
        spans = [replace(r, index=len(trace.units) + k) for k, (_, _, r) in enumerate(segs)]
        self.segments: dict[tuple[int, int], int] = {(a, b): len(trace.units) + k for k, (a, b, _) in enumerate(segs)}
        self.segment_members: dict[int, tuple[int, int]] = {v: k for k, v in self.segments.items()}
        self.num_units = len(trace.units)
        self.units = tuple(trace.units) + tuple(spans)
        self.unit_storages: list[list[int]] = []
        order = np.argsort(self.start, kind="stable")
        starts_sorted = self.start[order]
        produced = np.array([s.producer is not None for s in sts])
        for u in self.units:
            lo = np.searchsorted(starts_sorted, u.first_op, "left")
            hi = np.searchsorted(starts_sorted, u.last_op, "right")
            ids = [int(i) for i in order[lo:hi] if produced[i]]
            self.unit_storages.append(sorted(ids))
        self.input_of: dict[int, list[int]] = {}
        for u in self.units:
            for sid in u.inputs:
                self.input_of.setdefault(sid, []).append(u.index)
        self._unit_cache: dict[tuple[int, tuple[int, ...], frozenset[int]], UnitEffect] = {}

    def span(self, u: int) -> tuple[int, int]:
        """(first unit, last unit) of span u (a unit: (u, u))."""
        return self.segment_members.get(u, (u, u))

    def span_of(self, unit: int, end_unit: int | None) -> int | None:
        """The span index of a unit (end_unit None) or of the segment unit..end_unit; None if there is none."""
        if end_unit is None or end_unit == unit:
            return unit if 0 <= unit < self.num_units else None
        return self.segments.get((unit, end_unit))

    def unit_effect(self, u: int, save_ops: tuple[int, ...], rec_inputs: frozenset[int]) -> "UnitEffect":
        key = (u, save_ops, rec_inputs)
        eff = self._unit_cache.get(key)
        if eff is None:
            eff = UnitEffect(self, u, save_ops, rec_inputs)
            if len(self._unit_cache) > 4096:
                self._unit_cache.clear()
            self._unit_cache[key] = eff
        return eff


class UnitEffect:
    """What recomputing unit u with save_ops S does (given which storages are unit inputs).

    The semantics are those of [Note: simulation semantics] in simulate.py
    (recompute): `dropped` storages, re-run `time`, the re-run's `transient`
    bytes at the unit's first backward op `fb`.  Asking for a unit without a
    backward, or save ops outside the unit, raises `PlanError`: the decision
    space (`trace/space.py`) never offers them.
    """

    def __init__(self, ix: TraceIndex, u: int, save_ops: tuple[int, ...], rec_inputs: frozenset[int]) -> None:
        unit = ix.units[u]
        trace = ix.trace
        if unit.first_backward_op is None:
            raise PlanError(f"unit {u} ({unit.module}) has no backward: nothing to recompute for")
        S = set(save_ops)
        for j in S:
            if not unit.first_op <= j <= unit.last_op:
                raise PlanError(f"unit {u}: save_op {j} is outside the unit's ops [{unit.first_op}, {unit.last_op}]")
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
        # [Note: SAC holds what it caches] Selective recompute keeps the output of every save op until the
        # unit's re-run consumes it at fb, whether or not the unmanaged step saved it for backward (a
        # linear whose output only feeds an add is freed at once without checkpointing).  Such outputs
        # live to fb here; without this the simulator under-counted Swin-T's selective plans by ~200 MiB.
        self.held = tuple(sorted(sid for sid in kept
                                 if not trace.storages[sid].saved and int(ix.end[sid]) < self.fb))
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


def occupancy(n: int, start: np.ndarray, end: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Bytes live per event for intervals [start, end] (inclusive) of `nbytes` each."""
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, start, nbytes)
    np.add.at(diff, end + 1, -nbytes)
    return np.cumsum(diff[:n])
