"""torch.compile'd models: observe what the compiled graphs save, and set the partitioner's budget.

[Note: what memstrata can do under torch.compile]
AOTAutograd turns each compiled graph into one autograd.Function: its forward
runs the whole graph and then saves the tensors its backward needs (the
partitioner chose them), its backward reads all of them back at once
(`ctx.saved_tensors`) before it computes anything.  Measured on ResNet-18
(one graph): 116 saves in one burst at the end of the forward, 116 reads in
one burst at the start of the backward.  Two consequences:

* offloading saved tensors with saved-tensor hooks (what the eager runtime
  does) cannot lower a one-graph step's peak: the backward brings every saved
  tensor back before its first kernel, so the peak at the backward's start
  is the unmanaged one.  It could help across graph breaks (each graph's
  backward reads only its own saves); that is not built.
* what does lower it is saving less (or splitting the graph, below): the min-cut partitioner recomputes in
  the backward what it did not save when `activation_memory_budget` is below
  1.0 (0.0: recompute everything recomputable).  The budget is read when a
  graph is compiled, so a new fraction means a recompile: `PartitionerBudget`
  gives each compiled module a forward compiled by the user's own backend
  (mode, options, dynamic, fullgraph kept) under
  `torch._functorch.config.patch(activation_memory_budget=f)`; dynamo's
  backend guard keeps the compiled code of each fraction apart, and fraction
  1.0 is the user's original forward.

[Note: one graph per unit]
Inside one graph, recompute cannot go below the graph's own working memory:
at fraction 0 the backward re-runs the whole forward before it needs the
first activation (ResNet-18, batch 32, 128 px, CPU: peak 245 MiB above the
step's start at 1.0, 222 at 0.3, 278 at 0).  Breaking the compiled graph at
the recompute units of trace/units.py (a forward pre-hook calling
`torch._dynamo.graph_break()` on each unit, in place while such a forward
is compiled and run) gives one graph per unit; each graph's backward reads
only its own saves, so fraction 0 per unit is unit-level activation
checkpointing inside compiled code: a unit's activations are recomputed when
its backward starts and freed when it ends.

[Note: offloading the saves of a split graph]
Split at units, a step still keeps every graph's saves from its forward to
its backward (each unit's input at fraction 0: ResNet-18's stem units save
full-resolution tensors).  Each graph's backward reads only its own saves, so
moving them to the lower tier between the two lowers the peak: with
`offload` on, the pack hook hands every activation storage a graph saves (not
parameters, buffers or the batch; at least `SaveOffloader.MIN_BYTES`) to the
`TierMover` (NVMe files on CPU, where tier 0 is the host; pinned host buffers
on CUDA) and the unpack hook restores it, byte for byte, into a tensor of the
same dtype, size, stride and storage offset: the compiled backward computes on
the same bits, so a step is bit-exact against the same compiled graphs
unmanaged.  A restore is a demand fetch when the graph's backward starts (no
prefetch: one unit ahead would hold two full-resolution stem saves at once).
One graph without a split gains nothing from it (its backward reads every
save before its first kernel, see above).

[Note: the what-if of a split step]
What offloading would remove depends on *when* the peak happens: the split
step's peak is at the stem's backward on ResNet-18, where most graphs' saves
are already gone but every gradient exists (subtracting every save from the
peak predicted 115 MiB where offload measured 209 MiB).  So the runtime
keeps, at every heap sample of a step, four what-if readings: the heap less
(a) the offloadable saves still waiting for their graph's backward (every
graph's from its forward until its backward starts: then the saves of the
graphs before it; the running graph's own are restored in the managed step)
that the forward no longer holds (a save the forward still holds, such as a
unit's output that the next graph reads, is freed by no offload: ResNet-18's
offloaded step peaked in the stem's forward with 64 of its 70 MiB of saves
still held there, 145 MiB measured where the what-if without this term said
119; autograd keeps an alias of each save in the measured step, so the
forward's own tensor dies when the forward drops it),
(b) also the gradients made so far (a post-accumulate-grad hook on every
parameter: with gradient tiering they leave once final, runtime/grads.py),
(c) the saves and the split units' parameters a dry `ParamTiering` says
would be released ([Note: parameters of a compiled unit] in
runtime/params.py), (d) all three.  Their
peaks (`CompiledStepStats.whatif_peaks`) are what plan/compiled.py's
`offload_plan` predicts the offloaded step from.  Hooks see what is made
and read, not what the graphs' kernels allocate inside: the readings are
exact at the samples, and a peak between samples is missed by all four alike.

[Note: buffered files for compiled saves]
On a CPU box the saves (and, in memstrata/compiled.py, the gradients) go to
NVMe files written through the page cache (`NVMeStore(direct=False)`, as
runtime/params.py writes parameters), not with O_DIRECT: a direct write
needs a 4 KiB-aligned source, torch's CPU allocator aligns to 64 bytes, so
every save was first copied into a fresh aligned buffer, and the write job
holds the save until the disk took it.  On the shared box (ResNet-18, b32,
128 px, every save, gradient and split unit's parameter tiered) the step
peaked at 201-209 MiB with direct writes and 145 MiB buffered, 2026-12-05:
the in-flight writes and their staging copies were the difference.  Dirty
pages are the kernel's to write back (they are not this process's memory,
which is the basis the budget is kept on); on a machine where the page cache
competes with tier 0 that is a real cost: not measured here.

The runtime otherwise does no copying: `CompiledRuntime.step()` installs
saved-tensor hooks that return every tensor unchanged, record what was saved
(sizes, storages, which autograd.Function saved it) and sample the CPU heap
(a poller thread plus every save and read), and compares the saves with the
step's trace: a step that saves other tensors than its trace did reports
`misaligned` (the Manager warns once and traces again).  Keeping is exact, so
a step's values are those of the same compiled graph without memstrata.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..trace.compiled import CompiledTrace
from .memory import heap_in_use
from .mover import Placement, Resident, TierMover
from .pool import HostBufferPool
from .streams import CopyContext

__all__ = ["CompiledRuntime", "CompiledStepStats", "PartitionerBudget", "SaveOffloader", "compiled_modules",
           "is_compiled"]


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    """The torch.compile'd modules (`OptimizedModule`) in `model`, itself included, outermost first."""
    out: list[nn.Module] = []
    for m in model.modules():
        if type(m).__name__ == "OptimizedModule" and not any(m in o.modules() for o in out):
            out.append(m)
    return out


