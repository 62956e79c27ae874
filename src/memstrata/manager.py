"""The user API: wrap a training step, memstrata does the rest.

Example (runs on a CPU box; on CUDA the same code uses the GPU, pinned host
memory and CUDA copy streams)::

    >>> import tempfile, torch, torchvision
    >>> from memstrata.manager import Manager      # also memstrata.Manager
    >>> model = torchvision.models.mobilenet_v3_small(num_classes=10)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> mgr = Manager(model, budget="80%", nvme_dir=tempfile.mkdtemp())   # default: "50%act"
    >>> for _ in range(4):
    ...     x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    ...     with mgr.step(x):          # step 0: warm-up, 1: trace + plan, 2..: under the plan
    ...         loss = torch.nn.functional.cross_entropy(model(x), y)
    ...         loss.backward()
    ...     opt.step(); opt.zero_grad()
    >>> [s["mode"] for s in mgr.report()["steps"]]
    ['warmup', 'trace', 'managed', 'managed']
    >>> print(mgr.report())            # doctest: +SKIP
    >>> mgr.close()                    # removes the NVMe files and directory

Where tensors live: parameters, gradients and the batch stay where you put
them; optimizer states too, unless the optimizer is given (`optimizer=opt`:
then the plan places its per-parameter states, kept or on host / NVMe between
steps, and you step `mgr.optimizer`; see [Note: states in the plan] in
plan/joint.py).  Tensors autograd saves for backward follow the plan: kept
in tier 0 (GPU memory, or host RAM on a CPU box), copied to pinned host memory
or to files under `nvme_dir` during the forward and back during the backward,
or dropped and recomputed (whole recompute units, or all but their expensive
ops).  Values are bit-identical to training without memstrata.

Lifecycle per input shape (the shapes/dtypes of the tensors passed to `step`):
`warmup_steps` plain steps, one measured trace step (a normal training step
observed op by op: slower), a plan for the budget, then every further step
under that plan.  A new shape gets its own trace and plan (cached).  A step
whose pack sequence does not match its trace falls back to keeping (exact) and
triggers a re-trace.  `MEMSTRATA_DISABLE=1` in the environment (or
`enabled=False`) makes `step()` a no-op for side-by-side comparisons.

Errors surface before any managed step runs: a malformed budget or a missing /
unwritable `nvme_dir` in the constructor; with `fallback="raise"`, a budget below
the minimum (`InfeasibleBudgetError`, naming the smallest feasible budget and what
could not be freed; the default `fallback="minimum"` runs at that minimum with a
warning instead) or an `nvme_dir` without room for the plan (`NVMeDirectoryError`)
at the end of the trace step.  Afterwards the budget watch ([Note: budget watch])
re-plans when measured peaks or step times disagree with the plan's.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .decisions import InfeasibleBudgetError, Plan
from .hardware import Budget, Hierarchy, format_size, profile
from .plan.tuning import Correct, Keep, Measure, Trial, TryNext, next_step, watch_verdict
from .report import Report
from .runtime.activations import ActivationRuntime
from .runtime.ddp_grads import check_ddp, is_ddp
from .runtime.managed_states import ManagedStates
from .runtime.mover import Placement
from .runtime.params import ParamTiering
from .runtime.nvme import check_directory
from .runtime.pool import HostBufferPool
from .runtime.streams import CopyContext
from .trace.calibrate import calibrate_durations
from .trace.schema import Trace
from .trace.grads import renumber_grads
from .trace.states import planned_trace, with_optimizer_phase
from .trace.units import out_of_place_activations, restore_inplace
from .warn import warn_user

__all__ = ["Manager", "Report", "default_hierarchy", "disabled_by_env"]

CPU_PEAK_SOURCE = ("CPU: tier-0 bytes live at the step's start (trace) + glibc heap growth above the start "
                   "(mallinfo2, sampled at pack/unpack/unit boundaries)")

PlannerFn = Callable[[Trace, Hierarchy, int], Plan]


def disabled_by_env() -> bool:
    """True when MEMSTRATA_DISABLE is set to anything but '', '0', 'false', 'no'."""
    return os.environ.get("MEMSTRATA_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def default_hierarchy(device: torch.device, nvme_dir: str | None = None) -> Hierarchy:
    """A hierarchy for `device` without probing.

    CUDA: the named profile matching the device name (H200, H100, A100, RTX 4090;
    H200 otherwise) with tier 0 set to the device's total memory.  CPU: the
    "cpu" profile.  The NVMe tier gets `nvme_dir` as its path, or is dropped
    when there is no directory (the planner then cannot use it).
    """
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device).lower()
        key = next((k for k, pat in (("h200", "h200"), ("h100", "h100"), ("a100-80gb", "a100"), ("rtx4090", "4090"))
                    if pat in name), "h200")
        h = profile(key)
        _, total = torch.cuda.mem_get_info(device)
        h = h.with_fast_capacity(int(total))
    else:
        h = profile("cpu")
    return with_nvme_dir(h, nvme_dir)


def with_nvme_dir(h: Hierarchy, nvme_dir: str | None) -> Hierarchy:
    tiers = []
    for i, t in enumerate(h.tiers):
        if i > 0 and t.kind == "nvme":
            if nvme_dir is None and t.path is None:
                continue
            t = replace(t, path=os.path.abspath(nvme_dir) if nvme_dir is not None else t.path)
        tiers.append(t)
    return replace(h, tiers=tuple(tiers))


def _shape_key(inputs: tuple, kwargs: dict) -> tuple:
    key: list[Any] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            key.append((tuple(x.shape), str(x.dtype).replace("torch.", ""), x.device.type))
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                visit(x[k])

    visit(inputs)
    visit(kwargs)
    return tuple(key)


def _key_str(key: tuple) -> str:
    if not key:
        return "-"
    return ", ".join("x".join(map(str, s)) + f" {dt}" for s, dt, _ in key)


@dataclass
class StepRecord:
    """One row of the report."""

    index: int
    shape: str
    mode: str  # disabled / warmup / trace / managed
    seconds: float
    predicted_seconds: float | None = None
    peak_bytes: int | None = None
    peak_source: str = ""  # what peak_bytes measures (see runtime/memory.py)
    peak_above_start_bytes: int | None = None  # CPU: the heap's growth above the step's start (raw reading)
    predicted_peak_bytes: int | None = None
    budget_bytes: int | None = None
    stats: dict | None = None


@dataclass
class _ShapeState:
    key: tuple
    steps: int = 0
    traces: int = 0
    trace: Trace | None = None
    plan: Plan | None = None
    planned: Trace | None = None  # the trace as tier 0 sees it under the plan's state decisions
    runtime: ActivationRuntime | None = None
    budget: int | None = None
    predicted_seconds: float | None = None
    predicted_peak: int | None = None
    plan_seconds: float = 0.0
    plan_budget: int | None = None  # the budget the current plan was made for (the budget, or a corrected one)
    minimum_budget: int | None = None  # the smallest feasible budget, once a plan had to be refused for it
    warmup_seconds: float | None = None  # wall time of the fastest plain (untraced) step of this shape
    time_scale: float = 1.0  # untraced / traced step time, applied to the trace's op durations
    # [Note: measured plan tuning] in plan/tuning.py
    trials: list[Trial] = field(default_factory=list)  # plans run under measurement, in order
    pending: list[tuple[str, Any]] = field(default_factory=list)  # (name, tiers) still to try
    tuning: bool = False
    chosen: str | None = None
    # [Note: budget watch] in Manager._watch
    watch_seconds: list[float] = field(default_factory=list)
    watch_peaks: list[int] = field(default_factory=list)
    watch_overheads: list[float] = field(default_factory=list)
    simulated_seconds: float | None = None  # the simulator's step for the current plan
    overhead_seconds: float = 0.0  # the runtime's own time per step, measured ([Note: the runtime's own time])
    managed_seconds: list[float] = field(default_factory=list)  # every managed step's wall time, in order
    recalibrations: int = 0  # re-timings followed by a re-plan (at most MAX_RECALIBRATIONS)
    retimings: int = 0  # every re-timing of the trace, re-plans or not
    recalibrated: bool = False  # no further re-timing (MAX_RECALIBRATIONS reached)
    warned_misaligned: bool = False
    corrections: int = 0
    notes: list[str] = field(default_factory=list)
    # [Note: heap sampling at steady state] in Manager._metered
    plan_steps: int = 0  # managed steps under the current runtime
    peaks_within: int = 0  # watch windows under the current plan whose peak was within the budget


class Manager:
    """Manages the memory of one model's training steps under a budget.

    Args:
        model: the module being trained (already on its device).
        budget: tier-0 bytes allowed (`hardware.Budget`): "50%act" (the
            default: keep half of the saved activations, the part memstrata
            moves), an int or a size ("12GiB"), a percentage of the unmanaged
            peak ("50%": parameters, gradients and optimizer states count too),
            a slowdown ("1.1x": the least memory predicted to cost at most 10%
            step time), or a callable `budget(trace) -> bytes`; resolved once
            per input shape after tracing.
        fallback: "minimum" (default): a budget below the smallest feasible
            one runs at that minimum, with a warning and a note in the report
            (the fastest plan within the budget, else the least memory);
            "raise": `InfeasibleBudgetError` naming the minimum, what could
            not be freed and what to pass.
        nvme_dir: directory for NVMe-tier files (None: no NVMe tier).
        hierarchy: the memory hierarchy to plan against (default: a profile
            for the model's device, see `default_hierarchy`; no probing).
        planner: "auto" / "greedy" / "milp", or a callable
            `(trace, hierarchy, budget) -> Plan` (e.g. a forced plan).
        warmup_steps: plain steps per input shape before the trace step.
        enabled: False turns memstrata off; None reads MEMSTRATA_DISABLE.
        sync_timing: on CUDA, synchronize at the end of each step so the
            reported step time is real (default True).
        tune: measure the plan for `tune_steps` managed steps, correct it when
            its measured peak exceeds the budget, and try the recompute-only
            plan too; keep the fastest that fits (default: on with CUDA, where
            peaks are exact; see [Note: measured plan tuning] in plan/tuning.py).
        rank, world_size: this process's place under torch.distributed
            (default: read from torch.distributed when it is initialized, else
            0 and 1).  With world_size > 1 and an initialized process group,
            every rank runs rank 0's plan for a shape (`agree_plans`), so ranks
            of one DDP job recompute and offload the same storages.

        optimizer: the model's `torch.optim` optimizer: its per-parameter
            states join the plan (one budget, one objective with the
            activations); `self.optimizer` is then a `TieredOptimizer` over it
            that the training loop steps (None: the Manager does not touch the
            optimizer; with memstrata disabled `self.optimizer` is `optimizer`).

        tier_grads: with `optimizer`, the plan may also send a bucket's
            gradients below tier 0 as soon as they are final ([Note: gradients
            in the plan] in trace/grads.py).  Clip them with
            `self.optimizer.clip_grad_norm_(params, max_norm)` (torch's
            `clip_grad_norm_` does not see a gradient that is not in
            ``p.grad``); off by default for that reason.  Under torch.distributed
            the model must be wrapped in ``DistributedDataParallel(...,
            gradient_as_bucket_view=True)`` (not ``static_graph``) or FSDP2's
            ``fully_shard``: a tiered gradient leaves once reduced (DDP: at the
            end of the backward, and DDP's buckets that held only tiered
            gradients are freed until the next backward; FSDP2: this rank's
            shard after its group's reduce-scatter; [Note: tiered gradients
            under DDP], [Note: tiered gradients under FSDP2] in
            runtime/ddp_grads.py).  Under torch.compile
            every gradient is tiered when the compiled step's split graphs with
            their saves offloaded do not fit (memstrata/compiled.py).

        tier_params: with `optimizer`, the plan may also keep the parameters
            of large Linear/Conv modules below tier 0 between their uses
            (NVMe files on a CPU box, host DRAM below a device; [Note:
            parameters in the plan] in trace/params.py): fetched before the
            module's forward and backward, released after, all resident again
            when the step's block exits.  Default (None): on with `optimizer`
            in a single process, off otherwise; False opts out.  Not under
            torch.distributed (True there is an error).  Under torch.compile
            off by default; True: the split units' parameters, when their
            offloaded split graphs do not fit ([Note: parameters of a
            compiled unit] in runtime/params.py).

        heap_readings: CPU peak readings of managed steps (heap sampling, 1-2%
            of a step): "auto" (default) reads every step while the budget
            watch can act on them, then one in `METER_EVERY`; "sparse" reads a
            plan's first managed step and one in `METER_EVERY` (for a caller
            that measures memory itself).  [Note: heap sampling at steady state]

    A model wrapped in DistributedDataParallel (or DataParallel) is managed
    through the module it wraps: units, trace and hooks are the inner model's.
    """

    def __init__(
        self,
        model: nn.Module,
        budget: int | str = "50%act",
        *,
        nvme_dir: str | os.PathLike | None = None,
        hierarchy: Hierarchy | None = None,
        planner: str | PlannerFn = "auto",
        warmup_steps: int = 1,
        enabled: bool | None = None,
        io_workers: int | None = None,
        sync_timing: bool = True,
        max_retraces: int = 2,
        model_name: str = "",
        tune: bool | None = None,
        tune_steps: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        agree_plans: bool = True,
        fallback: str = "minimum",
        optimizer: torch.optim.Optimizer | None = None,
        tier_grads: bool = False,
        tier_params: bool | None = None,
        heap_readings: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Manager: model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Manager: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if hierarchy is not None and not isinstance(hierarchy, Hierarchy):
            raise TypeError(f"Manager: hierarchy must be a memstrata.hardware.Hierarchy (e.g. "
                            f"memstrata.profile('cpu')), got {type(hierarchy).__name__}")
        if optimizer is not None:
            mine = {id(p) for p in model.parameters()}
            if mine and not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("Manager: optimizer= holds none of the model's parameters (an optimizer built "
                                 "over another model or a copy of it?)")
        self.model = model
        self.root = _unwrap(model)  # what units, the trace and the runtime's hooks are found in
        self._compiled = _is_compiled(model)
        self.enabled = (not disabled_by_env()) if enabled is None else bool(enabled)
        self.budget_spec = budget
        self.budget = Budget.parse(budget, max_percent=100.0)  # above 100% of the peak nothing is managed
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.agree_plans = bool(agree_plans)
        # under DDP a tiered gradient leaves once DDP reduced it ([Note: tiered gradients under DDP])
        ddp = model if tier_grads and is_ddp(model) else None
        self._ddp = ddp
        if ddp is not None:
            check_ddp(ddp)
        elif tier_grads and self.world_size > 1 and not any(type(q).__name__ == "DTensor" for q in model.parameters()):
            # FSDP2 calls the post-accumulate-grad hooks of its sharded parameters after reduce-scatter (their
            # gradients reduced: [Note: tiered gradients under FSDP2]); other wrappers reduce after the hook fires
            raise ValueError("Manager: tier_grads=True under torch.distributed needs the model wrapped in "
                             "DistributedDataParallel(..., gradient_as_bucket_view=True) or FSDP2 (fully_shard)")
        if tier_params and self.world_size > 1:
            raise ValueError("Manager: tier_params=True is not supported under torch.distributed yet (DDP and FSDP2 "
                             "own the parameters' storage); leave it unset")
        if fallback not in ("raise", "minimum"):
            raise ValueError(f"fallback must be 'raise' or 'minimum', got {fallback!r}")
        self.fallback = fallback
        if heap_readings not in ("auto", "sparse"):
            raise ValueError(f"heap_readings must be 'auto' or 'sparse', got {heap_readings!r}")
        self.heap_readings = heap_readings
        # Activation modules run out of place while managed (same values; lets
        # selective recompute keep normalisation outputs), restored by close().
        # See [Note: why memstrata runs activations out of place] in trace/units.py.
        # (not for a compiled model: its graph decides what it saves; see memstrata/compiled.py)
        self._out_of_place = out_of_place_activations(self.root) if self.enabled and not self._compiled else []
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        if not (callable(planner) or planner in ("auto", "greedy", "milp")):
            raise ValueError(f"planner must be 'auto', 'greedy', 'milp' or a callable, got {planner!r}")
        self.planner = planner
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.nvme_dir = None
        if nvme_dir is not None and self.enabled:
            self.nvme_dir = check_directory(nvme_dir)  # missing / not writable: error now
        elif nvme_dir is not None:
            self.nvme_dir = os.path.abspath(os.fspath(nvme_dir))
        if hierarchy is None:
            hierarchy = default_hierarchy(self.device, self.nvme_dir)
        elif self.nvme_dir is not None:
            hierarchy = with_nvme_dir(hierarchy, self.nvme_dir)
        self.hierarchy = hierarchy
        self.io_workers = io_workers
        self.sync_timing = bool(sync_timing)
        self.max_retraces = int(max_retraces)
        if tune_steps < 1:
            raise ValueError(f"tune_steps must be >= 1, got {tune_steps}")
        self.tune_steps = int(tune_steps)
        self.model_name = model_name or type(self.root).__name__
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.tune = self._cuda if tune is None else bool(tune)
        self._copy: CopyContext | None = None
        self._pool: HostBufferPool | None = None
        # [Note: states in the plan] (plan/joint.py): the optimizer's states are planned with the activations.
        self.states: ManagedStates | None = None
        if optimizer is not None and self.enabled and self._compiled and not tier_grads:
            # the compiled lifecycle (compiled.py) plans activations only: say so rather than ignore optimizer=
            warn_user("memstrata: optimizer= with a torch.compile'd model: its states (and gradients) are not "
                          "tiered under torch.compile yet (they stay in tier 0; mgr.optimizer is the optimizer "
                          "itself; tier_grads=True tiers the gradients)")
        elif optimizer is not None and self.enabled:
            # (compiled, tier_grads=True: the compiled lifecycle tiers the gradients only, states stay kept)
            self._copy = CopyContext(self.device)
            self._pool = HostBufferPool(pin=self._copy.cuda)
            self.states = ManagedStates(optimizer, device=self.device, copy=self._copy, pool=self._pool,
                                        nvme_dir=self.nvme_dir, io_workers=io_workers, model=self.root,
                                        ddp=ddp)
        self.optimizer = self.states.optimizer if self.states is not None else optimizer
        self.tier_grads = bool(tier_grads)
        if self.tier_grads and optimizer is None:
            raise ValueError("Manager: tier_grads=True needs optimizer= (gradients are tiered with their bucket's "
                             "optimizer step)")
        if tier_params and optimizer is None:
            raise ValueError("Manager: tier_params=True needs optimizer= (parameters are planned with the optimizer's "
                             "states)")
        self.tier_params = (optimizer is not None and self.world_size <= 1 and not self._compiled
                            if tier_params is None else bool(tier_params))
        self._params: ParamTiering | None = None  # the current plan's parameter tiering (runtime/params.py)
        self._states: dict[tuple, _ShapeState] = {}
        self._steps: list[StepRecord] = []
        self._current: _ShapeState | None = None
        self._closed = False
        self._in_step = False
        self._compiled_life = None
        if self._compiled and self.enabled:
            from .compiled import CompiledLifecycle

            self._compiled_life = CompiledLifecycle(self.root, self.budget, fallback=self.fallback,
                                                    warmup_steps=self.warmup_steps, max_retraces=self.max_retraces,
                                                    model_name=self.model_name, device=self.device,
                                                    nvme_dir=self.nvme_dir, io_workers=io_workers,
                                                    states=self.states if self.tier_grads else None,
                                                    tier_params=self.tier_params)

    # ------------------------------------------------------------------ public
    MAX_CORRECTIONS = 2  # budget corrections per tuning candidate ([Note: measured plan tuning])
    TUNING_CANDIDATES = 2  # the plan, and the recompute-only plan when the plan copies

    @property
    def max_tuning_steps(self) -> int:
        """Managed steps per input shape that tuning can take at most (0 when tuning is off)."""
        if not self.tune:
            return 0
        return self.tune_steps * self.TUNING_CANDIDATES * (1 + self.MAX_CORRECTIONS)

    @property
    def trace(self) -> Trace | None:
        """The trace of the shape used by the latest step."""
        return self._current.trace if self._current else None

    @property
    def plan(self) -> Plan | None:
        """The plan of the shape used by the latest step."""
        return self._current.plan if self._current else None

    @property
    def runtime(self) -> ActivationRuntime | None:
        return self._current.runtime if self._current else None

    @contextlib.contextmanager
    def step(self, *inputs: Any, **kw_inputs: Any) -> Iterator[None]:
        """Wrap forward + loss + backward of one step.  Pass the batch (for its shape)."""
        if self._closed:
            raise RuntimeError("this Manager is closed")
        if self._in_step:
            raise RuntimeError("Manager.step() is already running: one `with mgr.step(...)` per training step, "
                               "not nested")
        self._in_step = True
        try:
            yield from self._step(inputs, kw_inputs)
        finally:
            self._in_step = False

    def _step(self, inputs: tuple, kw_inputs: dict) -> Iterator[None]:
        index = len(self._steps)
        if not self.enabled:
            t0 = time.perf_counter()
            yield
            self._steps.append(StepRecord(index, _key_str(_shape_key(inputs, kw_inputs)), "disabled",
                                          time.perf_counter() - t0))
            return
        key = _shape_key(inputs, kw_inputs)
        if self._compiled_life is not None:
            with self._compiled_life.step(key, (inputs, kw_inputs)) as out:
                yield
            self._steps.append(StepRecord(index, _key_str(key), out.mode, out.seconds, peak_bytes=out.peak_bytes,
                                          peak_source=out.peak_source,
                                          peak_above_start_bytes=out.peak_above_start_bytes,
                                          predicted_peak_bytes=out.predicted_peak_bytes,
                                          budget_bytes=out.budget_bytes, stats=out.stats))
            return
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _ShapeState(key)
        self._current = st
        n = st.steps
        st.steps += 1
        if st.runtime is None and n < self.warmup_steps:
            with self._measure(index, st, "warmup"):
                yield
            # the fastest plain step: the first one of a process also pays one-off set-up costs
            t = self._steps[-1].seconds
            st.warmup_seconds = t if st.warmup_seconds is None else min(st.warmup_seconds, t)
        elif st.runtime is None:
            from .trace.record import record_step

            batch = key[0][0][0] if key and key[0][0] else None
            with self._measure(index, st, "trace") as rec:
                with record_step(self.root, mode="measured", model_name=self.model_name, batch_size=batch) as r:
                    yield
                rec.peak_bytes = None
            st.traces += 1
            raw = r.trace()
            why = ("ran no backward" if not any(op.phase == "backward" for op in raw.ops) else
                   "ran no forward of the model" if (raw.activation_peak == 0 or (
                       next(self.root.children(), None) is not None
                       and not any(op.phase == "forward" and op.unit is not None for op in raw.ops))) else "")
            if why:  # a plan of an empty step manages nothing: say so instead of running as a silent no-op
                msg = (f"memstrata: step {index} ({_key_str(key)}) {why} inside `with mgr.step(...)`: nothing is "
                       f"managed; run the forward and loss.backward() inside the block")
                st.notes.append(msg.split(": ", 1)[1])
                warn_user(msg)
            trace, st.time_scale = calibrate_durations(raw, st.warmup_seconds)
            if self.states is not None:  # the optimizer step runs after the block: its records come from here
                trace = with_optimizer_phase(trace, self.states.state_bytes(),
                                             self.states.trace_step_seconds(self.hierarchy), self.states.dtypes())
                trace = renumber_grads(trace, self.states.model_to_optimizer(self.root))
                if self._ddp is not None:  # tiered gradients leave once DDP reduced them: at the backward's end
                    trace = replace(trace, grads_at_backward_end=True)
            self._plan(st, trace)
            self._steps[-1].peak_bytes = st.trace.observed_peak
            self._steps[-1].peak_source = "tracer (all storages, observed)"
            self._steps[-1].budget_bytes = st.budget
        else:
            rt = st.runtime
            if self.states is not None and st.plan is not None:  # this shape's plan placed the states its way
                self.states.apply(st.plan.states, self.hierarchy)
            params = self._apply_params(st.plan) if st.plan is not None else None
            if not self._cuda:
                rt.track_live_bytes = self._metered(st)
            st.plan_steps += 1
            with self._measure(index, st, "managed") as rec:
                with rt.step() as stats:
                    if params is not None:
                        params.begin()
                    try:
                        yield
                    finally:
                        if params is not None:
                            params.end()  # every parameter resident again for the optimizer step
            s = rt.last_stats or stats
            rec.stats = asdict(s)
            st.managed_seconds.append(rec.seconds)
            if not self._cuda and s.heap_peak_bytes is not None:
                # one basis with the budget and the prediction: what was there at the step's start, plus growth
                rec.peak_above_start_bytes = s.heap_peak_bytes
                rec.peak_bytes = (st.planned or st.trace).bytes_at_start + s.heap_peak_bytes
                rec.peak_source = CPU_PEAK_SOURCE
            if st.tuning and not s.misaligned:
                rec.mode = "managed (tuning)"
                self._tune(st, rec)
            elif not s.misaligned:
                self._watch(st, rec)
            if s.misaligned and not st.warned_misaligned:
                st.warned_misaligned = True
                why = "the step did not follow its trace"
                msg = (f"memstrata: step {index} ({_key_str(st.key)}) kept every activation (exact, no memory "
                       f"saved): {why} ({s.misaligned})")
                st.notes.append(msg.split(": ", 1)[1])
                warn_user(msg)
            if s.misaligned and st.traces <= self.max_retraces:
                # The step did not follow its trace (it kept everything: exact).  Trace again next time.
                st.runtime.close()
                st.runtime = None
                st.steps = self.warmup_steps

    def report(self) -> Report:
        """Per-step predicted vs measured time and peak, and each plan's decisions."""
        shapes = {}
        for key, st in self._states.items():
            d: dict[str, Any] = {"steps": st.steps, "traces": st.traces}
            if st.trace is not None:
                d["observed_peak"] = st.trace.observed_peak
                d["trace_step_time"] = st.trace.step_time
            if st.plan is not None:
                d["budget_bytes"] = st.budget
                d["plan"] = {
                    "planner": st.plan.planner,
                    "counts": st.plan.counts(),
                    "predicted_step_time": st.predicted_seconds,
                    "predicted_peaks": dict(st.plan.predicted_peaks),
                    "notes": list(st.plan.notes),
                    "plan_seconds": st.plan_seconds,
                    "trace_time_scale": st.time_scale,
                }
                d["calibration"] = _calibration(st, self.STEADY_STEPS)
            if self.tune and st.trials:
                d["tuning"] = {"active": st.tuning, "chosen": st.chosen,
                               "trials": [t.summary(int(st.budget or 0)) for t in st.trials]}
            if st.runtime is not None:
                d["runtime"] = st.runtime.describe()
            if self.states is not None:
                d["states"] = self.states.describe()
            if self._params is not None and st.plan is not None and st.plan.params:
                d["params"] = self._params.describe()
            if st.notes:
                d["notes"] = list(st.notes)
            shapes[_key_str(key)] = d
        if self._compiled_life is not None:
            for key in self._compiled_life.shapes:
                shapes[_key_str(key)] = self._compiled_life.describe(key)
        return Report(
            enabled=self.enabled,
            device=str(self.device),
            rank=self.rank,
            world_size=self.world_size,
            hierarchy=self.hierarchy.name,
            budget=str(self.budget),
            peak_source=("torch.cuda.max_memory_allocated (whole step, reset at step start)" if self._cuda else
                         CPU_PEAK_SOURCE + "; trace steps: the tracer's observed peak"),
            steps=[asdict(s) for s in self._steps],
            shapes=shapes,
        )

    def close(self) -> None:
        """Remove NVMe files and directories, free host buffers."""
        for st in self._states.values():
            if st.runtime is not None:
                st.runtime.close()
                st.runtime = None
        if self.states is not None:
            self.states.close()
        if self._params is not None:
            self._params.close()
            self._params = None
        if self._pool is not None:
            self._pool.clear()
        if self._compiled_life is not None:
            self._compiled_life.close()
        restore_inplace(self._out_of_place)
        self._out_of_place = []
        self._closed = True

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _measure(self, index: int, st: _ShapeState, mode: str) -> Iterator[StepRecord]:
        rec = StepRecord(index, _key_str(st.key), mode, 0.0, budget_bytes=st.budget)
        if mode == "managed":
            rec.predicted_seconds = st.predicted_seconds
            rec.predicted_peak_bytes = st.predicted_peak
        if self._cuda:
            if self.sync_timing:
                torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield rec
        if self._cuda:
            if self.sync_timing:
                torch.cuda.synchronize(self.device)
            rec.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            rec.peak_source = "torch.cuda.max_memory_allocated"
        rec.seconds = time.perf_counter() - t0
        self._steps.append(rec)

    def _resolve_budget(self, trace: Trace) -> int:
        if self.budget.kind == "slowdown":
            from .plan.api import least_budget_within

            return least_budget_within(trace, self.hierarchy, self.budget.value,
                                       planner=self.planner if isinstance(self.planner, str) else "auto")
        return self.budget.resolve(trace)

    def _plan(self, st: _ShapeState, trace: Trace) -> None:
        """Plan for `trace` and build the runtime; raises before any managed step runs."""
        st.trace = trace
        budget = self._resolve_budget(trace)
        t0 = time.perf_counter()
        try:
            plan = self._make_plan(trace, budget, None)
        except InfeasibleBudgetError as e:
            if self.fallback != "minimum":
                raise InfeasibleBudgetError(
                    e.budget, e.minimum_budget,
                    f"{str(e).split(': ', 1)[-1]}; pass budget={e.minimum_budget} or more, a relative budget such "
                    f"as '50%act', or fallback='minimum' to run at the smallest feasible budget") from None
            note = (f"budget {self.budget} ({format_size(budget)}) is below the smallest feasible "
                    f"{format_size(e.minimum_budget)} for input {_key_str(st.key)}: running at that minimum "
                    "(fallback='minimum'; pass fallback='raise' to make it an error)")
            st.notes.append(note)
            warn_user(f"memstrata: {note}")
            budget = st.minimum_budget = e.minimum_budget
            plan = self._make_plan(trace, budget, None)
        st.budget = budget
        plan = self._agreed(plan)
        st.plan_seconds = time.perf_counter() - t0
        st.trials, st.pending, st.chosen = [], [], None
        self._install(st, "planned", plan, budget, None)
        st.tuning = self.tune and not callable(self.planner) and bool(plan.storages or plan.units or plan.replays)
        if st.tuning and any(d.action == "offload" for d in plan.storages):
            st.pending.append(("recompute-only", ()))  # also measure the plan that copies nothing

    def _agreed(self, plan: Plan) -> Plan:
        """Rank 0's plan on every rank (a seam for plans agreed across ranks; identity on one process)."""
        if self.world_size <= 1 or not self.agree_plans:
            return plan
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return plan
        box = [plan.to_dict() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return Plan.from_dict(box[0])

    def _make_plan(self, trace: Trace, budget: int, tiers: Any) -> Plan:
        if callable(self.planner):
            return self.planner(trace, self.hierarchy, budget)
        if self.states is not None:
            from .plan.joint import joint_plan

            return joint_plan(trace, self.hierarchy, budget, planner=self.planner, tiers=tiers,
                              tier_grads=self.tier_grads, tier_params=self.tier_params)
        from .plan.api import plan as make_plan

        return make_plan(trace, self.hierarchy, budget, planner=self.planner, tiers=tiers)

    def _install(self, st: _ShapeState, name: str, plan: Plan, budget: int, tiers: Any, corrections: int = 0,
                 *, record: bool = True) -> None:
        """Make `plan` the shape's current plan: its predictions, a runtime, and (record) a trial."""
        trace = st.trace
        assert trace is not None
        st.plan = plan
        st.plan_budget = budget
        st.simulated_seconds = plan.predicted_step_time
        st.predicted_peak = dict(plan.predicted_peaks).get(self.hierarchy.fast.name)
        if st.simulated_seconds is None or st.predicted_peak is None:
            from .simulate import simulate

            tl = simulate(trace, plan, self.hierarchy, check=False)  # PlanError for a plan outside the space
            st.simulated_seconds = tl.step_time
            st.predicted_peak = int(tl.peaks[self.hierarchy.fast.name])
        st.predicted_seconds = st.simulated_seconds + st.overhead_seconds
        if self._copy is None:
            self._copy = CopyContext(self.device)
            self._pool = HostBufferPool(pin=self._copy.cuda)
        st.planned = planned_trace(trace, plan, self.hierarchy) if plan.states or plan.params else trace
        if self.states is not None:
            self.states.apply(plan.states, self.hierarchy)
        self._apply_params(plan)
        runtime = ActivationRuntime(
            self.root, st.planned, plan, self.hierarchy, device=self.device, copy=self._copy, pool=self._pool,
            nvme_dir=self.nvme_dir, io_workers=self.io_workers,
        )
        if st.runtime is not None:
            runtime.last_stats = st.runtime.last_stats  # the latest step's stats stay readable after a re-plan
            st.runtime.close()
        st.runtime = runtime
        st.plan_steps = st.peaks_within = 0
        if record:
            st.trials.append(Trial(name, plan, budget, tiers, st.predicted_seconds, st.predicted_peak,
                                   corrections=corrections))

    def _predict(self, st: _ShapeState) -> None:
        """The current plan's prediction on the (re-timed) trace: the simulator's step plus the runtime's own time."""
        from .simulate import simulate

        assert st.trace is not None and st.plan is not None
        st.simulated_seconds = simulate(st.trace, st.plan, self.hierarchy, check=False).step_time
        st.predicted_seconds = st.simulated_seconds + st.overhead_seconds

    def _apply_params(self, plan: Plan) -> ParamTiering | None:
        """Tier the parameters `plan` names (between steps; a different set re-installs the hooks)."""
        want = {d.module: Placement.for_tier(self.hierarchy, d.tier) for d in plan.params}
        have = self._params
        if have is not None and {k: s.placement for k, s in have.slots.items()} == want:
            return have
        if want and self.world_size > 1:
            raise ValueError("Manager: a plan that tiers parameters cannot run under torch.distributed yet")
        if have is not None:
            have.close()
            self._params = None
        if want:
            self._params = ParamTiering(self.root, want, nvme_dir=self.nvme_dir, io_workers=self.io_workers)
        return self._params

    def _tune(self, st: _ShapeState, rec: StepRecord) -> None:
        """Carry out the tuning policy of plan/tuning.py ([Note: measured plan tuning])."""
        tr = st.trials[-1]
        tr.seconds.append(rec.seconds)
        if rec.peak_bytes is not None:
            tr.peaks.append(int(rec.peak_bytes))
        budget = int(st.budget or 0)
        failed = False
        while True:
            action = next_step(st.trials, budget, tune_steps=self.tune_steps, max_corrections=self.MAX_CORRECTIONS,
                               exact_peaks=self._cuda, pending=len(st.pending), failed_correction=failed)
            if isinstance(action, Measure):
                return
            if isinstance(action, Correct):
                try:
                    plan = self._make_plan(st.trace, action.target, tr.tiers)
                except InfeasibleBudgetError:
                    failed = True
                    continue
                self._install(st, action.name, plan, action.target, tr.tiers, tr.corrections + 1)
                return
            if isinstance(action, TryNext):
                name, tiers = st.pending.pop(0)
                try:
                    plan = self._make_plan(st.trace, budget, tiers)
                except InfeasibleBudgetError:
                    continue
                self._install(st, name, plan, budget, tiers)
                return
            assert isinstance(action, Keep)
            best = action.trial
            st.tuning = False
            st.chosen = best.name
            if best is not st.trials[-1]:
                self._install(st, best.name, best.plan, best.budget, best.tiers, best.corrections, record=False)
            return


    WATCH_STEPS = 3  # managed steps measured before the budget watch acts (their medians count)
    CPU_PEAK_SLACK = 0.05  # CPU heap readings carry allocator noise: overshoot below 5% of the budget is let be
    RECALIBRATE_ABOVE = 0.15  # re-time the trace when measured and predicted step differ by more than this
    MAX_RECALIBRATIONS = 2  # re-timings that re-plan, per shape (a loaded box: the first window can be an outlier)
    STEADY_STEPS = 4  # the report's measured steady step: the median of this many last managed steps

    METER_EVERY = 8  # CPU, steady state: one managed step in this many samples the heap
    SETTLED_WINDOWS = 2  # watch windows within the budget after which a plan's peak counts as steady

    def _metered(self, st: _ShapeState) -> bool:
        """Whether this CPU step samples the heap.

        [Note: heap sampling at steady state]
        On CPU the peak of a managed step is read by sampling glibc's heap
        (`mallinfo2`, which walks every arena: 0.1-0.4 ms a call on the shared
        box) and counting live saved storages at packs, unpacks and unit
        boundaries: ~100 readings, 1-2% of a ResNet-18 step (b64, 112 px).
        Only the budget watch and tuning act on those readings.  So a plan's
        first managed step is always measured, every step is while the watch
        or tuning may still act on its peak (until `SETTLED_WINDOWS` windows
        fit the budget, or the corrections are used up), and after that one
        step in `METER_EVERY`.  A callable planner (no watch) keeps a reading
        at every step.  `heap_readings="sparse"` (for a caller that measures
        memory itself, as `memstrata bench` does) reads only a plan's first
        managed step and one in `METER_EVERY`.  A step that is not measured
        reports no peak (None); its time and values are unchanged.
        """
        if st.plan_steps == 0 or st.plan_steps % self.METER_EVERY == 0 or st.tuning:
            return True
        if self.heap_readings == "sparse":
            return False
        if callable(self.planner):  # no watch: a caller-made plan is read at every step, as it always was
            return True
        return st.peaks_within < self.SETTLED_WINDOWS and st.corrections < self.MAX_CORRECTIONS

    def _watch(self, st: _ShapeState, rec: StepRecord) -> None:
        """Keep the budget and the predictions honest after tuning (or without it).

        [Note: budget watch]
        Every managed step is measured.  After `WATCH_STEPS` of them (the median
        time and runtime overhead, the largest peak), or at once for a peak over
        the budget and its slack (then without re-timing from the short window):
        * peak: measured above the budget by more than the slack (on CPU the
          heap reading is noisy: `CPU_PEAK_SLACK`) -> the plan cannot be carried
          out as planned here; re-plan at the plan's budget less the overshoot
          (at most `MAX_CORRECTIONS` times), and say so in the report;
        * time: measured and predicted step differ by more than
          `RECALIBRATE_ABOVE` -> the trace's op times were not steady-state
          ones (a first step pays one-off costs); scale them by measured /
          predicted, both less the runtime's own time, and re-plan (at most
          `MAX_RECALIBRATIONS` times; after that, re-time and re-simulate the
          plan without re-planning), so later predictions are for this machine
          as it runs now.  On the shared 2-core box plain steps of one model
          swing by 40% within a minute (other tenants), so a prediction fixed
          after two windows was 0.76-1.18x of the steps that followed.
        * peak, at the smallest feasible budget (nothing lower to re-plan at): a plan
          that copies to a lower tier is re-planned at the same budget without
          copies (recompute and replays only) when such a plan exists: late copies
          were what the measurement saw (ResNet-18 b32 128 px at its minimum, 20 NVMe
          offloads planned from a loaded trace: 1.17x the budget);
        * always: the prediction becomes the simulator's step plus the runtime's
          own time measured in the window ([Note: the runtime's own time] in
          runtime/activations.py).  Folding that time into the op times instead
          made them 10% slower than plain steps (mobilenet_v3_small, 64 px), so
          a plan with fewer hooks or replays was over-predicted.
        Medians, not the fastest step: on a loaded box the fastest of a window
        is an outlier, and the prediction re-timed from it was 24% too fast
        for the steps that followed (bench/results/2026-12-05b-cpu-calibration/).
        One re-timing is not always enough: a window of two steps right after
        the trace step can still be slower than the steady state (CPU,
        mobilenet_v3_small, 64 px: 585 and 424 ms, then 346-386 ms), and a
        single re-timing from it over-predicted every later step by ~12%
        (bench/results/2026-12-05-cpu-breadth/calibration.md).
        Re-planning changes which storages move, never the values (every plan is exact).
        """
        if st.plan is None or not (st.plan.storages or st.plan.units or st.plan.replays) or callable(self.planner):
            return
        st.watch_seconds.append(rec.seconds)
        st.watch_overheads.append(float((rec.stats or {}).get("overhead_seconds") or 0.0))
        if rec.peak_bytes is not None:
            st.watch_peaks.append(int(rec.peak_bytes))
        slack = 0.0 if self._cuda else self.CPU_PEAK_SLACK
        # a peak over the budget is acted on at once: memory does not swing like time (Swin-T ran three steps
        # 51% over before the window closed); the time rule still waits for a full window ([Note: budget watch])
        early = (len(st.watch_seconds) < self.WATCH_STEPS and rec.peak_bytes is not None
                 and rec.peak_bytes > int(st.budget or 0) * (1.0 + slack) and st.corrections < self.MAX_CORRECTIONS)
        if len(st.watch_seconds) < self.WATCH_STEPS and not early:
            return
        seconds, st.watch_seconds = statistics.median(st.watch_seconds), []
        st.overhead_seconds, st.watch_overheads = statistics.median(st.watch_overheads), []
        if st.simulated_seconds is not None:
            st.predicted_seconds = st.simulated_seconds + st.overhead_seconds
        peak = max(st.watch_peaks) if st.watch_peaks else None
        st.watch_peaks = []
        budget = int(st.budget or 0)
        v = watch_verdict(seconds, peak, predicted_seconds=st.predicted_seconds,
                          overhead_seconds=st.overhead_seconds, budget=budget,
                          plan_budget=int(st.plan_budget or budget), minimum_budget=st.minimum_budget,
                          recalibrated=early, corrections=st.corrections,
                          max_corrections=self.MAX_CORRECTIONS, slack=slack,
                          recalibrate_above=self.RECALIBRATE_ABOVE)
        if peak is not None and not v.replan and peak <= budget:
            st.peaks_within += 1
        retime_only = (v.time_scale is not None and st.recalibrated and v.target == st.plan_budget)
        st.notes.extend(n for n in v.notes if not (retime_only and n.startswith("re-timed")))
        if v.stop:
            st.corrections = self.MAX_CORRECTIONS
            if self._without_copies(st):
                return
            # nothing left to correct to: say so once, in one line ([Note: budget watch])
            warn_user(f"memstrata: measured peak {format_size(peak)} is {peak / max(budget, 1) - 1:.0%} over the "
                      f"budget {format_size(budget)} at the smallest feasible budget, and no plan without copies "
                      "fits it: not corrected (its copies ran later than planned; mgr.report() has the steps)")
        if not v.replan:
            return
        assert st.trace is not None and v.target is not None
        if v.time_scale is not None:
            st.trace, _ = calibrate_durations(st.trace, st.trace.step_time * v.time_scale, allow_slower=True)
            st.time_scale *= v.time_scale
            st.retimings += 1
            if retime_only:  # the plan stays; its prediction follows the machine as it runs now
                self._predict(st)
                return
            st.recalibrations += 1
            st.recalibrated = st.recalibrations >= self.MAX_RECALIBRATIONS
        if v.target != st.plan_budget:
            st.corrections += 1
        target = v.target
        try:
            plan = self._make_plan(st.trace, target, None)
        except InfeasibleBudgetError as e:  # the minimum moved with the re-timed trace: plan there, then stop
            st.minimum_budget = e.minimum_budget
            st.corrections = self.MAX_CORRECTIONS
            if e.minimum_budget >= (st.plan_budget or 0):
                st.notes.append(f"the plan is already at the smallest feasible budget "
                                f"{format_size(e.minimum_budget)}: not corrected further")
                return
            target = e.minimum_budget
            plan = self._make_plan(st.trace, target, None)
            st.notes.append(f"re-planned at the smallest feasible budget {format_size(target)} instead")
        # Not agreed across ranks: only this rank measured the overshoot, and a collective here could hang.
        # Ranks may then run different plans, which changes where bytes live, never the values.
        self._install(st, "planned (watched)", plan, target, None, record=False)


    def _without_copies(self, st: _ShapeState) -> bool:
        """At the smallest feasible budget, a plan that copies to a lower tier measured over the budget: its copies
        ran later here than planned (on the shared CPU box a loaded trace step makes NVMe copies look cheap,
        and loaded disks write late: ResNet-18 b32 128 px at its minimum, 20 NVMe offloads, measured 1.17x).
        Re-plan at the same budget without copies (recompute and replays only), whose peak does not depend on
        the disk, when such a plan exists ([Note: budget watch]).  True when it was installed."""
        plan, budget = st.plan, int(st.plan_budget or st.budget or 0)
        if plan is None or st.trace is None or not any(d.action == "offload" for d in plan.storages):
            return False
        try:
            new = self._make_plan(st.trace, budget, ())
        except InfeasibleBudgetError:
            return False
        st.notes.append(f"re-planned at {format_size(budget)} without copies to a lower tier (recompute and replays "
                        "only): the copies ran later here than planned")
        self._install(st, "planned (watched, no copies)", new, budget, (), record=False)
        return True


def _calibration(st: _ShapeState, tail: int) -> dict[str, Any]:
    """Predicted vs measured step on one basis: the wall time of the `with mgr.step()` block (forward, loss and
    backward; the optimizer step outside it is in neither), the measured one the median of the last `tail`
    managed steps."""
    measured = statistics.median(st.managed_seconds[-tail:]) if st.managed_seconds else None
    pred = st.predicted_seconds
    return {"basis": "wall time of the step block (forward, loss, backward); measured: median of the last "
                     f"{min(tail, len(st.managed_seconds))} managed steps",
            "predicted_seconds": pred, "simulated_seconds": st.simulated_seconds,
            "runtime_overhead_seconds": st.overhead_seconds, "measured_seconds": measured,
            "predicted_over_measured": None if not (pred and measured) else pred / measured,
            "recalibrations": st.recalibrations, "retimings": st.retimings}


def _is_compiled(model: nn.Module) -> bool:
    """A torch.compile'd module (or one holding one): managed by memstrata/compiled.py."""
    from .runtime.compiled import is_compiled

    return is_compiled(_unwrap(model))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP / DataParallel wrapper runs (memstrata manages that one)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if initialized else 0) if rank is None else rank
        world_size = (dist.get_world_size() if initialized else 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank {rank}, world_size {world_size}")
    return int(rank), int(world_size)
