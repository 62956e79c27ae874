"""Measured plan tuning: a pure policy over trials, carried out by the Manager.

[Note: measured plan tuning]
The planner's model of the machine is never exact: copy and recompute
costs on a real GPU, allocator slack and stream-ordered frees that the
simulator does not see.  So the first managed steps of a shape measure
each plan for `tune_steps` steps (the fastest counts: a runtime's first
step also fills the pinned buffer pool):

1. a peak over the budget (CUDA: `max_memory_allocated`, exact) ->
   re-plan at the plan's budget less the overshoot and 2% of the budget,
   at most `max_corrections` times per candidate;
2. then the next candidate: the recompute-only plan, when the plan
   offloads (copies compete with compute for memory bandwidth and PCIe
   may deliver less than the profile says);
3. keep the fastest trial whose measured peak fits; when none fits, the
   one with the smallest peak.
Every trial step is an ordinary managed step (exact, same values).  Where
the measured peak is not a tier-0 total (a CPU heap reading), only speed
is compared (`exact_peaks=False`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..decisions import Plan

__all__ = ["Trial", "Measure", "Correct", "TryNext", "Keep", "next_step"]


@dataclass
class Trial:
    """One plan run for real while tuning: what it was predicted to do and what it did."""

    name: str
    plan: Plan
    budget: int  # the budget this plan was made for (the shape's budget, less any correction)
    tiers: Any  # None: every lower tier; (): recompute only
    predicted_seconds: float | None
    predicted_peak: int | None
    seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    corrections: int = 0

    @property
    def base_name(self) -> str:
        return self.name.split(" (")[0]

    def summary(self, budget: int) -> dict[str, Any]:
        peak = max(self.peaks) if self.peaks else None
        return {"name": self.name, "plan_budget_bytes": self.budget, "counts": self.plan.counts(),
                "predicted_seconds": self.predicted_seconds, "predicted_peak_bytes": self.predicted_peak,
                "measured_seconds": min(self.seconds) if self.seconds else None, "measured_peak_bytes": peak,
                "fits": None if peak is None else peak <= budget, "steps": len(self.seconds)}


@dataclass(frozen=True)
class Measure:
    """Run the current trial for more steps."""


@dataclass(frozen=True)
class Correct:
    """Re-plan the current candidate at `target` bytes (its measured peak overshot the budget)."""

    target: int
    name: str


@dataclass(frozen=True)
class TryNext:
    """Measure the next pending candidate."""


@dataclass(frozen=True)
class Keep:
    """Tuning is over: keep `trial`."""

    trial: Trial


def next_step(trials: list[Trial], budget: int, *, tune_steps: int, max_corrections: int, exact_peaks: bool,
              pending: int, failed_correction: bool = False) -> Measure | Correct | TryNext | Keep:
    """What to do after the latest measured step of `trials[-1]` ([Note: measured plan tuning])."""
    tr = trials[-1]
    if len(tr.seconds) < tune_steps:
        return Measure()
    peak = max(tr.peaks) if (tr.peaks and exact_peaks) else None
    if (peak is not None and peak > budget and tr.corrections < max_corrections and not failed_correction):
        k = tr.corrections + 1
        return Correct(tr.budget - (peak - budget) - int(0.02 * budget),
                       f"{tr.base_name} (corrected{'' if k == 1 else f' x{k}'})")
    if pending:
        return TryNext()
    done = [t for t in trials if t.seconds]
    fitting = [t for t in done if not (exact_peaks and t.peaks) or max(t.peaks) <= budget]
    if fitting:
        return Keep(min(fitting, key=lambda t: min(t.seconds)))
    return Keep(min(done, key=lambda t: max(t.peaks) if t.peaks else 0))


# ----------------------------------------------------------------------------- the budget watch
@dataclass(frozen=True)
class WatchVerdict:
    """What the budget watch asks for after a window of managed steps ([Note: budget watch] in manager.py)."""

    time_scale: float | None = None  # re-time the trace's ops by this factor
    target: int | None = None  # re-plan at this budget
    notes: tuple[str, ...] = ()
    stop: bool = False  # no further peak corrections (the plan is already the most frugal one)

    @property
    def replan(self) -> bool:
        return self.time_scale is not None or self.target is not None


def watch_verdict(seconds: float, peak: int | None, *, predicted_seconds: float | None, budget: int,
                  plan_budget: int, minimum_budget: int | None, recalibrated: bool, corrections: int,
                  max_corrections: int, slack: float, recalibrate_above: float,
                  overhead_seconds: float = 0.0) -> WatchVerdict:
    """Pure policy: re-time when measured and predicted step differ by more than `recalibrate_above`; re-plan
    lower when the measured peak exceeds the budget by more than `slack` (never below `minimum_budget`).
    `recalibrated`: no further re-timing is allowed (the Manager's `MAX_RECALIBRATIONS` reached).
    `overhead_seconds`: the runtime's own time, measured, inside both `seconds` and `predicted_seconds`; the
    trace's op times are scaled by what is left of each ([Note: the runtime's own time] in
    runtime/activations.py), so that time is not folded into them."""
    from ..hardware import format_size

    scale, target, notes, stop = None, None, [], False
    if not recalibrated and predicted_seconds and abs(seconds / predicted_seconds - 1.0) > recalibrate_above:
        ov = overhead_seconds if 0.0 <= overhead_seconds < min(seconds, predicted_seconds) else 0.0
        scale = (seconds - ov) / (predicted_seconds - ov)
        notes.append(f"re-timed the trace: managed steps took {seconds * 1e3:.0f} ms against "
                     f"{predicted_seconds * 1e3:.0f} ms predicted, {ov * 1e3:.0f} ms of each the runtime's own (ops x{scale:.2f})")
    if peak is not None and peak > budget * (1.0 + slack) and corrections < max_corrections:
        want = int(plan_budget - (peak - budget) - 0.02 * budget)
        if minimum_budget is not None and want < minimum_budget:
            if plan_budget <= minimum_budget:
                stop = True
                notes.append(f"measured peak {format_size(peak)} > budget {format_size(budget)}, and the plan is "
                             "already the most frugal one: not corrected (copies or frees ran later here than the "
                             "planner predicted)")
            else:
                want = minimum_budget
        if not stop:
            target = want
            notes.append(f"measured peak {format_size(peak)} > budget {format_size(budget)}: the plan did not free "
                         f"what it predicted here; re-planned at {format_size(target)}")
    if scale is not None and target is None:
        target = plan_budget
    return WatchVerdict(scale, target, tuple(notes), stop)
