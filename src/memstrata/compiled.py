"""The Manager's lifecycle for a torch.compile'd model (used by `manager.Manager`; one instance per Manager).

Per input shape: `warmup_steps` plain steps (the first one compiles), one
observed step at the user's compilation (the trace: what the graphs save, the
measured peak), a plan (`plan/compiled.py`: the largest partitioner
activation budget predicted to fit), then, when that fraction is below 1.0,
one step that recompiles at it (its saves become the trace the later steps are
checked against; its peak is not used: compiling allocates), then managed
steps.  The budget watch: after `WATCH_STEPS` managed steps whose largest
measured peak is above the budget (plus `CPU_PEAK_SLACK` on CPU, where the
reading is a sampled heap), recompile at a smaller fraction from that
measurement, at most `MAX_CORRECTIONS` times; when no fraction of one graph
fits, once one graph per recompute unit at fraction 0 ([Note: one graph per
unit] in runtime/compiled.py); when that does not fit either and there is a
lower tier (NVMe files on CPU: `nvme_dir`; pinned host on CUDA), the same
split graphs with their activation saves offloaded between forward and
backward ([Note: offloading the saves of a split graph]); when nothing fits,
the setting with the lowest measured peak, with one warning.  A step whose saves differ from
its trace (a graph break that went another way, a recompile we did not ask
for) warns once per shape, says why, and the next step is traced again.

What is managed and what is not: [Note: what memstrata can do under
torch.compile] in runtime/compiled.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

from .decisions import InfeasibleBudgetError
from .hardware import Budget, format_size
from .plan.compiled import CompiledPlan, correct_compiled, offload_plan, plan_compiled, split_plan
from .runtime.compiled import CompiledRuntime, CompiledStepStats
from .trace.compiled import CompiledTrace
from .warn import warn_user

__all__ = ["CompiledLifecycle", "CompiledStepOutcome"]

PEAK_SOURCE_CPU = ("CPU: parameters, buffers, gradients and the batch at the step's start + glibc heap growth above "
                   "the start (mallinfo2, a poller thread every 0.5 ms and every save/read)")
PEAK_SOURCE_CUDA = "torch.cuda.max_memory_allocated (whole step, reset at step start)"


@dataclass
class CompiledStepOutcome:
    """What one step of a compiled model did (the Manager turns it into a report row)."""

    mode: str = ""
    seconds: float = 0.0
    peak_bytes: int | None = None
    peak_above_start_bytes: int | None = None
    peak_source: str = ""
    predicted_peak_bytes: int | None = None
    budget_bytes: int | None = None
    stats: dict | None = None


@dataclass
class _Shape:
    key: tuple
    steps: int = 0
    traces: int = 0
    default: CompiledTrace | None = None  # the step as the user compiled it (fraction 1.0)
    trace: CompiledTrace | None = None  # what the steps at the current fraction save
    plan: CompiledPlan | None = None
    budget: int | None = None
    fraction: float = 1.0
    split: bool = False  # one graph per recompute unit
    split_tried: bool = False
    offload: bool = False  # split graphs' activation saves moved to the lower tier
    grads: bool = False  # with offload: gradients leave tier 0 once final (runtime/grads.py)
    params: bool = False  # with offload: the split units' parameters between uses (runtime/params.py)
    offload_tried: bool = False
    offload_more_tried: bool = False
    settled: bool = False  # nothing fits: running at the best measured setting
    recompile: bool = False  # the next step compiles at `fraction` (and becomes the trace)
    retrace: bool = False  # the next step becomes the trace (after a misaligned step)
    corrections: int = 0
    watch_peaks: list[int] = field(default_factory=list)
    watched: list[CompiledTrace] = field(default_factory=list)  # the managed steps of the last watch
    # (fraction, split, offload, grads, params) -> measured peak
    measured: dict[tuple[float, bool, bool, bool, bool], int] = field(default_factory=dict)
    warned_misaligned: bool = False
    misaligned_steps: int = 0
    quiet: bool = False  # the last watch window at the current setting changed nothing (see `settled`)
    notes: list[str] = field(default_factory=list)


class CompiledLifecycle:
    WATCH_STEPS = 2
    MAX_CORRECTIONS = 3
    CPU_PEAK_SLACK = 0.05

    def __init__(self, model: nn.Module, budget: Budget, *, fallback: str = "minimum", warmup_steps: int = 1,
                 max_retraces: int = 2, model_name: str = "", device: torch.device | None = None,
                 nvme_dir: str | None = None, io_workers: int | None = None, states: Any = None,
                 tier_params: bool = False) -> None:
        self.runtime = CompiledRuntime(model, nvme_dir=nvme_dir, io_workers=io_workers, tier_params=tier_params)
        self.states = states  # ManagedStates (runtime/managed_states.py) when gradients may be tiered, else None
        self.nvme_dir = nvme_dir
        self.budget = budget
        self.fallback = fallback
        self.warmup_steps = int(warmup_steps)
        self.max_retraces = int(max_retraces)
        self.model_name = model_name or type(model).__name__
        self.device = torch.device(device) if device is not None else self.runtime.device
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.shapes: dict[tuple, _Shape] = {}

    # ------------------------------------------------------------------ one step
    @contextlib.contextmanager
    def step(self, key: tuple, inputs: Any) -> Iterator[CompiledStepOutcome]:
        cs = self.shapes.get(key)
        if cs is None:
            cs = self.shapes[key] = _Shape(key)
        out = CompiledStepOutcome(budget_bytes=cs.budget)
        n = cs.steps
        cs.steps += 1
        if cs.default is None and n < self.warmup_steps:
            out.mode = "warmup"
            self.runtime.set_fraction(1.0, False)
            self._set_grads(False)
            t0 = time.perf_counter()
            yield out
            self._sync()
            out.seconds = time.perf_counter() - t0
            return
        rt = self.runtime
        rt.set_fraction(cs.fraction, cs.split, cs.offload, cs.params)
        self._set_grads(cs.grads)
        tracing = cs.default is None or cs.recompile or cs.retrace
        rt.expect(None if tracing else cs.trace)
        start = self._cuda_start()
        t0 = time.perf_counter()
        with rt.step(inputs) as stats:
            yield out
        self._sync()
        out.seconds = time.perf_counter() - t0
        trace = self._trace_of(stats, out.seconds, start)
        out.peak_bytes = trace.observed_peak
        out.peak_above_start_bytes = trace.peak_above_start
        out.peak_source = PEAK_SOURCE_CUDA if self.cuda else PEAK_SOURCE_CPU
        out.stats = {k: v for k, v in asdict(stats).items() if k != "pack_nbytes"}
        if cs.default is None:
            out.mode = "trace"
            cs.traces += 1
            cs.default = cs.trace = trace
            self._plan(cs)
        elif cs.recompile:
            out.mode = f"compile ({_setting(cs.fraction, cs.split, cs.offload)})"
            cs.recompile = False
            cs.trace = trace
            out.peak_source += "; this step also compiled (its peak includes the compiler's)"
        elif cs.retrace:
            out.mode = "trace"
            cs.traces += 1
            cs.retrace = False
            cs.trace = trace
        else:
            out.mode = "managed"
            if stats.misaligned:
                self._misaligned(cs, stats, out)
            else:
                self._watch(cs, trace)
        out.budget_bytes = cs.budget
        out.predicted_peak_bytes = cs.plan.predicted_peak if cs.plan is not None else None

    @staticmethod
    def _key_of(cs: _Shape) -> tuple[float, bool, bool, bool, bool]:
        return (cs.fraction, cs.split, cs.offload, cs.grads, cs.params)

    @property
    def can_tier_grads(self) -> bool:
        """Gradients can leave tier 0: the Manager holds the optimizer (tier_grads=True) and there is a tier."""
        return self.states is not None and (self.cuda or self.nvme_dir is not None)

    def settled(self) -> bool:
        """Every input shape seen has been traced and its last watch window at its current setting changed
        nothing (no recompile, retrace or correction pending): the steps from here run as they will keep
        running.  What a benchmark waits for before it times steps ([Note: memstrata under compile in the
        bench] in bench/contenders.py)."""
        return bool(self.shapes) and all(
            cs.default is not None and cs.quiet and not cs.recompile and not cs.retrace
            for cs in self.shapes.values())

    def _set_grads(self, on: bool) -> None:
        """Every gradient tiered from its accumulate hook to its optimizer step, or none (between steps)."""
        if self.states is None:
            return
        from .runtime.mover import Placement
        from .runtime.nvme import NVMeStore
        from .runtime.states import DEFAULT_BUCKET_BYTES, StatePlacement

        opt = self.states.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        if not on:
            want = StatePlacement((), ())
        else:
            tier = Placement.HOST if self.cuda else Placement.NVME
            want = StatePlacement.uniform([p.numel() * p.element_size() for p in params], tier, DEFAULT_BUCKET_BYTES)
            mover = self.states.mover
            if tier == Placement.NVME and mover.store is None:
                mover.store = NVMeStore(self.nvme_dir or "", required_bytes=sum(
                    p.numel() * p.element_size() for p in params), workers=self.states.io_workers,
                    direct=False)  # [Note: buffered files for compiled saves] in runtime/compiled.py
        if want != opt.grads.placement:
            opt.set_grad_placement(want)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _cuda_start(self) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def _trace_of(self, stats: CompiledStepStats, seconds: float, cuda_start: int | None) -> CompiledTrace:
        if cuda_start is not None:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            stats.bytes_at_start = cuda_start  # on CUDA the basis is everything allocated
            return self.runtime.trace_of(stats, seconds, self.model_name, peak - cuda_start, PEAK_SOURCE_CUDA)
        return self.runtime.trace_of(stats, seconds, self.model_name)

    # ------------------------------------------------------------------ decisions
    def _plan(self, cs: _Shape) -> None:
        trace = cs.default
        assert trace is not None
        if self.budget.kind == "slowdown":
            note = (f"a slowdown budget ({self.budget}) is not supported for compiled models: the compiled step "
                    "runs as compiled (give a size or a percentage)")
            cs.notes.append(note)
            warn_user(f"memstrata: {note}")
            cs.budget = trace.observed_peak
        else:
            cs.budget = self.budget.resolve(trace)
        cs.measured[(trace.fraction, False, False, False, False)] = trace.observed_peak
        plan = plan_compiled(trace, cs.budget)
        if not plan.feasible:
            if self.fallback == "raise":
                raise InfeasibleBudgetError(
                    cs.budget, plan.minimum_peak,
                    "a compiled step can only save less (the partitioner's activation budget); parameters, "
                    "gradients, the batch and the graph's working memory stay; pass a larger budget or "
                    "fallback='minimum'")
            warn_user(f"memstrata: {plan.notes[0]}")
        cs.notes.extend(plan.notes)
        self._adopt(cs, plan)

    def _adopt(self, cs: _Shape, plan: CompiledPlan) -> None:
        cs.plan = plan
        cs.quiet = False
        cs.watch_peaks, cs.watched = [], []
        if (plan.fraction, plan.split) != (cs.fraction, cs.split):
            cs.fraction, cs.split = plan.fraction, plan.split
            cs.recompile = True

    def _watch(self, cs: _Shape, trace: CompiledTrace) -> None:
        cs.watch_peaks.append(trace.observed_peak)
        if len(cs.watch_peaks) < self.WATCH_STEPS:
            cs.watched.append(trace)
        if len(cs.watch_peaks) < self.WATCH_STEPS or cs.budget is None or cs.default is None:
            return
        if cs.fraction >= 1.0 and not cs.split and not cs.offload and cs.default.observed_peak <= cs.budget:
            cs.watch_peaks, cs.watched = [], []
            cs.quiet = True
            return  # it fitted as compiled: nothing is managed (as the eager watch, which leaves empty plans be)
        peak, cs.watch_peaks = max(cs.watch_peaks), []
        cs.watched.append(trace)
        cs.watched = cs.watched[-self.WATCH_STEPS:]
        cs.measured[self._key_of(cs)] = peak
        slack = 0.0 if self.cuda else self.CPU_PEAK_SLACK
        if peak <= cs.budget * (1.0 + slack) or cs.settled:
            cs.quiet = True
            return
        cs.quiet = False
        measured = replace(trace, peak_above_start=peak - trace.bytes_at_start)
        # [Note: a fraction that saved nothing] A smaller partitioner budget that measured no lower than the
        # step as compiled says the peak is not the graph's saves (it is the backward's working memory, the
        # recompute's temporaries): on ResNet-18 (CPU) 0.55, 0.05 and 0 all measured above 1.0, and so did 0.2,
        # 0.15 and 0 on a tiny one, each a recompile.  Smaller fractions are skipped: one graph per unit next.
        no_gain = not cs.split and cs.fraction < 1.0 and peak >= cs.default.observed_peak
        if no_gain:
            cs.notes.append(f"activation budget {cs.fraction:g} measured {format_size(peak)}, not below the step "
                            f"as compiled ({format_size(cs.default.observed_peak)}): recompute inside one graph "
                            "does not lower this step's peak; no smaller fraction is tried")
        plan = None if cs.split or no_gain else correct_compiled(cs.default, measured, cs.budget)
        cs.corrections += 1
        if plan is None or (plan.fraction, False, False, False, False) in cs.measured or \
                cs.corrections >= self.MAX_CORRECTIONS:
            self._settle(cs)
            return
        cs.notes.extend(plan.notes)
        self._adopt(cs, plan)

    def _settle(self, cs: _Shape) -> None:
        """No fraction fits: split the graph at units once; then run at the setting whose measured peak was
        lowest, and say so (once)."""
        if not cs.split_tried and self.runtime.budget.units:
            cs.split_tried = True
            assert cs.budget is not None
            plan = split_plan(cs.budget)
            cs.notes.extend(plan.notes)
            self._adopt(cs, plan)
            return
        if cs.split and not cs.offload_tried and self.runtime.can_offload:
            cs.offload_tried = True
            assert cs.budget is not None and cs.trace is not None
            # the split steps just watched (not the step that compiled them: the compiler's memory is in its
            # readings), their what-if peaks taken at the largest ([Note: the what-if of a split step])
            base = cs.watched[-1] if cs.watched else cs.trace
            ws = [t.whatif_peaks for t in cs.watched if t.whatif_peaks is not None]
            split = replace(base, peak_above_start=cs.measured[(cs.fraction, True, False, False, False)]
                            - base.bytes_at_start,
                            whatif_peaks=tuple(max(w[k] for w in ws) for k in range(4)) if ws else None)
            plan = offload_plan(split, cs.budget, self.runtime.offloader.describe(), grads=self.can_tier_grads,
                                params=self.runtime.can_tier_params,
                                margin=0.0 if self.cuda else self.CPU_PEAK_SLACK)
            cs.notes.extend(plan.notes)
            cs.plan = plan
            # the same graphs: no recompile; their saves (and gradients, parameters) go to the lower tier
            cs.offload, cs.grads, cs.params = True, plan.grads, plan.params
            cs.watch_peaks, cs.watched = [], []
            return
        more = (cs.split and cs.offload and not cs.offload_more_tried
                 and ((self.can_tier_grads and not cs.grads) or (self.runtime.can_tier_params and not cs.params)))
        if more:
            # measured above the budget with part of the lower tier's menu: the rest of it (no recompile)
            cs.offload_more_tried = True
            cs.grads = cs.grads or self.can_tier_grads
            cs.params = cs.params or self.runtime.can_tier_params
            note = (f"offloaded split graphs measured above the budget {format_size(cs.budget)}: running at "
                    f"{_setting(cs.fraction, cs.split, cs.offload, cs.grads, cs.params)}")
            cs.notes.append(note)
            cs.watch_peaks, cs.watched = [], []
            return
        cs.settled = True
        best = min(cs.measured, key=lambda k: (cs.measured[k], -k[0]))
        tried = ", ".join(f"{_setting(*k)}: {format_size(p)}" for k, p in sorted(cs.measured.items(), reverse=True))
        note = (f"no partitioner activation budget keeps the compiled step within {format_size(cs.budget)} "
                f"(measured peaks by setting: {tried}): running at {_setting(*best)}, the lowest; the rest of "
                "the peak is what recompute inside the graph" + (" and offloading its saves" if cs.offload_tried else "")
                + " cannot remove (the backward's working memory, gradients, parameters, the batch)")
        cs.notes.append(note)
        warn_user(f"memstrata: {note}")
        if best != self._key_of(cs):
            if best[:2] != (cs.fraction, cs.split):
                cs.retrace = True  # compiled already: no recompile, but its saves become the trace again
            cs.fraction, cs.split, cs.offload, cs.grads, cs.params = best
        if cs.plan is not None:
            cs.plan = replace(cs.plan, fraction=best[0], split=best[1], predicted_peak=cs.measured[best],
                              feasible=False)

    def _misaligned(self, cs: _Shape, stats: CompiledStepStats, out: CompiledStepOutcome) -> None:
        cs.misaligned_steps += 1
        cs.quiet = False
        out.mode = "managed (misaligned)"
        if not cs.warned_misaligned:
            cs.warned_misaligned = True
            msg = (f"memstrata: a step of the compiled model ({_key(cs.key)}) saved other tensors than its trace "
                   f"({stats.misaligned}): the compiled graph changed (a recompile or a graph break that went "
                   "another way); its values are the compiled graph's (nothing was moved) but its peak is not "
                   "the planned one; tracing again")
            cs.notes.append(msg.split(": ", 1)[1])
            warn_user(msg)
        if cs.traces <= self.max_retraces:
            cs.retrace = True

    # ------------------------------------------------------------------ report
    def describe(self, key: tuple) -> dict[str, Any]:
        cs = self.shapes[key]
        d: dict[str, Any] = {"steps": cs.steps, "traces": cs.traces, "compiled": True,
                             "fraction": cs.fraction, "split_at_units": cs.split, "offload": cs.offload,
                             "grads_tiered": cs.grads, "params_tiered": cs.params,
                             "corrections": cs.corrections,
                             "misaligned_steps": cs.misaligned_steps, "settled": cs.quiet,
                             "measured_peaks": {_setting(*k): p for k, p in cs.measured.items()}}
        if cs.default is not None:
            d["observed_peak"] = cs.default.observed_peak
            d["trace"] = cs.default.summary()
        if cs.plan is not None:
            d["budget_bytes"] = cs.budget
            d["plan"] = cs.plan.to_dict()
        if cs.notes:
            d["notes"] = list(cs.notes)
        d["runtime"] = self.runtime.describe()
        return d

    def close(self) -> None:
        self.runtime.close()


def _setting(fraction: float, split: bool, offload: bool = False, grads: bool = False, params: bool = False) -> str:
    return (f"{fraction:g}{' per unit' if split else ''}{' + offload' if offload else ''}"
            f"{' + gradients' if grads else ''}{' + parameters' if params else ''}")


def _key(key: tuple) -> str:
    return ", ".join("x".join(map(str, s)) + f" {dt}" for s, dt, _ in key) if key else "-"
