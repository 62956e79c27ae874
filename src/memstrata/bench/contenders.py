"""The contenders of `memstrata bench`: one training step each, same math.

Every contender runs in its own worker process (`memstrata.bench.worker`) on a
freshly built model; this module only says how one step is taken.

What each peer does with the budget (the knob, where it has one):

- ``unmanaged``: plain eager step.  No knob: the ceiling for speed.
- ``memstrata``: ``memstrata.manager.Manager(model, budget=...)``.
- ``checkpoint``: full activation checkpointing, the standard peer:
  `torch.utils.checkpoint` (non-reentrant) around *every* block that
  `memstrata.trace.units.find_units` returns (units that are not single
  layers; the stem and head layers stay plain).  No knob is used: it is not
  given fewer blocks when the budget is generous.
- ``selective_checkpoint``: the same blocks under torch's SAC API
  (`create_selective_checkpoint_contexts`), policy: save the outputs of
  convolutions and matrix multiplies, recompute everything else.  No knob.
- ``save_on_cpu``: `torch.autograd.graph.save_on_cpu(pin_memory=True)`
  around the forward; every saved activation goes to pinned host memory.
  CUDA only (on CPU the tensors already live in host memory).  No knob.
- ``disk_offload_hooks``: the naive disk peer: a `saved_tensors_hooks` pair
  that `torch.save`s every saved non-parameter tensor to a file and
  `torch.load`s it when backward asks.  No knob, no overlap.
- ``microbatch``: gradient accumulation over k equal micro-batches, k the
  smallest divisor of the batch whose estimated peak fits the budget (chosen
  by the harness from the unmanaged run).  Reported apart: BatchNorm sees
  batches of batch/k samples, so the math is not the same.
- ``compile``: ``torch.compile(model)`` (inductor, default mode), otherwise
  unmanaged.  Its compilation happens in untimed setup steps.
- ``compile_memory_budget``: the same with
  ``torch._functorch.config.activation_memory_budget`` set to a fraction (the
  harness passes the budget's fraction: 0.5 for ``50%act`` or ``50%``): the
  min-cut partitioner then saves about that fraction of the activation bytes
  and recomputes the rest (its own knob).  Both compile peers run generated
  kernels, so their losses are close to, not bitwise equal to, eager's.
- ``memstrata_compile``: ``Manager(torch.compile(model), budget=...)``, the
  way a user writes it (the ``compile`` peer's compile options), at each bench
  budget: the Manager's compiled lifecycle (memstrata/compiled.py) picks the
  partitioner's activation budget, splits the graph at units, offloads the
  split graphs' saves, until the step fits ([Note: memstrata under compile in
  the bench]).  Compiled like the compile peers: in the compiled group.
- ``trl_offload``: TRL's stream-overlapped saved-tensor offload
  (``trl.models.activation_offloading.get_act_offloading_ctx_manager``, the
  maintained copy of torchtune's ``OffloadActivations``) around the forward.
  CUDA only; imported at run time ("not installed" when trl is missing).  No
  knob (its defaults: pinned memory, a second stream, 1 KiB minimum size).

[Note: BatchNorm under recomputation] Re-running a block's forward in
training mode would update BatchNorm running statistics a second time, so a
checkpointed run would end with different buffers than the unmanaged one.
The recompute context of both checkpoint peers sets every BatchNorm momentum
in the block to 0.0 (an exact no-op update) and restores
``num_batches_tracked`` afterwards, so parameters *and* buffers match.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

CONTENDERS = (
    "unmanaged",
    "memstrata",
    "checkpoint",
    "selective_checkpoint",
    "save_on_cpu",
    "disk_offload_hooks",
    "microbatch",
    "compile",
    "compile_memory_budget",
    "memstrata_compile",
    "trl_offload",
)
REPORTED_APART = ("microbatch",)
COMPILED = ("compile", "compile_memory_budget", "memstrata_compile")  # generated kernels: same model, not bit-identical losses
# Contenders with a knob the harness sets from each budget (one run per budget, fewer when two budgets
# give the same setting); the others have one setting, named here for the table and JSON.
BUDGET_KNOBS = ("memstrata", "microbatch", "compile_memory_budget", "memstrata_compile")
FIXED_SETTINGS = {
    "unmanaged": "eager",
    "checkpoint": "every block",
    "selective_checkpoint": "every block, save conv/mm",
    "save_on_cpu": "pinned host",
    "disk_offload_hooks": "torch.save per tensor",
    "compile": "inductor",
    "trl_offload": "streams, pinned host",
}


@dataclass
class StepContext:
    """Everything a contender's step needs, built once by the worker."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None
    budget_bytes: int | None = None
    microbatches: int = 1
    nvme_dir: str | None = None
    unmanaged_peak_bytes: int | None = None  # measured peak above baseline of the unmanaged run
    memory_budget_fraction: float | None = None  # compile_memory_budget's activation_memory_budget
    plan: Any = None  # memstrata: a `memstrata.decisions.Plan` to run ([Note: one plan for every repeat] in plan_once.py)
    loss_fn: Callable = field(default_factory=nn.CrossEntropyLoss)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x)
        return self.loss_fn(out.float(), y)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class SkipContender(Exception):
    """Raised by `prepare` when a contender does not apply here (with the reason)."""


