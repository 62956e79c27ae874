"""record — observe one training step at aten-op level and return a `Trace`.

Three entry points:

* `record_step(model, ...)` — a context manager around a step the user writes;
* `trace_step(model, inputs, target, ...)` — one full step (forward, loss,
  backward, optional optimizer step) in one call;
* `trace_model(name, batch, res, profile)` — a torchvision classifier built on
  the `meta` device and traced there: GPU-scale traces on a CPU box.

Example (everything lives on the CPU; nothing is moved)::

    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    >>> with record_step(model) as rec:
    ...     loss = torch.nn.functional.cross_entropy(model(x), y)
    ...     loss.backward()
    ...     opt.step()
    >>> t = rec.trace()
    >>> t.ops[0].name, t.ops[0].phase, t.units[0].module
    ('aten.convolution.default', 'forward', 'conv1')

[Note: how the recorder sees a step]
A `TorchDispatchMode` sees every aten op below autograd, in execution order;
each call becomes one `OpRecord` (views, `detach` and in-place ops included),
so op *k* of a unit's forward is event `unit.first_op + k` -- the same
sequence a selective-checkpoint policy sees when the unit is re-run, except
for the ops SAC hides from its policy (`aten.detach.default`, see
`sac_op_indices`).  Storages are keyed by the address of their `StorageImpl`
(`untyped_storage()._cdata`, valid on `meta` where `data_ptr()` is 0).  We
hold a `StorageWeakRef` to every storage we have seen until the recorder is
finished: the weak reference keeps the `StorageImpl` allocation (not its data)
alive, so an address cannot be reused by a later storage while we key by it,
and `expired()` tells when eager PyTorch really released the data.  The live
storages are polled at the start of every op: whatever expired since the
previous op was freed after that op (`freed_after`), either inside it or by
Python/autograd between the two.

[Note: where a unit's backward starts]
`UnitRecord.first_backward_op` is the first backward op run after autograd
unpacks a tensor packed inside the unit: the moment non-reentrant checkpoint
would trigger the unit's recompute (it recomputes on the first unpack of the
region's saved tensors).  It is *not* the first backward read of the saved
storages: a storage packed by several units (a shared module's weight, an
activation saved by its producer's and its consumer's unit) is read by a later
unit's backward first.  Pack hooks return the tensor unchanged; the unpack hook
receives that same object back, which identifies the pack position (an object
packed at several positions is matched last-packed-first, the backward's
order).

[Note: phases]
forward  -- every op before the autograd engine starts;
backward -- every op run while an autograd graph task is executing
            (`torch._C._current_graph_task_id() != -1`; works on the engine's
            device threads too, which inherit the mode through autograd's
            thread-local state);
optimizer -- ops inside `Optimizer.step` (global step pre/post hooks) and any
            op after the backward (gradient clipping, zero_grad, ...).
A step is one forward, one backward, then the update; gradient accumulation
over micro-batches should be traced one micro-batch at a time.
"""

from __future__ import annotations

import difflib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ..hardware import Hierarchy
from .roofline import is_metadata_op, op_cost, op_dtype, resolve_hierarchy, roofline_time
from .schema import OpRecord, StorageRecord, Trace, UnitRecord
from .param_modules import tierable_param_modules
from .units import find_units, sequential_children

__all__ = [
    "record_step",
    "StepRecorder",
    "trace_step",
    "trace_model",
    "ModelInputError",
    "check_model_input",
    "live_bytes_per_event",
    "observed_peak",
    "sac_op_indices",
    "SAC_HIDDEN_OPS",
    "classification_models",
]

MODES = ("measured", "meta")

# Ops that torch's selective-checkpoint modes run without consulting the policy: the policy's k-th call is
# the k-th op of the unit *not* in this set (one list, in trace/space.py).
from .space import SAC_HIDDEN_OPS  # noqa: E402


# ----------------------------------------------------------------------------- builders


