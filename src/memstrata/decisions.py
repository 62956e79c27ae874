"""decisions — the plain-data decisions a planner makes and the runtime carries out (a leaf module).

A `Plan` has one frozen record per managed storage and one per recompute unit
the planner chose to recompute.  No torch objects: plans are printable,
diffable and round-trip through JSON.

Decision kinds
--------------
* keep      — the storage stays in tier 0 for its whole life (the default for
              every storage without a record).
* offload   — after event `evict_after` the storage is copied to `tier` and its
              tier-0 copy freed once the copy lands; the copy back to tier 0
              starts at event `prefetch_at` and must land before the first
              backward read.  Only saved activations are offloaded.
* recompute — a `UnitDecision`: the unit's forward is re-run just before its
              backward; the storages saved inside it are not kept, except the
              outputs of the ops listed in `save_ops` (selective recompute:
              those outputs are kept in tier 0, everything else is re-run).

Which decisions are *legal* for a trace is not decided here but in one place,
`trace.space.DecisionSpace`; this module only says what a decision is.  Inside
the planners and the simulator an offload travels as an `Offload` record
(tier index, evict_after, prefetch_at), never as a bare tuple.

Adding a decision kind: a frozen record here, its legality in
`trace/space.py`, its cost in `simulate.py`, its execution in `runtime/`
(see ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

ACTIONS = ("keep", "offload")


class PlanError(ValueError):
    """A plan (or a planner's state) that is malformed or not legal for its trace.

    Raised by the simulator and the runtime; planners never catch it: they ask
    `DecisionSpace` what is legal before they simulate.
    """


class Offload(NamedTuple):
    """One offload as the planners and the simulator carry it (tiers by index into `Hierarchy.tiers`)."""

    tier: int  # >= 1: a lower tier (0 only on a CPU hierarchy, for the host-pool copy path)
    evict_after: int  # event after which the copy down starts
    prefetch_at: int  # event at which the copy up starts


@dataclass(frozen=True)
class StorageDecision:
    storage: int  # StorageRecord.id
    action: str  # one of ACTIONS
    tier: str | None = None  # destination tier for "offload"
    evict_after: int | None = None  # event after which the copy down starts
    prefetch_at: int | None = None  # event at which the copy up starts

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise PlanError(f"storage {self.storage}: action must be one of {ACTIONS}, got {self.action!r}")
        if self.action == "offload":
            if self.tier is None or self.evict_after is None or self.prefetch_at is None:
                raise PlanError(f"storage {self.storage}: offload needs tier, evict_after and prefetch_at")
            if self.prefetch_at <= self.evict_after:
                raise PlanError(
                    f"storage {self.storage}: prefetch_at ({self.prefetch_at}) must come after evict_after ({self.evict_after})"
                )


@dataclass(frozen=True)
class UnitDecision:
    unit: int  # UnitRecord.index
    save_ops: tuple[int, ...] = ()  # op indices inside the unit whose outputs are kept


@dataclass(frozen=True)
class StateDecision:
    """One bucket of parameters whose optimizer states live on `tier` between optimizer steps.

    `params` are the optimizer's parameter indices (param groups in order, as in
    `Optimizer.state_dict()`); `tier` is a lower tier's name (on a CPU hierarchy
    also tier 0's own name: a host-buffer copy), None for states kept in tier 0.
    The runtime carries it out with `runtime.states.TieredOptimizer`: read back
    before the bucket's update, written down after it ([Note: states in the plan]
    in plan/joint.py).
    """

    params: tuple[int, ...]
    tier: str | None = None
    storages: tuple[int, ...] = ()  # trace storage ids of these states
    nbytes: int = 0  # state bytes of the bucket


@dataclass(frozen=True)
class Plan:
    planner: str  # which planner made it
    hierarchy: str  # Hierarchy.name
    budget: int  # tier-0 bytes allowed
    storages: tuple[StorageDecision, ...] = ()
    units: tuple[UnitDecision, ...] = ()
    predicted_step_time: float | None = None  # seconds, from the simulator
    predicted_peaks: tuple[tuple[str, int], ...] = ()  # (tier name, peak bytes)
    notes: tuple[str, ...] = ()
    states: tuple[StateDecision, ...] = ()  # optimizer-state buckets (empty: the optimizer is not managed)

    def decision_for(self, storage: int) -> StorageDecision:
        for d in self.storages:
            if d.storage == storage:
                return d
        return StorageDecision(storage, "keep")

    def recomputed_units(self) -> dict[int, UnitDecision]:
        return {u.unit: u for u in self.units}

    def counts(self) -> dict[str, int]:
        """Decisions by kind: keep / offload:<tier> / recompute (units)."""
        out: dict[str, int] = {}
        for d in self.storages:
            key = d.action if d.action == "keep" else f"offload:{d.tier}"
            out[key] = out.get(key, 0) + 1
        out["recompute_units"] = len(self.units)
        for d in self.states:
            if d.tier is not None:
                key = f"states:{d.tier}"
                out[key] = out.get(key, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        d["storages"] = tuple(StorageDecision(**s) for s in d["storages"])
        d["units"] = tuple(UnitDecision(u["unit"], tuple(u["save_ops"])) for u in d["units"])
        d["predicted_peaks"] = tuple((str(n), int(b)) for n, b in d["predicted_peaks"])
        d["notes"] = tuple(d["notes"])
        d["states"] = tuple(StateDecision(tuple(x["params"]), x.get("tier"), tuple(x.get("storages", ())),
                                          int(x.get("nbytes", 0))) for x in d.get("states", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        return cls.from_dict(json.loads(s))


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget; `minimum_budget` is the smallest one that does."""

    def __init__(self, budget: int, minimum_budget: int, detail: str = "") -> None:
        from .hardware import format_size

        self.budget = budget
        self.minimum_budget = minimum_budget
        msg = (
            f"budget {format_size(budget)} is below the smallest feasible budget "
            f"{format_size(minimum_budget)} ({minimum_budget} bytes)"
        )
        super().__init__(msg + (f": {detail}" if detail else ""))