class Contender:
    name = ""
    setup_steps = 0  # untimed steps before warm-up (memstrata's tracing step)

    def prepare(self, ctx: StepContext) -> None:
        pass

    def step(self, ctx: StepContext) -> float:
        loss = ctx.forward_loss(ctx.x, ctx.y)
        ctx.backward(loss)
        ctx.optimizer_step()
        return loss.detach()

    def notes(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Unmanaged(Contender):
    name = "unmanaged"


# --------------------------------------------------------------- checkpointing
@contextlib.contextmanager
def _batchnorm_frozen(module: nn.Module):
    """See [Note: BatchNorm under recomputation]."""
    bns = [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class _Checkpointed(nn.Module):
    """Runs `inner` under non-reentrant `torch.utils.checkpoint`."""

    def __init__(self, inner: nn.Module, selective_policy: Callable | None) -> None:
        super().__init__()
        self.inner = inner
        self._policy = selective_policy

    def _contexts(self):
        if self._policy is None:
            fwd, rec = contextlib.nullcontext(), contextlib.nullcontext()
        else:
            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            fwd, rec = create_selective_checkpoint_contexts(self._policy)
        @contextlib.contextmanager
        def recompute():
            with _batchnorm_frozen(self.inner), rec:
                yield

        return fwd, recompute()

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)


def _sac_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {
        aten.convolution.default,
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.linear.default,
    }

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_blocks(model: nn.Module, selective: bool) -> list[str]:
    """Wrap every multi-layer recompute unit of `model` in `_Checkpointed`.

    Returns the qualified names of the wrapped blocks.  If the model has no
    multi-layer units (a flat model), every unit is wrapped.  With
    `selective`, in-place activations inside the blocks are made out-of-place:
    SAC refuses a saved conv output that an in-place op then mutates (the
    SiLU after EfficientNet's squeeze-excitation conv); values are unchanged.
    """
    from memstrata.trace.units import find_units

    units = find_units(model)
    blocks = [(n, m) for n, m in units if len(m._modules) > 0] or units
    policy = _sac_policy() if selective else None
    for name, module in blocks:
        if selective:
            for m in module.modules():
                if isinstance(getattr(m, "inplace", None), bool):
                    m.inplace = False
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _Checkpointed(module, policy))
    return [n for n, _ in blocks]


class Checkpoint(Contender):
    name = "checkpoint"
    selective = False

    def prepare(self, ctx: StepContext) -> None:
        self._blocks = checkpoint_blocks(ctx.model, self.selective)

    def notes(self) -> dict[str, Any]:
        return {"checkpointed_blocks": len(self._blocks)}


