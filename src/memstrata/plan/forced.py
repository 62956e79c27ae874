"""Plans that force one decision kind everywhere (tests, benchmarks, debugging).

`forced_plan(trace, kind, hierarchy)`:

* ``keep``       — no decisions: every saved activation stays in tier 0;
* ``host``       — every saved activation offloaded to the host tier (the first
                   DRAM tier below tier 0; on a CPU-only hierarchy, where host
                   RAM *is* tier 0, the offload goes to tier 0's name and the
                   runtime still copies into its separate host buffer pool);
* ``nvme``       — every saved activation offloaded to the NVMe tier;
* ``recompute``  — every recomputable unit fully recomputed;
* ``selective``  — every recomputable unit recomputed except the outputs of its
                   convolutions and matrix products (the classic SAC policy);
* ``segment``    — every segment candidate, longest first, greedily without
                   overlap (runs of consecutive Sequential children), its heavy
                   outputs kept (convolutions, matrix products); units outside
                   every segment recomputed selectively as in ``selective``;
* ``replay``     — every saved storage that can be replayed is (op-level
                   recompute: batch norm / activation / add / pooling outputs
                   regenerated from kept inputs);
* ``mixed``      — every decision kind at once, deterministically: units
                   alternate full recompute / selective / none; saved
                   activations packed outside recomputed units alternate
                   keep / host / NVMe (NVMe only when the hierarchy has it).

Every decision is taken from the trace's decision space (trace/space.py), so
the runtime carries out exactly what the plan says: only units that can be
recomputed, only saves that selective recompute can keep.

Events: eviction after the storage's last forward use; prefetch one unit ahead
of need (at the backward start of the unit whose backward runs just before the
first reader's), never before eviction.
"""

from __future__ import annotations

from bisect import bisect_right

from ..decisions import Plan, ReplayDecision, StorageDecision, UnitDecision
from ..hardware import Hierarchy
from ..trace.schema import Trace
from ..trace.space import DecisionSpace, decision_space

KINDS = ("keep", "host", "nvme", "recompute", "selective", "segment", "replay", "mixed")

def host_tier(hierarchy: Hierarchy) -> str:
    """The tier a forced "host" plan offloads to: the first host-DRAM tier, or tier 0 on a CPU hierarchy."""
    t = hierarchy.host_tier()
    if t is not None:
        return t.name
    if hierarchy.host_is_tier0:
        return hierarchy.fast.name  # the host buffer pool in the same RAM ([Note: the legal menu])
    raise ValueError(f"hierarchy {hierarchy.name!r} has no host DRAM tier")


def nvme_tier(hierarchy: Hierarchy) -> str:
    t = hierarchy.nvme_tier()
    if t is None:
        raise ValueError(f"hierarchy {hierarchy.name!r} has no NVMe tier")
    return t.name


def _heavy_save_ops(space: DecisionSpace, u: int) -> tuple[int, ...]:
    """The classic SAC policy: keep the outputs of heavy ops, where selective recompute can keep them."""
    cacheable = space.cacheable_ops(u)
    return tuple(j for j in space.heavy_ops(u) if j in cacheable)


def _segment_decisions(space: DecisionSpace) -> tuple[UnitDecision, ...]:
    """Longest legal segments first, no two sharing a unit; the remaining units selective."""
    ix = space.ix
    taken: set[int] = set()
    out: list[UnitDecision] = []
    for k in sorted(space.legal_segments(), key=lambda k: (-(ix.span(k)[1] - ix.span(k)[0]), ix.span(k))):
        a, b = ix.span(k)
        if taken.intersection(range(a, b + 1)):
            continue
        taken.update(range(a, b + 1))
        out.append(UnitDecision(a, _heavy_save_ops(space, k), end_unit=b))
    for u in space.recomputable_units():
        if u not in taken:
            out.append(UnitDecision(u, _heavy_save_ops(space, u)))
    return tuple(sorted(out, key=lambda d: d.unit))


def _offload_decisions(trace: Trace, tier: str | list[str | None], skip=frozenset()) -> tuple[StorageDecision, ...]:
    last_fwd: dict[int, int] = {}
    for op in trace.ops:
        if op.phase != "forward":
            continue
        for s in op.inputs:
            last_fwd[s] = op.index
        for s in op.outputs:
            last_fwd[s] = max(last_fwd.get(s, -1), op.index)
    starts = sorted(u.first_backward_op for u in trace.units if u.first_backward_op is not None)
    out = []
    tiers = tier if isinstance(tier, list) else [tier]
    n = 0
    space = decision_space(trace)
    for s in trace.saved_storages():
        if not space.offloadable[s.id] or s.id in skip:
            continue
        first_read = min(s.backward_reads)
        evict = last_fwd.get(s.id, s.producer if s.producer is not None else 0)
        evict = max(evict, s.producer or 0)
        if evict >= first_read - 1:
            continue  # nothing to win: it is read right after its last forward use
        j = bisect_right(starts, first_read) - 1  # unit whose backward contains the first read
        prefetch = starts[j - 1] - 1 if j >= 1 else first_read - 1
        prefetch = max(prefetch, evict + 1)
        prefetch = min(prefetch, first_read - 1)
        t = tiers[n % len(tiers)]
        n += 1
        if t is not None:
            out.append(StorageDecision(s.id, "offload", tier=t, evict_after=evict, prefetch_at=prefetch))
    return tuple(out)


def forced_plan(trace: Trace, kind: str, hierarchy: Hierarchy) -> Plan:
    """A plan with every decision of one `kind` (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    space = decision_space(trace)
    storages: tuple[StorageDecision, ...] = ()
    units: tuple[UnitDecision, ...] = ()
    replays: tuple[ReplayDecision, ...] = ()
    if kind == "segment":
        units = _segment_decisions(space)
    elif kind == "replay":
        # every run shared that can be ([Note: shared replays] in trace/space.py)
        replays = tuple(ReplayDecision(sid, ops) for sid, ops in
                        sorted(space.shared_chains(space.replayable_storages()).items()))
    elif kind == "host":
        storages = _offload_decisions(trace, host_tier(hierarchy))
    elif kind == "nvme":
        storages = _offload_decisions(trace, nvme_tier(hierarchy))
    elif kind == "mixed":
        ud = []
        inside: set[int] = set()  # pack positions inside recomputed units
        for j, u in enumerate(trace.units[i] for i in space.recomputable_units()):
            if j % 3 == 2:
                continue
            ud.append(UnitDecision(u.index, _heavy_save_ops(space, u.index) if j % 3 == 1 else ()))
            inside.update(range(u.pack_start, u.pack_end))
        units = tuple(ud)
        skip = frozenset(s.id for s in trace.storages if any(p in inside for p in s.pack_indices)
                         or (s.unit is not None and any(d.unit == s.unit for d in ud)))
        tiers: list[str | None] = [None, host_tier(hierarchy)]
        if hierarchy.nvme_tier() is not None:
            tiers.append(nvme_tier(hierarchy))
        storages = _offload_decisions(trace, tiers, skip)
    elif kind in ("recompute", "selective"):
        units = tuple(UnitDecision(u, _heavy_save_ops(space, u) if kind == "selective" else ())
                      for u in space.recomputable_units())
    return Plan(
        planner=f"forced:{kind}",
        hierarchy=hierarchy.name,
        budget=int(trace.observed_peak),
        storages=storages,
        units=units,
        replays=replays,
        notes=(f"every decision forced to {kind!r}",),
    )
