"""One plan for activations and optimizer states within one tier-0 budget.

>>> from memstrata.hardware import profile
>>> from memstrata.trace import trace_model
>>> h = profile("a100-80gb")
>>> tr = trace_model("vit_b_32", 32, 224, h)                                  # doctest: +SKIP
>>> p = joint_plan(tr, h, int(0.6 * tr.observed_peak), planner="greedy")      # doctest: +SKIP (~3 s)
>>> p.counts()             # 14 of 19 state buckets in host DRAM, the activations planned for the rest
{'offload:dram': 18, 'recompute_units': 7, 'states:dram': 14}

[Note: states in the plan]
The optimizer's per-parameter states are records of the trace (kind
"optimizer_state", [Note: optimizer states as trace records] in
trace/states.py), cut into buckets of consecutive parameters
(`trace.states.state_buckets`: about 1/16 of the states each, at most
64 MiB).  A state placement says, per bucket, "kept in tier 0" or "on lower
tier T between steps".  One objective decides both halves of the plan: for
every candidate placement the activation planner (`plan.api.plan`, greedy or
MILP) plans the trace *as tier 0 sees it under that placement*
(`tier_states`: tiered states gone between steps, the runtime's state window
live during the optimizer phase) within the same budget, so the activations
get exactly the budget the states leave; the candidate's predicted step time
is the activation plan's simulated step plus the states' exposed I/O
(`state_stall_seconds`).  The least predicted step wins (ties: fewer tiered
bytes, then a shallower tier; a candidate whose state I/O alone exceeds the
best so far is skipped: its activations cannot beat the unmanaged step); a budget no candidate fits raises
`InfeasibleBudgetError` with the least minimum over the candidates.
Candidates: everything kept, and, per lower tier that frees tier 0 (not
tier 0's own host copy on a CPU box), the largest 1, 1/4, 1/2, 3/4 and all
of the buckets on that tier.  So the split between states and activations is
chosen by predicted step time, not by a user fraction; what it does not
search: per-bucket mixes of two lower tiers; a lower tier's capacity is
checked against the states alone (the activations offloaded there share it:
not yet counted together).  Parameters and gradients
stay in tier 0 (their access times are in the trace, but the runtime does
not move them yet).  `Plan.states` carries the decisions (JSON round trip);
the Manager executes them through `runtime.states.TieredOptimizer`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..decisions import InfeasibleBudgetError, Plan, StateDecision
from ..hardware import Hierarchy, format_size
from ..trace.schema import Trace
from ..trace.states import planned_trace, state_buckets, state_stall_seconds
from .api import minimum_budget, offload_tier_indices, plan

__all__ = ["joint_plan", "joint_minimum_budget", "state_decisions", "STATE_FRACTIONS"]

STATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # shares of the buckets tried on each lower tier (plus the largest one)


def _state_tier_names(hierarchy: Hierarchy, tiers) -> list[int]:
    """Lower tiers states may go to (indices), by the same `tiers` restriction as activations."""
    return list(offload_tier_indices(hierarchy, tiers))


def state_decisions(trace: Trace, hierarchy: Hierarchy, placement: str | Sequence[str | None],
                    bucket_bytes: int | None = None) -> tuple[StateDecision, ...]:
    """Decisions for a fixed placement: one tier name (or 'keep') for every bucket, or one per bucket."""
    buckets = state_buckets(trace, bucket_bytes)
    names = [t.name for t in hierarchy.tiers]
    per = [placement] * len(buckets) if isinstance(placement, str) else list(placement)
    if len(per) != len(buckets):
        raise ValueError(f"state placement names {len(per)} tiers for {len(buckets)} state buckets")
    out = []
    for b, t in zip(buckets, per):
        t = None if t in (None, "keep") else str(t)
        if t is not None and t not in names:
            raise ValueError(f"unknown tier {t!r} for optimizer states; hierarchy {hierarchy.name!r} has {names}")
        if t == names[0] and not hierarchy.host_is_tier0:
            raise ValueError(f"tier {t!r} is tier 0: keep states there with 'keep'")
        params = tuple(g.param for g in b if g.param is not None)
        out.append(StateDecision(params, t, tuple(s for g in b for s in g.storages), sum(g.nbytes for g in b)))
    return tuple(out)


def _moved(hierarchy: Hierarchy, decisions: Sequence[StateDecision]) -> list[tuple[int, int]]:
    names = [t.name for t in hierarchy.tiers]
    return [(names.index(d.tier), d.nbytes) for d in decisions if d.tier is not None]


def _candidates(trace: Trace, hierarchy: Hierarchy, tiers, bucket_bytes) -> list[tuple[StateDecision, ...]]:
    buckets = state_buckets(trace, bucket_bytes)
    n = len(buckets)
    names = [t.name for t in hierarchy.tiers]
    order = sorted(range(n), key=lambda i: (-sum(g.nbytes for g in buckets[i]), -i))
    out = [state_decisions(trace, hierarchy, "keep", bucket_bytes)]
    counts = sorted({1, *(max(1, round(n * f)) for f in STATE_FRACTIONS)})
    for ti in _state_tier_names(hierarchy, tiers):
        for k in counts:
            chosen = set(order[:k])
            if ti >= 1 and sum(sum(g.nbytes for g in buckets[i]) for i in chosen) > hierarchy.tiers[ti].capacity:
                continue  # the tier cannot hold them
            out.append(state_decisions(trace, hierarchy, [names[ti] if i in chosen else None for i in range(n)],
                                       bucket_bytes))
    return out


def _with_states(trace: Trace, hierarchy: Hierarchy, p: Plan, decisions: tuple[StateDecision, ...]) -> Plan:
    moved = _moved(hierarchy, decisions)
    stall, io = state_stall_seconds(trace, hierarchy, moved)
    step = (p.predicted_step_time or 0.0) + stall
    n = sum(1 for d in decisions if d.tier is not None)
    note = (f"optimizer states: {n}/{len(decisions)} buckets below tier 0 "
            f"({format_size(sum(b for _, b in moved))} of {format_size(sum(d.nbytes for d in decisions))}); "
            f"state I/O {io * 1e3:.3f} ms, exposed {stall * 1e3:.3f} ms")
    return replace(p, states=decisions, predicted_step_time=step, notes=p.notes + (note,))


def joint_plan(trace: Trace, hierarchy: Hierarchy, budget: int, *, planner: str = "auto", tiers=None,
               states: str | Sequence[str | None] | None = None, bucket_bytes: int | None = None,
               time_limit: float = 4.0) -> Plan:
    """Activations and optimizer states in one plan within `budget` ([Note: states in the plan]).

    `states`: None lets the objective choose the placement; a tier name / 'keep' (every bucket) or one per
    bucket fixes it (the activations are still planned for what it leaves).  A trace without optimizer-state
    records gets `plan.api.plan`'s plan.
    """
    budget = int(budget)
    if not state_buckets(trace, bucket_bytes):
        return plan(trace, hierarchy, budget, planner=planner, tiers=tiers, time_limit=time_limit)
    cands = ([state_decisions(trace, hierarchy, states, bucket_bytes)] if states is not None
             else _candidates(trace, hierarchy, tiers, bucket_bytes))
    best: tuple | None = None
    least = None
    # Cheapest state I/O first; a candidate whose states alone cost more than the best plan so far (its
    # activations cannot beat the unmanaged step) is not planned.
    stalls = [state_stall_seconds(trace, hierarchy, _moved(hierarchy, dec))[0] for dec in cands]
    for stall, dec in sorted(zip(stalls, cands), key=lambda sd: sd[0]):
        if best is not None and trace.step_time + stall > best[0][0]:
            continue
        derived = planned_trace(trace, dec, hierarchy)
        try:
            p = plan(derived, hierarchy, budget, planner=planner, tiers=tiers, time_limit=time_limit)
        except InfeasibleBudgetError as e:
            least = e if least is None or e.minimum_budget < least.minimum_budget else least
            continue
        full = _with_states(trace, hierarchy, p, dec)
        moved = _moved(hierarchy, dec)
        key = (round(full.predicted_step_time or 0.0, 12), sum(b for _, b in moved), max((t for t, _ in moved),
                                                                                          default=0))
        if best is None or key < best[0]:
            best = (key, full)
    if best is None:
        assert least is not None
        raise InfeasibleBudgetError(budget, least.minimum_budget, str(least).split(": ", 1)[-1])
    return best[1]


def joint_minimum_budget(trace: Trace, hierarchy: Hierarchy, *, tiers=None, bucket_bytes: int | None = None) -> int:
    """The smallest budget `joint_plan` can plan for: the least `minimum_budget` over the state candidates."""
    if not state_buckets(trace, bucket_bytes):
        return minimum_budget(trace, hierarchy, tiers=tiers)
    return min(minimum_budget(planned_trace(trace, dec, hierarchy), hierarchy, tiers=tiers)
               for dec in _candidates(trace, hierarchy, tiers, bucket_bytes))