class SelectiveCheckpoint(Checkpoint):
    name = "selective_checkpoint"
    selective = True

    def notes(self) -> dict[str, Any]:
        return {"checkpointed_blocks": len(self._blocks), "policy": "save conv/mm outputs, recompute the rest",
                "inplace_activations": "made out-of-place inside the blocks"}


# --------------------------------------------------------------- offload peers
_SAVE_ON_CPU_SKIP = "save_on_cpu moves activations to host memory; on CPU they already live there"


class SaveOnCpu(Contender):
    name = "save_on_cpu"

    def prepare(self, ctx: StepContext) -> None:
        if ctx.device.type != "cuda":
            raise SkipContender(_SAVE_ON_CPU_SKIP)

    def step(self, ctx: StepContext):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            loss = ctx.forward_loss(ctx.x, ctx.y)
        ctx.backward(loss)
        ctx.optimizer_step()
        return loss.detach()


class DiskOffloadHooks(Contender):
    """The naive disk peer: torch.save every saved activation, torch.load on unpack."""

    name = "disk_offload_hooks"

    def prepare(self, ctx: StepContext) -> None:
        self._root = tempfile.mkdtemp(prefix="memstrata-bench-disk-", dir=ctx.nvme_dir)
        self._param_storages = {p.untyped_storage().data_ptr() for p in ctx.model.parameters()}
        self._count = 0
        self._bytes = 0
        self._dir = self._root

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self._param_storages:
            return ("keep", t)
        self._count += 1
        path = os.path.join(self._dir, f"{self._count}.pt")
        torch.save(t, path)
        self._bytes += t.untyped_storage().nbytes()
        return ("file", path)

    def _unpack(self, packed):
        kind, payload = packed
        if kind == "keep":
            return payload
        t = torch.load(payload, weights_only=True)
        os.remove(payload)
        return t

    def step(self, ctx: StepContext):
        self._dir = tempfile.mkdtemp(dir=self._root)
        self._bytes = 0
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                loss = ctx.forward_loss(ctx.x, ctx.y)
            ctx.backward(loss)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        ctx.optimizer_step()
        return loss.detach()

    def notes(self) -> dict[str, Any]:
        return {"bytes_written_per_step": self._bytes, "dir": self._root}

    def close(self) -> None:
        shutil.rmtree(getattr(self, "_root", ""), ignore_errors=True)


# --------------------------------------------------------------- micro-batching
class Microbatch(Contender):
    name = "microbatch"

    def prepare(self, ctx: StepContext) -> None:
        k = ctx.microbatches
        if k < 1 or ctx.x.shape[0] % k:
            raise ValueError(f"micro-batch count {k} does not divide the batch {ctx.x.shape[0]}")
        self._k = k
        self._xs = ctx.x.chunk(k)
        self._ys = ctx.y.chunk(k)

    def step(self, ctx: StepContext):
        total = 0.0
        for xb, yb in zip(self._xs, self._ys):
            loss = ctx.forward_loss(xb, yb) / self._k
            ctx.backward(loss)
            total = total + loss.detach()
        ctx.optimizer_step()
        return total

    def notes(self) -> dict[str, Any]:
        return {"microbatches": self._k, "microbatch_size": self._xs[0].shape[0]}


# --------------------------------------------------------------- torch.compile
class Compiled(Contender):
    """``torch.compile`` of the model (inductor); the first steps compile, untimed.

    Two setup steps: the first traces and compiles forward and backward, the
    second would show a recompilation (a guard that failed on the first run);
    the bench's warm-up steps follow, then the timed ones.
    """

    name = "compile"
    setup_steps = 2

    def _configure(self, ctx: StepContext) -> None:
        pass

    def prepare(self, ctx: StepContext) -> None:
        import torch._inductor.config as inductor_config

        if ctx.device.type == "cpu":
            # one compile worker: no pool of compiler processes next to the measured one on a small box
            inductor_config.compile_threads = 1
        self._configure(ctx)
        ctx.model = torch.compile(ctx.model)

    def notes(self) -> dict[str, Any]:
        return {"backend": "inductor", "mode": "default"}