def is_checkpoint_dummy(t: torch.Tensor) -> bool:
    """The empty leaf that non-reentrant `torch.utils.checkpoint` saves beside a unit's inputs on some torch
    versions: not a pack of any plain step ([Note: checkpoint's dummy save])."""
    return t.is_leaf and t.requires_grad and t.numel() == 0


# [Note: checkpoint's dummy save]
# The pack positions of a trace (a plain step) and of a managed step must be the same sequence.  A recomputed
# unit runs under non-reentrant checkpoint, which saves the unit's tensor inputs through the surrounding
# saved-tensor hooks (ours).  Up to torch 2.11 it saves them with `ctx.save_for_backward(dummy, *inputs)`,
# `dummy = torch.empty((0,), requires_grad=True)`; from 2.12 on without the dummy.  That one extra pack
# shifted every later pack of a unit with a single saved tensor into the next unit's positions (DenseNet's
# transition pool: "pack 57: storage of 16384 bytes, trace storage 134 has 4096" on torch 2.11, the GPU
# image's version).  Both the tracer and the runtime skip empty leaves that require grad: no plain step
# saves one where it matters (it holds no bytes), and skipping it on both sides keeps the two sequences equal.


def _param_indices(optimizer) -> list:
    """(parameter, the optimizer's index of it) in state_dict order."""
    return [(p, i) for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]


@dataclass(eq=False)
class _Storage:
    """Mutable record of one storage while the step runs (becomes a StorageRecord)."""

    id: int
    key: int  # StorageImpl address
    ref: StorageWeakRef
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    producer: int | None
    first_phase: str  # phase of the op that first touched it
    module: str = ""
    unit: int | None = None
    last_use: int | None = None
    freed_after: int | None = None
    pack_indices: list[int] = field(default_factory=list)
    backward_reads: list[int] = field(default_factory=list)
    role: str | None = None  # parameter / buffer / input / gradient / optimizer_state, when known
    param_index: int | None = None  # optimizer states: their parameter's index in the optimizer


@dataclass(eq=False)
class _UnitCall:
    index: int
    module: str
    first_op: int
    pack_start: int
    inputs: tuple[int, ...]
    last_op: int = -1
    pack_end: int = -1
    parent: int | None = None
    sequential: str = ""  # the plain nn.Sequential calling it as a direct child (segments), "" = none
    position: int = -1


def _storage_key(t: torch.Tensor) -> tuple[int, Any] | None:
    try:
        s = t.untyped_storage()
        return s._cdata, s
    except Exception:  # sparse / opaque subclass tensors have no plain storage
        return None


def _flat_tensors(x: Any, out: list[torch.Tensor]) -> None:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _flat_tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _flat_tensors(y, out)


# ----------------------------------------------------------------------------- dispatch mode


class _Mode(TorchDispatchMode):
    def __init__(self, rec: "StepRecorder") -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.rec._on_op(func, args, kwargs or {})


# ----------------------------------------------------------------------------- recorder


