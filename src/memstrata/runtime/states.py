"""Optimizer states off tier 0: read ahead before the step, written behind after it.

`TieredOptimizer` wraps any `torch.optim` optimizer whose state is per-parameter
tensors (AdamW / Adam: ``exp_avg``, ``exp_avg_sq``; SGD: ``momentum_buffer``;
Adagrad: ``sum``; ...).  Between steps the states of chosen buckets of
parameters live on a lower tier (`Placement.HOST`: a host buffer; `Placement.NVME`:
a file of the NVMe store); `step()` brings them back bucket by bucket, runs the
wrapped optimizer's own step on that bucket only, and sends them down again,
through the tier mover (mover.py).  Gradients and parameters stay on tier 0.

>>> import tempfile, torch
>>> from memstrata.runtime.states import StatePlacement, TieredOptimizer
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
>>> inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
>>> with tempfile.TemporaryDirectory() as d:
...     # params 0, 1 (first Linear) keep their states on tier 0; params 2, 3 keep theirs in NVMe files
...     opt = TieredOptimizer(inner, placement=StatePlacement(((0, 1), (2, 3)), ("keep", "nvme")), nvme_dir=d)
...     model(torch.randn(4, 8)).sum().backward()
...     opt.step()
...     sorted(opt.inner.state[model[1].weight])        # exp_avg, exp_avg_sq: in a file, not in RAM
...     sorted(opt.state_dict()["state"][2])            # the standard format, states materialised
...     opt.close()
['step']
['exp_avg', 'exp_avg_sq', 'step']

[Note: per-bucket steps are the full step]
`step()` restricts every param group's ``params`` to one bucket and calls the
wrapped optimizer's `step()` once per bucket.  For optimizers whose update of a
parameter reads only that parameter's gradient and state (every torch.optim
optimizer except LBFGS), and with the single-tensor kernels (``foreach=False``,
the default on CPU), that is the same arithmetic on the same values as one full
step: bit-identical.  The foreach / fused kernels group tensors by device and
dtype and apply the same per-tensor formula, so a smaller list changes nothing
either (checked on CPU with ``foreach=True`` in tests/test_states.py); where a
kernel choice depends on the list (``_default_to_fused_or_foreach`` looks at the
tensors' devices only), pin ``foreach=`` / ``fused=`` explicitly on both arms of
a comparison.  Scalar (0-dim) states such as ``step`` stay in the wrapped
optimizer's ``state`` all the time; every state with ``dim() > 0`` of a tiered
bucket is tiered.  LR schedulers see the wrapped optimizer's ``param_groups``
(the same list), so a schedule changes ``lr`` for every bucket alike.

[Note: the state window]
Buckets are stepped in a fixed order: the kept buckets first (their compute
hides the first NVMe reads), then the host and NVMe buckets.  While bucket k is
stepped, bucket k+1 (up to ``prefetch_depth`` buckets) is being read and bucket
k-1 is being written; the write of bucket k-2 is waited for before bucket k
starts.  So at most ``prefetch_depth + 2`` tiered buckets are on tier 0 at any
time (`stats.peak_resident_bytes`); the writes of the last two buckets overlap
the next forward/backward and are waited for at the start of the next `step()`
(or in `state_dict()`, `flush()`, `close()`).  A tiered bucket whose write is
still in flight when it is needed again is used from memory (no read).  NVMe
buckets on a CPU tier 0 go through the arena ring instead: ``prefetch_depth + 2``
arenas, reads pumped ahead into every clean arena ([Note: the pipeline of the
arena ring] in state_arenas.py); `StatePlacement.from_plan` takes the depth
from the planner's `window`.  Given the model (`model=`), the ring's buckets
are not stepped in `step()` at all but just before their next use in the
next forward ([Note: deferred updates] in deferred.py), and so are the kept
and the host buckets of the model's parameters (and NVMe buckets outside a
ring, as on CUDA: [Note: deferred host buckets]): `step()` records them and
steps only the others, and the ring walks the buckets in the order the last
forward used them, always in that order; a deferred host bucket is read
ahead ``prefetch_depth`` buckets before its update and written behind it.

[Note: no state is ever lost]
A state's bytes are always complete in at least one place.  Every write goes to
a new file (the store never overwrites a file); the previous file is removed
only after its bytes are back on tier 0 (the read job removes it), and the
tier-0 tensor is dropped only after the new file was written completely.  So
when the NVMe directory fills up mid-run, the failed write removes its partial
file, the tensor it was writing stays on tier 0, the step that produced it
finishes for every bucket (a write failure does not stop the step half way),
and `step()` then raises a one-line `NVMeIOError`.  Parameters and states are
then exactly those after that step: `state_dict()` returns them, and the next
`step()` tries the write again.  A failed *read* is different (the file was the
only copy): it raises at once and names the parameter.  A rename-based scheme
buys nothing here, since the files are not a checkpoint: a crashed process's
files are garbage (`remove_stale_stores` deletes them at the next start).
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..hardware import format_size
from .deferred import ModelHooks, PendingUpdate, capture_hyper
from .errors import NVMeIOError
from .mover import Placement, Resident, TierMover
from .nvme import NVMeStore, remove_stale_stores  # noqa: F401  (re-exported)
from .pool import HostBufferPool, round_up
from .state_arenas import ArenaRing, BucketFile
from .streams import CopyContext

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024  # parameter bytes per bucket when the placement is one tier for all


def _as_placement(tier: Placement | str | int) -> Placement:
    if isinstance(tier, Placement):
        return tier
    if isinstance(tier, str):
        try:
            return Placement[tier.upper()]
        except KeyError:
            raise ValueError(f"unknown state tier {tier!r}: use 'keep', 'host' or 'nvme'") from None
    return Placement(int(tier))


def buckets_by_size(nbytes: Sequence[int], bucket_bytes: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive indices grouped so that each group holds about `bucket_bytes` (at least one index each)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    out: list[tuple[int, ...]] = []
    cur: list[int] = []
    acc = 0
    for i, n in enumerate(nbytes):
        if cur and acc + int(n) > bucket_bytes:
            out.append(tuple(cur))
            cur, acc = [], 0
        cur.append(i)
        acc += int(n)
    if cur:
        out.append(tuple(cur))
    return tuple(out)


@dataclass(frozen=True)
class StatePlacement:
    """Where each bucket of parameters keeps its optimizer states between steps.

    `buckets` are tuples of parameter indices (the optimizer's numbering: param
    groups in order, parameters in order, as in `Optimizer.state_dict()`);
    `tiers[i]` is bucket i's `Placement` ('keep', 'host' or 'nvme').  Parameters
    in no bucket keep their states on tier 0.  `plan.states.plan_states`
    returns `buckets` and `tiers` in this form.
    """

    buckets: tuple[tuple[int, ...], ...]
    tiers: tuple[Placement, ...]
    prefetch_depth: int = 1  # tiered buckets read ahead of the one being stepped

    def __post_init__(self) -> None:
        buckets = tuple(tuple(int(i) for i in b) for b in self.buckets)
        tiers = tuple(_as_placement(t) for t in self.tiers)
        if len(buckets) != len(tiers):
            raise ValueError(f"StatePlacement: {len(buckets)} buckets but {len(tiers)} tiers")
        seen: set[int] = set()
        for b in buckets:
            if not b:
                raise ValueError("StatePlacement: empty bucket")
            for i in b:
                if i < 0 or i in seen:
                    raise ValueError(f"StatePlacement: parameter index {i} is negative or in two buckets")
                seen.add(i)
        if self.prefetch_depth < 1:
            raise ValueError(f"StatePlacement: prefetch_depth must be >= 1, got {self.prefetch_depth}")
        object.__setattr__(self, "buckets", buckets)
        object.__setattr__(self, "tiers", tiers)

    @classmethod
    def uniform(cls, param_nbytes: Sequence[int], tier: Placement | str,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> "StatePlacement":
        """Every parameter's states on `tier`, in buckets of about `bucket_bytes` parameter bytes."""
        b = buckets_by_size(param_nbytes, bucket_bytes)
        return cls(b, (tier,) * len(b))

    @classmethod
    def from_plan(cls, plan: Any, prefetch_depth: int | None = None) -> "StatePlacement":
        """From any record with `buckets` and `tiers` (e.g. `plan.states.StatePlan`); the ring depth from its
        `window` (arenas = prefetch_depth + 2) unless `prefetch_depth` is given."""
        if prefetch_depth is None:
            prefetch_depth = max(1, int(getattr(plan, "window", 3)) - 2)
        return cls(tuple(plan.buckets), tuple(plan.tiers), prefetch_depth)

    def tier_of(self, index: int) -> Placement:
        for b, t in zip(self.buckets, self.tiers):
            if index in b:
                return t
        return Placement.KEEP