class CompiledMemoryBudget(Compiled):
    """``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` = the fraction."""

    name = "compile_memory_budget"

    def _configure(self, ctx: StepContext) -> None:
        import torch._functorch.config as functorch_config

        f = ctx.memory_budget_fraction
        if f is None or not 0.0 <= f <= 1.0:
            raise ValueError(f"compile_memory_budget needs a fraction in [0, 1], got {f!r}")
        functorch_config.activation_memory_budget = float(f)
        self._fraction = float(f)

    def notes(self) -> dict[str, Any]:
        return {**super().notes(), "activation_memory_budget": self._fraction}


# --------------------------------------------------------------- TRL offload
_TRL_NEEDS_CUDA = "trl's activation offload moves saved tensors to pinned host memory on a side stream: needs CUDA"


class TrlOffload(Contender):
    """TRL's `OffloadActivations` (streams, pinned memory) around the forward, as TRL's trainer uses it."""

    name = "trl_offload"

    def prepare(self, ctx: StepContext) -> None:
        if ctx.device.type != "cuda":
            raise SkipContender(_TRL_NEEDS_CUDA)
        try:
            from trl.models.activation_offloading import get_act_offloading_ctx_manager
        except ImportError as e:
            raise SkipContender(f"not installed: trl ({e}); pip install trl") from None
        # no output head of the kinds it looks for (output, lm_head, ...) on a torchvision model: no warning
        self._offload = get_act_offloading_ctx_manager(ctx.model, warn_if_no_head=False)
        try:
            import trl

            self._version = getattr(trl, "__version__", "?")
        except ImportError:  # pragma: no cover -- imported just above
            self._version = "?"

    def step(self, ctx: StepContext):
        with self._offload:
            loss = ctx.forward_loss(ctx.x, ctx.y)
        ctx.backward(loss)
        ctx.optimizer_step()
        return loss.detach()

    def notes(self) -> dict[str, Any]:
        return {"trl": self._version, "use_streams": True, "use_pin_memory": True, "min_offload_size": 1024}


# --------------------------------------------------------------- memstrata
def _manager_report(mgr: Any, out: dict[str, Any]) -> dict[str, Any] | None:
    """The Manager's report, with its step modes put in `out`; None (the error put in `out`) if it fails."""
    try:
        report = dict(mgr.report())
    except Exception as e:  # noqa: BLE001 -- the report is informative only
        out["report_error"] = f"{type(e).__name__}: {e}"
        return None
    out["step_modes"] = [s.get("mode") for s in report.get("steps") or []]
    return report


