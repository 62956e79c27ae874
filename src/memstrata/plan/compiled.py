"""The plan for a torch.compile'd model: the partitioner's activation budget that fits the memory budget.

A compiled graph offers one knob ([Note: what memstrata can do under
torch.compile] in runtime/compiled.py): `activation_memory_budget`, the
fraction of its default saved activations the min-cut partitioner may keep
(the rest is recomputed inside the backward graph).  Less saved means more
recompute, so the fastest plan that fits is the largest fraction that fits.

[Note: the compiled peak model]
From a trace at fraction f_t (measured peak P_t, saved activations A_t) and
the default trace (fraction 1, saved activations A_1), the peak at fraction f
is predicted as  P(f) = P_t - A_t + f * A_1:  the partitioner keeps about f
of the default saves, everything else in the step stays.  That is optimistic
at small f (the inputs of a recomputed region are saved anyway, and the
recompute needs its own temporaries), so the Manager measures the step that
runs at the new fraction and corrects downwards from *that* trace (a new
P_t, A_t), at most a few times.  Fractions are multiples of `STEP` (each new
one is a recompile: a handful of fractions, not a search).

    >>> from memstrata.trace.compiled import CompiledTrace
    >>> t = CompiledTrace("m", 1.0, (), saved_activation_bytes=600, saved_static_bytes=0, unpacks=0,
    ...                   bytes_at_start=300, peak_above_start=700, peak_source="", step_time=0.1)
    >>> plan_compiled(t, 700).fraction      # 1000 - 600 + f * 600 <= 700
    0.5
    >>> plan_compiled(t, 2000).fraction     # fits as compiled: nothing to do
    1.0
    >>> p = plan_compiled(t, 300); p.fraction, p.feasible, p.minimum_peak
    (0.0, False, 400)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..hardware import format_size
from ..trace.compiled import CompiledTrace

__all__ = ["CompiledPlan", "plan_compiled", "correct_compiled", "split_plan", "offload_plan", "STEP"]

STEP = 0.05  # fractions the Manager compiles at are multiples of this


@dataclass(frozen=True)
class CompiledPlan:
    """A partitioner fraction for a budget, with its predicted peak (see [Note: the compiled peak model])."""

    fraction: float
    budget: int
    predicted_peak: int | None  # None: not predicted (one graph per unit: measured instead)
    minimum_peak: int | None  # predicted at fraction 0 (optimistic: see the note)
    feasible: bool  # the prediction at `fraction` fits the budget
    notes: tuple[str, ...] = ()
    split: bool = False  # one graph per recompute unit ([Note: one graph per unit] in runtime/compiled.py)
    offload: bool = False  # the split graphs' activation saves go to the lower tier
    grads: bool = False  # and the gradients once final (runtime/grads.py)
    params: bool = False  # and the split units' parameters between uses (runtime/params.py)

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "budget": self.budget, "predicted_peak": self.predicted_peak,
                "minimum_peak": self.minimum_peak, "feasible": self.feasible, "split": self.split,
                "offload": self.offload, "grads": self.grads, "params": self.params,
                "notes": list(self.notes)}


def split_plan(budget: int) -> CompiledPlan:
    """When no fraction of one graph fits: one graph per unit, each at activation budget 0 (its peak is measured)."""
    return CompiledPlan(0.0, budget, None, None, False,
                        ("no activation budget of one graph fits: recompiling with one graph per recompute unit at "
                         "activation budget 0 (unit-level activation checkpointing inside the compiled code)",),
                        split=True)


def offload_plan(split: CompiledTrace, budget: int, lower_tier: str, *, grads: bool = False,
                 params: bool = False, margin: float = 0.0) -> CompiledPlan:
    """Split graphs with their activation saves offloaded ([Note: offloading the saves of a split graph] in
    runtime/compiled.py), and, where available (`grads`, `params`), the gradients once final and the split
    units' parameters between uses: the first of (saves), (+ gradients), (+ parameters), (+ both) predicted to
    fit with `margin` to spare (a fraction of the budget: the readings miss the lower tier's in-flight copies),
    else the lowest.  Predicted from the measured split step's what-if peaks ([Note: the what-if of a
    split step]): the heap at each sample less what each would have moved off tier 0 at that moment.

    >>> from memstrata.trace.compiled import CompiledTrace
    >>> t = CompiledTrace("m", 0.0, (), saved_activation_bytes=600, saved_static_bytes=0, unpacks=0,
    ...                   bytes_at_start=300, peak_above_start=900, peak_source="", step_time=0.1,
    ...                   graphs=6, largest_graph_activation_bytes=100, whatif_peaks=(700, 500, 600, 350))
    >>> p = offload_plan(t, 850, "NVMe", grads=True); p.predicted_peak, p.feasible, p.grads, p.params
    (800, True, True, False)
    >>> p = offload_plan(t, 600, "NVMe", grads=True, params=True); p.predicted_peak, p.feasible, p.params
    (650, False, True)

    Without what-if readings (a CUDA step): every save but the largest graph's leaves (optimistic).
    """
    levels = [(False, False)] + ([(True, False)] if grads else []) + ([(False, True)] if params else []) + (
        [(True, True)] if grads and params else [])
    w = split.whatif_peaks
    if w is None:
        predicted = {(False, False): max(_rest(split) + split.largest_graph_activation_bytes, split.bytes_at_start)}
        levels = levels[:1]
    else:
        index = {(False, False): 0, (True, False): 1, (False, True): 2, (True, True): 3}
        predicted = {lv: split.bytes_at_start + w[index[lv]] for lv in levels}
    fits = [lv for lv in levels if predicted[lv] <= budget * (1.0 - margin)]
    chosen = fits[0] if fits else min(levels, key=lambda lv: (predicted[lv], levels.index(lv)))
    g, pr = chosen
    peak = predicted[chosen]
    feasible = peak <= budget
    what = "their activation saves" + (", the gradients once final" if g else "") + (
        ", the split units' parameters between uses" if pr else "")
    others = "; ".join(f"{_level(lv)}: {format_size(predicted[lv])}" for lv in levels)
    note = (f"split graphs at activation budget 0 measured {format_size(split.observed_peak)} > budget "
            f"{format_size(budget)}: offloading {what} to {lower_tier}: predicted {format_size(peak)} "
            f"({others})" + ("" if feasible else " (still above the budget: the backward's working memory stays)"))
    return CompiledPlan(0.0, budget, peak, min(predicted.values()), feasible, (note,), split=True, offload=True,
                        grads=g, params=pr)


def _level(level: tuple[bool, bool]) -> str:
    return "saves" + (" + gradients" if level[0] else "") + (" + parameters" if level[1] else "")


def _rest(base: CompiledTrace) -> int:
    """The peak without the saved activations; never below what was there at the step's start (a sampled
    heap can read less growth than the saves when the step reuses memory freed since its start)."""
    return max(base.observed_peak - base.saved_activation_bytes, base.bytes_at_start)


def _predict(base: CompiledTrace, default_activations: int, fraction: float) -> int:
    return int(_rest(base) + fraction * default_activations)


def _fraction_for(base: CompiledTrace, default_activations: int, budget: int) -> float:
    if default_activations <= 0:
        return 0.0
    exact = (budget - _rest(base)) / default_activations
    return max(0.0, min(1.0, math.floor(exact / STEP + 1e-9) * STEP))


def plan_compiled(default: CompiledTrace, budget: int) -> CompiledPlan:
    """The largest fraction whose predicted peak fits `budget`, from the default (fraction 1) trace."""
    a1 = default.saved_activation_bytes
    minimum = _predict(default, a1, 0.0)
    if default.observed_peak <= budget:
        return CompiledPlan(default.fraction, budget, default.observed_peak, minimum, True,
                            (f"the compiled step's peak {format_size(default.observed_peak)} fits the budget: "
                             "compiled as the user compiled it",))
    f = round(_fraction_for(default, a1, budget), 6)
    predicted = _predict(default, a1, f)
    feasible = predicted <= budget
    note = (f"partitioner activation budget {f:g}: predicted peak {format_size(predicted)} "
            f"(the graphs save {format_size(a1)} of activations at 1.0)")
    if not feasible:
        note = (f"budget {format_size(budget)} is below what recompute inside the compiled graph can reach "
                f"(predicted {format_size(minimum)} at activation budget 0: the rest of the peak is parameters, "
                "gradients, the batch and the graph's working memory): running at 0")
    return CompiledPlan(f, budget, predicted, minimum, feasible, (note,))


def correct_compiled(default: CompiledTrace, measured: CompiledTrace, budget: int) -> CompiledPlan | None:
    """After a step at `measured.fraction` peaked above `budget`: a smaller fraction, or None at 0."""
    if measured.fraction <= 0.0:
        return None
    a1 = default.saved_activation_bytes
    f = round(_fraction_for(measured, a1, budget), 6)
    if f >= measured.fraction:
        # The partitioner saved more at this fraction than the model says (what it may recompute is not
        # linear in the fraction): go to the most frugal graph at once rather than recompiling step by step.
        f = 0.0
    predicted = _predict(measured, a1, f)
    note = (f"measured peak {format_size(measured.observed_peak)} at activation budget {measured.fraction:g} > "
            f"budget {format_size(budget)}: recompiling at {f:g} (predicted {format_size(predicted)})")
    return CompiledPlan(f, budget, predicted, _predict(measured, a1, 0.0), predicted <= budget, (note,))
