"""The decision space: what may be decided for one trace, derived once, read by everyone.

Planners choose from it, the simulator validates plans against it, forced plans
are built from it and the runtime asserts that the plan it is given stays
inside it.  Nothing else in the package decides what is offloadable,
recomputable or heavy.

>>> from memstrata.trace.space import decision_space, is_heavy_op
>>> is_heavy_op("aten.convolution.default"), is_heavy_op("aten.relu.default")
(True, False)
>>> space = decision_space(trace)                                    # doctest: +SKIP
>>> space.recomputable[0], space.why_not(3)                           # doctest: +SKIP
(True, 'aten.relu_.default (event 41) writes an input of the unit in place')

[Note: the legal menu]
* offload: a storage that autograd saves for backward (`saved`, kind
  "activation"), that the runtime can find again (it has pack positions), that
  some backward op reads and that is live at some event.  Destinations: the
  lower tiers of the hierarchy.  On a CPU hierarchy (host RAM *is* tier 0) an
  offload to tier 0's own name is legal too: it exercises the host buffer pool
  (a copy in the same RAM) and frees nothing, which is what the simulator
  predicts for it.
* recompute a unit: the unit has a backward, saves something inside itself,
  and none of its forward ops writes one of its inputs in place (re-running it
  would read the overwritten input).  Selective recompute may keep the outputs
  of `cacheable_ops(u)` only (trace/sac.py: what torch's SAC can cache).
* heavy ops: one taxonomy (`is_heavy_op`) for planners ("keep the outputs of
  convolutions and matrix products") and forced plans; the roofline may add
  ops that are flop-bound for a given hierarchy (`heavy_ops`).
A decision outside the menu raises `PlanError` in the simulator and the
runtime; planners ask `problem()` (or `simulate.try_run`) instead of catching.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Mapping

import numpy as np

from ..decisions import Offload, Plan, PlanError
from ..hardware import Hierarchy
from .index import TraceIndex, UnitEffect, trace_index
from .sac import is_inplace_op, sac_cacheable_ops
from .schema import Trace

__all__ = ["DecisionSpace", "decision_space", "is_heavy_op", "op_base_name", "HEAVY_OP_PREFIXES", "SAC_HIDDEN_OPS"]

# Compute-bound op families: convolutions, matrix products, attention.  Matched on the aten base name with
# leading underscores removed ("_convolution", "mkldnn_convolution", "_scaled_dot_product_flash_attention").
HEAVY_OP_PREFIXES = ("convolution", "conv1d", "conv2d", "conv3d", "mm", "addmm", "bmm", "baddbmm", "matmul", "linear",
                     "scaled_dot_product", "einsum")
_HEAVY_INFIXES = ("_convolution",)  # mkldnn_convolution, cudnn_convolution, miopen_convolution, ...


def op_base_name(name: str) -> str:
    """'aten.convolution.default' -> 'convolution'; plain names pass through."""
    parts = name.split(".")
    return parts[1] if name.startswith("aten.") and len(parts) > 1 else parts[0]


def is_heavy_op(name: str) -> bool:
    """Convolutions, matrix products and attention: the ops whose outputs selective recompute keeps."""
    base = op_base_name(name)
    if base.endswith("_backward") or "_backward_" in base:
        return False
    stripped = base.lstrip("_")
    return stripped.startswith(HEAVY_OP_PREFIXES) or any(i in base for i in _HEAVY_INFIXES)


def _sac_hidden_ops() -> frozenset[str]:
    """Ops torch's selective checkpointing never shows its policy (one list for tracer and runtime)."""
    try:
        from torch.utils.checkpoint import SAC_IGNORED_OPS
    except ImportError:  # pragma: no cover - older torch
        return frozenset({"aten.detach.default", "prim.device.default"})
    return frozenset(str(op) for op in SAC_IGNORED_OPS)


SAC_HIDDEN_OPS: frozenset[str] = _sac_hidden_ops()