def is_compiled(model: nn.Module) -> bool:
    """True when `model` is or holds a torch.compile'd module."""
    return bool(compiled_modules(model))


class _BudgetedBackend:
    """The user's backend, compiling under `activation_memory_budget=fraction`."""

    def __init__(self, inner: Any, fraction: float) -> None:
        self.inner = inner
        self.fraction = float(fraction)

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        import torch._functorch.config as functorch_config

        with functorch_config.patch(activation_memory_budget=self.fraction):
            return self.inner(gm, example_inputs)


def _graph_break(module: nn.Module, args: Any) -> None:
    torch._dynamo.graph_break()  # a no-op outside compilation


def split_points(units: list[nn.Module]) -> list[nn.Module]:
    """The units a split breaks the graph before: not one that modifies its input in place, nor the unit
    just before one (units in registration order, which is the order they run in for the models we split).

    [Note: no break before an in-place module] A break before `nn.ReLU(inplace=True)` puts it in a graph of
    its own that writes into a tensor the previous graph saved for its backward.  Without saved-tensor hooks
    autograd's version check raises; with ours (which hand the tensor back) the backward silently reads the
    post-ReLU values: a wrong gradient (the 1.3e-3 -> 0.16 difference seen on ResNet-18 split at units).
    A break before the unit *before* it does the same: dynamo splits the parent's frame at the call of a
    split unit (the break runs in the unit's pre-hook, a nested frame), the unit runs in a frame of its own,
    and the parent resumes in a new graph that starts right after that call, i.e. with the in-place module,
    whose input (the unit's output) comes from outside the graph.  AOTAutograd applies such a write to the
    input with `copy_` after the graph, and at activation budget 0 the graph saved that input: ResNet-18's
    stem (conv1 | bn1 | relu_ | maxpool) split before bn1 failed autograd's version check unmanaged
    (2026-12-05, b32 128 px).  So neither the in-place module nor the unit before it is a split point: both
    join the graph that runs before them, which functionalises the write.
    """
    inplace = [bool(getattr(u, "inplace", False)) for u in units]
    return [u for i, u in enumerate(units) if not inplace[i] and not (i + 1 < len(units) and inplace[i + 1])]


