"""Parameters off tier 0 between their uses: fetched before a module's forward and backward, released after.

`ParamTiering` carries out a plan's parameter decisions (`Plan.params`,
[Note: parameters in the plan] in trace/params.py) for the modules it names.
Only inside a managed step (`begin()` .. `end()`); outside it every parameter
is resident, so the optimizer step, clipping, `state_dict()` and evaluation
see ordinary parameters.

>>> import tempfile, torch
>>> from memstrata.runtime.params import ParamTiering
>>> from memstrata.runtime.mover import Placement
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> with tempfile.TemporaryDirectory() as d:
...     tiering = ParamTiering(model, {"0": Placement.NVME}, nvme_dir=d)
...     tiering.begin()
...     loss = model(torch.randn(4, 8)).sum()
...     gone = model[0].weight.untyped_storage().nbytes()    # released after its forward
...     loss.backward()                                        # fetched for its backward, released after
...     tiering.end()                                          # resident again for the optimizer step
...     back = model[0].weight.untyped_storage().nbytes()
...     tiering.close()
>>> gone, back, model[0].weight.grad.shape
(0, 256, torch.Size([8, 8]))

[Note: release by storage resize]
A module's parameters are released by resizing their storages to 0 bytes
(`UntypedStorage.resize_(0)`, as FSDP1 frees its flat parameters) and fetched
by resizing them back and copying the bytes in at the storage level.  The
tensor objects, their shapes, strides and version counters never change, so
* every alias autograd saved (the weight itself for a convolution, the
  `weight.t()` view for a linear layer's `mm`, or the activation runtime's
  `_Kept` wrapper around either) shares the one storage and reads the fetched
  bytes in backward: copies only, bit-exact by construction;
* `AccumulateGrad` only reads the parameter's metadata, so a gradient
  accumulates into ``p.grad`` while the parameter is released;
* a version-counter check never fires (the copies bypass it).
Reading a released parameter (inside the step, outside its module) fails
loudly ("storage of size 0"), never silently.

[Note: when the runtime holds a tiered module's parameters]
* Forward: the module's forward pre-hook fetches them (if released); its
  forward hook writes them down (once per step: whatever changed them since
  the last step, an optimizer or a `p.data.copy_` that no version counter
  sees, is written) and releases them, after registering a pre-hook
  (fetch) and a hook (release) on the autograd node that made the module's
  output: the one node that reads the weight in backward ([Note: which
  modules' parameters may be tiered] in trace/param_modules.py).
* A recompute re-runs the forward inside backward (non-reentrant
  checkpoint: at the first unpack of the unit, possibly inside the very node
  that reads the weight): the pre-hook fetches if needed, the hook does *not*
  release (`torch._C._current_graph_task_id() != -1`); the node's own hook
  releases after it ran.  (A reentrant checkpoint's recomputed graph runs its
  own nodes: the hooks registered on the recomputed output release there.)
* `end()` (the step's block exits) and any optimizer's step pre-hook
  (a step inside the block) fetch every released module: the optimizer step
  sees resident parameters.
[Note: parameters of a compiled unit]
Under torch.compile split at units (runtime/compiled.py, [Note: one graph
per unit]) a unit that is a split point runs its forward as one compiled
graph, called from an eager `Module.__call__`: its forward hooks run as
Python (wrapped in `torch.compiler.disable`, so dynamo never traces them),
and its output's autograd node is the graph's `CompiledFunctionBackward`,
the one node whose backward reads the unit's parameters (saved by the
graph: the same storages).  `whole_modules=True` tiers such a unit's
parameters together, submodules' included, with the same hooks as above.
Inductor's kernels read raw pointers: a released parameter read by compiled
code would not fail loudly but read freed memory.  So tiering starts `dry`
(hooks count, nothing moves: the what-if the plan reads) and the first dry
step checks each unit through `probe`: exactly one graph saved inside its
forward, no eager op saved there, and its output's node is that graph's;
`go_live()` tiers only the units that passed.  Storage resizes change no
tensor metadata that dynamo guards on (shape, stride, dtype, device), so
the compiled code is reused: no recompile per step (tested).
The copies run with the dispatch modes switched off: a selective checkpoint
counts the ops of its region and must not see them.
Copies are synchronous (the plan prices them as exposed); NVMe files are
opened once per parameter and overwritten in place (`NVMeStore.open_file`:
the store owns the files' lifetime), read and written in the calling thread
straight from the parameter's storage; host copies are pinned on CUDA.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import _disable_current_modes

from ..trace.param_modules import tierable_param_modules
from .errors import NVMeIOError
from .mover import Placement
from .nvme import NVMeStore

__all__ = ["ParamTiering", "ParamStats"]


class ParamStats:
    """What the parameter tier did (cumulative)."""

    def __init__(self) -> None:
        self.fetches = 0
        self.releases = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.resident_peak_bytes = 0  # tiered parameter bytes resident at once, at most (this step)


class _Slot:
    """The parameters of one tiered module and where their bytes live between uses."""

    __slots__ = ("name", "module", "params", "placement", "nbytes", "files", "host", "resident", "written",
                 "enabled")

    def __init__(self, name: str, module: nn.Module, placement: Placement, recurse: bool = False) -> None:
        self.name = name
        self.module = module
        self.params = list(module.parameters(recurse=recurse))
        self.enabled = True
        self.placement = placement
        self.nbytes = sum(p.untyped_storage().nbytes() for p in self.params)
        self.files: list[tuple[str, int]] = []
        self.host: list[torch.Tensor] = []
        self.resident = True
        self.written = False  # written down in this step (since begin() or an optimizer step inside it)


def _bytes(p: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over `p`'s whole storage."""
    ust = p.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=ust.device).set_(ust)