class _Slot:
    """One tiered state tensor (param, key): on tier 0 (`tensor`), below (`rec`), or both while written."""

    __slots__ = ("key", "dtype", "shape", "stride", "offset", "nbytes", "tensor", "rec", "serial", "spec")

    def __init__(self, key: str, t: torch.Tensor, serial: int) -> None:
        self.key = key
        self.serial = serial  # the mover's storage tag (file names)
        self.tensor: torch.Tensor | None = None
        self.rec: Resident | None = None
        self.adopt(t)

    def adopt(self, t: torch.Tensor) -> None:
        # A DTensor state (FSDP2's sharded parameters): this rank's shard is what moves; the DTensor is
        # rebuilt over it on the way back ([Note: sharded states] in runtime/managed_states.py).
        self.spec = _dtensor_spec(t)
        local = _local(t)
        ust = local.untyped_storage()
        dense = local.is_contiguous() or local.is_contiguous(memory_format=torch.channels_last)
        if not dense or ust.nbytes() > round_up(local.numel() * local.element_size()):
            local = local.clone(memory_format=torch.contiguous_format)  # evict exactly this tensor's bytes
            t = _wrap(local, self.spec) if self.spec is not None else local
        self.dtype, self.shape, self.stride, self.offset = local.dtype, local.shape, local.stride(), local.storage_offset()
        self.nbytes = local.untyped_storage().nbytes()
        self.tensor = t

    def storage(self) -> torch.UntypedStorage:
        """The bytes that move: the tensor's storage (a DTensor's: its local shard's)."""
        assert self.tensor is not None
        return _local(self.tensor).untyped_storage()

    def rebuild(self, u8: torch.Tensor, base: int) -> torch.Tensor:
        """The state tensor over restored bytes (`u8`'s storage, data at byte `base`), in a compact storage."""
        flat = torch.empty(0, dtype=torch.uint8, device=u8.device).set_(u8.untyped_storage(), base, (self.nbytes,))
        if u8.untyped_storage().nbytes() != self.nbytes or base % 64:
            # A read-back buffer is rounded up to 4 KiB (plus alignment slack): wrap exactly our bytes
            # (CPU: no copy), so the next eviction moves the same bytes and the storage never grows.
            flat = torch.frombuffer(flat.numpy(), dtype=torch.uint8) if flat.device.type == "cpu" else flat.clone()
        out = torch.empty(0, dtype=self.dtype, device=u8.device)
        out.set_(flat.untyped_storage(), self.offset, self.shape, self.stride)
        return _wrap(out, self.spec) if self.spec is not None else out


def _dtensor_spec(t: torch.Tensor) -> tuple | None:
    """(mesh, placements, global shape, global stride) of a DTensor; None for a plain tensor."""
    if type(t).__name__ != "DTensor":
        return None
    return (t.device_mesh, tuple(t.placements), t.shape, t.stride())


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (over the same storage), or `t`."""
    if type(t).__name__ != "DTensor":
        return t
    with torch.no_grad():
        return t.to_local()


def _wrap(local: torch.Tensor, spec: tuple) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = spec
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _going_up(rec: Resident) -> bool:
    return rec.read is not None or rec.restored is not None


class _ParamStates:
    """One parameter's record: its tier and its tiered state tensors."""

    __slots__ = ("param", "index", "placement", "slots", "slots_in_ring")

    def __init__(self, param: torch.Tensor, index: int, placement: Placement) -> None:
        self.param = param
        self.index = index
        self.placement = placement
        self.slots: dict[str, _Slot] = {}
        self.slots_in_ring = False  # an NVMe bucket in the arena ring holds its states (no slots)

    def reading(self) -> bool:
        return any(s.rec is not None and s.tensor is None for s in self.slots.values())

    def writes(self) -> list[_Slot]:
        return [s for s in self.slots.values() if s.rec is not None and s.tensor is not None]


@dataclass
class StateStats:
    """What the state tier did (cumulative since construction; `steps` counts `step()` calls)."""

    steps: int = 0
    bytes_written: int = 0  # bytes sent down (host copies and NVMe writes)
    bytes_read: int = 0  # bytes brought back up
    reads_waited_s: float = 0.0  # host time blocked on NVMe reads inside step()
    writes_waited_s: float = 0.0  # host time blocked on the write window inside step()
    demand_fetches: int = 0  # states restored with no read-ahead started
    resident_bytes: int = 0  # tiered state bytes on tier 0 now
    peak_resident_bytes: int = 0
    write_failures: int = 0
    step_seconds: list[float] = field(default_factory=list)
    arena_bytes: int = 0  # the NVMe buckets' arenas on tier 0 (allocated once; state_arenas.py)
    ring_reads_waited_s: float = 0.0  # of reads_waited_s / writes_waited_s: the NVMe buckets in arenas
    ring_writes_waited_s: float = 0.0
    ring_bytes_read: int = 0
    ring_bytes_written: int = 0
    ring_write_failures: int = 0
    compute_seconds: float = 0.0  # inside the wrapped optimizer's step (the rest of step_seconds: tiering)
    deferred_seconds: float = 0.0  # applying deferred updates outside step() (forward hooks, flush)
    deferred_updates: int = 0  # bucket updates applied after step() returned