def _raise_recompile_limit(needed: int) -> None:
    """Split graphs compile each unit's forward as a frame of its own, once per block shape and per
    setting (a fraction's backend is guarded apart): ResNet-18's eight `BasicBlock.forward` calls alone
    reach dynamo's default limit of 8, after which the blocks run eagerly, unmanaged and uncompiled."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed:
            setattr(dynamo_config, name, needed)
            break


class PartitionerBudget:
    """Sets the partitioner's activation budget of the compiled modules in a model ([Note: what memstrata ...]).

    `set(f)` swaps each `OptimizedModule`'s forward for one compiled at
    fraction `f` (cached: switching back costs nothing); `set(1.0)` and
    `restore()` put the user's forward back.
    """

    def __init__(self, model: nn.Module) -> None:
        from ..trace.units import find_units

        self.modules = compiled_modules(model)
        self.original = [m.forward for m in self.modules]
        self._forwards: dict[tuple[float, bool], list[Any]] = {(1.0, False): list(self.original)}
        self.fraction = 1.0
        self.split = False
        # The recompute units of the compiled modules' own modules (trace/units.py): where `split` breaks graphs.
        self.units = split_points([u for m in self.modules for _, u in find_units(m._orig_mod)])
        self._hooks: list[Any] = []

    def _compile(self, fraction: float) -> list[Any]:
        from torch._dynamo.eval_frame import innermost_backend

        out = []
        for m in self.modules:
            ctx = m.dynamo_ctx
            backend = _BudgetedBackend(innermost_backend(ctx.callback), fraction)
            opt = torch._dynamo.optimize(backend, nopython=bool(getattr(ctx, "fullgraph", False)),
                                         dynamic=getattr(ctx, "_dynamic", None))
            # The forward exactly as OptimizedModule builds it (it wraps torch.nn modules' frames so that
            # dynamo does not skip them), with the new context; the module's own context is kept.
            old_ctx, old_forward = m.dynamo_ctx, m.forward
            try:
                m.dynamo_ctx = opt
                m._initialize()
                out.append(m.forward)
            finally:
                m.dynamo_ctx, m.forward = old_ctx, old_forward
        return out

    def set(self, fraction: float, split: bool = False) -> None:
        """Compile at `fraction`; `split`: one graph per recompute unit ([Note: one graph per unit])."""
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"an activation memory budget is in [0, 1], got {fraction}")
        split = bool(split) and bool(self.units)
        if split:
            _raise_recompile_limit(8 * (len(self._forwards) + 2) + 2 * len(self.units))
        if (fraction, split) == (self.fraction, self.split):
            return
        self._set_breaks(split)
        forwards = self._forwards.get((fraction, split))
        if forwards is None:
            forwards = self._forwards[(fraction, split)] = self._compile(fraction)
        for m, f in zip(self.modules, forwards):
            m.forward = f
        self.fraction, self.split = fraction, split

    def _set_breaks(self, on: bool) -> None:
        if on and not self._hooks:
            self._hooks = [u.register_forward_pre_hook(_graph_break) for u in self.units]
        elif not on:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def restore(self) -> None:
        self.set(1.0, False)


@dataclass
class CompiledStepStats:
    """What one step of a compiled model saved (plain data; the Manager reports it)."""

    fraction: float = 1.0
    packs: int = 0
    unpacks: int = 0
    graphs: int = 0  # bursts of saves by one autograd.Function call (a compiled graph)
    largest_graph_activation_bytes: int = 0  # the most activation bytes one graph (or eager run) saved
    eager_packs: int = 0  # saves by eager ops between graphs (graph breaks)
    saved_activation_bytes: int = 0
    saved_static_bytes: int = 0  # parameters, buffers and the batch the graphs saved (there anyway)
    bytes_at_start: int = 0
    heap_peak_bytes: int | None = None  # CPU: sampled heap peak above the step's start
    heap_samples: int = 0
    misaligned: str | None = None
    offload: bool = False  # saves moved to the lower tier ([Note: offloading the saves of a split graph])
    offloaded_bytes: int = 0  # storages handed to the mover (each once)
    restores: int = 0
    restore_wait_seconds: float = 0.0
    params_tiered: bool = False  # split units' parameters off tier 0 between uses (runtime/params.py)
    # [Note: the what-if of a split step]: sampled heap peak above the start less what offloading the saves
    # would have removed at each sample, also tiering the gradients, the units' parameters, both
    whatif_peaks: tuple[int, int, int, int] | None = None
    grad_bytes: int = 0  # gradients made in this step (final: their accumulate hooks ran)
    pack_nbytes: list[int] = field(default_factory=list, repr=False)


class _HeapPoller(threading.Thread):
    """Samples the CPU heap every `interval` s (while the GIL lets it) between start() and finish()."""

    def __init__(self, interval: float = 0.0005, whatif: Any = None) -> None:
        super().__init__(daemon=True, name="memstrata-compiled-heap")
        self.interval = interval
        self.peak = heap_in_use() if heap_in_use is not None else 0
        self.whatif = whatif  # () -> (offloadable saves alive, final gradients, released parameters), bytes
        self.whatif_peaks = [self.peak] * 4
        self.samples = 0
        self._stop_evt = threading.Event()

    def _take(self, h: int) -> None:
        self.samples += 1
        if h > self.peak:
            self.peak = h
        if self.whatif is not None:
            off, grads, params = self.whatif()
            w = self.whatif_peaks
            for k, v in enumerate((h - off, h - off - grads, h - off - params, h - off - grads - params)):
                if v > w[k]:
                    w[k] = v

    def run(self) -> None:
        assert heap_in_use is not None
        while not self._stop_evt.is_set():
            self._take(heap_in_use())
            time.sleep(self.interval)

    def sample(self) -> None:
        if heap_in_use is not None:
            self._take(heap_in_use())

    def finish(self) -> int:
        self._stop_evt.set()
        if self.is_alive():
            self.join()
        self.sample()
        return self.peak


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except Exception:  # sparse / opaque subclasses
        return None


def _saving_function_frame() -> Any:
    """The frame of the compiled graph's call (AOTAutograd's runtime wrapper) or autograd.Function.apply
    whose outputs are being saved, else None (an eager op between graphs)."""
    f = sys._getframe(2)
    while f is not None and "/torch/_dynamo/" in f.f_code.co_filename.replace("\\", "/"):
        f = f.f_back  # the torch.compiler.disable wrapper around the hook
    if f is None:
        return None
    name = f.f_code.co_filename.replace("\\", "/")
    if "/torch/_functorch/_aot_autograd/" in name or (f.f_code.co_name == "apply" and
                                                        name.endswith("torch/autograd/function.py")):
        return f
    return None


def _tensors(x: Any, out: list[torch.Tensor]) -> None:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)


class _Offloaded:
    """A save moved to the lower tier: its record and how to rebuild the tensor over the restored bytes."""

    __slots__ = ("owner", "rec", "dtype", "size", "stride", "offset", "__weakref__")

    def __init__(self, owner: "SaveOffloader", rec: Resident, t: torch.Tensor) -> None:
        self.owner = owner
        self.rec = rec
        self.dtype = t.dtype
        self.size = tuple(t.size())
        self.stride = tuple(t.stride())
        self.offset = t.storage_offset() * t.element_size()  # bytes
        rec.refs += 1

    def __del__(self) -> None:  # autograd dropped the save (after its backward): give the bytes back
        try:
            self.owner.drop(self.rec)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class SaveOffloader:
    """Moves saved activation storages to the lower tier and back ([Note: offloading the saves of a split graph]).

    One `Resident` per storage per step (aliases share it); released when the
    last save of it is dropped by autograd.
    """

    MIN_BYTES = 1 << 16  # smaller saves stay (a file per tensor costs more than it frees)

    def __init__(self, device: torch.device, nvme_dir: str | None, *, io_workers: int | None = None) -> None:
        self.copy = CopyContext(device)
        self.placement = Placement.HOST if self.copy.cuda else Placement.NVME
        self.nvme_dir = nvme_dir
        self.pool = HostBufferPool(pin=self.copy.cuda)
        self.store = None
        self.io_workers = io_workers
        self.mover = TierMover(self.copy.device, self.copy, self.pool, None)
        self._live: dict[int, tuple[Resident, Any]] = {}  # storage -> (record, weakref to a tensor on it)

    @property
    def available(self) -> bool:
        """On CPU the lower tier is NVMe: without a directory there is nowhere to move to."""
        return self.placement == Placement.HOST or self.nvme_dir is not None

    def describe(self) -> str:
        if self.placement == Placement.HOST:
            return "pinned host memory"
        return f"NVMe files under {self.nvme_dir}" if self.nvme_dir else "none (no nvme_dir on CPU)"

    def pack(self, t: torch.Tensor, s: torch.UntypedStorage, stats: CompiledStepStats) -> _Offloaded:
        key = s._cdata
        hit = self._live.get(key)
        rec = hit[0] if hit is not None and hit[1]() is not None and not hit[0].released else None
        if rec is None:
            if self.placement == Placement.NVME and self.store is None:
                from .nvme import NVMeStore

                # buffered files ([Note: buffered files for compiled saves])
                self.store = self.mover.store = NVMeStore(self.nvme_dir or "", workers=self.io_workers, direct=False)
            rec = self.mover.evict(key, self.placement, s)
            self._live[key] = (rec, weakref.ref(t))
            stats.offloaded_bytes += rec.nbytes
        return _Offloaded(self, rec, t)

    def unpack(self, obj: _Offloaded, stats: CompiledStepStats | None) -> torch.Tensor:
        got = self.mover.restore(obj.rec)
        if stats is not None:
            stats.restores += 1
            stats.restore_wait_seconds += got.waited_seconds
        with torch.no_grad():
            out = torch.empty(0, dtype=obj.dtype, device=got.tensor.device)
            out.set_(got.tensor.untyped_storage(), (got.base + obj.offset) // out.element_size(), obj.size,
                     obj.stride)
        return out

    def drop(self, rec: Resident) -> None:
        rec.refs -= 1
        if rec.refs <= 0:
            self.mover.release(rec)
            hit = self._live.get(rec.storage)
            if hit is not None and hit[0] is rec:
                del self._live[rec.storage]

    def end_step(self) -> None:
        self._live.clear()  # records still held by saves stay valid; storages are not matched across steps

    def close(self) -> None:
        self._live.clear()
        self.mover.close(own_store=True)
        self.store = self.mover.store = None


class _Step:
    def __init__(self, stats: CompiledStepStats, expected: tuple[int, ...] | None, fixed: set[int],
                 poller: _HeapPoller | None) -> None:
        self.stats = stats
        self.expected = expected
        self.fixed = fixed  # storages of parameters, buffers and the batch (there before the step)
        self.seen: set[int] = set()
        self.poller = poller
        self.frame: Any = None
        self.graph_bytes = 0  # activation bytes saved by the current graph
        self.heap_base = 0
        # [Note: the what-if of a split step]
        self.graph_offloadable: list[int] = [0]  # per graph (index = stats.graphs when saved): offloadable bytes
        self.save_graph: dict[int, int] = {}  # storage -> the graph that saved it
        self.offloadable_alive = 0
        # (the forward's own tensor, bytes, graph) per offloadable save: while the forward still holds the tensor
        # offloading frees nothing, so the what-if does not subtract it (append-only: the poller thread reads it)
        self.forward_held: list[tuple[Any, int, int]] = []
        self.backward_graph: int | None = None
        self.grad_bytes = 0
        self.start_storages: set[int] = set()
        self.params: Any = None  # the runtime's ParamTiering (dry or live), if any

    def whatif(self) -> tuple[int, int, int]:
        return self.offloadable_alive - self.held_by_forward(), self.grad_bytes, self.released_params()

    def held_by_forward(self) -> int:
        """Bytes of the saves still waiting for their graph's backward that the forward itself still holds."""
        b, held = self.backward_graph, self.forward_held
        n = 0
        for i in range(len(held)):
            ref, nbytes, g = held[i]
            if (b is None or g < b) and ref() is not None:
                n += nbytes
        return n

    def released_params(self) -> int:
        return self.params.released_bytes if self.params is not None else 0