class StepRecorder:
    """Records one training step; use through `record_step`.  `trace()` after the block."""

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "measured",
        profile: Hierarchy | str | None = None,
        model_name: str = "",
        batch_size: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.hierarchy = resolve_hierarchy(profile)
        if mode == "meta" and self.hierarchy is None:
            raise ValueError("mode='meta' estimates op times with a roofline: pass profile= (e.g. 'h200')")
        self.model = model
        self.mode = mode
        self.model_name = model_name or type(model).__name__
        self.batch_size = batch_size
        self._trace: Trace | None = None
        self._active = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "StepRecorder":
        if self._active or self._trace is not None:
            raise RuntimeError("a StepRecorder records one step; create a new one with record_step()")
        self._active = True
        self._ops: list[tuple] = []  # (name, phase, module, unit, flops, bytes, dur, inputs, outputs)
        self._by_key: dict[int, _Storage] = {}
        self._storages: list[_Storage] = []
        self._live: list[_Storage] = []  # polled for expiry (parameters and buffers are not)
        self._module_stack: list[str] = []
        self._unit_stack: list[_UnitCall] = []
        self._units: list[_UnitCall] = []
        self._num_packs = 0
        self._pack_owner: list[int] = []  # pack position -> storage id
        self._first_unpack: list[int | None] = []  # pack position -> first backward op after its unpack
        self._packed_objs: dict[int, list[int]] = {}  # id(packed object) -> pack positions not yet unpacked
        self._backward_start: int | None = None
        self._in_optimizer = 0
        self._optimizers: list[weakref.ref] = []
        self._input_shape: tuple[int, ...] | None = None
        self._device: str | None = None
        self._sync = self.mode == "measured" and torch.cuda.is_available()
        self._handles: list[Any] = []

        # Storages that exist before the step: parameters, buffers, existing grads.
        for name, p in self.model.named_parameters():
            owner = name.rpartition(".")[0]
            self._register_existing(p, "parameter", owner)
            if p.grad is not None:
                self._register_existing(p.grad, "gradient", owner)
            if self._device is None:
                self._device = p.device.type
        for name, b in self.model.named_buffers():
            self._register_existing(b, "buffer", name.rpartition(".")[0])

        self._install_hooks()
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        self._dispatch = _Mode(self)
        self._dispatch.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._dispatch.__exit__(exc_type, exc, tb)
        finally:
            self._saved_hooks.__exit__(exc_type, exc, tb)
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._active = False
        if exc_type is None:
            self._finish()

    def trace(self) -> Trace:
        if self._trace is None:
            raise RuntimeError("trace() is available after the record_step block has finished without error")
        return self._trace

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        unit_modules = {id(m) for _, m in find_units(self.model)}
        self._in_sequential = sequential_children(self.model)
        for name, m in self.model.named_modules():
            is_unit = id(m) in unit_modules
            self._handles.append(m.register_forward_pre_hook(self._make_pre(name, is_unit, m is self.model),
                                                             with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._make_post(is_unit), always_call=True))
        self._model_index = {id(p): i for i, p in enumerate(self.model.parameters())}
        for p in self.model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        from torch.optim import optimizer as opt

        self._handles.append(opt.register_optimizer_step_pre_hook(self._opt_pre))
        self._handles.append(opt.register_optimizer_step_post_hook(self._opt_post))

    def _make_pre(self, name: str, is_unit: bool, is_root: bool) -> Callable:
        def pre(module, args, kwargs):
            self._module_stack.append(name)
            # The module's own parameters as it runs: under FSDP2 these are the unsharded parameters its
            # pre-forward hook (registered before ours) has just gathered; they are parameters, not inputs.
            for p in module.parameters(recurse=False):
                s = self._sid(p, None)
                if s is not None and s.role in (None, "input") and s.producer is None:
                    s.role = "parameter"
            tensors: list[torch.Tensor] = []
            if is_unit or (is_root and self._input_shape is None):
                _flat_tensors(args, tensors)
                _flat_tensors(kwargs, tensors)
            if is_root and self._input_shape is None and tensors:
                self._input_shape = tuple(int(s) for s in tensors[0].shape)
                self._device = self._device or tensors[0].device.type
                for t in tensors:
                    s = self._sid(t, None)
                    if s is not None and s.role is None and s.producer is None:
                        s.role = "input"
            if is_unit and self._phase() == "forward":
                ids: list[int] = []
                for t in tensors:
                    s = self._sid(t, None)
                    if s is not None and s.id not in ids:
                        ids.append(s.id)
                parent = self._unit_stack[-1].index if self._unit_stack else None
                seq, pos = self._in_sequential.get(name, ("", -1))
                call = _UnitCall(len(self._units), name, len(self._ops), self._num_packs, tuple(ids), parent=parent,
                                 sequential=seq, position=pos)
                self._units.append(call)
                self._unit_stack.append(call)
            return None

        return pre

    def _make_post(self, is_unit: bool) -> Callable:
        def post(module, args, output):
            if self._module_stack:
                self._module_stack.pop()
            if is_unit and self._unit_stack and self._phase() == "forward":
                call = self._unit_stack.pop()
                call.last_op = len(self._ops) - 1
                call.pack_end = self._num_packs
            return None

        return post

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            s = self._sid(p.grad, None)
            if s is not None and s.role is None:
                s.role = "gradient"
            if s is not None and s.role == "gradient" and s.param_index is None:
                # the model's parameter order; an optimizer traced in the step renumbers it in its own order
                s.param_index = self._model_index.get(id(p))

    def _opt_pre(self, optimizer, args, kwargs) -> None:
        self._in_optimizer += 1
        if not any(r() is optimizer for r in self._optimizers):
            self._optimizers.append(weakref.ref(optimizer))
        self._mark_optimizer_state(optimizer)  # states from earlier steps exist before this one
        return None

    def _opt_post(self, optimizer, args, kwargs) -> None:
        self._in_optimizer = max(0, self._in_optimizer - 1)
        self._mark_optimizer_state(optimizer)

    def _mark_optimizer_state(self, optimizer) -> None:
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        for param, state in optimizer.state.items():
            ts: list[torch.Tensor] = []
            _flat_tensors(state, ts)
            for t in ts:
                s = self._sid(t, None)
                if s is not None and s.role is None:
                    s.role = "optimizer_state"
                if s is not None and s.role == "optimizer_state" and t.dim() > 0:
                    s.param_index = index.get(id(param))
        for param, i in _param_indices(optimizer):
            if param.grad is not None:  # gradients: the optimizer's numbering too (trace/grads.py)
                s = self._sid(param.grad, None)
                if s is not None and s.role == "gradient":
                    s.param_index = i

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if is_checkpoint_dummy(t):
            return t  # [Note: checkpoint's dummy save]
        if self._phase() == "forward":
            s = self._sid(t, None)
            pos = self._num_packs
            self._num_packs += 1
            self._pack_owner.append(s.id if s is not None else -1)
            self._first_unpack.append(None)
            self._packed_objs.setdefault(id(t), []).append(pos)
            if s is not None:
                s.pack_indices.append(pos)
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        # The packed object itself comes back (it is alive while autograd holds it,
        # so its id is unambiguous).  An object packed at several positions is
        # assigned last-packed-first: the backward visits nodes in reverse order.
        positions = self._packed_objs.get(id(t))
        if positions and self._phase() == "backward":
            pos = positions.pop()
            if self._first_unpack[pos] is None:
                self._first_unpack[pos] = len(self._ops)
        return t

    # ------------------------------------------------------------------ storages
    def _phase(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        if self._in_optimizer or self._backward_start is not None:
            return "optimizer"
        return "forward"

    def _new_storage(self, key: int, st: Any, t: torch.Tensor, producer: int | None, phase: str) -> _Storage:
        s = _Storage(
            id=len(self._storages),
            key=key,
            ref=StorageWeakRef(st),
            nbytes=int(st.nbytes()),
            dtype=str(t.dtype).replace("torch.", ""),
            shape=tuple(int(d) for d in t.shape),
            producer=producer,
            first_phase=phase,
        )
        self._storages.append(s)
        self._by_key[key] = s
        return s

    def _register_existing(self, t: torch.Tensor, role: str, module: str) -> None:
        k = _storage_key(t)
        if k is None:
            return
        s = self._by_key.get(k[0])
        if s is None:
            s = self._new_storage(k[0], k[1], t, None, "forward")
            s.module = module
            if role not in ("parameter", "buffer"):
                self._live.append(s)
        if s.role is None:
            s.role = role

    def _sid(self, t: torch.Tensor, producer: int | None) -> _Storage | None:
        """The record of `t`'s storage; a new one (made by `producer`) if unseen."""
        k = _storage_key(t)
        if k is None:
            return None
        s = self._by_key.get(k[0])
        if s is None:
            s = self._new_storage(k[0], k[1], t, producer, self._phase())
            if producer is not None:
                s.module = self._module_stack[-1] if self._module_stack else ""
                s.unit = self._unit_stack[-1].index if self._unit_stack and s.first_phase == "forward" else None
            self._live.append(s)
        return s

    def _poll(self, prev_op: int) -> None:
        """Mark storages released since the last poll as freed after op `prev_op`."""
        live = self._live
        if not live:
            return
        expired = torch.Storage._expired  # type: ignore[attr-defined]
        keep = []
        for s in live:
            if expired(s.ref.cdata):
                s.freed_after = max(prev_op, 0)
            else:
                keep.append(s)
        if len(keep) != len(live):
            self._live = keep

    # ------------------------------------------------------------------ ops
    def _on_op(self, func, args: tuple, kwargs: dict):
        idx = len(self._ops)
        self._poll(idx - 1)
        phase = self._phase()
        if phase == "backward" and self._backward_start is None:
            self._backward_start = idx

        in_t: list[torch.Tensor] = []
        _flat_tensors(args, in_t)
        if kwargs:
            _flat_tensors(kwargs, in_t)
        inputs: list[int] = []
        for t in in_t:
            s = self._sid(t, None)
            if s is None or s.id in inputs:
                continue
            inputs.append(s.id)
            s.last_use = idx
            if phase == "backward" and (s.producer is None or s.producer < self._backward_start):
                s.backward_reads.append(idx)

        if self._sync:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            torch.cuda.synchronize()
            dur = time.perf_counter() - t0
        elif self.mode == "measured":
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            dur = time.perf_counter() - t0
        else:
            out = func(*args, **kwargs)
            dur = 0.0

        out_t: list[torch.Tensor] = []
        _flat_tensors(out, out_t)
        aliasing = is_metadata_op(func)
        outputs: list[int] = []
        for t in out_t:
            s = self._sid(t, idx)
            if s is None or s.id in outputs:
                continue
            s.last_use = idx
            if s.producer == idx or not aliasing:
                outputs.append(s.id)

        cost = op_cost(func, args, kwargs, out)
        if self.mode == "meta":
            dur = roofline_time(cost.flops, cost.bytes_accessed, self.hierarchy, cost.is_compute, op_dtype(args))
        module = self._module_stack[-1] if self._module_stack else ""
        unit = self._unit_stack[-1].index if (self._unit_stack and phase == "forward") else None
        self._ops.append((str(func), phase, module, unit, cost.flops, cost.bytes_accessed, dur,
                          tuple(inputs), tuple(outputs)))
        return out

    # ------------------------------------------------------------------ finish
    def _finish(self) -> None:
        n = len(self._ops)
        self._poll(n - 1)
        # Gradients still attached at the end, and optimizer states created in the step.
        for p in self.model.parameters():
            if p.grad is not None:
                k = _storage_key(p.grad)
                s = self._by_key.get(k[0]) if k else None
                if s is not None and s.role is None:
                    s.role = "gradient"
        for r in self._optimizers:
            o = r()
            if o is not None:
                self._mark_optimizer_state(o)

        phases = [op[1] for op in self._ops]
        forward_end = max((i for i, p in enumerate(phases) if p == "forward"), default=-1)
        backward_end = max((i for i, p in enumerate(phases) if p == "backward"), default=forward_end)

        storages = tuple(self._storage_record(s, phases) for s in self._storages)
        ops = tuple(
            OpRecord(index=i, name=o[0], phase=o[1], module=o[2], unit=o[3], flops=o[4], bytes_accessed=o[5],
                     duration=o[6], inputs=o[7], outputs=o[8])
            for i, o in enumerate(self._ops)
        )
        units = self._unit_records(storages, ops)
        device = self.hierarchy.device if self.mode == "meta" else (self._device or "cpu")
        input_shape = self._input_shape or ()
        batch = self.batch_size if self.batch_size is not None else (input_shape[0] if input_shape else 0)
        self._trace = Trace(
            model=self.model_name,
            mode=self.mode,
            device=device,
            profile=self.hierarchy.name if self.hierarchy is not None else None,
            batch_size=int(batch),
            input_shape=tuple(input_shape),
            ops=ops,
            storages=storages,
            units=units,
            forward_end=forward_end,
            backward_end=backward_end,
            num_packs=self._num_packs,
            observed_peak=observed_peak(storages, n),
            param_modules=tierable_param_modules(self.model),
        )
        # Drop the weak references (and the builders) now that the trace is plain data.
        self._by_key.clear()
        self._storages.clear()
        self._live.clear()

    def _storage_record(self, s: _Storage, phases: list[str]) -> StorageRecord:
        role = s.role
        produced_in = phases[s.producer] if s.producer is not None else None
        if role is None:
            if s.producer is None:
                role = "input" if s.first_phase == "forward" else "temporary"
            elif produced_in == "optimizer" and s.freed_after is None:
                role = "optimizer_state"
            elif produced_in == "forward" and s.pack_indices:
                role = "activation"
            else:
                role = "temporary"
        persistent = role in ("parameter", "buffer") or (role in ("gradient", "optimizer_state") and s.freed_after is None)
        return StorageRecord(
            id=s.id,
            nbytes=s.nbytes,
            dtype=s.dtype,
            shape=s.shape,
            kind=role,
            producer=s.producer,
            last_use=s.last_use,
            persistent=persistent,
            saved=bool(s.pack_indices),
            pack_indices=tuple(s.pack_indices),
            backward_reads=tuple(s.backward_reads),
            module=s.module,
            unit=s.unit,
            freed_after=s.freed_after,
            param_index=s.param_index if role in ("optimizer_state", "gradient") else None,
        )

    def _unit_records(self, storages: tuple[StorageRecord, ...], ops: tuple[OpRecord, ...]) -> tuple[UnitRecord, ...]:
        prefix = [0.0]
        for op in ops:
            prefix.append(prefix[-1] + op.duration)
        out = []
        for u in self._units:
            last_op = u.last_op if u.last_op >= 0 else len(ops) - 1
            pack_end = u.pack_end if u.pack_end >= 0 else self._num_packs
            reads = [r for r in self._first_unpack[u.pack_start:pack_end] if r is not None and r < len(ops)]
            fb = min(reads) if reads else None
            out.append(UnitRecord(
                index=u.index,
                module=u.module,
                first_op=u.first_op,
                last_op=last_op,
                pack_start=u.pack_start,
                pack_end=pack_end,
                inputs=u.inputs,
                first_backward_op=fb,
                recompute_time=prefix[last_op + 1] - prefix[u.first_op] if last_op >= u.first_op else 0.0,
                parent=u.sequential,
                position=u.position,
            ))
        return tuple(out)


def record_step(
    model: nn.Module,
    *,
    mode: str = "measured",
    profile: Hierarchy | str | None = None,
    model_name: str = "",
    batch_size: int | None = None,
) -> StepRecorder:
    """Record the training step run inside the block; `.trace()` afterwards.

    mode="measured" times every op for real (synchronising CUDA around each
    op, so the step runs slower than usual); mode="meta" estimates op times
    with `profile`'s roofline -- use it with a model and inputs on the `meta`
    device.  Run exactly one forward, one backward and optionally one
    optimizer step inside the block.  The recorder installs saved-tensor hooks
    for the block (an outer `saved_tensors_hooks` context is shadowed).
    """
    return StepRecorder(model, mode=mode, profile=profile, model_name=model_name, batch_size=batch_size)


# ----------------------------------------------------------------------------- derived quantities


def live_bytes_per_event(storages: Any, num_ops: int = 0) -> list[int]:
    """Bytes live at each event, by the definition in `trace.schema` [Note: what "live" means].

    A storage is live over [producer, freed_after] inclusive; producer None
    means from event 0, freed_after None means to the last event.  Accepts a
    `Trace` (then `num_ops` may be anything) or a sequence of StorageRecords.
    """
    if isinstance(storages, Trace):
        num_ops = len(storages.ops)
        storages = storages.storages
    if num_ops <= 0:
        return []
    diff = [0] * (num_ops + 1)
    for s in storages:
        start = 0 if s.producer is None else s.producer
        end = num_ops - 1 if s.freed_after is None else s.freed_after
        if end < start:
            continue
        diff[start] += s.nbytes
        diff[end + 1] -= s.nbytes
    out, acc = [], 0
    for i in range(num_ops):
        acc += diff[i]
        out.append(acc)
    return out


def observed_peak(storages: Any, num_ops: int = 0) -> int:
    """max over events of `live_bytes_per_event` (0 for an empty trace)."""
    return max(live_bytes_per_event(storages, num_ops), default=0)


def sac_op_indices(trace: Trace, unit: UnitRecord | int) -> list[int]:
    """Op indices of a unit's forward in the order a selective-checkpoint policy sees them.

    torch's SAC modes run `SAC_HIDDEN_OPS` (aten.detach.default, ...) without
    calling the policy, so the policy's k-th call is `sac_op_indices(...)[k]`.
    """
    u = trace.units[unit] if isinstance(unit, int) else unit
    return [i for i in range(u.first_op, u.last_op + 1) if trace.ops[i].name not in SAC_HIDDEN_OPS]


# ----------------------------------------------------------------------------- convenience


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)  # torchvision InceptionOutputs / GoogLeNetOutputs
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and "out" in out:
        return out["out"]
    raise TypeError(f"cannot find the output tensor in a model output of type {type(out).__name__}")