class _Entry:
    """One bucket of the step order: its parameter indices, its tier, and its file in the arena ring."""

    __slots__ = ("indices", "tier", "file", "pending")

    def __init__(self, indices: tuple[int, ...], tier: Placement) -> None:
        self.indices = indices
        self.tier = tier
        self.file: BucketFile | None = None
        self.pending: PendingUpdate | None = None  # [Note: deferred updates] in deferred.py


def _interleave(nvme: list[_Entry], others: list[_Entry]) -> list[_Entry]:
    """NVMe buckets spread evenly among the others, so every read and write overlaps some compute."""
    if not nvme:
        return others
    out: list[_Entry] = []
    n, m = len(nvme), len(others)
    for k, e in enumerate(nvme):
        out.extend(others[k * m // n:(k + 1) * m // n])
        out.append(e)
    return out


class _ExitCloser:
    """At interpreter exit (KeyboardInterrupt after SIGINT included): `close(keep_states=False)`."""

    __slots__ = ("ref",)

    def __init__(self, ref: "weakref.ReferenceType[TieredOptimizer]") -> None:
        self.ref = ref

    def __call__(self) -> None:
        opt = self.ref()
        if opt is not None:
            opt.close(keep_states=False, apply_pending=False)


class TieredOptimizer(torch.optim.Optimizer):
    """`optimizer` with its per-parameter states on the tiers `placement` names.

    * `placement`: a `StatePlacement`, or one tier for every state ('keep',
      'host', 'nvme'; buckets of `bucket_bytes` parameter bytes).
    * `nvme_dir`: directory for the NVMe store (needed for NVMe buckets unless
      `mover` brings a store); the store is a private subdirectory removed by
      `close()` (and at exit).
    * `mover`: an existing `TierMover` (shares its streams, pool and store);
      by default one is made for the parameters' device.
    * `model`, `defer`: with the model whose parameters these are, the
      tiered buckets (NVMe through the arena ring on a CPU tier 0; host, and
      NVMe on CUDA, read ahead and written behind on the copy streams) and
      the kept ones are stepped just before their parameters are next used in
      a forward, not inside `step()`, so their state I/O also overlaps the
      next forward ([Note: deferred updates], [Note: deferred host buckets]
      in deferred.py).
      The default when `model` is given; `defer=False` turns it off.  Call
      `flush()` before reading parameters outside a forward between `step()`
      and the next forward.  `set_placement()` builds the ring and the
      deferral anew for the new placement (the Manager's path: it starts
      with every state kept and installs the plan's placement later).

    Use it where the optimizer was used: `step()`, `zero_grad()`,
    `state_dict()` / `load_state_dict()` (standard torch format), LR schedulers,
    `clip_grad_norm_` on the parameters.  `inner.state` holds only the states
    on tier 0 between steps; `state_dict()` has them all.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, placement: StatePlacement | Placement | str = "nvme", *,
                 nvme_dir: str | os.PathLike | None = None, mover: TierMover | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, io_workers: int | None = None,
                 model: torch.nn.Module | None = None, defer: bool | None = None) -> None:
        if isinstance(optimizer, TieredOptimizer):
            raise ValueError("TieredOptimizer: the optimizer is already tiered")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"TieredOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if type(optimizer).__name__ == "LBFGS":
            raise ValueError("TieredOptimizer: LBFGS keeps one state for all parameters; it cannot be tiered")
        self.inner = optimizer
        # torch.optim.Optimizer's bookkeeping, shared with the wrapped optimizer where it is state.
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups  # the same list: LR schedulers write through it
        self.state = optimizer.state
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        params = [p for g in optimizer.param_groups for p in g["params"]]
        if isinstance(placement, (str, Placement)):
            placement = StatePlacement.uniform([p.numel() * p.element_size() for p in params], placement, bucket_bytes)
        if not isinstance(placement, StatePlacement):
            raise ValueError(f"TieredOptimizer: placement must be a StatePlacement or a tier, got {placement!r}")
        bad = [i for b in placement.buckets for i in b if i >= len(params)]
        if bad:
            raise ValueError(f"StatePlacement names parameter {bad[0]}, the optimizer has {len(params)}")
        self.placement = placement
        self.stats = StateStats()
        self._records = [_ParamStates(p, i, placement.tier_of(i)) for i, p in enumerate(params)]
        self._set_orders(placement)
        self._serial = itertools.count()
        self.closed = False

        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"TieredOptimizer: parameters on several devices {sorted(map(str, devices))}")
        device = devices.pop()
        needs_nvme = any(t == Placement.NVME for t in placement.tiers)
        self._own_mover = mover is None
        if io_workers is None:
            io_workers = 4  # read and write chunks of neighbouring buckets at once (threads wait in syscalls)
        if mover is None:
            copy = CopyContext(device)
            pool = HostBufferPool(pin=copy.cuda)
            store = None
            if needs_nvme:
                if nvme_dir is None:
                    raise ValueError("TieredOptimizer: NVMe state buckets need nvme_dir=")
                # NVMeStore removes the stores of dead processes first (nvme.remove_stale_stores)
                store = NVMeStore(nvme_dir, required_bytes=self._expected_nvme_bytes(), workers=io_workers,
                                  pool=pool if copy.asynchronous else None)
            mover = TierMover(device, copy, pool, store)
        elif needs_nvme and mover.store is None:
            raise ValueError("TieredOptimizer: NVMe state buckets need a mover with an NVMe store")
        self.mover = mover
        self._model = model
        self._defer_arg = defer
        self._plain = all(type(p.data) is torch.Tensor for p in params)  # not DTensor (FSDP2) or other subclasses
        self._ring: ArenaRing | None = None
        self._entries: list[_Entry] = []
        self._use_order: list[_Entry] = []
        self._seen: list[_Entry] = []  # buckets in the order the last forward applied them
        self._behind: list[_Entry] = []  # deferred slot buckets written down, newest last (the write window)
        self._npending = 0
        self._late: list[str] = []  # write failures found outside step(): raised by the next step() / flush()
        self._hooks: ModelHooks | None = None
        self._defer = False
        self._stepping_inner = False  # inside the wrapped optimizer's step (a deferred one runs in a forward hook)
        try:
            if defer and model is None:
                raise ValueError("TieredOptimizer: defer=True needs model= (the module whose forward applies the "
                                 "updates)")
            self._build_pipeline(strict=True)
            if defer and self._ring is None and not self._slots_deferrable():
                raise ValueError("TieredOptimizer: defer=True needs tiered state buckets (host, or NVMe) of plain "
                                 "tensors")
        except ValueError:
            self._drop_pipeline()
            if self._own_mover:
                self.mover.close(own_store=True)
            raise
        self._atexit = _ExitCloser(weakref.ref(self))
        atexit.register(self._atexit)
        # States that exist already (Adagrad makes them at construction, or a resumed optimizer).
        self._adopt_all()

    def _set_orders(self, placement: StatePlacement) -> None:
        """The step order of `placement` ([Note: the state window]): kept parameters first, then the tiered
        buckets; kept buckets named by the placement stay apart (the ring interleaves them)."""
        n = len(self._records)
        listed = {i for b in placement.buckets for i in b}
        kept = [i for i in range(n) if i not in listed or placement.tier_of(i) == Placement.KEEP]
        tiered = [b for b, t in zip(placement.buckets, placement.tiers) if t != Placement.KEEP]
        self._order: list[tuple[int, ...]] = ([tuple(kept)] if kept else []) + [tuple(b) for b in tiered]
        self._order_tiers = ([(tuple(kept), Placement.KEEP)] if kept else []) + [
            (tuple(b), t) for b, t in zip(placement.buckets, placement.tiers) if t != Placement.KEEP]
        if any(t == Placement.KEEP for t in placement.tiers):
            rest = [i for i in range(n) if i not in listed]
            self._order_tiers = ([(tuple(rest), Placement.KEEP)] if rest else []) + [
                (tuple(b), t) for b, t in zip(placement.buckets, placement.tiers)]

    def _may_defer(self) -> bool:
        """Whether deferred updates are possible beyond the ring and the model (GradTieredOptimizer: not
        with tiered gradients, which `zero_grad()` drops before the next forward)."""
        return True

    def _slots_deferrable(self) -> bool:
        """Whether the placement has tiered buckets outside the arena ring whose updates can be deferred
        ([Note: deferred host buckets] in deferred.py): plain tensors only (FSDP2's DTensor parameters are
        gathered by FSDP's own pre-forward hook, before ours could update them)."""
        return self._plain and any(t != Placement.KEEP and (t != Placement.NVME or self._ring is None)
                                   for t in self.placement.tiers)

    def _wants_defer(self) -> bool:
        return bool(self._model is not None and (self._ring is not None or self._slots_deferrable())
                    and self._defer_arg is not False and self._may_defer())

    def _build_pipeline(self, *, strict: bool) -> None:
        """The arena ring of the NVMe buckets on a CPU tier 0 and the deferred updates, for `self.placement`
        (at construction and after `set_placement`; nothing tiered yet).  A parameter of a deferred bucket
        that is not the model's raises when `strict` or `defer=True`; otherwise updates are not deferred."""
        placement = self.placement
        mover = self.mover
        for r in self._records:
            r.slots_in_ring = False
        # [Note: why arenas and in-place files] (state_arenas.py): NVMe buckets on a CPU tier 0.
        self._ring = None
        self._entries = [_Entry(b, t) for b, t in self._order_tiers]
        needs_nvme = any(t == Placement.NVME for t in placement.tiers)
        if needs_nvme and not mover.copy.asynchronous and mover.store is not None and self._plain:
            nv = [e for e in self._entries if e.tier == Placement.NVME]
            for n, e in enumerate(nv):
                e.file = BucketFile(n)
                for i in e.indices:
                    self._records[i].slots_in_ring = True
            arena = max(self._expected_bucket_bytes(e.indices) for e in nv)
            self._ring = ArenaRing(mover.store, arena, placement.prefetch_depth + 2)
            self._entries = _interleave(nv, [e for e in self._entries if e.tier != Placement.NVME])
        # [Note: deferred updates] (deferred.py): the ring's buckets stepped at their next use.
        self._defer = self._wants_defer()
        # The deferred buckets: every NVMe bucket of the ring, and the kept and the other tiered (host; NVMe
        # without the ring) buckets whose parameters are all the model's (the kept ones' compute in the forward
        # keeps the disk busy: [Note: deferred updates]; the host ones' copies overlap the forward: [Note:
        # deferred host buckets]).
        self._use_order = []
        self._seen = []
        self._behind = []
        self._npending = 0
        if not self._defer:
            return
        model = self._model
        assert model is not None
        in_model = {id(p) for p in model.parameters()}
        self._use_order = [e for e in self._entries if e.file is not None or (
            all(id(self._records[i].param) in in_model for i in e.indices))]
        owner = {id(self._records[i].param): e for e in self._use_order for i in e.indices}
        try:
            self._hooks = ModelHooks(model, owner, apply=self._apply_hook, flush=self._apply_all_pending,
                                     idle=self._pump_idle if self._ring is not None else None)
        except ValueError:
            if strict or self._defer_arg:
                raise
            self._defer, self._use_order = False, []

    def _drop_pipeline(self) -> None:
        """Undo `_build_pipeline` (the ring's states already put back or settled; no update pending)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._ring is not None:
            for f in self._ring_files():
                self._ring.forget(f)
            self._ring.clear()
        self._ring = None
        self._defer = False
        self._use_order, self._seen, self._npending, self._behind = [], [], 0, []
        self._entries = [_Entry(b, t) for b, t in self._order_tiers]
        for r in self._records:
            r.slots_in_ring = False

    # ------------------------------------------------------------------ sizes
    def _expected_nvme_bytes(self) -> int:
        """Bytes the NVMe buckets will hold: each parameter's expected state bytes (`expected_state_bytes`)."""
        return sum(sum(expected_state_bytes(self.inner, r.param)) for r in self._records
                   if r.placement == Placement.NVME)

    def _expected_bucket_bytes(self, indices: Sequence[int]) -> int:
        out = 0
        for i in indices:
            p = self._records[i].param
            out += sum(round_up(b, 64) for b in expected_state_bytes(self.inner, p)) or round_up(
                p.numel() * p.element_size(), 64)
        return round_up(out)

    # ------------------------------------------------------------------ NVMe buckets in arenas
    def _ring_files(self) -> list[BucketFile]:
        return [e.file for e in self._entries if e.file is not None]

    def _ring_count(self) -> None:
        s = self.stats
        s.resident_bytes = self._slot_resident + sum(a.owner.raw_bytes for a in self._ring.arenas if a.owner)
        s.peak_resident_bytes = max(s.peak_resident_bytes, s.resident_bytes)
        s.arena_bytes = self._ring.allocated_bytes

    def _ring_bring(self, e: "_Entry", protect: set[int], failures: list[str]) -> None:
        """Start reading `e`'s bucket into an arena if only its file has the values."""
        f = e.file
        if f.arena is None and f.on_disk:
            self._ring.acquire(f, protect, failures)
            self._ring.read(f)
            self._ring_count()

    def _ring_materialise(self, e: "_Entry", failures: list[str]) -> None:
        """`e`'s states in the wrapped optimizer's `state`, as views into its arena."""
        f = e.file
        ring = self._ring
        if f.arena is None and f.on_disk:  # nothing read it ahead (a demand fetch)
            self.stats.demand_fetches += 1
            self._ring_bring(e, {f.position}, failures)
        ring.wait_reads(f)
        ring.settle(f, block=True, failures=failures)  # its last write must not see the update
        for (j, key) in f.layout:
            self.inner.state[self._records[e.indices[j]].param][key] = f.view(j, key)

    def _ring_adopt(self, e: "_Entry", protect: set[int], failures: list[str]) -> None:
        """After `e`'s update: its states into its arena (already there from the second step on), written behind."""
        f = e.file
        ring = self._ring
        states = []
        for j, i in enumerate(e.indices):
            st = self.inner.state.get(self._records[i].param)
            if st:
                states.extend((j, k, v) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
        if not states:
            return
        in_place = f.arena is not None and len(states) == len(f.layout) and all(
            (j, k) in f.layout and v.data_ptr() == f.view(j, k).data_ptr() and v.shape == f.layout[(j, k)][2]
            and v.dtype == f.layout[(j, k)][1] for j, k, v in states)
        if not in_place:  # the first step (fresh states), a resumed state_dict, or a new state key
            lo, hi = (f.arena.buf.data_ptr(), f.arena.buf.data_ptr() + f.arena.nbytes) if f.arena else (0, 0)
            states = [(j, k, v.clone() if lo <= v.data_ptr() < hi else v) for j, k, v in states]
            f.set_layout(states)
            if f.arena is not None and f.arena.nbytes < f.nbytes:
                f.arena.owner, f.arena = None, None
            ring.acquire(f, protect, failures)
            for j, k, v in states:
                f.view(j, k).copy_(v)
        for j, k, _ in states:
            self.inner.state[self._records[e.indices[j]].param].pop(k, None)
        f.last_used = ring.clock
        ring.clock += 1
        ring.write(f)
        self._ring_count()

    def _ring_snapshot(self, f: BucketFile) -> dict[tuple[int, str], torch.Tensor]:
        """Fresh copies of `f`'s states (from its arena or its file)."""
        if not f.layout:
            return {}
        if f.arena is not None:
            self._ring.wait_reads(f)
            return {jk: f.view(*jk).clone() for jk in f.layout}
        buf = self._ring.read_copy(f)
        out = {}
        for (j, k), (off, dtype, shape, n) in f.layout.items():
            out[(j, k)] = buf[off:off + n].view(dtype).view(shape).clone()
        return out

    def _step_ring(self, failures: list[str]) -> None:
        """One step over the interleaved entries; NVMe buckets through the arena ring
        ([Note: the pipeline of the arena ring] in state_arenas.py)."""
        entries = self._entries if self.stats.steps % 2 == 0 else self._entries[::-1]  # the last buckets are hot
        nv = [e.file for e in entries if e.file is not None]
        ring = self._ring
        ahead = max(1, ring.count)  # the bucket about to be stepped, and one read ahead in every other arena
        n = 0  # position in `nv` of the next NVMe bucket
        for e in entries:
            upcoming = nv[n:n + ahead]
            protect = {f.position for f in upcoming}
            ring.pump(upcoming, protect)  # reads whose arena became free while the last bucket was stepped
            if e.file is not None:
                f = e.file
                if f.arena is None and f.on_disk:  # no arena came free in time: wait for the oldest write
                    self.stats.demand_fetches += 1
                    self._ring_bring(e, protect, failures)
                while f.reads and not all(r.done() for r in f.reads):
                    ring.wait_any(f, protect)  # a write that lands meanwhile starts the next read at once
                    ring.pump(upcoming, protect)
                self._ring_materialise(e, failures)
            elif e.tier != Placement.KEEP:
                for i in e.indices:
                    self._prefetch(self._records[i])
                for i in e.indices:
                    self._materialise(self._records[i])
            self._step_bucket(e.indices)
            if e.file is not None:
                self._ring_adopt(e, protect, failures)
                n += 1
            elif e.tier != Placement.KEEP:
                for i in e.indices:
                    self._adopt(self._records[i])
                    self._evict(self._records[i])
        failures.extend(ring.take_failures())

    # ------------------------------------------------------------------ deferred updates
    def _upcoming(self, first: "_Entry | None" = None) -> tuple[list[BucketFile], set[int]]:
        """The ring's next reads, in need order: the pending buckets (`first` first) in the last forward's
        order, or, with none pending (backward), the next step's first buckets; and their positions."""
        n = self._ring.count
        if self._npending:
            files = [first.file] if first is not None and first.file is not None else []
            files += [e.file for e in self._use_order if e.pending is not None and e is not first
                      and e.file is not None]
        else:
            files = [e.file for e in self._use_order if e.file is not None]
        files = files[:n]
        return files, {f.position for f in files}

    def _step_deferred(self, failures: list[str]) -> None:
        """`step()` with deferred updates: every deferred bucket (NVMe, and kept ones of the model) recorded
        ([Note: deferred updates] in deferred.py), the others (host buckets, parameters outside the model) now."""
        if len(self._seen) == len(self._use_order):  # the order the last forward used them in
            self._use_order = self._seen
        self._seen = []
        hyper = capture_hyper(self.inner.param_groups)
        for e in self._use_order:
            e.pending = PendingUpdate(hyper, (self._records[i].param for i in e.indices))
        self._npending = len(self._use_order)
        ring = self._ring
        for e in self._entries:
            if e.pending is not None:
                continue
            if ring is not None:
                ring.pump(*self._upcoming())
            if e.tier != Placement.KEEP:
                for i in e.indices:
                    self._prefetch(self._records[i])
                for i in e.indices:
                    self._materialise(self._records[i])
            self._step_bucket(e.indices)
            if e.tier != Placement.KEEP:
                for i in e.indices:
                    self._adopt(self._records[i])
                    self._evict(self._records[i])
        self._read_ahead_slots(None)  # the first deferred host buckets: copied up while the forward starts
        if ring is not None:
            ring.pump(*self._upcoming())
            failures.extend(ring.take_failures())

    def _apply(self, e: "_Entry", failures: list[str]) -> None:
        """Bucket `e`'s pending update: its states into an arena, the wrapped optimizer's step with the
        gradients and hyper-parameters of the `step()` that recorded it, its states written behind."""
        pend = e.pending
        assert pend is not None
        t0 = time.perf_counter()
        ring = self._ring
        f = e.file
        slots = f is None and e.tier != Placement.KEEP  # a host bucket (or NVMe without the ring)
        params = [self._records[i].param for i in e.indices]
        k = pend.changed()
        if k is not None:
            raise ValueError(
                f"TieredOptimizer: the gradient of parameter {e.indices[k]} changed in place between step() and its "
                f"deferred update (model.zero_grad(set_to_none=False)?): use the optimizer's zero_grad(), call "
                f"flush() first, or defer=False")
        if ring is not None:
            upcoming, protect = self._upcoming(e)
            ring.pump(upcoming, protect)
        if slots:  # [Note: deferred host buckets]
            for b in self._behind[:-2]:  # the write window ([Note: the state window])
                for i in b.indices:
                    self._settle(self._records[i], block=True, failures=failures)
            del self._behind[:-2]
            for i in e.indices:
                self._prefetch(self._records[i])
            self._read_ahead_slots(e)
            for i in e.indices:
                self._materialise(self._records[i])
        if f is not None:
            if f.arena is None and f.on_disk:  # no arena came free in time: wait for the oldest write
                self.stats.demand_fetches += 1
                self._ring_bring(e, protect, failures)
            while f.reads and not all(r.done() for r in f.reads):
                ring.wait_any(f, protect)
                ring.pump(upcoming, protect)
            self._ring_materialise(e, failures)
        groups = self.inner.param_groups
        live_grads = [p.grad for p in params]
        live_hyper = [{key: g[key] for key in h if key in g} for g, h in zip(groups, pend.hyper)]
        try:
            for p, gr in zip(params, pend.grads):
                p.grad = gr
            for g, h in zip(groups, pend.hyper):
                g.update(h)
            self._step_bucket(e.indices)
        finally:
            for p, gr in zip(params, live_grads):
                p.grad = gr
            for g, h in zip(groups, live_hyper):
                g.update(h)
        e.pending = None
        self._npending -= 1
        self._seen.append(e)
        if f is not None:
            self._ring_adopt(e, protect, failures)
        elif slots:
            for i in e.indices:
                self._adopt(self._records[i])
                self._evict(self._records[i])  # written behind: the copy down overlaps the next module's forward
            self._behind.append(e)
        if ring is not None:
            ring.pump(*self._upcoming())
            self._sync_ring_stats()
        self.stats.deferred_updates += 1
        self.stats.deferred_seconds += time.perf_counter() - t0

    def _read_ahead_slots(self, current: "_Entry | None") -> None:
        """Start copying up the states of the next `prefetch_depth` pending slot buckets (host; NVMe without the
        ring) after `current`, in the order the last forward used them ([Note: deferred host buckets])."""
        n = 0
        for e in self._use_order:
            if n >= self.placement.prefetch_depth:
                return
            if e is current or e.pending is None or e.file is not None or e.tier == Placement.KEEP:
                continue
            for i in e.indices:
                self._prefetch(self._records[i])
            n += 1

    def _apply_hook(self, e: "_Entry") -> None:
        if self.closed:
            return
        with torch.no_grad():
            self._apply(e, self._late)

    def _apply_all_pending(self) -> None:
        """Every pending update now, in the order they were last used (`flush()`, `state_dict()`, ...)."""
        if not self._npending or self.closed:
            return
        with torch.no_grad():
            for e in list(self._use_order):
                if e.pending is not None:
                    self._apply(e, self._late)

    def _pump_idle(self) -> None:
        """During backward (post-accumulate-grad hooks): start reading the next step's first buckets
        into arenas whose writes have landed (never waits)."""
        if self._npending or self.closed or self._ring is None:
            return
        self._ring.pump(*self._upcoming())

    def _step_bucket(self, bucket: Sequence[int]) -> None:
        """The wrapped optimizer's step on the parameters of `bucket` only."""
        groups = self.inner.param_groups
        full = [g["params"] for g in groups]
        key = (id(groups), *(id(ps) for ps in full))
        cached = getattr(self, "_owner_cache", None)
        if cached is None or cached[0] != key:  # once per param-group layout, not once per bucket
            cached = self._owner_cache = (key, {id(p): gi for gi, g in enumerate(groups) for p in g["params"]})
        owner = cached[1]
        sub: list[list[torch.Tensor]] = [[] for _ in groups]
        for i in bucket:
            p = self._records[i].param
            sub[owner[id(p)]].append(p)
        t0 = time.perf_counter()
        try:
            for g, ps in zip(groups, sub):
                g["params"] = ps
            self._stepping_inner = True
            self.inner.step()
        finally:
            self._stepping_inner = False
            self.stats.compute_seconds += time.perf_counter() - t0
            for g, ps in zip(groups, full):
                g["params"] = ps

    @property
    def _slot_resident(self) -> int:
        return sum(s.nbytes for r in self._records for s in r.slots.values() if s.tensor is not None)

    # ------------------------------------------------------------------ moving one record
    def _adopt(self, rec: _ParamStates) -> None:
        """Take the wrapped optimizer's tensor states of `rec` into slots (they are on tier 0 now)."""
        st = self.inner.state.get(rec.param)
        if not st or rec.placement == Placement.KEEP:
            return
        for key, v in list(st.items()):
            if not torch.is_tensor(v) or v.dim() == 0:
                continue
            slot = rec.slots.get(key)
            if slot is None:
                slot = rec.slots[key] = _Slot(key, v, next(self._serial))
                self._count_resident(slot.nbytes)
            elif slot.tensor is not v:  # the optimizer replaced the tensor (SGD's first momentum_buffer)
                if slot.rec is not None:
                    self.mover.release(slot.rec)
                    slot.rec = None
                was = slot.tensor is not None
                slot.adopt(v)
                if not was:
                    self._count_resident(slot.nbytes)
            if slot.tensor is not v:  # adopt() compacted it: the optimizer must use the compact copy
                st[key] = slot.tensor

    def _adopt_all(self) -> None:
        ring_ids = set()
        if self._ring is not None:
            failures: list[str] = []
            for e in self._entries:
                if e.file is not None:
                    ring_ids.update(e.indices)
                    self._ring_adopt(e, {e.file.position}, failures)
            self._raise_failures(failures)
        for rec in self._records:
            if rec.index in ring_ids:
                continue
            self._adopt(rec)
            if rec.placement != Placement.KEEP:
                self._evict(rec)

    def _count_resident(self, n: int) -> None:
        s = self.stats
        s.resident_bytes += n
        s.peak_resident_bytes = max(s.peak_resident_bytes, s.resident_bytes)

    def _evict(self, rec: _ParamStates) -> None:
        """Send `rec`'s tier-0 states down; drop them from the wrapped optimizer's `state`."""
        st = self.inner.state[rec.param]
        for slot in rec.slots.values():
            st.pop(slot.key, None)
            if slot.tensor is None or slot.rec is not None:
                continue
            slot.rec = self.mover.evict(slot.serial, rec.placement, slot.storage())
            self.stats.bytes_written += slot.nbytes
            if rec.placement == Placement.HOST:  # the host buffer is the copy now ([Note: stream hand-offs])
                self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        slot.tensor = None
        self.stats.resident_bytes -= slot.nbytes

    def _prefetch(self, rec: _ParamStates) -> None:
        for slot in rec.slots.values():
            if slot.tensor is None and slot.rec is not None and not _going_up(slot.rec):
                self._count_resident(slot.nbytes)  # the read-back buffer is on tier 0 from now on
                self.mover.prefetch(slot.rec)

    def _materialise(self, rec: _ParamStates) -> None:
        """Every state of `rec` on tier 0 and in the wrapped optimizer's `state`."""
        if not rec.slots:  # nothing tiered (a kept parameter, or one without states): do not create a state entry
            return
        st = self.inner.state[rec.param]
        for slot in rec.slots.values():
            if slot.tensor is None:
                if not _going_up(slot.rec):
                    self._count_resident(slot.nbytes)
                try:
                    got = self.mover.restore(slot.rec)
                except NVMeIOError as e:
                    raise NVMeIOError(f"optimizer state {slot.key!r} of parameter {rec.index} is lost: {e}") from None
                self.stats.reads_waited_s += got.waited_seconds
                self.stats.demand_fetches += int(got.demand_fetch)
                self.stats.bytes_read += slot.nbytes
                slot.tensor = slot.rebuild(got.tensor, got.base)
            if slot.rec is not None:  # bytes below are stale from here on (the step updates them in place)
                self.mover.release(slot.rec)
                slot.rec = None
            st[slot.key] = slot.tensor

    def _settle(self, rec: _ParamStates, *, block: bool, failures: list[str]) -> bool:
        """Drop tier-0 copies whose write finished; True when no write of `rec` is in flight."""
        clear = True
        for slot in rec.writes():
            fut = slot.rec.write
            if fut is None:  # pragma: no cover - HOST slots are dropped at eviction
                self._drop(slot)
                continue
            if not fut.done():
                if not block:
                    clear = False
                    continue
                t0 = time.perf_counter()
                try:
                    fut.exception()
                finally:
                    self.stats.writes_waited_s += time.perf_counter() - t0
            err = fut.exception()
            if err is None:
                self._drop(slot)
                continue
            # [Note: no state is ever lost]: the tensor stays; the next step writes it again.
            self.mover.release(slot.rec)
            slot.rec = None
            self.stats.write_failures += 1
            failures.append(f"{err}")
        return clear

    def _raise_failures(self, failures: list[str]) -> None:
        if not failures:
            return
        first = failures[0]
        full = any(re.search(r"No space left|quota", f, re.I) for f in failures)
        where = self.mover.store.directory if self.mover.store is not None else "?"
        why = f"the NVMe directory {where} is full" if full else f"an NVMe write under {where} failed"
        raise NVMeIOError(
            f"{why}: {len(failures)} optimizer state write(s) failed ({first}); the states after the last step "
            f"are intact in memory: save them with state_dict() or free space and step again"
        )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimizer step, bucket by bucket ([Note: per-bucket steps are the full step])."""
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        failures: list[str] = []
        recs = self._records
        for r in recs:  # the last step's final writes had the whole forward/backward to land
            self._settle(r, block=True, failures=failures)
        if self._defer:
            self._apply_all_pending()  # a second step() before a forward: the last one's updates first
            failures.extend(self._late)
            self._late = []
            self._step_deferred(failures)
            self.stats.steps += 1
            self.stats.step_seconds.append(time.perf_counter() - t0)
            self._sync_ring_stats()
            self._raise_failures(failures)
            return loss
        if self._ring is not None:
            self._step_ring(failures)
            self.stats.steps += 1
            self.stats.step_seconds.append(time.perf_counter() - t0)
            self._sync_ring_stats()
            self._raise_failures(failures)
            return loss
        order = self._order
        depth = self.placement.prefetch_depth
        for k, bucket in enumerate(order):
            if k >= 2:  # the write window ([Note: the state window])
                for i in order[k - 2]:
                    self._settle(recs[i], block=True, failures=failures)
            for j in range(k, min(len(order), k + 1 + depth)):
                for i in order[j]:
                    self._prefetch(recs[i])
            for i in bucket:
                self._materialise(recs[i])
            self._step_bucket(bucket)
            for i in bucket:
                self._adopt(recs[i])
                if recs[i].placement != Placement.KEEP:
                    self._evict(recs[i])
        self.stats.steps += 1
        self.stats.step_seconds.append(time.perf_counter() - t0)
        self._raise_failures(failures)
        return loss

    def _sync_ring_stats(self) -> None:
        ring = self._ring
        if ring is None:
            return
        s = self.stats
        # the ring's counters are cumulative too: add what is new since the last sync to the totals
        s.reads_waited_s += ring.reads_waited_s - s.ring_reads_waited_s
        s.writes_waited_s += ring.writes_waited_s - s.ring_writes_waited_s
        s.bytes_read += ring.bytes_read - s.ring_bytes_read
        s.bytes_written += ring.bytes_written - s.ring_bytes_written
        s.write_failures += ring.write_failures - s.ring_write_failures
        s.ring_reads_waited_s, s.ring_writes_waited_s = ring.reads_waited_s, ring.writes_waited_s
        s.ring_bytes_read, s.ring_bytes_written = ring.bytes_read, ring.bytes_written
        s.ring_write_failures = ring.write_failures
        s.arena_bytes = ring.allocated_bytes

    # ------------------------------------------------------------------ whole-state operations
    def flush(self) -> None:
        """Wait for every write in flight; raise `NVMeIOError` (one line) if any failed.

        NVMe buckets whose values are on disk give their arenas back (`stats.resident_bytes`
        counts only what has no copy below; the arenas stay allocated: `stats.arena_bytes`).  Deferred
        updates ([Note: deferred updates] in deferred.py) are applied first."""
        self._check_open()
        self._apply_all_pending()
        failures = self._settle_all() + self._late
        self._late = []
        if self._ring is not None:
            self._ring.release_all_clean(failures)
            self._ring_count()
            self._sync_ring_stats()
        self._raise_failures(failures)

    def _settle_all(self) -> list[str]:
        failures: list[str] = []
        for r in self._records:
            self._settle(r, block=True, failures=failures)
        if self._ring is not None:
            self._ring.drain(self._ring_files(), failures)
            self._sync_ring_stats()
        return failures

    def _ring_put_back(self) -> list[tuple[torch.Tensor, str]]:
        """Fresh copies of every NVMe bucket's states into the wrapped optimizer's `state`; the keys put."""
        put = []
        for e in self._entries:
            if e.file is None:
                continue
            for (j, k), v in self._ring_snapshot(e.file).items():
                p = self._records[e.indices[j]].param
                self.inner.state[p][k] = v
                put.append((p, k))
        return put

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's `state_dict()`, every state materialised (standard torch format).

        The tensors are snapshots: the next `step()` works on copies read back
        from the lower tiers, so the returned dict does not change under it.
        """
        self._check_open()
        self._apply_all_pending()  # [Note: deferred updates]: the states as unmanaged would have them now
        self._settle_all()  # a failed write left its tensor on tier 0: nothing to raise, nothing lost
        for r in self._records:
            self._prefetch(r)
        for r in self._records:
            self._materialise(r)
        put = self._ring_put_back() if self._ring is not None else []
        try:
            sd = self.inner.state_dict()
            sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        finally:
            for p, k in put:
                self.inner.state[p].pop(k, None)
            for r in self._records:
                if r.placement != Placement.KEEP and not r.slots_in_ring:
                    self._evict(r)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a standard torch optimizer state dict (from this class or from the plain optimizer)."""
        self._check_open()
        self._apply_all_pending()
        self._settle_all()
        for r in self._records:
            for slot in r.slots.values():
                if slot.rec is not None:
                    self.mover.release(slot.rec)
                if slot.tensor is not None:
                    self.stats.resident_bytes -= slot.nbytes
            r.slots.clear()
        if self._ring is not None:
            for f in self._ring_files():
                self._ring.forget(f)
        self.inner.load_state_dict(state_dict)
        self.state = self.inner.state  # torch replaces both; LR schedulers read them through this object
        self.param_groups = self.inner.param_groups
        self._adopt_all()

    def _bring_all_back(self) -> None:
        """Every state into the wrapped optimizer's own tensors, nothing left tiered (prefetched first)."""
        for r in self._records:
            self._prefetch(r)
        for r in self._records:
            self._materialise(r)
            for slot in r.slots.values():
                self._drop(slot)
            r.slots.clear()

    def set_placement(self, placement: StatePlacement) -> None:
        """Move to a new placement between steps: every state comes back to tier 0, then the new tiers apply.

        Values do not change (states are only moved); NVMe buckets need a mover with a store.
        """
        self._check_open()
        if not isinstance(placement, StatePlacement):
            raise ValueError(f"TieredOptimizer: placement must be a StatePlacement, got {placement!r}")
        if placement == self.placement and self._defer == self._wants_defer():
            return
        self._apply_all_pending()
        n = len(self._records)
        bad = [i for b in placement.buckets for i in b if i >= n]
        if bad:
            raise ValueError(f"StatePlacement names parameter {bad[0]}, the optimizer has {n}")
        if any(t == Placement.NVME for t in placement.tiers) and self.mover.store is None:
            raise ValueError("TieredOptimizer: NVMe state buckets need a mover with an NVMe store")
        self._raise_failures(self._settle_all())
        if self._ring is not None:
            self._ring_put_back()  # the NVMe buckets' states into the wrapped optimizer (fresh copies)
        self._bring_all_back()
        self._drop_pipeline()
        self.placement = placement
        for r in self._records:
            r.placement = placement.tier_of(r.index)
        self._set_orders(placement)
        self._build_pipeline(strict=False)  # the arena ring and deferred updates of the new placement
        self._adopt_all()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none and self._npending:
            # [Note: deferred updates]: a pending bucket still needs the gradient zero_() would clear; the
            # parameter gets a fresh zero tensor (what set_to_none=False leaves), the update keeps the old one.
            for e in self._use_order:
                if e.pending is None:
                    continue
                for i, g in zip(e.indices, e.pending.grads):
                    p = self._records[i].param
                    if g is not None and p.grad is g:
                        p.grad = torch.zeros_like(g)
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("TieredOptimizer: add param groups to the optimizer before wrapping it")

    def describe(self) -> str:
        by = {t: 0 for t in Placement}
        for r in self._records:
            by[r.placement] += sum(s.nbytes for s in r.slots.values())
        if self._ring is not None:
            by[Placement.NVME] += sum(f.raw_bytes for f in self._ring_files())
        parts = ", ".join(f"{t.label} {format_size(n)}" for t, n in by.items() if n)
        return f"optimizer states: {parts or 'none yet'}; {len(self._order)} buckets"

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("TieredOptimizer: used after close()")

    def close(self, *, keep_states: bool = True, apply_pending: bool = True) -> None:
        """Remove the NVMe store; with `keep_states`, first bring every state back into the wrapped optimizer.

        After `close()` the wrapped optimizer (`inner`) is a plain, complete
        optimizer again (or, with ``keep_states=False``, one without the
        tiered states, e.g. at the end of a run).  Deferred updates are applied
        first (the parameters are then those of the last `step()`) unless
        `apply_pending` is False (the exit handler).
        """
        if self.closed:
            return
        try:
            if apply_pending:
                self._apply_all_pending()
        finally:
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None
        try:
            if keep_states:
                self._settle_all()
                if self._ring is not None:
                    self._ring_put_back()
                self._bring_all_back()
            else:
                if self._ring is not None:
                    self._ring.drain(self._ring_files(), [])
                if self.mover.store is not None:
                    self.mover.store.drain()
                for r in self._records:
                    for slot in r.slots.values():
                        if slot.rec is not None:
                            self.mover.release(slot.rec)
                            slot.rec = None
                    r.slots.clear()
        finally:
            self.closed = True
            if self._ring is not None:
                for f in self._ring_files():
                    self._ring.forget(f)
                self._ring.clear()
            atexit.unregister(self._atexit)
            if self._own_mover:
                self.mover.close(own_store=True)

    def __enter__(self) -> "TieredOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close(keep_states=exc[0] is None, apply_pending=exc[0] is None)

    def __repr__(self) -> str:
        return f"TieredOptimizer({type(self.inner).__name__}, {self.describe()})"


_STATE_TENSORS = {"Adam": 2, "AdamW": 2, "NAdam": 3, "RAdam": 2, "Adamax": 2, "SGD": 1, "Adagrad": 1,
                  "RMSprop": 1, "Adadelta": 2, "Rprop": 2, "ASGD": 2, "SparseAdam": 2}


def expected_state_tensors(optimizer: torch.optim.Optimizer) -> int:
    """Parameter-sized state tensors `optimizer` keeps per parameter (a table for torch.optim; 2 otherwise)."""
    name = type(optimizer).__name__
    n = _STATE_TENSORS.get(name, 2)
    g = optimizer.defaults
    if name in ("Adam", "AdamW") and g.get("amsgrad"):
        n += 1
    if name == "SGD" and not g.get("momentum"):
        n = 0
    if name == "RMSprop":
        n += int(bool(g.get("momentum"))) + int(bool(g.get("centered")))
    return n


def expected_state_bytes(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[int]:
    """Bytes of each tensor state `optimizer` will keep for `param`: the optimizer's own
    ``expected_state_bytes(param)`` where it has one (`MasterWeights`: fp32 states and the fp32 master of a bf16
    parameter), else `expected_state_tensors` x the parameter's bytes (states in the parameter's dtype)."""
    own = getattr(optimizer, "expected_state_bytes", None)
    if callable(own):
        return [int(b) for b in own(param)]
    return [param.numel() * param.element_size()] * expected_state_tensors(optimizer)


__all__ = ["TieredOptimizer", "StatePlacement", "StateStats", "buckets_by_size", "remove_stale_stores",
           "expected_state_tensors", "expected_state_bytes", "DEFAULT_BUCKET_BYTES"]