class _UnitProbe:
    """Checks, in a dry step, that a split unit ran as one compiled graph whose node reads its parameters
    ([Note: parameters of a compiled unit] in runtime/params.py)."""

    def __init__(self, runtime: "CompiledRuntime") -> None:
        self.runtime = runtime

    def enter(self) -> Any:
        st = self.runtime._state
        return None if st is None else (st.stats.graphs, st.stats.eager_packs, st.frame)

    def leave(self, token: Any, node: Any) -> bool:
        st = self.runtime._state
        if st is None or token is None:
            return False
        graphs, eager, frame = token
        new_graphs = st.stats.graphs - graphs
        one_graph = new_graphs == 1 or (new_graphs == 0 and st.frame is frame)
        return (one_graph and st.stats.eager_packs == eager and node is not None
                and type(node).__name__ == "CompiledFunctionBackward")


class CompiledRuntime:
    """Runs steps of a compiled model at a partitioner fraction and checks them against their trace.

    `step(inputs)` is a context manager over forward + loss + backward; it
    yields the step's `CompiledStepStats` (complete when the block exits).
    `expect(trace)` makes later steps check their saves against `trace`.
    """

    def __init__(self, model: nn.Module, *, sample_heap: bool | None = None, nvme_dir: str | None = None,
                 io_workers: int | None = None, tier_params: bool = False) -> None:
        self.model = model
        self.budget = PartitionerBudget(model)
        if not self.budget.modules:
            raise ValueError(f"{type(model).__name__} holds no torch.compile'd module")
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        cpu = self.device.type == "cpu"
        self.sample_heap = (cpu and heap_in_use is not None) if sample_heap is None else bool(sample_heap)
        self.expected: CompiledTrace | None = None
        self.offloader = SaveOffloader(self.device, nvme_dir, io_workers=io_workers)
        self.offload = False  # move activation saves to the lower tier ([Note: offloading the saves ...])
        self.last_stats: CompiledStepStats | None = None
        self._state: _Step | None = None
        self.tier_params = bool(tier_params)
        self.params: Any = None  # ParamTiering of the split units ([Note: parameters of a compiled unit])
        # gradients made in a step, for the what-if ([Note: the what-if of a split step]); registered first, so
        # they run before a gradient tier's hooks take the gradient away
        self._grad_hooks = [p.register_post_accumulate_grad_hook(self._grad_done)
                            for p in model.parameters() if p.requires_grad]

    @property
    def fraction(self) -> float:
        return self.budget.fraction

    @property
    def split(self) -> bool:
        return self.budget.split

    @property
    def can_offload(self) -> bool:
        return self.offloader.available

    @property
    def can_tier_params(self) -> bool:
        """Split units' parameters can leave tier 0 (asked for, split, a lower tier, units found eligible)."""
        return self.params is not None and any(self.params.eligible.values())

    def set_fraction(self, fraction: float, split: bool = False, offload: bool = False,
                     params: bool = False) -> None:
        """Compile (on the next call) at this partitioner budget; the saves change, so forget the trace.
        `offload`: move the activation saves to the lower tier (the saves themselves do not change);
        `params`: the split units' parameters too ([Note: parameters of a compiled unit])."""
        if offload and not self.can_offload:
            raise ValueError(f"no lower tier to offload compiled saves to ({self.offloader.describe()})")
        if params and not (split and self.can_tier_params):
            raise ValueError("the split units' parameters cannot be tiered (not split at units, tier_params off, "
                             "no lower tier, or no unit whose backward reads its parameters in one graph)")
        self.offload = bool(offload)
        if (float(fraction), bool(split)) != (self.budget.fraction, self.budget.split):
            self.expected = None
        self.budget.set(fraction, split)
        self._set_params(self.budget.split, bool(params))

    def _set_params(self, split: bool, live: bool) -> None:
        """A dry ParamTiering over the split units while split (the what-if), live when `live`."""
        if self.params is not None and (not split or (self.params.dry is False and not live)):
            self.params.close()  # every parameter resident, hooks gone
            self.params = None
        if self.params is None and split and self.tier_params:
            self.params = self._param_tiering()
        if self.params is not None and live:
            self.params.go_live()

    def _param_tiering(self) -> Any:
        from .params import ParamTiering

        if len(self.budget.modules) != 1:
            return None  # several compiled modules: units are named per module (not built)
        placement = Placement.HOST if self.offloader.copy.cuda else Placement.NVME
        if placement == Placement.NVME and self.offloader.nvme_dir is None:
            return None
        root = self.budget.modules[0]._orig_mod
        split = {id(u) for u in self.budget.units}
        names = {n: placement for n, u in root.named_modules() if id(u) in split and any(True for _ in u.parameters())}
        from .params import _whole_tierable

        names = {n: pl for n, pl in names.items() if n in set(_whole_tierable(root, names))}
        if not names:
            return None
        return ParamTiering(root, names, nvme_dir=self.offloader.nvme_dir, io_workers=self.offloader.io_workers,
                            whole_modules=True, dry=True, probe=_UnitProbe(self))

    def expect(self, trace: CompiledTrace | None) -> None:
        self.expected = trace

    def trace_of(self, stats: CompiledStepStats, seconds: float, model_name: str = "",
                 peak_above_start: int | None = None, peak_source: str = "") -> CompiledTrace:
        """The trace a step's stats make (its peak: the heap reading, or `peak_above_start` e.g. from CUDA)."""
        above = peak_above_start if peak_above_start is not None else (stats.heap_peak_bytes or 0)
        source = peak_source or ("CPU heap above the step's start (mallinfo2: a poller thread + every save "
                                 "and read)" if stats.heap_peak_bytes is not None else "not measured")
        return CompiledTrace(
            model=model_name or type(self.model).__name__, fraction=stats.fraction,
            pack_nbytes=tuple(stats.pack_nbytes), saved_activation_bytes=stats.saved_activation_bytes,
            saved_static_bytes=stats.saved_static_bytes, unpacks=stats.unpacks,
            bytes_at_start=stats.bytes_at_start, peak_above_start=int(above), peak_source=source,
            step_time=float(seconds), graphs=stats.graphs,
            largest_graph_activation_bytes=stats.largest_graph_activation_bytes,
            whatif_peaks=stats.whatif_peaks if peak_above_start is None else None, grad_bytes=stats.grad_bytes)

    @contextlib.contextmanager
    def step(self, inputs: Any = ()) -> Iterator[CompiledStepStats]:
        if self._state is not None:
            raise RuntimeError("CompiledRuntime.step() is not re-entrant")
        stats = CompiledStepStats(fraction=self.budget.fraction, offload=self.offload)
        fixed: set[int] = set()
        start: dict[int, int] = {}
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                s = _storage(t)
                if s is not None:
                    fixed.add(s._cdata)
                    start[s._cdata] = s.nbytes()
                g = getattr(t, "grad", None)
                s = _storage(g) if isinstance(g, torch.Tensor) else None
                if s is not None:
                    start[s._cdata] = s.nbytes()
            xs: list[torch.Tensor] = []
            _tensors(inputs, xs)
            for t in xs:
                s = _storage(t)
                if s is not None:
                    fixed.add(s._cdata)
                    start[s._cdata] = s.nbytes()
        stats.bytes_at_start = int(sum(start.values()))
        expected = self.expected.pack_nbytes if self.expected is not None else None
        st = _Step(stats, expected, fixed, None)
        st.start_storages = set(start)
        st.params = self.params
        poller = None
        if self.sample_heap:
            poller = st.poller = _HeapPoller(whatif=st.whatif)
        if poller is not None:
            st.heap_base = poller.peak
            poller.start()
        self._state = st
        params = self.params
        stats.params_tiered = params is not None and not params.dry
        if params is not None:
            params.begin()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield stats
        finally:
            if params is not None:
                params.end()  # every parameter resident again (the optimizer step runs after the block)
            self._state = None
            self.offloader.end_step()
            stats.grad_bytes = st.grad_bytes
            if poller is not None:
                stats.heap_peak_bytes = max(0, poller.finish() - st.heap_base)
                stats.heap_samples = poller.samples
                stats.whatif_peaks = tuple(max(0, w - st.heap_base) for w in poller.whatif_peaks)  # type: ignore
            if expected is not None and stats.misaligned is None and stats.packs != len(expected):
                stats.misaligned = f"the step saved {stats.packs} tensors, its trace {len(expected)}"
            self.last_stats = stats

    # The hooks run inside compiled regions' calls: dynamo must not trace them (it would compile them
    # as user frames and recompile them on every call).  torch.compiler.disable runs them as Python.
    @torch.compiler.disable
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = self._state
        if st is None:
            return t
        stats = st.stats
        k = stats.packs
        stats.packs = k + 1
        frame = _saving_function_frame()
        if frame is None:
            stats.eager_packs += 1
            if st.frame is not None:
                st.graph_bytes = 0
            st.frame = None
        elif frame is not st.frame:
            stats.graphs += 1
            st.frame = frame
            st.graph_bytes = 0
        s = _storage(t)
        n = int(s.nbytes()) if s is not None else 0
        stats.pack_nbytes.append(n)
        offloadable = (s is not None and s._cdata not in st.fixed and n >= SaveOffloader.MIN_BYTES
                       and t.device == self.device and t.layout == torch.strided)
        first = s is not None and s._cdata not in st.seen
        if first:
            st.seen.add(s._cdata)
            if s._cdata in st.fixed:
                stats.saved_static_bytes += n
            else:
                stats.saved_activation_bytes += n
                st.graph_bytes += n
                stats.largest_graph_activation_bytes = max(stats.largest_graph_activation_bytes, st.graph_bytes)
            if offloadable:
                g = stats.graphs
                while len(st.graph_offloadable) <= g:
                    st.graph_offloadable.append(0)
                st.graph_offloadable[g] += n
                st.save_graph[s._cdata] = g
                st.offloadable_alive += n
        exp = st.expected
        if exp is not None and stats.misaligned is None:
            if k >= len(exp):
                stats.misaligned = f"save {k}: the trace saved only {len(exp)} tensors"
            elif exp[k] != n:
                stats.misaligned = f"save {k}: a storage of {n} bytes, the trace's had {exp[k]}"
        if st.poller is not None:
            st.poller.sample()
        if stats.offload and offloadable:
            return self.offloader.pack(t, s, stats)
        if offloadable and st.poller is not None and s is not None and s._cdata in st.save_graph:
            # [Note: the what-if of a split step]: autograd keeps an alias, so the forward's own tensor object
            # lives exactly as long as the forward holds it
            if first:
                st.forward_held.append((weakref.ref(t), n, st.save_graph[s._cdata]))
            return t.detach()
        return t

    @torch.compiler.disable
    def _unpack(self, t: Any) -> torch.Tensor:
        st = self._state
        if st is not None:
            st.stats.unpacks += 1
        key = t.rec.storage if isinstance(t, _Offloaded) else None
        if isinstance(t, _Offloaded):
            t = self.offloader.unpack(t, st.stats if st is not None else None)
        if st is not None:
            if key is None:
                s = _storage(t)
                key = s._cdata if s is not None else None
            g = st.save_graph.get(key) if key is not None else None
            if g is not None and g != st.backward_graph:
                # graph g's backward starts: the saves of later graphs are gone, earlier ones' still wait
                st.backward_graph = g
                st.offloadable_alive = sum(st.graph_offloadable[:g])
            if st.poller is not None:
                st.poller.sample()
        return t

    @torch.compiler.disable
    def _grad_done(self, p: torch.Tensor) -> None:
        st = self._state
        g = p.grad
        if st is None or g is None:
            return
        s = _storage(g)
        if s is not None and s._cdata not in st.start_storages:
            st.start_storages.add(s._cdata)  # counted once
            st.grad_bytes += int(s.nbytes())

    def close(self) -> None:
        """Give the compiled modules their own forward back; parameters resident; remove the offload store."""
        self._set_params(False, False)
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []
        self.budget.restore()
        self.offloader.close()

    def describe(self) -> dict[str, Any]:
        return {"fraction": self.budget.fraction, "split_at_units": self.budget.split, "offload": self.offload,
                "lower_tier": self.offloader.describe(),
                "compiled_modules": len(self.budget.modules), "units": len(self.budget.units),
                "compiled": [f"{f:g}{' per unit' if sp else ''}" for f, sp in sorted(self.budget._forwards)]}