class Memstrata(Contender):
    """`memstrata.manager.Manager` at the bench budget.

    The bench budget counts bytes above the baseline (what a step adds on top
    of parameters, buffers, optimizer states and the batch); the Manager's
    budget counts every tier-0 byte, as its tracer does.

    [Note: bench budget -> Manager budget]
    When the unmanaged run's measured peak P is known (it runs first), the bench
    asks for a measured reduction R = P - budget.  The measured peak also holds
    memory no traced tensor accounts for (op-internal scratch such as oneDNN
    reorders, allocator slack), which no plan can free, so the Manager is asked
    to cut R bytes off its own traced peak: budget = trace.observed_peak - R.
    Without P, it gets ``budget_bytes + persistent_bytes``, where
    persistent_bytes is the exact tensor size of parameters, buffers, SGD
    momentum buffers and the batch.
    Its own warm-up and trace steps (``setup_steps``) come before the bench's
    warm-up, so warm-up and timed steps run under the plan.
    """

    name = "memstrata"

    def prepare(self, ctx: StepContext) -> None:
        try:
            from memstrata.manager import Manager
        except ImportError as e:
            raise SkipContender(f"memstrata.manager is not available yet ({e})") from None
        if ctx.budget_bytes is None:
            raise ValueError("memstrata needs a budget in bytes")
        m = ctx.model
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        self._persistent = (
            sum(nbytes(p) for p in m.parameters())
            + sum(nbytes(b) for b in m.buffers())
            + sum(nbytes(p) for p in m.parameters() if p.requires_grad)  # SGD momentum buffers
            + nbytes(ctx.x) + nbytes(ctx.y)
        )
        self._budget = int(ctx.budget_bytes) + self._persistent
        budget: Any = self._budget
        self._reduction = None
        if ctx.unmanaged_peak_bytes:
            self._reduction = max(0, int(ctx.unmanaged_peak_bytes) - int(ctx.budget_bytes))
            budget = lambda trace, r=self._reduction: max(1, int(trace.observed_peak) - r)  # noqa: E731
        # On CUDA the first step of a process pays one-off costs (cuDNN/cuBLAS set-up, lazy
        # module loading); the Manager calibrates op times to its fastest warm-up step, so it
        # gets a second one there.
        warmup = 2 if ctx.device.type == "cuda" else 1
        self._fixed = ctx.plan
        planner: Any = "auto"
        if callable(ctx.plan):  # the planning run's planner (bench/plan_once.py)
            planner = ctx.plan
        elif ctx.plan is not None:  # the bench's one plan: no re-planning, no tuning, the same plan in every repeat
            planner = lambda trace, hierarchy, b, p=ctx.plan: p  # noqa: E731
        self._mgr = Manager(m, budget=budget, nvme_dir=ctx.nvme_dir, warmup_steps=warmup,
                            model_name=type(m).__name__, planner=planner,
                            heap_readings="sparse" if ctx.plan is not None else "auto")  # the bench meters memory
        # warm-up, the trace-and-plan step, then (CUDA) the tuning steps ([Note: measured plan tuning])
        self.setup_steps = self._mgr.warmup_steps + 1 + self._mgr.max_tuning_steps

    def step(self, ctx: StepContext):
        with self._mgr.step(ctx.x):
            loss = ctx.forward_loss(ctx.x, ctx.y)
            ctx.backward(loss)
        ctx.optimizer_step()
        return loss.detach()

    def notes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"manager_budget_bytes": self._budget, "persistent_bytes": self._persistent,
                               "budget_rule": ("trace.observed_peak - measured reduction" if self._reduction is not None
                                               else "budget + persistent bytes"),
                               "measured_reduction_bytes": self._reduction,
                               "plan_source": ("the planning run's planner" if callable(self._fixed) else
                                               "given (planned once for every repeat)" if self._fixed is not None
                                               else "the Manager's own")}
        report = _manager_report(self._mgr, out)
        if report is None:
            return out
        steps = report.get("steps") or []
        if steps:
            last = steps[-1]
            out["last_step"] = {k: last.get(k) for k in ("mode", "seconds", "predicted_seconds", "peak_bytes",
                                                         "predicted_peak_bytes", "budget_bytes", "peak_source")}
            out["misaligned"] = [(s.get("stats") or {}).get("misaligned") for s in steps
                                 if (s.get("stats") or {}).get("misaligned")][:3]
        shapes = report.get("shapes") or {}
        for sh in shapes.values():
            plan = sh.get("plan") or {}
            out["plan"] = {"planner": plan.get("planner"), "counts": plan.get("counts"),
                           "predicted_step_time": plan.get("predicted_step_time"),
                           "plan_seconds": plan.get("plan_seconds"), "notes": (plan.get("notes") or [])[:5]}
            out["observed_peak"] = sh.get("observed_peak")
            if sh.get("tuning"):
                out["tuning"] = sh["tuning"]
            out["traces"] = sh.get("traces")
        return out

    def close(self) -> None:
        mgr = getattr(self, "_mgr", None)
        if mgr is not None:
            mgr.close()