def _host_view(p: torch.Tensor) -> memoryview:
    """The bytes of `p`'s (CPU) storage as a memoryview, without `Tensor.numpy()`: exporting a storage to
    numpy makes it non-resizable for good, and [Note: release by storage resize] needs it resizable."""
    ust = p.untyped_storage()
    return memoryview((ctypes.c_ubyte * ust.nbytes()).from_address(ust.data_ptr())).cast("B")


def _pwrite_all(fd: int, mv: memoryview) -> None:
    done = 0
    while done < len(mv):
        k = os.pwritev(fd, [mv[done:]], done)
        if k <= 0:
            raise OSError(errno.EIO, "short write")
        done += k


def _pread_all(fd: int, mv: memoryview) -> None:
    done = 0
    while done < len(mv):
        k = os.preadv(fd, [mv[done:]], done)
        if k <= 0:
            raise OSError(errno.EIO, f"short read ({done} of {len(mv)} bytes)")
        done += k


def _whole_tierable(root: nn.Module, names: Mapping[str, Placement]) -> list[str]:
    """Of `names`, the modules whose parameters (submodules' included) may be tiered as one: plain
    `nn.Parameter`s that require grad, own their whole storage, and belong to no other module named."""
    mods = dict(root.named_modules())
    owner: dict[int, int] = {}
    for name in names:
        for p in (mods[name].parameters() if name in mods else ()):
            owner[id(p)] = owner.get(id(p), 0) + 1
    counts: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    out = []
    for name in names:
        m = mods.get(name)
        ps = list(m.parameters()) if m is not None else []
        if ps and all(type(p) is nn.Parameter and p.requires_grad and p.layout == torch.strided
                      and p.is_contiguous() and p.storage_offset() == 0 and p.numel() > 0
                      and p.untyped_storage().nbytes() == p.numel() * p.element_size()
                      and owner[id(p)] == 1 and counts[id(p)] == 1 for p in ps):
            out.append(name)
    return out


