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
(`state_stall_seconds`; below a device with every gradient kept, the runtime
defers the moved buckets' updates to the next forward, so their copies are
priced against the forward's compute too: `deferred_forward_seconds`,
[Note: optimizer states as trace records]).  The least predicted step wins (ties: fewer tiered
bytes, then a shallower tier; a candidate whose state I/O alone exceeds the
best so far is skipped: its activations cannot beat the unmanaged step); a budget no candidate fits raises
`InfeasibleBudgetError` with the least minimum over the candidates.
Candidates: everything kept, and, per lower tier that frees tier 0 (not
tier 0's own host copy on a CPU box), the largest 1, 1/4, 1/2, 3/4 and all
of the buckets on that tier.  So the split between states and activations is
chosen by predicted step time, not by a user fraction; what it does not
search: per-bucket mixes of two lower tiers; a lower tier's capacity is
checked against the states alone (the activations offloaded there share it:
not yet counted together).  Gradients: each candidate
that sends states to a lower tier has a twin that also sends the same
buckets' gradients down when final (host DRAM below a device, where the
bucket then steps on the host; NVMe on a CPU box), priced by
`trace.grads.grad_stall_seconds` ([Note: gradients in the plan] in
trace/grads.py; `tier_grads=False` leaves them out).  `Plan.states` carries
the decisions (JSON round trip); the Manager executes them through
`runtime.grads.GradTieredOptimizer` (a `runtime.states.TieredOptimizer`).