def trace_step(
    model: nn.Module,
    inputs: Any,
    target: Any = None,
    *,
    loss_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    mode: str = "measured",
    profile: Hierarchy | str | None = None,
    model_name: str = "",
) -> Trace:
    """Trace one full step: forward, loss, backward, and `optimizer.step()` if given.

    `inputs` is a tensor or a tuple of positional tensors; the loss is
    `loss_fn(output, target)` (default cross entropy) or `loss_fn(output)`
    (default `output.sum()`) when `target` is None.
    """
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss() if target is not None else (lambda o: o.sum())
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    with record_step(model, mode=mode, profile=profile, model_name=model_name) as rec:
        out = _logits(model(*args))
        loss = loss_fn(out, target) if target is not None else loss_fn(out)
        del out
        loss.backward()
        del loss
        if optimizer is not None:
            optimizer.step()
    return rec.trace()


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build_on_meta(builder: Callable[[], nn.Module]) -> nn.Module:
    """Build a model whose parameters and buffers live on `meta` (nothing allocated).

    The `torch.device("meta")` context does it for most models; constructors that
    compute with tensors (`.item()`, `.tolist()`, e.g. RegNet's width schedule)
    fail under it, so for those we build on the CPU with parameter and buffer
    registration redirected to `meta` (one layer's tensors exist at a time).
    """
    try:
        with torch.device("meta"):
            return builder()
    except (NotImplementedError, RuntimeError):
        pass
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def to_meta_parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def to_meta_buffer(self, name, tensor, persistent=True):
        if tensor is not None:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = to_meta_parameter, to_meta_buffer  # type: ignore[method-assign]
    try:
        return builder()
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


