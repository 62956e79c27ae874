"""Activation executor: carries out a Plan's decisions for tensors saved for backward.

Example (CPU; host RAM is tier 0, the "host" tier is a separate buffer pool)::

    >>> import torch, torchvision
    >>> from memstrata.hardware import profile
    >>> from memstrata.trace.record import trace_step
    >>> from memstrata.plan.forced import forced_plan
    >>> from memstrata.runtime import ActivationRuntime
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

Copies between tiers are the tier mover's (mover.py; [Note: stream hand-offs]
in streams.py); unit recompute is recompute.py's ("""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten

from ..decisions import Plan
from ..hardware import Hierarchy
from ..trace.record import is_checkpoint_dummy
from ..trace.schema import Trace
from ..trace.space import decision_space
from ..trace.units import find_units
from .memory import heap_in_use
from .mover import Placement, Resident, TierMover
from .nvme import NVMeStore
from .pool import HostBufferPool, round_up
from .recompute import (build_segment_plans, build_unit_plans, checkpoint_unit, install_segment_forwards,
                        install_unit_forwards)
from .replay import ChainTable, Replayed, ReplayCapture, held_inputs, unit_chains
from .signs import SignBits, SignPacked
from .streams import CopyContext

KEEP, HOST, NVME = Placement.KEEP, Placement.HOST, Placement.NVME

def tier_action(hierarchy: Hierarchy, tier: str | None) -> Placement:
    """Which store carries an offload to `tier` (kept for callers of 0.1: `Placement.for_tier`)."""
    return Placement.for_tier(hierarchy, tier)


# ---------------------------------------------------------------------- plain data built once
@dataclass(frozen=True)
class _PackEntry:
    storage: int
    nbytes: int
    action: Placement
    anchor: int | None  # min backward read: a lower bound of the event at unpack


@dataclass
class StepStats:
    """What one managed step did (plain data; the manager reports it).

    [Note: the runtime's own time]
    The simulator prices what a plan adds to a step as copies (a CPU box's
    copies as compute time), waits and re-run ops.  The runtime also adds
    time it does not price: the Python of every pack and unpack hook (every
    saved tensor, kept ones too), glibc heap readings on CPU (~0.1 ms each,
    at unit boundaries), and replay capture's dispatch mode around every op
    of a unit with replays.  On the 2-core box that was 20-30 ms of a 400 ms
    mobilenet_v3_small step (batch 64, 64 px), which the budget watch then
    folded into the op times (x1.18) and over-predicted the plain step by 10%
    (bench/results/2026-12-05b-cpu-calibration/).  `overhead_seconds` times
    exactly that: each hook's wall time less the priced work inside it
    (mover.evict / restore, a replay's ops), plus heap sampling, plus the
    capture's time outside the ops.  The Manager adds it to the prediction
    as its own term (`Manager._watch`).
    """

    packs: int = 0
    kept: int = 0
    offloaded: dict[str, int] = field(default_factory=lambda: {"host": 0, "nvme": 0})
    offloaded_bytes: dict[str, int] = field(default_factory=lambda: {"host": 0, "nvme": 0})
    deduplicated: int = 0
    recomputed_units: int = 0
    recomputed_segments: int = 0
    replayed: int = 0  # saved tensors packed as replay recipes (op-level recompute)
    prefetches: int = 0
    demand_fetches: int = 0
    wait_seconds: float = 0.0  # host time blocked waiting for NVMe reads
    misaligned: str | None = None
    live_peak_bytes: int | None = None  # tier-0 bytes of saved activations memstrata sees (runtime accounting)
    heap_peak_bytes: int | None = None  # CPU: sampled glibc heap peak above the step start (memory.py)
    # [Note: the runtime's own time]: seconds this step spent in memstrata's hooks, heap sampling and replay
    # capture that the simulator does not price (copies, waits and replays it does price are left out)
    overhead_seconds: float = 0.0