# --------------------------------------------------------------- memstrata under torch.compile
class MemstrataCompiled(Contender):
    """`Manager(torch.compile(model), budget=...)`: memstrata over the compiled model, at the bench budget.

    [Note: memstrata under compile in the bench]
    The model is compiled exactly as the ``compile`` peer compiles it
    (`Compiled.prepare`: inductor, default mode; one compile thread on CPU) and
    handed to the Manager, which finds the compiled module and runs its
    compiled lifecycle (memstrata/compiled.py): warm-up, a trace step, the
    partitioner fraction predicted to fit, recompiles, the budget watch
    (corrections, one graph per unit, offloaded saves).  Every step of that
    ladder is setup: the contender keeps stepping, untimed, until the
    lifecycle says it is `settled` (a watch window at the current setting
    changed nothing), at most `MAX_SETUP_STEPS`; the bench's warm-up and timed
    steps then run at the setting it settled on.  A ladder that did not settle
    is said in the notes (``settled: false``), not hidden.

    The budget, on the bench's basis: the bench budget B counts bytes above
    the baseline (what the step adds to what lives between steps); the
    Manager's compiled trace counts ``bytes_at_start`` (parameters, buffers,
    gradients, the batch) plus the measured growth above the step's start.
    On CUDA that growth is ``max_memory_allocated`` less ``memory_allocated``
    at the start, the bench's own reading, so the Manager is asked for
    ``bytes_at_start + B``.  On CPU the Manager reads a sampled heap and the
    bench reads resident memory (they differed by ~20 MB on a tiny ResNet-18,
    the heap reading higher), so the contender meters the Manager's trace
    step with the bench's meter too (reading P) and asks for
    ``observed_peak - (P - B)``: the reduction the bench wants, cut off the
    Manager's own reading (the eager arm's rule, [Note: bench budget ->
    Manager budget], with the compiled step's own P; P < B gives room).  On
    CPU either is divided by ``1 + CPU_PEAK_SLACK``: the compiled watch
    accepts a CPU reading up to that slack over its budget, the bench's check
    has none.

    Like the ``memstrata`` arm the Manager gets no optimizer (activations
    only); on CUDA it resets the peak-memory statistics at each step's start
    (as the eager Manager does), so the bench's peak is the last timed step's.
    """

    name = "memstrata_compile"
    MAX_SETUP_STEPS = 40

    def prepare(self, ctx: StepContext) -> None:
        try:
            from memstrata.compiled import CompiledLifecycle
            from memstrata.manager import Manager
        except ImportError as e:
            raise SkipContender(f"memstrata.manager is not available ({e})") from None
        if ctx.budget_bytes is None:
            raise ValueError("memstrata_compile needs a budget in bytes")
        Compiled.prepare(Compiled(), ctx)  # ctx.model = torch.compile(model), the compile peer's options
        b = int(ctx.budget_bytes)
        cuda = ctx.device.type == "cuda"
        slack = 0.0 if cuda else CompiledLifecycle.CPU_PEAK_SLACK
        self._slack, self._bench_budget = slack, b
        self._trace_bench_peak: int | None = None  # CPU: the bench's meter over the trace step

        def budget(trace) -> int:
            if self._trace_bench_peak is None:  # CUDA: the trace reads max_memory_allocated above the start
                total = trace.bytes_at_start + b
            else:  # CPU: cut the reduction the bench's meter asks for off the Manager's own reading
                total = trace.observed_peak - (self._trace_bench_peak - b)  # (more room when it is below b)
            return max(1, int(total / (1.0 + slack)))

        # CUDA: a second plain step before the trace (the first one of a process pays one-off set-up costs)
        warmup = 2 if cuda else 1
        self._meter_call = None if cuda else warmup + 1  # the trace step
        self._mgr = Manager(ctx.model, budget=budget, nvme_dir=ctx.nvme_dir, warmup_steps=warmup,
                            model_name=type(getattr(ctx.model, "_orig_mod", ctx.model)).__name__)
        self._life = self._mgr._compiled_life
        if self._life is None:
            raise SkipContender("the Manager did not see a compiled model (memstrata disabled?)")
        # warm-up, trace, and at least one watch window; `step` keeps going until the lifecycle settles
        self.setup_steps = warmup + 1 + self._life.WATCH_STEPS
        self._calls = 0
        self._extra = 0

    def _one(self, ctx: StepContext, meter: bool = False):
        with self._mgr.step(ctx.x):
            m = None
            if meter:
                from .peak import PeakMeter

                m = PeakMeter(ctx.device)
                m.start()
            loss = ctx.forward_loss(ctx.x, ctx.y)
            ctx.backward(loss)
            if m is not None:  # read before the step's block ends: the Manager resolves its budget there
                self._trace_bench_peak = m.stop().peak_bytes
        ctx.optimizer_step()
        return loss.detach()

    def step(self, ctx: StepContext):
        self._calls += 1
        loss = self._one(ctx, meter=self._calls == self._meter_call)
        if self._calls == self.setup_steps:  # the last setup step: the rest of the ladder, untimed
            while not self._life.settled() and self.setup_steps + self._extra < self.MAX_SETUP_STEPS:
                self._extra += 1
                loss = self._one(ctx)
        return loss

    def notes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "inductor", "mode": "default", "bench_budget_bytes": self._bench_budget,
                               "budget_rule": ("trace.bytes_at_start + bench budget" if self._trace_bench_peak is None
                                               else "trace.observed_peak - (the bench's reading of the trace step "
                                                    "- bench budget)")
                               + (f", / {1 + self._slack:g} (the compiled watch's CPU slack)" if self._slack else ""),
                               "trace_bench_peak_bytes": self._trace_bench_peak,
                               "setup_steps": self.setup_steps + self._extra, "settled": self._life.settled()}
        report = _manager_report(self._mgr, out)
        if report is None:
            return out
        steps = report.get("steps") or []
        if steps:
            last = steps[-1]
            st = last.get("stats") or {}
            out["graphs"] = st.get("graphs")
            out["last_step"] = {k: last.get(k) for k in ("mode", "seconds", "peak_bytes", "peak_above_start_bytes",
                                                         "predicted_peak_bytes", "budget_bytes", "peak_source")}
            out["last_step"].update({k: st.get(k) for k in ("fraction", "offload", "offloaded_bytes",
                                                            "saved_activation_bytes", "restore_wait_seconds")})
        for sh in (report.get("shapes") or {}).values():
            out["misaligned_steps"] = sh.get("misaligned_steps")
            out["setting"] = {k: sh.get(k) for k in ("fraction", "split_at_units", "offload", "grads_tiered",
                                                     "params_tiered", "corrections")}
            out["manager_budget_bytes"] = sh.get("budget_bytes")
            out["observed_peak"] = sh.get("observed_peak")
            out["measured_peaks"] = sh.get("measured_peaks")
            out["plan"] = sh.get("plan")
            out["lifecycle_notes"] = (sh.get("notes") or [])[:6]
            out["runtime"] = sh.get("runtime")
        return out

    def close(self) -> None:
        mgr = getattr(self, "_mgr", None)
        if mgr is not None:
            mgr.close()


_BY_NAME: dict[str, type[Contender]] = {
    c.name: c for c in (Unmanaged, Memstrata, Checkpoint, SelectiveCheckpoint, SaveOnCpu, DiskOffloadHooks, Microbatch,
                        Compiled, CompiledMemoryBudget, MemstrataCompiled, TrlOffload)
}


def skip_reason(name: str, device: str) -> str | None:
    """Why `name` does not apply on `device` (known without starting a worker), or None."""
    if name == "save_on_cpu" and device != "cuda":
        return _SAVE_ON_CPU_SKIP
    if name == "trl_offload" and device != "cuda":
        return _TRL_NEEDS_CUDA
    return None


def make(name: str) -> Contender:
    return _BY_NAME[name]()