_MODEL_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """float32 / bfloat16 / float16 from a torch dtype or its name ("bf16", "float16", ...).

    >>> model_dtype("bf16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype) and dtype in _MODEL_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _MODEL_DTYPES:
        return _MODEL_DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be float32, bfloat16 or float16 (a torch dtype or its name), got {dtype!r}")


def trace_model(
    name: str,
    batch: int,
    res: int,
    profile: Hierarchy | str = "h200",
    dtype: torch.dtype | str = torch.float32,
    num_classes: int = 1000,
    inplace_activations: bool = False,
) -> Trace:
    """Trace one SGD-momentum training step of a torchvision classifier on `meta`.

    Nothing is allocated: the model, the batch (batch x 3 x res x res) and the
    optimizer states are meta tensors, op times come from `profile`'s roofline.
    Activations run out of place, as under `memstrata.Manager` (see [Note: why
    memstrata runs activations out of place] in units.py), unless
    `inplace_activations=True` (the model exactly as torchvision builds it).

    >>> t = trace_model("resnet18", 8, 64, "h200")
    >>> t.mode, t.device, t.batch_size
    ('meta', 'cuda', 8)
    """
    import torchvision

    known = classification_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision classification model {name!r}{hint} "
                         f"(see memstrata.trace.classification_models())")
    for what, v in (("batch", batch), ("res", res), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    dtype = model_dtype(dtype)
    hierarchy = resolve_hierarchy(profile)
    assert hierarchy is not None
    model = _build_on_meta(lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes))
    model = model.to(dtype=dtype).train()
    if not inplace_activations:
        from .units import out_of_place_activations

        out_of_place_activations(model)
    x = torch.empty(batch, 3, res, res, device="meta", dtype=dtype)
    y = torch.empty(batch, device="meta", dtype=torch.long)
    # On CUDA, SGD defaults to the multi-tensor (foreach) kernels; mirror the
    # device the profile describes so the optimizer phase has the same shape.
    foreach = hierarchy.device == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=foreach)
    try:
        return trace_step(model, x, y, optimizer=opt, mode="meta", profile=hierarchy, model_name=name)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        check_model_input(name, batch, res, num_classes=num_classes, dtype=dtype)  # the user's input?
        raise  # no: the model takes this input, so the failure is ours


class ModelInputError(ValueError):
    """A model cannot take the requested input: smaller than it allows, or not the one size it is built for."""


def check_model_input(name: str, batch: int, res: int, *, num_classes: int = 1000,
                      dtype: torch.dtype | str = torch.float32) -> None:
    """Raise ModelInputError when torchvision's `name` cannot train on a batch x 3 x res x res input.

    Tried on meta (nothing allocated): a forward of the model as torchvision
    builds it.  The one-line message says why, in torch's words, and what the
    model does take (see `_input_hint`).

    >>> check_model_input("vit_b_16", 2, 64)
    Traceback (most recent call last):
    ...
    memstrata.trace.record.ModelInputError: vit_b_16 cannot take a batch of 2 at 64x64: Wrong image height! Expected 224 but got 64; the smallest it takes at batch 2 is 224x224
    """
    import torchvision

    dtype = model_dtype(dtype)
    plain = _build_on_meta(lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes))
    plain = plain.to(dtype=dtype).train()
    why = _input_problem(plain, batch, res)
    if why is not None:
        raise ModelInputError(f"{name} cannot take a batch of {batch} at {res}x{res}: {why}"
                              f"{_input_hint(name, plain, batch, res)}")


def _input_problem(model: nn.Module, batch: int, res: int) -> str | None:
    """Why `model` (on meta, in training mode) rejects a batch x 3 x res x res input, else None."""
    dtype = next(model.parameters()).dtype
    x = torch.empty(batch, 3, res, res, device="meta", dtype=dtype)
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        return " ".join(str(e).split()).rstrip("!.") or type(e).__name__
    return None


def _input_hint(name: str, model: nn.Module, batch: int, res: int, limit: int = 1024) -> str:
    """What input `model` does take at `batch`, found by trying on meta ("" when nothing up to `limit` works).

    First the sizes torchvision's weights metadata lists (a ViT takes exactly
    its image size), then, above `res`, doubling and bisection for the
    smallest side, which assumes that a model taking side s also takes every
    larger side (true of convolutional nets).
    """
    import torchvision

    ok = lambda side: _input_problem(model, batch, side) is None  # noqa: E731
    try:
        listed = {max(w.meta["min_size"]) for w in torchvision.models.get_model_weights(name) if "min_size" in w.meta}
    except (KeyError, ValueError):
        listed = set()
    for side in sorted(listed):
        if side > res and ok(side):
            return f"; the smallest it takes at batch {batch} is {side}x{side}"
        if side < res and ok(side):
            return f"; it takes {side}x{side}"
    lo, hi, side = res, None, max(2 * res, 8)  # lo fails
    while side <= limit:
        if ok(side):
            hi = side
            break
        lo, side = side, 2 * side
    if hi is None:
        return ""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return f"; the smallest it takes at batch {batch} is {hi}x{hi}"