# ---------------------------------------------------------------------- per-step objects
class _Packed:
    """What a pack hook returns for an offloaded tensor: a view description + the shared `Resident`."""

    __slots__ = ("record", "dtype", "size", "stride", "offset", "anchor")

    def __init__(self, record: Resident, t: torch.Tensor, anchor: int | None) -> None:
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
            rec.mover.release(rec)


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
        self.by_storage: dict[int, tuple[StorageWeakRef, Resident]] = {}
        self.by_sid: dict[int, Resident] = {}
        self.pending_reads: list[Resident] = []
        self.param_storages: set[int] = set()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.stats = StepStats()
        self.misaligned: str | None = None
        self.heap_base = 0
        self.heap_peak = 0
        self.next_sample = 0.0  # perf_counter time before which pack/unpack samples are skipped
        self.buffer_storages: frozenset[int] = frozenset()
        self.chain_table = ChainTable()  # steps of chains that span units ([Note: replays across units])
        self.priced = 0.0  # seconds of priced work (copies, waits, replays) run inside the runtime's hooks
        self.sampling = 0.0  # seconds in _sample (heap readings)
        self.signs: dict = {}  # storage key -> (StorageWeakRef, weakref to SignBits) ([Note: sign replays])
        self.recipes: dict = {}  # storage key -> RecipeEntry ([Note: replay recipes] in replay.py) ([Note: replay recipes] in replay.py)


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
        self.last_stats: StepStats | None = None
        self.notes: list[str] = []

        # The runtime carries plans out; it does not decide what is legal ([Note: the legal menu] in trace/space.py).
        decision_space(trace).decisions_of(plan, hierarchy)  # PlanError for a decision outside the space
        self._build_pack_table()
        self._unit_modules: dict[str, nn.Module] = dict(find_units(self.model))
        self._units = build_unit_plans(trace, plan, decision_space(trace), self._unit_modules, self.notes)
        self._all_modules: dict[str, nn.Module] = dict(self.model.named_modules())
        self._segments = build_segment_plans(trace, plan, decision_space(trace), self._all_modules, self.notes)
        space = decision_space(trace)
        self._replays = space.replays_of(plan)
        # [Note: sign replays] (signs.py): kept as bits at the pack, no chain captured
        self._sign_sids = space.sign_replays(self._replays)
        chains = {sid: c for sid, c in self._replays.items() if sid not in self._sign_sids}
        self._replay_sids = frozenset(chains)
        self._last_pack = {sid: max(trace.storages[sid].pack_indices) for sid in self._replays}
        self._chains_by_unit = unit_chains(trace, chains)
        self._all_chains = {c[-1]: c for c in chains.values()}
        self._held_at = held_inputs(space, chains)

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
            self.store = NVMeStore(directory, required_bytes=self.nvme_bytes, workers=io_workers,
                                   pool=self.pool if self.copy.asynchronous else None)
            self._owns_store = True
        if self.store is not None:
            self.notes.append(self.store.describe())
        self.mover = TierMover(self.device, self.copy, self.pool, self.store)

    # ------------------------------------------------------------------ tables
    def _nvme_path(self) -> str | None:
        t = self.hierarchy.nvme_tier()
        return t.path if t is not None else None

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
                action = Placement.for_tier(self.hierarchy, d.tier)
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
            st.buffer_storages = frozenset(b.untyped_storage()._cdata for b in self.model.buffers())
        restore_units = install_unit_forwards(self._unit_modules, self._unit_call)
        restore_segments = install_segment_forwards(self._all_modules, self._segments, self._segment_call)

        def restore() -> None:
            restore_segments()
            restore_units()
        if self.track_live_bytes and heap_in_use is not None:
            st.heap_base = st.heap_peak = heap_in_use()
        self._state = st
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield st.stats
        except BaseException:
            # The step unwinds (a failed NVMe write, an error in the model, Ctrl-C): its graph will never run
            # backward, so nothing it moved is needed again.  Give back buffers and files now, not at close().
            for _, rec in list(st.by_storage.values()):
                self.mover.release(rec)
            for rec in list(st.by_sid.values()):
                self.mover.release(rec)
            raise
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
            st.stats.overhead_seconds += st.sampling
            self.last_stats = st.stats

    def _misalign(self, st: _StepState, why: str) -> None:
        if st.misaligned is None:
            st.misaligned = why

    # ------------------------------------------------------------------ units
    def _unit_call(self, name: str, module: nn.Module, orig, *args, **kwargs):
        st = self._state
        if st is None or self._recomputing > 0:
            return orig(*args, **kwargs)  # outside a step, or checkpoint re-running a unit: no bookkeeping
        t0, sampling = time.perf_counter(), st.sampling
        inner = [0.0, 0.0]  # the unit's own forward: wall time, heap sampling in it (its hooks count their own)
        try:
            return self._unit_call_one(st, i := st.unit_calls, name, module, orig, inner, args, kwargs)
        finally:
            st.stats.overhead_seconds += (time.perf_counter() - t0) - inner[0] - (st.sampling - sampling - inner[1])

    def _unit_call_one(self, st: _StepState, i: int, name: str, module: nn.Module, orig, inner: list[float],
                       args, kwargs):
        # Every forward call of a unit module counts, nested ones too (the tracer numbers them the same way).
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
        t_in, s_in = time.perf_counter(), st.sampling
        try:
            if recompute:
                st.ckpt_depth += 1
                try:
                    out = checkpoint_unit(up, module, orig, args, kwargs, self._recompute_enter,
                                          self._recompute_exit)
                    st.pack_counter = up.record.pack_end
                    st.stats.recomputed_units += 1
                finally:
                    st.ckpt_depth -= 1
            else:
                chains = self._chains_by_unit.get(i) if up is not None and st.misaligned is None else None
                if chains and torch.is_grad_enabled():
                    with ReplayCapture(self.trace, up.record, chains, st.recipes, self._replays, st.buffer_storages,
                                       st.chain_table, self._held_at) as cap:
                        out = orig(*args, **kwargs)
                    st.stats.overhead_seconds += cap.overhead_seconds
                    st.chain_table.prune(self._all_chains, up.record.last_op)
                    if cap.broken:
                        self.notes.append(f"unit {i} ({name}): replay recording stopped ({cap.broken}); kept")
                else:
                    out = orig(*args, **kwargs)
                if up is not None and check and st.misaligned is None and st.pack_counter != up.record.pack_end:
                    self._misalign(st, f"unit {i} ({name}) ends at pack {st.pack_counter}, trace says {up.record.pack_end}")
        finally:
            inner[0], inner[1] = time.perf_counter() - t_in, st.sampling - s_in
            st.depth -= 1
        if self.track_live_bytes and st.depth == 0:
            self._sample(st)
        if up is not None and st.misaligned is None and st.depth == 0:
            self._advance(st, up.record.last_op)
            if up.backward_anchor is not None:
                self._hook_outputs(out, up.backward_anchor)
        return out

    def _segment_call(self, up, children: list[nn.Module], x):
        """Run a segment's children under one checkpoint ([Note: segments] in recompute.py)."""
        st = self._state

        def run(inp):
            for m in children:
                inp = m(inp)
            return inp

        if (st is None or self._recomputing > 0 or st.misaligned is not None or st.depth > 0
                or not torch.is_grad_enabled() or st.unit_calls != up.first_unit
                or st.pack_counter != up.record.pack_start):
            return run(x)
        st.depth += 1
        st.ckpt_depth += 1
        try:
            out = checkpoint_unit(up, children, run, (x,), {}, self._recompute_enter, self._recompute_exit)
            st.pack_counter = up.record.pack_end
            st.stats.recomputed_segments += 1
        finally:
            st.depth -= 1
            st.ckpt_depth -= 1
        if st.unit_calls != up.last_unit + 1:
            self._misalign(st, f"segment {up.record.module} made {st.unit_calls - up.first_unit} unit calls")
        if self.track_live_bytes:
            self._sample(st)
        if st.misaligned is None:
            self._advance(st, up.record.last_op)
            if up.backward_anchor is not None:
                self._hook_outputs(out, up.backward_anchor)
        return out

    def _recompute_enter(self) -> None:
        self._recomputing += 1
        if self._state is not None:
            self._state.recomputing += 1

    def _recompute_exit(self) -> None:
        self._recomputing -= 1
        if self._state is not None:
            self._state.recomputing -= 1

    def _hook_outputs(self, out, anchor: int) -> None:
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                t.register_hook(functools.partial(self._on_unit_backward, anchor))
                return  # one hook per unit call is enough: they all fire at the same point

    def _on_unit_backward(self, anchor: int, grad):
        st = self._state
        if st is not None:
            t0, sampling = time.perf_counter(), st.sampling
            self._advance(st, anchor)
            if self.track_live_bytes:
                self._sample(st)
            st.stats.overhead_seconds += (time.perf_counter() - t0) - (st.sampling - sampling)
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
        with _disable_current_modes():  # [Note: the runtime's own ops]
            st.pending_reads = self.mover.poll(st.pending_reads)

    def _prefetch(self, st: _StepState, rec: Resident) -> None:
        if rec.released or rec.restored is not None or rec.read is not None:
            return
        st.stats.prefetches += 1
        with _disable_current_modes():  # [Note: the runtime's own ops]
            started = self.mover.prefetch(rec)
        if started:
            st.pending_reads.append(rec)

    # ------------------------------------------------------------------ pack
    def _pack(self, t: torch.Tensor):
        st = self._state
        if st is None:  # hooks outlived the step (should not happen): behave like no hooks
            return t
        t0, priced, sampling = time.perf_counter(), st.priced, st.sampling
        try:
            return self._pack_one(st, t)
        finally:
            st.stats.overhead_seconds += (time.perf_counter() - t0) - (st.priced - priced) - (st.sampling - sampling)

    def _pack_one(self, st: _StepState, t: torch.Tensor):
        if is_checkpoint_dummy(t):
            return t  # not a pack of the trace: [Note: checkpoint's dummy save] in trace/record.py
        k = st.pack_counter
        st.pack_counter = k + 1
        st.stats.packs += 1
        entry = self._packs[k] if (k < len(self._packs) and st.misaligned is None) else None
        if self.track_live_bytes:
            self._track(st, t)
        if entry is None:
            st.stats.kept += 1
            return t
        if entry.storage in self._sign_sids:
            packed = self._pack_signs(st, k, entry, t)
            if packed is not None:
                return packed
        if entry.storage in self._replay_sids:
            hit = st.recipes.get(t.untyped_storage()._cdata)
            recipe = hit.recipe() if hit is not None and hit.sid == entry.storage and not hit.ref.expired() else None
            if recipe is not None and t.untyped_storage().nbytes() == entry.nbytes:
                st.stats.replayed += 1
                if k >= self._last_pack[entry.storage]:
                    hit.release()  # from now on the packs (and readers) keep the recipe ([Note: what a recipe holds])
                return Replayed(recipe, t, entry.anchor)
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

    def _pack_signs(self, st: _StepState, k: int, entry: _PackEntry, t: torch.Tensor) -> SignPacked | None:
        """A sign replay ([Note: sign replays] in signs.py): the storage's bits, made at its first pack and
        shared by its later packs (weakly held by the step: they live as long as a pack holding them)."""
        if not (type(t) is torch.Tensor and t.layout == torch.strided and t.is_floating_point()
                and not t.is_conj() and not t.is_neg()):
            return None
        ust = t.untyped_storage()
        key = ust._cdata
        hit = st.signs.get(key)
        signs = hit[1]() if hit is not None and not hit[0].expired() else None
        if signs is None:
            if ust.nbytes() != entry.nbytes:
                self._misalign(st, f"pack {k}: storage of {ust.nbytes()} bytes, trace storage {entry.storage} "
                                   f"has {entry.nbytes}")
                return None
            t0 = time.perf_counter()
            with _disable_current_modes():  # its compare and packing are memstrata's ops: [Note: the runtime's own ops]
                signs = SignBits(ust, t.dtype)
            st.priced += time.perf_counter() - t0  # priced as the replay's time (simulate.replay_time)
            st.signs[key] = (StorageWeakRef(ust), weakref.ref(signs))
        if k >= self._last_pack[entry.storage]:
            st.signs.pop(key, None)
        st.stats.replayed += 1
        return SignPacked(signs, t, entry.anchor)

    def _offloadable(self, t: torch.Tensor) -> bool:
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and t.device == self.device
            and not t.is_conj()
            and not t.is_neg()
            and t.untyped_storage().nbytes() > 0
        )

    def _evict(self, st: _StepState, entry: _PackEntry, ust: torch.UntypedStorage) -> Resident:
        # [Note: the runtime's own ops]
        # The pack hook runs while the unit's forward is under `ReplayCapture` (a dispatch mode that numbers
        # the unit's ops against the trace: runtime/replay.py).  The copy down allocates a host buffer and
        # copies into it (`aten.empty`, `aten.copy_`): ops of memstrata, not of the model.  Seen by the
        # capture they broke its numbering, so every replay after the first offload of a unit was kept:
        # Swin-T b32 128 px at 50%, 18 NVMe offloads and 41 replays planned, 17 replayed, 1.51x the budget
        # measured where the simulator predicted 1.0x (test_replay_offload_mix.py).  They run with the
        # dispatch modes set aside; the same for copies up (`_prefetch`, `_unpack_one`).
        t0 = time.perf_counter()
        with _disable_current_modes():
            rec = self.mover.evict(entry.storage, entry.action, ust)
        st.priced += time.perf_counter() - t0  # the simulator prices the copy (Tier.host_cost_per_byte)
        name = entry.action.label
        st.stats.offloaded[name] += 1
        st.stats.offloaded_bytes[name] += rec.nbytes
        return rec

    # ------------------------------------------------------------------ unpack
    def _unpack(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj
        st = self._state
        if st is None:
            return self._unpack_one(st, obj)
        t0, priced, sampling = time.perf_counter(), st.priced, st.sampling
        try:
            return self._unpack_one(st, obj)
        finally:
            st.stats.overhead_seconds += (time.perf_counter() - t0) - (st.priced - priced) - (st.sampling - sampling)

    def _unpack_one(self, st: _StepState | None, obj):
        if type(obj) is Replayed or type(obj) is SignPacked:
            if st is None:
                return obj.unpack()
            self._advance(st, obj.anchor)
            t0 = time.perf_counter()
            out = obj.unpack()
            st.priced += time.perf_counter() - t0  # the replay's ops (or the bits' lookup): priced as recompute
            return out
        if type(obj) is _Kept:
            if st is not None:
                self._advance(st, obj.anchor)
                if self.track_live_bytes:
                    self._sample(st, rate_limited=True)
            return obj.tensor
        rec = obj.record
        if st is not None:
            self._advance(st, obj.anchor)
            if rec.restored is None and rec.read is None and not rec.released:
                st.stats.prefetches += 1  # a demand fetch also starts a copy up
        t0 = time.perf_counter()
        with _disable_current_modes():  # [Note: the runtime's own ops]
            got = self.mover.restore(rec)
        if st is not None:
            st.priced += time.perf_counter() - t0  # waits and copies up: priced as stalls
            st.stats.demand_fetches += int(got.demand_fetch)
            st.stats.wait_seconds += got.waited_seconds
        with torch.no_grad():
            out = torch.empty(0, dtype=obj.dtype, device=got.tensor.device)
            out.set_(got.tensor.untyped_storage(), (got.base + obj.offset) // out.element_size(), obj.size, obj.stride)
        if st is not None and self.track_live_bytes:
            self._sample(st, rate_limited=True)
        return out

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
        t0 = time.perf_counter()
        try:
            self._sample_heap(st, rate_limited)
        finally:
            st.sampling += time.perf_counter() - t0

    def _sample_heap(self, st: _StepState, rate_limited: bool) -> None:
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
        cur = st.live_bytes + self.mover.restored_bytes
        if st.stats.live_peak_bytes is None or cur > st.stats.live_peak_bytes:
            st.stats.live_peak_bytes = cur
        if heap_in_use is not None:
            h = heap_in_use()
            if h > st.heap_peak:
                st.heap_peak = h

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Finish pending I/O and remove the NVMe store this runtime created."""
        self.mover.close(own_store=self._owns_store)

    def describe(self) -> dict[str, Any]:
        counts = {"keep": 0, "host": 0, "nvme": 0}
        for e in {e.storage: e for e in self._packs if e is not None}.values():
            counts[e.action.label] += 1
        return {
            "storages": counts,
            "recomputed_units": sum(1 for u in self._units if u.recompute),
            "selective_units": sum(1 for u in self._units if u.selective),
            "segments": sum(len(v) for v in self._segments.values()),
            "replays": len(self._replays),
            "nvme_bytes": self.nvme_bytes,
            "notes": list(self.notes),
        }