class ParamTiering:
    """Tier the parameters of the modules `placements` names ({qualified name: HOST or NVME}).

    `whole_modules`: each named module's parameters *with its submodules'* (a compiled graph per unit: [Note:
    parameters of a compiled unit]); `dry`: only count what would be resident (no copy, no release) until
    `go_live()`; `probe`: in a dry step, an object whose `enter()` (before a module's forward) and
    `leave(token, node)` (after it, with its output's autograd node) say whether the module's backward reads
    its parameters in that one node; the modules where it did not are left out by `go_live()` (`eligible`).
    """

    def __init__(self, root: nn.Module, placements: Mapping[str, Placement], *,
                 nvme_dir: str | os.PathLike | None = None, io_workers: int | None = None,
                 whole_modules: bool = False, dry: bool = False,
                 probe: Any = None) -> None:
        mods = dict(root.named_modules())
        ok = set(_whole_tierable(root, placements) if whole_modules else tierable_param_modules(root))
        for name, pl in placements.items():
            if name not in ok:
                raise ValueError(f"parameters of module {name!r} cannot be tiered (not a plain Linear/Conv with "
                                 "parameters of its own: [Note: which modules' parameters may be tiered])")
            if pl not in (Placement.HOST, Placement.NVME):
                raise ValueError(f"parameters of module {name!r}: placement must be host or nvme, got {pl!r}")
            if pl == Placement.NVME and any(p.device.type != "cpu" for p in mods[name].parameters()):
                raise ValueError(f"parameters of module {name!r}: NVMe placement is for parameters in host RAM "
                                 "(a device's parameters go to host DRAM)")
        self.whole_modules = bool(whole_modules)
        self.slots = {name: _Slot(name, mods[name], pl, self.whole_modules) for name, pl in placements.items()}
        self.stats = ParamStats()
        self.store: NVMeStore | None = None
        self.nvme_dir = nvme_dir
        self.io_workers = io_workers
        self.dry = bool(dry)
        self.probe = probe
        self.eligible: dict[str, bool] = {name: True for name in self.slots}  # dry steps: read in one node
        self._probed: dict[str, Any] = {}
        if not self.dry:
            self._allocate()
        self.active = False
        self._resident_bytes = sum(s.nbytes for s in self.slots.values())
        self.total_bytes = self._resident_bytes
        self._handles = []
        wrap = torch.compiler.disable if self.whole_modules else (lambda f: f)  # run as Python, never traced
        for s in self.slots.values():
            self._handles.append(s.module.register_forward_pre_hook(wrap(self._make_pre(s))))
            self._handles.append(s.module.register_forward_hook(wrap(self._make_post(s))))
        self._handles.append(register_optimizer_step_pre_hook(self._before_optimizer_step))
        self.closed = False

    def _allocate(self) -> None:
        need = sum(s.nbytes for s in self.slots.values() if s.placement == Placement.NVME)
        if need:
            if self.nvme_dir is None:
                raise ValueError("the plan puts parameters on NVMe but the Manager has no nvme_dir")
            self.store = NVMeStore(self.nvme_dir, required_bytes=need, workers=self.io_workers, direct=False)
        for s in self.slots.values():
            if s.placement == Placement.NVME:
                assert self.store is not None
                s.files = [self.store.open_file(f"param-{s.name or 'root'}-{i}") for i in range(len(s.params))]
            else:
                pin = s.params[0].device.type == "cuda"
                s.host = [torch.empty(p.untyped_storage().nbytes(), dtype=torch.uint8, pin_memory=pin)
                          for p in s.params]

    def go_live(self) -> None:
        """From a dry run to real tiering (between steps), of the modules found `eligible` only."""
        if not self.dry:
            return
        if self.active:
            raise RuntimeError("ParamTiering.go_live() inside a step")
        for name in [n for n, ok in self.eligible.items() if not ok]:
            self.slots[name].enabled = False
            self._resident_bytes -= self.slots[name].nbytes
            self.total_bytes -= self.slots[name].nbytes
        self.slots = {n: s for n, s in self.slots.items() if s.enabled}
        self.dry = False
        self._allocate()

    @property
    def released_bytes(self) -> int:
        """Tiered parameter bytes not on tier 0 now (in a dry step: that would not be)."""
        return self.total_bytes - self._resident_bytes

    # ------------------------------------------------------------------ copies
    def _write(self, s: _Slot) -> None:
        with torch.no_grad(), _disable_current_modes():  # unseen by checkpoint's dispatch modes: not the model's ops
            if s.placement == Placement.NVME:  # synchronous: the storage is resized right after
                for p, (path, fd) in zip(s.params, s.files):
                    try:
                        _pwrite_all(fd, _host_view(p))
                    except OSError as e:
                        raise NVMeIOError(f"writing the parameters of {s.name!r} to {path} failed: "
                                          f"{e.strerror or e}") from e
            else:
                for p, h in zip(s.params, s.host):
                    h.copy_(_bytes(p))
        s.written = True
        self.stats.bytes_written += s.nbytes

    def _fetch(self, s: _Slot) -> None:
        if s.resident or not s.enabled:
            return
        if self.dry:
            s.resident = True
            self._resident_bytes += s.nbytes
            return
        with torch.no_grad(), _disable_current_modes():
            for p in s.params:
                p.untyped_storage().resize_(p.numel() * p.element_size())
            if s.placement == Placement.NVME:
                for p, (path, fd) in zip(s.params, s.files):
                    try:
                        _pread_all(fd, _host_view(p))
                    except OSError as e:
                        raise NVMeIOError(f"reading the parameters of {s.name!r} from {path} failed: "
                                          f"{e.strerror or e}") from e
            else:
                for p, h in zip(s.params, s.host):
                    _bytes(p).copy_(h)
        s.resident = True
        self.stats.fetches += 1
        self.stats.bytes_read += s.nbytes
        self._resident_bytes += s.nbytes
        self.stats.resident_peak_bytes = max(self.stats.resident_peak_bytes, self._resident_bytes)

    def _release(self, s: _Slot) -> None:
        if not s.resident or not s.enabled:
            return
        if self.dry:
            s.resident = False
            self._resident_bytes -= s.nbytes
            return
        if not s.written:
            self._write(s)
        with _disable_current_modes():
            for p in s.params:
                p.untyped_storage().resize_(0)
        s.resident = False
        self.stats.releases += 1
        self._resident_bytes -= s.nbytes

    # ------------------------------------------------------------------ hooks
    def _make_pre(self, s: _Slot):
        def pre(_module, args):
            if self.active:
                self._fetch(s)
                if self.dry and self.probe is not None:
                    self._probed[s.name] = self.probe.enter()
        return pre

    def _make_post(self, s: _Slot):
        def post(_module, _args, out):
            if not self.active:
                return
            node = out.grad_fn if isinstance(out, torch.Tensor) else None
            if self.dry and self.probe is not None and s.name in self._probed:
                if not self.probe.leave(self._probed.pop(s.name), node):
                    self.eligible[s.name] = False
            if node is None:
                return  # no backward will read them (no grad, or not a tensor): keep them resident
            node.register_prehook(lambda _g: self._fetch(s) if self.active else None)
            node.register_hook(lambda _gi, _go: self._release(s) if self.active else None)
            if torch._C._current_graph_task_id() != -1:
                # a recompute inside backward (checkpoint): the node about to read them may be running now;
                # the node that reads them releases them ([Note: when the runtime holds ...])
                return
            self._release(s)
        return post

    def _before_optimizer_step(self, _opt, _args, _kwargs) -> None:
        if self.active:  # an optimizer step inside the step's block: it changes them, read them first
            self.fetch_all()
        for s in self.slots.values():
            s.written = False

    # ------------------------------------------------------------------ the step
    def begin(self) -> None:
        """A managed step starts: tiered modules are released after their forward from now on."""
        if self.closed:
            raise RuntimeError("this ParamTiering is closed")
        self.stats.resident_peak_bytes = self._resident_bytes
        for s in self.slots.values():
            s.written = False  # anything may have changed them since (an optimizer, `p.data.copy_`, a load)
        self.active = True

    def fetch_all(self) -> None:
        for s in self.slots.values():
            self._fetch(s)

    def end(self) -> None:
        """The step's block exits: every tiered module resident again (for the optimizer step and beyond)."""
        self.fetch_all()
        self.active = False

    def close(self) -> None:
        """Every parameter resident, hooks removed, files gone."""
        if self.closed:
            return
        self.end()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.store is not None:
            for s in self.slots.values():
                for path, fd in s.files:
                    self.store.close_file(path, fd)
            self.store.close()
        self.closed = True

    def describe(self) -> str:
        n = sum(s.nbytes for s in self.slots.values())
        return (f"parameters of {len(self.slots)} modules tiered ({n} B); {self.stats.fetches} fetches, "
                f"{self.stats.bytes_read} B read, {self.stats.bytes_written} B written")