Parameters ([Note: parameters in the plan] in trace/params.py): the tierable
modules' parameter groups (largest first) can live on the parameter tier
(host DRAM below a device, NVMe files on a CPU box) between their uses; the
largest 1, 1/4, 1/2 and all of them are each paired with the kept-states
candidate and with every candidate that sends all state buckets down (with
and without their gradients), priced by `param_stall_seconds` (synchronous
copies: all exposed) in the same objective.  `tier_params=False` leaves
parameters out.  `Plan.params` carries them (runtime/params.py executes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..decisions import InfeasibleBudgetError, ParamDecision, Plan, StateDecision
from ..hardware import HOST_KINDS, Hierarchy, format_size
from ..trace.schema import Trace
from ..trace.grads import grad_groups, host_step
from ..trace.params import param_groups, param_stall_seconds
from ..trace.states import moved_state_bytes, placement_stall_seconds, planned_trace, state_buckets
from .api import minimum_budget, offload_tier_indices, plan

__all__ = ["joint_plan", "joint_minimum_budget", "state_decisions", "param_decisions", "param_tier",
           "STATE_FRACTIONS"]

STATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # shares of the buckets tried on each lower tier (plus the largest one)


def _state_tier_names(hierarchy: Hierarchy, tiers) -> list[int]:
    """Lower tiers states may go to (indices), by the same `tiers` restriction as activations."""
    return list(offload_tier_indices(hierarchy, tiers))


def _tier_or_keep(t, names: list[str], hierarchy: Hierarchy, what: str) -> str | None:
    t = None if t in (None, "keep") else str(t)
    if t is not None and t not in names:
        raise ValueError(f"unknown tier {t!r} for {what}; hierarchy {hierarchy.name!r} has {names}")
    if t == names[0] and not hierarchy.host_is_tier0:
        raise ValueError(f"tier {t!r} is tier 0: keep {what} there with 'keep'")
    return t


def state_decisions(trace: Trace, hierarchy: Hierarchy, placement: str | Sequence[str | None],
                    bucket_bytes: int | None = None,
                    grads: str | Sequence[str | None] | None = None) -> tuple[StateDecision, ...]:
    """Decisions for a fixed placement: one tier name (or 'keep') for every bucket, or one per bucket.

    `grads`: where each bucket's gradients go when final (same forms; None keeps them all in tier 0;
    [Note: gradients in the plan] in trace/grads.py)."""
    buckets = state_buckets(trace, bucket_bytes)
    names = [t.name for t in hierarchy.tiers]
    per = [placement] * len(buckets) if isinstance(placement, str) else list(placement)
    if len(per) != len(buckets):
        raise ValueError(f"state placement names {len(per)} tiers for {len(buckets)} state buckets")
    gper = [grads] * len(buckets) if grads is None or isinstance(grads, str) else list(grads)
    if len(gper) != len(buckets):
        raise ValueError(f"gradient placement names {len(gper)} tiers for {len(buckets)} state buckets")
    by_param = grad_groups(trace)
    out = []
    for b, t, gt in zip(buckets, per, gper):
        t = _tier_or_keep(t, names, hierarchy, "optimizer states")
        gt = _tier_or_keep(gt, names, hierarchy, "gradients")
        if gt is not None and names.index(gt) == 0:
            raise ValueError(f"tier {gt!r} is tier 0: keep gradients there with 'keep'")
        params = tuple(g.param for g in b if g.param is not None)
        gs = tuple(s for p in params for s in by_param.get(p, ())) if gt is not None else ()
        out.append(StateDecision(params, t, tuple(s for g in b for s in g.storages), sum(g.nbytes for g in b),
                                 gt, gs, sum(trace.storages[s].nbytes for s in gs)))
    return tuple(out)


def _grad_tier(hierarchy: Hierarchy, state_tier: int) -> int | None:
    """Where a candidate puts the gradients of buckets whose states go to `state_tier`: host DRAM on a device
    hierarchy (the bucket then steps on the host), the NVMe tier on a CPU one (host RAM is tier 0)."""
    if state_tier < 1:
        return None
    if hierarchy.host_is_tier0:
        t = hierarchy.nvme_tier()
    elif hierarchy.tiers[state_tier].kind in HOST_KINDS:
        t = hierarchy.host_tier()
    else:
        return None  # states on NVMe below a device: their gradients would come back with them; not searched
    if t is None:
        return None
    return [x.name for x in hierarchy.tiers].index(t.name)


def param_tier(hierarchy: Hierarchy, tiers=None) -> str | None:
    """Where tiered parameters live: NVMe files on a CPU box (host RAM is tier 0), host DRAM below a device;
    None when the hierarchy (or the `tiers` restriction) has no such tier."""
    t = hierarchy.nvme_tier() if hierarchy.host_is_tier0 else hierarchy.host_tier()
    if t is None:
        return None
    names = [x.name for x in hierarchy.tiers]
    return t.name if names.index(t.name) in offload_tier_indices(hierarchy, tiers) else None


def param_decisions(trace: Trace, hierarchy: Hierarchy, modules, tier: str | None = None) -> tuple[ParamDecision, ...]:
    """Decisions tiering the parameters of `modules` (names; "all": every tierable module) on `tier`
    (default `param_tier`)."""
    groups = {g.module: g for g in param_groups(trace)}
    names = list(groups) if modules == "all" else list(modules)
    bad = [m for m in names if m not in groups]
    if bad:
        raise ValueError(f"module {bad[0]!r} has no tierable parameters in this trace; tierable: "
                         f"{sorted(groups)[:8]}{' ...' if len(groups) > 8 else ''}")
    tier = tier or param_tier(hierarchy)
    if tier is None:
        raise ValueError(f"hierarchy {hierarchy.name!r} has no tier for parameters (host DRAM below a device, "
                         "NVMe on a CPU box)")
    return tuple(ParamDecision(m, tier, groups[m].storages, groups[m].nbytes) for m in names)


def _param_sets(trace: Trace, hierarchy: Hierarchy, tiers) -> list[tuple[ParamDecision, ...]]:
    tier = param_tier(hierarchy, tiers)
    groups = sorted(param_groups(trace), key=lambda g: -g.nbytes)
    if tier is None or not groups:
        return []
    n = len(groups)
    counts = sorted({1, *(max(1, round(n * f)) for f in STATE_FRACTIONS)})
    return [tuple(ParamDecision(g.module, tier, g.storages, g.nbytes) for g in groups[:k]) for k in counts]


Candidate = tuple[tuple[StateDecision, ...], tuple[ParamDecision, ...]]


def _candidates(trace: Trace, hierarchy: Hierarchy, tiers, bucket_bytes,
                grads: bool = True, params: bool = True) -> list[Candidate]:
    buckets = state_buckets(trace, bucket_bytes)
    by_param = grad_groups(trace)
    n = len(buckets)
    names = [t.name for t in hierarchy.tiers]
    order = sorted(range(n), key=lambda i: (-sum(g.nbytes for g in buckets[i]), -i))
    keep = state_decisions(trace, hierarchy, "keep", bucket_bytes)
    out = [keep]
    full = [keep]  # the candidates parameter sets are paired with
    counts = sorted({1, *(max(1, round(n * f)) for f in STATE_FRACTIONS)})
    for ti in _state_tier_names(hierarchy, tiers):
        for k in counts:
            chosen = set(order[:k])
            if ti >= 1 and sum(sum(g.nbytes for g in buckets[i]) for i in chosen) > hierarchy.tiers[ti].capacity:
                continue  # the tier cannot hold them
            per = [names[ti] if i in chosen else None for i in range(n)]
            out.append(state_decisions(trace, hierarchy, per, bucket_bytes))
            if k == n and ti >= 1:
                full.append(out[-1])
            gi = _grad_tier(hierarchy, ti) if grads else None
            if gi is not None and by_param:  # the same buckets' gradients below too
                out.append(state_decisions(trace, hierarchy, per, bucket_bytes,
                                           grads=[names[gi] if i in chosen else None for i in range(n)]))
                if k == n and ti >= 1:
                    full.append(out[-1])
    res: list[Candidate] = [(c, ()) for c in out]
    if params:
        res += [(c, ps) for ps in _param_sets(trace, hierarchy, tiers) for c in full]
    return res


def _with_states(trace: Trace, hierarchy: Hierarchy, p: Plan, decisions: tuple[StateDecision, ...],
                 pdecs: tuple[ParamDecision, ...] = ()) -> Plan:
    stall, io = placement_stall_seconds(trace, hierarchy, decisions)
    pstall, pio = param_stall_seconds(hierarchy, pdecs)
    step = (p.predicted_step_time or 0.0) + stall + pstall
    n = sum(1 for d in decisions if d.tier is not None)
    moved = sum(d.nbytes for d in decisions if d.tier is not None)
    note = (f"optimizer states: {n}/{len(decisions)} buckets below tier 0 "
            f"({format_size(moved)} of {format_size(sum(d.nbytes for d in decisions))}); "
            f"state I/O {io * 1e3:.3f} ms, exposed {stall * 1e3:.3f} ms")
    ng = sum(1 for d in decisions if d.grads is not None)
    if ng:
        note += (f"; gradients of {ng} buckets below tier 0 when final "
                 f"({format_size(sum(d.grad_nbytes for d in decisions))})"
                 + (", stepped on the host" if any(host_step(hierarchy, d) for d in decisions) else ""))
    if pdecs:
        note += (f"; parameters of {len(pdecs)} modules on {pdecs[0].tier} between uses "
                 f"({format_size(sum(d.nbytes for d in pdecs))}), I/O {pio * 1e3:.3f} ms exposed")
    return replace(p, states=decisions, params=tuple(pdecs), predicted_step_time=step, notes=p.notes + (note,))


def _stall(trace: Trace, hierarchy: Hierarchy, cand: Candidate) -> float:
    return placement_stall_seconds(trace, hierarchy, cand[0])[0] + param_stall_seconds(hierarchy, cand[1])[0]


def joint_plan(trace: Trace, hierarchy: Hierarchy, budget: int, *, planner: str = "auto", tiers=None,
               states: str | Sequence[str | None] | None = None, bucket_bytes: int | None = None,
               time_limit: float = 4.0, grads: str | Sequence[str | None] | None = None,
               tier_grads: bool = True, params: Sequence[str] | str | None = None,
               tier_params: bool = True) -> Plan:
    """Activations, optimizer states, gradients and parameters in one plan within `budget`
    ([Note: states in the plan]).

    `states`: None lets the objective choose the placement; a tier name / 'keep' (every bucket) or one per
    bucket fixes it (the activations are still planned for what it leaves); `grads` fixes where the buckets'
    gradients go the same way (with `states` only; None keeps them).  `tier_grads=False` leaves gradients
    out of the search.  `params`: module names (or "all") whose parameters are tiered, fixed (with `states`
    fixed or not); `tier_params=False` leaves parameters out of the search.  A trace without optimizer-state
    records gets `plan.api.plan`'s plan.
    """
    budget = int(budget)
    if grads is not None and states is None:
        raise ValueError("joint_plan: grads= fixes the gradients of a fixed state placement: pass states= too")
    if not state_buckets(trace, bucket_bytes):  # no optimizer states: parameters are the only other decision
        psets = ([param_decisions(trace, hierarchy, params, param_tier(hierarchy, tiers))] if params is not None
                 else _param_sets(trace, hierarchy, tiers) if tier_params else [])
        if not psets:
            return plan(trace, hierarchy, budget, planner=planner, tiers=tiers, time_limit=time_limit)
        cands = [((), ps) for ps in psets] if params is not None else [((), ())] + [((), ps) for ps in psets]
        params = None  # fixed above
    elif states is not None:
        cands: list[Candidate] = [(state_decisions(trace, hierarchy, states, bucket_bytes, grads), ())]
    else:
        cands = _candidates(trace, hierarchy, tiers, bucket_bytes, tier_grads, tier_params and params is None)
    if params is not None:
        fixed = param_decisions(trace, hierarchy, params, param_tier(hierarchy, tiers))
        cands = [(c, fixed) for c, _ in cands]  # (no parameter-set pairs were made: tier_params is off here)
    best: tuple | None = None
    least = None
    # Cheapest I/O first; a candidate whose copies alone cost more than the best plan so far (its
    # activations cannot beat the unmanaged step) is not planned.
    stalls = [_stall(trace, hierarchy, c) for c in cands]
    for stall, (dec, pdec) in sorted(zip(stalls, cands), key=lambda sd: sd[0]):
        if best is not None and trace.step_time + stall > best[0][0]:
            continue
        derived = planned_trace(trace, dec, hierarchy, params=pdec)
        try:
            p = plan(derived, hierarchy, budget, planner=planner, tiers=tiers, time_limit=time_limit)
        except InfeasibleBudgetError as e:
            least = e if least is None or e.minimum_budget < least.minimum_budget else least
            continue
        full = _with_states(trace, hierarchy, p, dec, pdec)
        moved = moved_state_bytes(hierarchy, dec)
        key = (round(full.predicted_step_time or 0.0, 12), sum(b for _, b in moved),
               sum(d.grad_nbytes for d in dec), sum(d.nbytes for d in pdec), max((t for t, _ in moved), default=0))
        if best is None or key < best[0]:
            best = (key, full)
    if best is None:
        assert least is not None
        raise InfeasibleBudgetError(budget, least.minimum_budget, str(least).split(": ", 1)[-1])
    return best[1]


def joint_minimum_budget(trace: Trace, hierarchy: Hierarchy, *, tiers=None, bucket_bytes: int | None = None,
                         tier_grads: bool = True, tier_params: bool = True) -> int:
    """The smallest budget `joint_plan` can plan for: the least `minimum_budget` over the candidates
    (`tier_grads=False`: every gradient kept in tier 0; `tier_params=False`: every parameter kept)."""
    if not state_buckets(trace, bucket_bytes):
        psets = _param_sets(trace, hierarchy, tiers) if tier_params else []
        return min(minimum_budget(planned_trace(trace, (), hierarchy, params=ps), hierarchy, tiers=tiers)
                   for ps in [(), *psets])
    return min(minimum_budget(planned_trace(trace, dec, hierarchy, params=pdec), hierarchy, tiers=tiers)
               for dec, pdec in _candidates(trace, hierarchy, tiers, bucket_bytes, tier_grads, tier_params))