class DecisionSpace:
    """The legal decisions for one trace ([Note: the legal menu])."""

    def __init__(self, ix: TraceIndex) -> None:
        self.ix = ix
        trace = ix.trace
        sts = trace.storages
        self.offloadable = np.array(
            [s.saved and s.kind == "activation" and bool(s.backward_reads) and bool(s.pack_indices) for s in sts],
            dtype=bool) & ~ix.never_live
        self._why_not: dict[int, str] = {}
        for u in trace.units:
            why = self._unit_problem(trace, u.index)
            if why:
                self._why_not[u.index] = why
        self.recomputable = tuple(u.index not in self._why_not for u in trace.units)
        self._cacheable: dict[int, frozenset[int]] = {}

    @property
    def trace(self) -> Trace:
        return self.ix.trace

    # ------------------------------------------------------------------ units
    @staticmethod
    def _unit_problem(trace: Trace, u: int) -> str:
        unit = trace.units[u]
        if unit.first_backward_op is None:
            return "has no backward"
        if unit.pack_end <= unit.pack_start:
            return "saves nothing for backward"
        inputs = set(unit.inputs)
        for op in trace.ops[unit.first_op : unit.last_op + 1]:
            if is_inplace_op(op.name) and inputs.intersection(op.outputs):
                return f"{op.name} (event {op.index}) writes an input of the unit in place"
        return ""

    def why_not(self, u: int) -> str:
        """Why unit u may not be recomputed ('' when it may)."""
        return self._why_not.get(u, "")

    def recomputable_units(self) -> list[int]:
        return [u for u, ok in enumerate(self.recomputable) if ok]

    def cacheable_ops(self, u: int) -> frozenset[int]:
        """Ops of unit u whose outputs selective recompute may keep (trace/sac.py)."""
        c = self._cacheable.get(u)
        if c is None:
            c = self._cacheable[u] = sac_cacheable_ops(self.trace, self.trace.units[u])
        return c

    def heavy_ops(self, u: int, hierarchy: Hierarchy | None = None) -> tuple[int, ...]:
        """Compute-bound ops of unit u: `is_heavy_op`, or flop-bound on `hierarchy`'s roofline."""
        unit = self.trace.units[u]
        pf = hierarchy.peak_flops if hierarchy is not None else None
        bw = hierarchy.fast_bandwidth if hierarchy is not None else None
        out = []
        for j in range(unit.first_op, unit.last_op + 1):
            op = self.trace.ops[j]
            heavy = is_heavy_op(op.name)
            if not heavy and pf and bw and op.flops > 0:
                heavy = op.flops / pf > op.bytes_accessed / bw
            if heavy:
                out.append(j)
        return tuple(out)

    # ------------------------------------------------------------------ tiers
    @staticmethod
    def offload_tiers(hierarchy: Hierarchy) -> tuple[int, ...]:
        """Tier indices a planner may offload to: every lower tier."""
        return tuple(range(1, len(hierarchy.tiers)))

    @staticmethod
    def legal_tier(hierarchy: Hierarchy, ti: int) -> bool:
        return 1 <= ti < len(hierarchy.tiers) or (ti == 0 and hierarchy.host_is_tier0)

    # ------------------------------------------------------------------ validation
    def decisions_of(self, plan: Plan, hierarchy: Hierarchy) -> tuple[dict[int, Offload], dict[int, tuple[int, ...]]]:
        """A plan's decisions as (sid -> Offload, unit -> save_ops), checked: `PlanError` if any is illegal."""
        trace = self.trace
        names = [t.name for t in hierarchy.tiers]
        offloads: dict[int, Offload] = {}
        seen: set[int] = set()
        for d in plan.storages:
            if not 0 <= d.storage < len(trace.storages):
                raise PlanError(f"plan names storage {d.storage}, which the trace does not have")
            if d.storage in seen:
                raise PlanError(f"storage {d.storage} has more than one decision")
            seen.add(d.storage)
            if d.action == "keep":
                continue
            if d.tier not in names or not self.legal_tier(hierarchy, names.index(d.tier)):
                raise PlanError(f"storage {d.storage}: offload tier {d.tier!r} is not a lower tier of {names}")
            offloads[d.storage] = Offload(names.index(d.tier), int(d.evict_after), int(d.prefetch_at))
        units: dict[int, tuple[int, ...]] = {}
        for u in plan.units:
            if not 0 <= u.unit < len(trace.units):
                raise PlanError(f"plan names unit {u.unit}, which the trace does not have")
            if u.unit in units:
                raise PlanError(f"unit {u.unit} has more than one decision")
            units[u.unit] = tuple(sorted(u.save_ops))
        problem = self.problem(hierarchy, offloads, units)
        if problem:
            raise PlanError(problem)
        return offloads, units

    def problem(self, hierarchy: Hierarchy, offloads: Mapping[int, Offload],
                units: Mapping[int, tuple[int, ...]]) -> str:
        """The first reason these decisions are illegal, or '' (needs the effects: see `resolve`)."""
        return self.resolve(hierarchy, offloads, units)[2]

    def resolve(self, hierarchy: Hierarchy, offloads: Mapping[int, Offload], units: Mapping[int, tuple[int, ...]]
                ) -> tuple[dict[int, UnitEffect], dict[int, int], str]:
        """(unit effects, need event per offloaded storage, problem) for a set of decisions.

        `problem` is '' for legal decisions; otherwise effects/needs are partial.
        The *need* event of an offload is its first access after eviction (a
        forward or backward read/write, or the recompute of a recomputed unit
        that has it as an input); `prefetch_at <= need` is required.
        """
        ix = self.ix
        trace = ix.trace
        n = ix.n
        for u, S in units.items():
            if not 0 <= u < len(trace.units):
                return {}, {}, f"unit {u} is not in the trace"
            if not self.recomputable[u]:
                return {}, {}, f"unit {u} ({trace.units[u].module}) cannot be recomputed: {self.why_not(u)}"
            unit = trace.units[u]
            for j in S:
                if not unit.first_op <= j <= unit.last_op:
                    return {}, {}, f"unit {u}: save_op {j} is outside the unit's ops [{unit.first_op}, {unit.last_op}]"
                if j not in self.cacheable_ops(u):
                    return {}, {}, (f"unit {u}: save_op {j} ({trace.ops[j].name}) cannot be kept by selective "
                                    "recompute (in place, persistent or later mutated output)")
        rec_inputs = frozenset(sid for u in units for sid in trace.units[u].inputs)
        effects = {u: ix.unit_effect(u, tuple(sorted(S)), rec_inputs) for u, S in units.items()}
        dropped = {sid for eff in effects.values() for sid in eff.dropped}
        ends = ix.end
        needs: dict[int, int] = {}
        if not offloads:
            return effects, needs, ""
        inside = np.zeros(n + 1, dtype=np.int32)  # events inside some recomputed unit's forward
        held_until: dict[int, int] = {}  # inputs of recomputed units live until the unit's first backward op
        for u, eff in effects.items():
            unit = trace.units[u]
            inside[unit.first_op] += 1
            inside[unit.last_op + 1] -= 1
            for sid in unit.inputs:
                held_until[sid] = max(held_until.get(sid, -1), eff.fb)
        inside = np.cumsum(inside[:n]) > 0
        for sid, (ti, ev, pf) in offloads.items():
            if not 0 <= sid < len(trace.storages):
                return effects, needs, f"storage {sid} is not in the trace"
            s = trace.storages[sid]
            if not self.offloadable[sid]:
                return effects, needs, (f"storage {sid}: only saved activations read in backward can be offloaded "
                                        f"(kind {s.kind}, saved {s.saved})")
            if sid in dropped or (s.producer is not None and inside[s.producer]):
                return effects, needs, f"storage {sid}: produced inside a recomputed unit and offloaded; pick one"
            if not self.legal_tier(hierarchy, ti):
                return effects, needs, f"storage {sid}: offload tier index {ti} is not a lower tier"
            start = int(ix.start[sid])
            if ev < start or ev >= n:
                return effects, needs, (f"storage {sid}: evict_after {ev} is before its producer ({start}) "
                                        "or past the step")
            acc = ix.accesses[sid]
            k = bisect.bisect_right(acc, ev)
            nd = acc[k] if k < len(acc) else None
            for u in ix.input_of.get(sid, ()):
                if u in effects and effects[u].fb > ev and (nd is None or effects[u].fb < nd):
                    nd = effects[u].fb
            if nd is None:
                return effects, needs, f"storage {sid}: never accessed after evict_after {ev}; nothing to prefetch for"
            if not ev < pf <= nd:
                return effects, needs, (f"storage {sid}: prefetch_at {pf} must be in ({ev}, {nd}] "
                                        "(first access after eviction)")
            end = max(int(ends[sid]), held_until.get(sid, -1))
            if end <= ev:
                return effects, needs, f"storage {sid}: evict_after {ev} is not before its end of life {end}"
            needs[sid] = nd
        return effects, needs, ""


_SPACE_CACHE: dict[int, tuple[weakref.ref, DecisionSpace]] = {}


def decision_space(trace: Trace) -> DecisionSpace:
    """The (cached) decision space of a trace."""
    hit = _SPACE_CACHE.get(id(trace))
    if hit is not None and hit[0]() is trace:
        return hit[1]
    space = DecisionSpace(trace_index(trace))
    if len(_SPACE_CACHE) > 32:
        for k in [k for k, (r, _) in _SPACE_CACHE.items() if r() is None] or list(_SPACE_CACHE)[:16]:
            _SPACE_CACHE.pop(k, None)
    _SPACE_CACHE[id(trace)] = (weakref.ref(trace), space)
    return space
