"""Activation executor: carries out a Plan's decisions for tensors saved for backward.

Example (CPU; host RAM is tier 0, the "host" tier is a separate buffer pool)::

    >>> import torch, torchvision
    >>> from memstrata.hardware import profile
    >>> from memstrata.trace.record import trace_step
    >>> from memstrata.runtime import ActivationRuntime, forced_plan
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    >>> trace = trace_step(model, x, y, mode="measured")
    >>> h = profile("cpu")
    >>> rt = ActivationRuntime(model, trace, forced_plan(trace, "host", h), h)
    >>> with rt.step():
    ...     loss = torch.nn.functional.cross_entropy(model(x), y)
    ...     loss.backward()
    >>> rt.last_stats.offloaded["host"] > 0, rt.last_stats.demand_fetches
    (True, 0)

    During the forward every saved activation is copied to a host buffer and
    # its tier-0 storage freed as soon as the model drops it; the backward copies
    # it back into a fresh tier-0 tensor just before the node that reads it.

[Note: pack positions]
The runtime finds a saved storage again by its position in the forward's
sequence of `saved_tensors_hooks` pack calls (`StorageRecord.pack_indices`).
Pack call k of a step is looked up in a table built from the trace; the table
says which trace storage it is and what the plan decided.  Every mismatch we can
detect cheaply (a unit called out of order, a pack count inside a unit that
differs from the trace, a storage whose size differs) switches the rest of the
step to "keep everything": keeping is always exact, it only costs memory, and
the step reports `misaligned` so the manager re-traces.

[Note: deduplication]
Views and in-place ops make several saved tensors share one storage.  The
storage is offloaded once: records are keyed by the storage's identity
(`StorageWeakRef`, which also tells when a key went stale), each pack returns a
small `_Packed` (dtype, size, stride, byte offset) pointing at the shared
`_Record`, and unpack rebuilds the view with `Tensor.set_` on the restored
storage, so aliasing survives the round trip.  `_Packed` objects are reference
counted by CPython: when autograd frees the last one (after the last node that
needs the storage ran), the record releases its host buffer, file and tier-0
copy.  Parameters and buffers are never offloaded: their storages are excluded
by identity at the start of every step.

[Note: events and runtime hooks]
Plans speak in trace events (op indices).  Watching every op with a
TorchDispatchMode would cost more than the copies we schedule, so the runtime
only observes cheap proxies and keeps a monotone event counter that is always a
*lower bound* of the true event (never early, so prefetches never land before
the plan said they may, and the budget holds):

* forward: evictions start at the pack call itself (the earliest moment the
  tensor is final; the plan's `evict_after` is never earlier than its producer)
  and the counter jumps to `unit.last_op` when a unit's forward returns;
* backward: a gradient hook on each unit's outputs fires when the unit's
  backward is about to start -> counter = `unit.first_backward_op - 1` (the
  tracer's first backward op reading a storage saved in the unit: at most a
  few ops after the hook, never before it in practice); every unpack of a
  saved tensor -> counter = the first backward op that reads that storage
  (`min(StorageRecord.backward_reads)`, a lower bound because the node
  unpacking it is one of those readers).
Whenever the counter advances, every offloaded storage with
`prefetch_at <= counter` starts its copy up (NVMe: read-ahead on the thread
pool; host: host->device copy on the h2d stream).  Unpack waits only for the
storage it needs; one that was not prefetched yet is fetched on demand and
counted as a demand fetch in the step's stats.

[Note: stream hand-offs]
Eviction (CUDA): (1) d2h.wait_stream(compute) so the copy reads the finished
tensor; (2) d2h.wait_event(buffer.last_use) so a pinned buffer is not
overwritten while a previous H2D still reads it; (3) src.record_stream(d2h) so
the caching allocator does not recycle the source block before the copy ran;
(4) the D2H event is stored on the record.  Prefetch: (5) h2d.wait_event(D2H
event); the tier-0 buffer is allocated on h2d; the H2D event is stored and the
pinned buffer released with it (reuse waits on it, pool.py).  Unpack: (6)
compute.wait_event(H2D event) and restored.record_stream(compute), because the
block was allocated on h2d but is read and freed on compute.  No call in this
file synchronizes the host with the device except the NVMe write thread, which
waits for the D2H event before writing the pinned buffer to its file.

[Note: recompute units]
A recomputed unit call runs under non-reentrant `torch.utils.checkpoint` with
`preserve_rng_state=True` (dropout and stochastic depth draw the same numbers
again).  `context_fn` returns (forward ctx, recompute ctx): for selective units
the forward ctx is SAC's caching mode with a policy that says MUST_SAVE for the
ops in `save_ops` and PREFER_RECOMPUTE otherwise; the recompute ctx composes
SAC's replay mode with a buffer guard that snapshots the unit's buffers when
recomputation starts and restores them after, so BatchNorm running statistics
and `num_batches_tracked` are updated once per step, as without memstrata.
The k-th op SAC shows the policy inside unit u is trace op `u.first_op + k`
after dropping the ops SAC never shows (`SAC_IGNORED_OPS`); names are checked
and the first mismatch makes the rest of the unit PREFER_RECOMPUTE (exact).
Saves of a recomputed unit go to checkpoint's own hooks, not to ours, so after
the unit the pack counter jumps to `unit.pack_end`.  Units whose forward writes
one of its inputs in place (e.g. a lone `ReLU(inplace=True)`) are never
recomputed: re-running them would read the overwritten input.  A recomputed
unit receives fresh copies of list/tuple/dict arguments (same tensors), because
callers may mutate a container after the call and checkpoint re-runs the unit
on the objects it was given (torchvision's `_DenseBlock` appends to its list).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from bisect import insort
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import checkpoint as _ckpt
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..hardware import Hierarchy
from ..decisions import Plan, UnitDecision
from ..trace.schema import Trace, UnitRecord
from ..trace.sac import is_inplace_op, sac_cacheable_ops
from ..trace.units import find_units
from .errors import NVMeIOError, UnrecomputableUnitError
from .memory import heap_in_use
from .nvme import NVMeStore
from .pool import HostBufferPool, round_up
from .streams import CopyContext, TensorEvent

KEEP, HOST, NVME = 0, 1, 2
_ACTION_NAMES = {KEEP: "keep", HOST: "host", NVME: "nvme"}

_SAC_IGNORED = frozenset(str(op) for op in getattr(_ckpt, "SAC_IGNORED_OPS", ()))
_CKPT_KW: dict[str, Any] = {}
if "respect_saved_tensors_hooks" in inspect.signature(_ckpt.checkpoint).parameters:
    # Tensors SAC keeps stay in tier 0 (legacy behaviour), as the plan assumes.
    _CKPT_KW["respect_saved_tensors_hooks"] = False


def tier_action(hierarchy: Hierarchy, tier: str | None) -> int:
    """Which store carries an offload to `tier`."""
    if tier is None:
        return KEEP
    kind = hierarchy.tier(tier).kind
    if kind == "nvme":
        return NVME
    if kind in ("dram", "pinned_dram"):
        return HOST
    return KEEP  # an offload "to" HBM is a keep


# ---------------------------------------------------------------------- plain data built once
@dataclass(frozen=True)
class _PackEntry:
    storage: int
    nbytes: int
    action: int
    anchor: int | None  # min backward read: a lower bound of the event at unpack


@dataclass
class _UnitPlan:
    record: UnitRecord
    recompute: bool
    selective: bool
    op_names: tuple[str, ...] = ()  # unit ops as SAC's policy sees them
    save_positions: frozenset[int] = frozenset()
    backward_anchor: int | None = None
    note: str = ""


@dataclass
class StepStats:
    """What one managed step did (plain data; the manager reports it)."""

    packs: int = 0
    kept: int = 0
    offloaded: dict[str, int] = field(default_factory=lambda: {"host": 0, "nvme": 0})
    offloaded_bytes: dict[str, int] = field(default_factory=lambda: {"host": 0, "nvme": 0})
    deduplicated: int = 0
    recomputed_units: int = 0
    prefetches: int = 0
    demand_fetches: int = 0
    wait_seconds: float = 0.0  # host time blocked waiting for NVMe reads
    misaligned: str | None = None
    live_peak_bytes: int | None = None  # tier-0 bytes of saved activations memstrata sees (runtime accounting)
    heap_peak_bytes: int | None = None  # CPU: sampled glibc heap peak above the step start (memory.py)


# ---------------------------------------------------------------------- per-step objects
class _Record:
    """One offloaded storage in one step (shared by every pack of that storage)."""

    __slots__ = (
        "rt", "storage", "action", "nbytes", "device", "host", "ready", "path", "write",
        "read", "file_live", "restored", "base", "refs", "released", "__weakref__",
    )

    def __init__(self, rt: "ActivationRuntime", storage: int, action: int, nbytes: int, device: torch.device) -> None:
        self.rt = rt
        self.storage = storage
        self.action = action
        self.nbytes = nbytes
        self.device = device
        self.host = None  # HostBuffer holding the bytes (host tier)
        self.ready = None  # CUDA event: the D2H copy into `host` landed
        self.path: str | None = None
        self.write = None  # Future of the NVMe write
        self.read = None  # Future of the NVMe read-ahead
        self.file_live = False
        self.restored: TensorEvent | None = None  # tier-0 uint8 copy + H2D event
        self.base = 0  # byte offset of the data inside restored's storage
        self.refs = 0
        self.released = False


class _Packed:
    """What a pack hook returns for an offloaded tensor: a view description + the shared record."""

    __slots__ = ("record", "dtype", "size", "stride", "offset", "anchor")

    def __init__(self, record: _Record, t: torch.Tensor, anchor: int | None) -> None:
        self.record = record
        self.dtype = t.dtype
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset() * t.element_size()
        self.anchor = anchor
        record.refs += 1

    def __del__(self) -> None:
        rec = self.record
        rec.refs -= 1
        if rec.refs == 0:
            rec.rt._release(rec)


class _Kept:
    """A kept tensor plus the event its unpack tells us about."""

    __slots__ = ("tensor", "anchor")

    def __init__(self, tensor: torch.Tensor, anchor: int) -> None:
        self.tensor = tensor
        self.anchor = anchor


class _StepState:
    def __init__(self, prefetch_queue: list[tuple[int, int]]) -> None:
        self.pack_counter = 0
        self.unit_calls = 0
        self.depth = 0  # unit calls in progress (> 1: a unit module called inside another unit)
        self.ckpt_depth = 0  # > 0 inside the original forward of a checkpointed unit
        self.recomputing = 0  # > 0 while checkpoint re-runs a unit
        self.event = -1  # lower bound of the current trace event ([Note: events and runtime hooks])
        self.queue = prefetch_queue  # (prefetch_at, storage id), sorted
        self.queue_pos = 0
        self.by_storage: dict[int, tuple[StorageWeakRef, _Record]] = {}
        self.by_sid: dict[int, _Record] = {}
        self.pending_reads: list[_Record] = []
        self.param_storages: set[int] = set()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.stats = StepStats()
        self.misaligned: str | None = None
        self.heap_base = 0
        self.heap_peak = 0
        self.next_sample = 0.0  # perf_counter time before which pack/unpack samples are skipped


class _BufferGuard:
    """Recompute context: snapshot a unit's buffers on enter, restore them on exit.

    Composed with SAC's replay context (`inner`).  See [Note: recompute units].
    """

    def __init__(self, rt: "ActivationRuntime", module: nn.Module, inner: Any) -> None:
        self.rt = rt
        self.module = module
        self.inner = inner
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        st = self.rt._state
        if st is not None:
            st.recomputing += 1
        self.rt._recomputing += 1
        with torch.no_grad():
            self.saved = [(b, b.clone()) for b in self.module.buffers()]
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            with torch.no_grad():
                for b, snap in self.saved:
                    b.copy_(snap)
            self.saved = []
            self.rt._recomputing -= 1
            st = self.rt._state
            if st is not None:
                st.recomputing -= 1


class _UnitPolicy:
    """SAC policy for one unit call: MUST_SAVE at the planned positions, else PREFER_RECOMPUTE."""

    def __init__(self, names: tuple[str, ...], save: frozenset[int]) -> None:
        self.names = names
        self.save = save
        self.k = 0
        self.kr = 0
        self.decisions: list[Any] = []
        self.mismatch = False

    def __call__(self, ctx, op, *args, **kwargs):
        P = _ckpt.CheckpointPolicy
        if getattr(ctx, "is_recompute", False):  # torch versions that ask again during recompute: replay
            k = self.kr
            self.kr += 1
            return self.decisions[k] if k < len(self.decisions) else P.PREFER_RECOMPUTE
        k = self.k
        self.k += 1
        if self.mismatch or k >= len(self.names) or str(op) != self.names[k]:
            self.mismatch = True
            d = P.PREFER_RECOMPUTE
        else:
            d = P.MUST_SAVE if k in self.save else P.PREFER_RECOMPUTE
        self.decisions.append(d)
        return d


# ---------------------------------------------------------------------- the runtime
class ActivationRuntime:
    """Executes `plan` for `model`: pack/unpack hooks, unit recompute, copies and stores.

    One runtime per (model, input shape).  `step()` is a context manager that
    covers forward, loss and backward of one training step.
    """

    def __init__(
        self,
        model: nn.Module,
        trace: Trace,
        plan: Plan,
        hierarchy: Hierarchy,
        *,
        device: torch.device | str | None = None,
        copy: CopyContext | None = None,
        pool: HostBufferPool | None = None,
        nvme_store: NVMeStore | None = None,
        nvme_dir: str | None = None,
        io_workers: int | None = None,
        track_live_bytes: bool | None = None,
    ) -> None:
        self.model = model
        self.trace = trace
        self.plan = plan
        self.hierarchy = hierarchy
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device(trace.device if trace.device != "meta" else "cpu")
        self.device = torch.device(device)
        self.copy = copy if copy is not None else CopyContext(self.device)
        if self.copy.cuda and self.device.index is None:
            self.device = self.copy.device
        self.pool = pool if pool is not None else HostBufferPool(pin=self.copy.cuda)
        self.track_live_bytes = (not self.copy.cuda) if track_live_bytes is None else bool(track_live_bytes)
        self._state: _StepState | None = None
        self._recomputing = 0
        self._restored_bytes = 0
        self.last_stats: StepStats | None = None
        self.notes: list[str] = []

        self._build_pack_table()
        self._build_units()

        # The NVMe store: validated here, before any managed step (see nvme.py).
        self.nvme_bytes = sum(round_up(self.trace.storages[e.storage].nbytes) for e in self._offloaded_storages(NVME))
        self._owns_store = False
        self.store = nvme_store
        if self.nvme_bytes and self.store is None:
            directory = nvme_dir or self._nvme_path()
            if directory is None:
                from .errors import NVMeDirectoryError

                raise NVMeDirectoryError(
                    "the plan offloads activations to NVMe but no directory is configured "
                    "(pass nvme_dir=..., or a hierarchy whose nvme tier has a path)"
                )
            self.store = NVMeStore(directory, required_bytes=self.nvme_bytes, workers=io_workers, pool=self.pool if self.copy.cuda else None)
            self._owns_store = True
        if self.store is not None:
            self.notes.append(self.store.describe())

    # ------------------------------------------------------------------ tables
    def _nvme_path(self) -> str | None:
        for t in self.hierarchy.tiers:
            if t.kind == "nvme" and t.path:
                return t.path
        return None

    def _offloaded_storages(self, action: int) -> list[_PackEntry]:
        seen: dict[int, _PackEntry] = {}
        for e in self._packs:
            if e is not None and e.action == action:
                seen.setdefault(e.storage, e)
        return list(seen.values())

    def _build_pack_table(self) -> None:
        tr, plan = self.trace, self.plan
        decisions = {d.storage: d for d in plan.storages}
        table: list[_PackEntry | None] = [None] * tr.num_packs
        queue: list[tuple[int, int]] = []
        for s in tr.storages:
            if not s.pack_indices:
                continue
            d = decisions.get(s.id)
            action = KEEP
            if d is not None and d.action == "offload":
                if s.kind in ("parameter", "buffer", "gradient", "optimizer_state"):
                    self.notes.append(f"storage {s.id} ({s.kind}) is never offloaded; kept")
                else:
                    action = tier_action(self.hierarchy, d.tier)
            anchor = min(s.backward_reads) if s.backward_reads else None
            entry = _PackEntry(s.id, s.nbytes, action, anchor)
            for p in s.pack_indices:
                if 0 <= p < len(table):
                    table[p] = entry
            if action != KEEP:
                queue.append((int(d.prefetch_at), s.id))
        queue.sort()
        self._packs = table
        self._queue = queue

    def _build_units(self) -> None:
        tr = self.trace
        self._unit_modules: dict[str, nn.Module] = dict(find_units(self.model))
        decisions: dict[int, UnitDecision] = self.plan.recomputed_units()
        units: list[_UnitPlan] = []
        for u in tr.units:
            dec = decisions.get(u.index)
            up = _UnitPlan(u, recompute=False, selective=False)
            if u.first_backward_op is not None:
                up.backward_anchor = u.first_backward_op - 1
            if dec is not None:
                ok, why = self._recomputable(u)
                if not ok:
                    up.note = why
                    self.notes.append(f"unit {u.index} ({u.module}) not recomputed: {why}")
                elif u.module not in self._unit_modules:
                    self.notes.append(f"unit {u.index} ({u.module}) not found in the model; not recomputed")
                else:
                    up.recompute = True
                    if dec.save_ops:
                        up.selective = True
                        up.op_names, up.save_positions = self._sac_positions(u, dec.save_ops)
            units.append(up)
        self._units = units

    def _recomputable(self, u: UnitRecord) -> tuple[bool, str]:
        if u.pack_end <= u.pack_start:
            return False, "saves nothing for backward"
        inputs = set(u.inputs)
        for op in self.trace.ops[u.first_op : u.last_op + 1]:
            if is_inplace_op(op.name) and inputs.intersection(op.outputs):
                return False, f"{op.name} (event {op.index}) writes an input of the unit in place"
        return True, ""

    def _sac_positions(self, u: UnitRecord, save_ops: tuple[int, ...]) -> tuple[tuple[str, ...], frozenset[int]]:
        """Policy positions that may be MUST_SAVE.

        SAC caches an op's output by reference and refuses (at backward) a cached
        tensor that was mutated since.  So a planned save is dropped (recomputed
        instead: exact either way) when the op is in place (its output is its
        input), when an output is a persistent storage (a BatchNorm buffer's
        `add_`, a parameter view: updated by the next step), or when a later
        forward op writes an output in place.
        """
        cacheable = sac_cacheable_ops(self.trace, u)
        want = set(save_ops)
        names: list[str] = []
        pos: set[int] = set()
        dropped = 0
        for op in self.trace.ops[u.first_op : u.last_op + 1]:
            if op.name in _SAC_IGNORED:
                continue
            if op.index in want:
                if op.index in cacheable:
                    pos.add(len(names))
                else:
                    dropped += 1
            names.append(op.name)
        if dropped:
            self.notes.append(f"unit {u.index} ({u.module}): {dropped} planned save op(s) recomputed instead "
                              "(in place, persistent or later mutated output: SAC cannot cache them)")
        return tuple(names), frozenset(pos)

    # ------------------------------------------------------------------ step
    @contextlib.contextmanager
    def step(self) -> Iterator[StepStats]:
        """Run one forward+loss+backward under the plan (a context manager)."""
        if self._state is not None:
            raise RuntimeError("ActivationRuntime.step() is not re-entrant")
        st = _StepState(list(self._queue))
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                st.param_storages.add(t.untyped_storage()._cdata)
        restore = self._install_units()
        if self.track_live_bytes and heap_in_use is not None:
            st.heap_base = st.heap_peak = heap_in_use()
        self._state = st
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield st.stats
        finally:
            self._state = None
            restore()
            st.stats.misaligned = st.misaligned
            if self.track_live_bytes:
                self._sample(st)
                if heap_in_use is not None:
                    st.stats.heap_peak_bytes = st.heap_peak - st.heap_base
            else:
                st.stats.live_peak_bytes = None
            self.last_stats = st.stats

    def _install_units(self):
        """Route unit calls through `_unit_call` for the duration of a step ([Note: recompute units]).

        Instance attributes are set and removed again; nothing stays on the modules.
        """
        _missing = object()
        installed: list[tuple[nn.Module, Any]] = []
        for name, module in self._unit_modules.items():
            prev = module.__dict__.get("forward", _missing)
            orig = module.forward
            module.forward = functools.partial(self._unit_call, name, module, orig)
            installed.append((module, prev))

        def restore() -> None:
            for module, prev in installed:
                if prev is _missing:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = prev

        return restore

    def _misalign(self, st: _StepState, why: str) -> None:
        if st.misaligned is None:
            st.misaligned = why

    # ------------------------------------------------------------------ units
    def _unit_call(self, name: str, module: nn.Module, orig, *args, **kwargs):
        st = self._state
        if st is None or self._recomputing > 0:
            return orig(*args, **kwargs)  # outside a step, or checkpoint re-running a unit: no bookkeeping
        # Every forward call of a unit module counts, nested ones too (the tracer numbers them the same way).
        i = st.unit_calls
        st.unit_calls += 1
        up = self._units[i] if i < len(self._units) else None
        # Inside a checkpointed unit, saves go to checkpoint, so pack positions cannot be checked there.
        check = st.ckpt_depth == 0
        if up is None or up.record.module != name:
            self._misalign(st, f"unit call {i} is {name!r}, the trace expects "
                               f"{up.record.module if up else 'no more units'!r}")
            up = None
        elif check and st.misaligned is None and st.pack_counter != up.record.pack_start:
            self._misalign(st, f"unit {i} ({name}) starts at pack {st.pack_counter}, trace says {up.record.pack_start}")
        recompute = (
            up is not None and up.recompute and st.misaligned is None and st.depth == 0 and torch.is_grad_enabled()
        )
        st.depth += 1
        try:
            if recompute:
                st.ckpt_depth += 1
                try:
                    out = self._checkpointed(st, up, module, orig, args, kwargs)
                finally:
                    st.ckpt_depth -= 1
            else:
                out = orig(*args, **kwargs)
                if up is not None and check and st.misaligned is None and st.pack_counter != up.record.pack_end:
                    self._misalign(st, f"unit {i} ({name}) ends at pack {st.pack_counter}, trace says {up.record.pack_end}")
        finally:
            st.depth -= 1
        if self.track_live_bytes and st.depth == 0:
            self._sample(st)
        if up is not None and st.misaligned is None and st.depth == 0:
            self._advance(st, up.record.last_op)
            if up.backward_anchor is not None:
                self._hook_outputs(out, up.backward_anchor)
        return out

    def _checkpointed(self, st: _StepState, up: _UnitPlan, module: nn.Module, orig, args, kwargs):
        # Checkpoint re-runs `orig` on the very argument objects it was given.  Callers may
        # mutate a container after the call (torchvision's _DenseBlock appends to the list
        # it passed), so the unit gets fresh containers holding the same tensors.
        flat, spec = tree_flatten((args, kwargs))
        args, kwargs = tree_unflatten(flat, spec)
        versions = [(a, a._version) for a in flat if isinstance(a, torch.Tensor)]
        if up.selective:
            policy = _UnitPolicy(up.op_names, up.save_positions)

            def context_fn():
                fwd, rec = _ckpt.create_selective_checkpoint_contexts(policy)
                return fwd, _BufferGuard(self, module, rec)
        else:

            def context_fn():
                return contextlib.nullcontext(), _BufferGuard(self, module, contextlib.nullcontext())

        out = _ckpt.checkpoint(
            orig, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **_CKPT_KW, **kwargs
        )
        for a, v in versions:
            if a._version != v:
                raise UnrecomputableUnitError(
                    f"unit {up.record.index} ({up.record.module}) wrote its input in place; "
                    "recomputing it would not reproduce the forward. Re-trace, or exclude the unit."
                )
        st.pack_counter = up.record.pack_end
        st.stats.recomputed_units += 1
        return out

    def _hook_outputs(self, out, anchor: int) -> None:
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                t.register_hook(functools.partial(self._on_unit_backward, anchor))
                return  # one hook per unit call is enough: they all fire at the same point

    def _on_unit_backward(self, anchor: int, grad):
        st = self._state
        if st is not None:
            self._advance(st, anchor)
            if self.track_live_bytes:
                self._sample(st)
        return None

    # ------------------------------------------------------------------ events
    def _advance(self, st: _StepState, event: int | None) -> None:
        if event is None or event <= st.event:
            return
        st.event = event
        q, i = st.queue, st.queue_pos
        while i < len(q) and q[i][0] <= event:
            rec = st.by_sid.get(q[i][1])
            if rec is not None and not rec.released:
                self._prefetch(st, rec)
            i += 1
        st.queue_pos = i
        if st.pending_reads:
            self._pump(st)

    def _pump(self, st: _StepState) -> None:
        """Move finished NVMe reads up to tier 0 (CUDA: start their H2D)."""
        still = []
        for rec in st.pending_reads:
            if rec.read is not None and rec.read.done():
                self._finish_read(rec)
            elif rec.read is not None:
                still.append(rec)
        st.pending_reads = still

    # ------------------------------------------------------------------ pack
    def _pack(self, t: torch.Tensor):
        st = self._state
        if st is None:  # hooks outlived the step (should not happen): behave like no hooks
            return t
        k = st.pack_counter
        st.pack_counter = k + 1
        st.stats.packs += 1
        entry = self._packs[k] if (k < len(self._packs) and st.misaligned is None) else None
        if self.track_live_bytes:
            self._track(st, t)
        if entry is None:
            st.stats.kept += 1
            return t
        if entry.action == KEEP or not self._offloadable(t):
            st.stats.kept += 1
            return _Kept(t, entry.anchor) if entry.anchor is not None else t
        ust = t.untyped_storage()
        key = ust._cdata
        if key in st.param_storages:
            st.stats.kept += 1
            return _Kept(t, entry.anchor) if entry.anchor is not None else t
        hit = st.by_storage.get(key)
        rec = hit[1] if (hit is not None and not hit[0].expired() and not hit[1].released) else None
        if rec is not None:
            st.stats.deduplicated += 1
        else:
            n = ust.nbytes()
            if n != entry.nbytes:
                # Not the storage the trace saw here: keep this one (exact), count it.
                self._misalign(st, f"pack {k}: storage of {n} bytes, trace storage {entry.storage} has {entry.nbytes}")
                st.stats.kept += 1
                return t
            rec = self._evict(st, entry, ust)
            st.by_storage[key] = (StorageWeakRef(ust), rec)
            st.by_sid.setdefault(entry.storage, rec)
        return _Packed(rec, t, entry.anchor)

    def _offloadable(self, t: torch.Tensor) -> bool:
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and t.device == self.device
            and not t.is_conj()
            and not t.is_neg()
            and t.untyped_storage().nbytes() > 0
        )

    def _evict(self, st: _StepState, entry: _PackEntry, ust: torch.UntypedStorage) -> _Record:
        n = ust.nbytes()
        rec = _Record(self, entry.storage, entry.action, n, self.device)
        name = _ACTION_NAMES[entry.action]
        st.stats.offloaded[name] += 1
        st.stats.offloaded_bytes[name] += n
        with torch.no_grad():
            src = torch.empty(0, dtype=torch.uint8, device=ust.device).set_(ust)
            if self.copy.cuda:
                buf = self.pool.acquire(n)
                d2h = self.copy.d2h
                d2h.wait_stream(self.copy.compute_stream())  # (1) [Note: stream hand-offs]
                with torch.cuda.stream(d2h):
                    if buf.last_use is not None:
                        d2h.wait_event(buf.last_use)  # (2)
                        buf.last_use = None
                    buf.tensor[:n].copy_(src, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(d2h)  # (4)
                src.record_stream(d2h)  # (3)
                if entry.action == HOST:
                    rec.host, rec.ready = buf, ev
                else:
                    rec.path = self.store.new_path(entry.storage)
                    rec.file_live = True
                    rec.write = self.store.submit_write(
                        rec.path, buf.tensor, n, event=ev, on_done=functools.partial(self.pool.release, buf)
                    )
            elif entry.action == HOST:
                buf = self.pool.acquire(n)
                buf.tensor[:n].copy_(src)
                rec.host = buf
            else:
                # The write job holds `src` (the tier-0 storage stays alive until written).
                rec.path = self.store.new_path(entry.storage)
                rec.file_live = True
                rec.write = self.store.submit_write(rec.path, src, n)
        return rec

    # ------------------------------------------------------------------ prefetch
    def _prefetch(self, st: _StepState | None, rec: _Record) -> None:
        if rec.released or rec.restored is not None or rec.read is not None:
            return
        if st is not None:
            st.stats.prefetches += 1
        if rec.action == HOST:
            buf, rec.host = rec.host, None
            self._to_tier0(rec, buf, rec.ready)
        else:
            n = rec.nbytes
            into = functools.partial(self._staging_for_read, n) if self.copy.cuda else None
            rec.file_live = False  # the read job removes the file ([Note: NVMe file lifetime])
            rec.read = self.store.submit_read(rec.path, n, after=rec.write, into=into)
            if st is not None:
                st.pending_reads.append(rec)

    def _staging_for_read(self, n: int):
        buf = self.pool.acquire(n)
        if buf.last_use is not None:  # a host writer reuses it: wait on the host ([Note: buffer reuse])
            buf.last_use.synchronize()
            buf.last_use = None
        return buf

    def _to_tier0(self, rec: _Record, buf, ready) -> None:
        """Copy `buf` (a HostBuffer) into a fresh tier-0 tensor; give `buf` back."""
        n = rec.nbytes
        with torch.no_grad():
            if self.copy.cuda:
                h2d = self.copy.h2d
                with torch.cuda.stream(h2d):
                    if ready is not None:
                        h2d.wait_event(ready)  # (5) the D2H into buf landed
                    dev = torch.empty(n, dtype=torch.uint8, device=self.device)
                    dev.copy_(buf.tensor[:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(h2d)
                self.pool.release(buf, ev)
                rec.restored = TensorEvent(dev, ev)
            else:
                dev = torch.empty(n, dtype=torch.uint8)
                dev.copy_(buf.tensor[:n])
                self.pool.release(buf)
                rec.restored = TensorEvent(dev, None)
        rec.base = 0
        self._restored_bytes += n

    def _finish_read(self, rec: _Record) -> None:
        fut, rec.read = rec.read, None
        try:
            result = fut.result()
        except NVMeIOError:
            raise
        except OSError as e:  # pragma: no cover - store wraps OSErrors already
            raise NVMeIOError(str(e)) from e
        if rec.released:
            if self.copy.cuda:
                self.pool.release(result)
            return
        if self.copy.cuda:
            self._to_tier0(rec, result, None)
        else:
            rec.restored = TensorEvent(result, None)
            rec.base = result.storage_offset()
            self._restored_bytes += rec.nbytes

    # ------------------------------------------------------------------ unpack
    def _unpack(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj
        st = self._state
        if type(obj) is _Kept:
            if st is not None:
                self._advance(st, obj.anchor)
                if self.track_live_bytes:
                    self._sample(st, rate_limited=True)
            return obj.tensor
        rec = obj.record
        if st is not None:
            self._advance(st, obj.anchor)
        if rec.restored is None:
            if rec.read is None:
                self._prefetch(st, rec)
                if st is not None:
                    st.stats.demand_fetches += 1
            if rec.restored is None:
                t0 = time.perf_counter()
                self._finish_read(rec)
                if st is not None:
                    st.stats.wait_seconds += time.perf_counter() - t0
        dev, ev = rec.restored
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)  # (6) compute waits here, and only here
            dev.record_stream(cur)
        with torch.no_grad():
            out = torch.empty(0, dtype=obj.dtype, device=dev.device)
            out.set_(dev.untyped_storage(), (rec.base + obj.offset) // out.element_size(), obj.size, obj.stride)
        if st is not None and self.track_live_bytes:
            self._sample(st, rate_limited=True)
        return out

    # ------------------------------------------------------------------ release
    def _release(self, rec: _Record) -> None:
        """The last pack of `rec` is gone: give back its buffer, file and tier-0 copy."""
        if rec.released:
            return
        rec.released = True
        if rec.host is not None:
            self.pool.release(rec.host, rec.ready)
            rec.host = None
        if rec.read is not None:
            fut = rec.read
            rec.read = None
            if self.copy.cuda:
                fut.add_done_callback(self._release_staging)
        if rec.file_live and rec.path is not None and self.store is not None and not self.store.closed:
            rec.file_live = False
            self.store.submit_unlink(rec.path, after=rec.write)
        if rec.restored is not None:
            rec.restored = None
            self._restored_bytes -= rec.nbytes

    def _release_staging(self, fut) -> None:
        if fut.exception() is None:
            self.pool.release(fut.result())

    # ------------------------------------------------------------------ accounting
    def _track(self, st: _StepState, t: torch.Tensor) -> None:
        ust = t.untyped_storage()
        key = ust._cdata
        if key in st.param_storages or key in st.live:
            self._sample(st, rate_limited=True)
            return
        n = ust.nbytes()
        st.live[key] = (StorageWeakRef(ust), n)
        st.live_bytes += n
        self._sample(st, rate_limited=True)

    _SAMPLE_INTERVAL = 0.002  # s; mallinfo2 walks the arenas' free lists (~0.1 ms with I/O threads around)

    def _sample(self, st: _StepState, rate_limited: bool = False) -> None:
        """Update both CPU peaks (see runtime/memory.py).

        Always at unit boundaries and at step end; at pack/unpack at most once
        per `_SAMPLE_INTERVAL`, which bounds the cost to ~5% of a sample's time.
        """
        if rate_limited:
            now = time.perf_counter()
            if now < st.next_sample:
                return
            st.next_sample = now + self._SAMPLE_INTERVAL
        dead = [k for k, (ref, _) in st.live.items() if ref.expired()]
        for k in dead:
            st.live_bytes -= st.live.pop(k)[1]
        cur = st.live_bytes + self._restored_bytes
        if st.stats.live_peak_bytes is None or cur > st.stats.live_peak_bytes:
            st.stats.live_peak_bytes = cur
        if heap_in_use is not None:
            h = heap_in_use()
            if h > st.heap_peak:
                st.heap_peak = h

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Finish pending I/O and remove the NVMe store this runtime created."""
        if self.store is not None and self._owns_store:
            self.store.close()
        self.pool.clear()

    def describe(self) -> dict[str, Any]:
        counts = {"keep": 0, "host": 0, "nvme": 0}
        for e in {e.storage: e for e in self._packs if e is not None}.values():
            counts[_ACTION_NAMES[e.action]] += 1
        return {
            "storages": counts,
            "recomputed_units": sum(1 for u in self._units if u.recompute),
            "selective_units": sum(1 for u in self._units if u.selective),
            "nvme_bytes": self.nvme_bytes,
            "notes": list(self.notes),
        }
