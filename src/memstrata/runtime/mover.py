"""The tier mover: evict, prefetch, restore and release one storage between tiers.

One object owns every copy between tier 0 and the lower tiers: the stream
hand-offs (through `CopyContext`, [Note: stream hand-offs] in streams.py), the
host buffer pool and the NVMe store.  It knows nothing about *why* a storage
moves: saved-tensor hooks are one client (activations.py); parameter,
gradient and optimizer-state triggers (module pre-hooks, grad hooks, the
optimizer step) are meant to be others.

>>> import torch
>>> from memstrata.runtime.mover import Placement, TierMover
>>> from memstrata.runtime.pool import HostBufferPool
>>> from memstrata.runtime.streams import CopyContext
>>> mover = TierMover(torch.device("cpu"), CopyContext("cpu"), HostBufferPool(pin=False))
>>> t = torch.arange(6.0)
>>> r = mover.evict(7, Placement.HOST, t.untyped_storage())      # the bytes now also live in a host buffer
>>> mover.prefetch(r)                                            # copy back up (CPU: at once)
False
>>> got = mover.restore(r)
>>> torch.equal(got.tensor.view(torch.float32)[:6], t), got.base, got.demand_fetch
(True, 0, False)
>>> mover.release(r)                                             # buffer back to the pool

NVMe files follow [Note: NVMe file lifetime] in nvme.py; pooled buffers [Note: buffer reuse] in pool.py.
"""

from __future__ import annotations

import enum
import functools
import time
from typing import NamedTuple

import torch

from ..hardware import HOST_KINDS, Hierarchy
from .errors import NVMeIOError
from .nvme import NVMeStore
from .pool import HostBufferPool
from .streams import CopyContext, TensorEvent


class Restored(NamedTuple):
    """A restored storage: its tier-0 bytes, where the data starts, and what getting it cost."""

    tensor: torch.Tensor  # uint8, on tier 0
    base: int  # byte offset of the data inside `tensor`'s storage
    demand_fetch: bool  # nothing had started the copy up before it was needed
    waited_seconds: float  # host time blocked on an NVMe read


class Placement(enum.IntEnum):
    """Where a managed storage lives between eviction and restore."""

    KEEP = 0
    HOST = 1
    NVME = 2

    @classmethod
    def for_tier(cls, hierarchy: Hierarchy, tier: str | None) -> "Placement":
        """Which store carries an offload to `tier` (a host tier -> HOST, an NVMe tier -> NVME)."""
        if tier is None:
            return cls.KEEP
        kind = hierarchy.tier(tier).kind
        if kind == "nvme":
            return cls.NVME
        if kind in HOST_KINDS:
            return cls.HOST
        return cls.KEEP  # an offload "to" HBM is a keep

    @property
    def label(self) -> str:
        return self.name.lower()


class Resident:
    """One storage under the mover's care for one step (shared by every alias of that storage)."""

    __slots__ = ("mover", "storage", "placement", "nbytes", "host", "ready", "path", "write", "read", "file_live",
                 "restored", "base", "refs", "released", "__weakref__")

    def __init__(self, mover: "TierMover", storage: int, placement: Placement, nbytes: int) -> None:
        self.mover = mover
        self.storage = storage  # trace storage id
        self.placement = placement
        self.nbytes = nbytes
        self.host = None  # HostBuffer holding the bytes (host tier)
        self.ready = None  # event: the copy down into `host` landed
        self.path: str | None = None
        self.write = None  # Future of the NVMe write
        self.read = None  # Future of the NVMe read-ahead
        self.file_live = False
        self.restored: TensorEvent | None = None  # tier-0 uint8 copy + its copy-up event
        self.base = 0  # byte offset of the data inside restored's storage
        self.refs = 0  # clients holding it (activations: live `_Packed` objects)
        self.released = False


class TierMover:
    """Moves storages between tier 0 and the host / NVMe tiers; owns streams, pool and store."""

    def __init__(self, device: torch.device, copy: CopyContext, pool: HostBufferPool,
                 store: NVMeStore | None = None) -> None:
        self.device = device
        self.copy = copy
        self.pool = pool
        self.store = store
        self.restored_bytes = 0  # tier-0 bytes of restored copies still held (CPU accounting)

    # ------------------------------------------------------------------ evict
    def evict(self, storage: int, placement: Placement, ust: torch.UntypedStorage) -> Resident:
        """Start moving `ust` down to `placement`; the tier-0 copy may be freed once nothing else holds it."""
        n = ust.nbytes()
        rec = Resident(self, storage, placement, n)
        with torch.no_grad():
            src = torch.empty(0, dtype=torch.uint8, device=ust.device).set_(ust)
            if self.copy.asynchronous:  # through a pinned buffer on the d2h stream
                buf = self.pool.acquire(n)
                ev = self.copy.copy_down(src, buf, n)
                if placement == Placement.HOST:
                    rec.host, rec.ready = buf, ev
                else:
                    rec.path = self._store().new_path(storage)
                    rec.file_live = True
                    rec.write = self._store().submit_write(
                        rec.path, buf.tensor, n, event=ev, on_done=functools.partial(self.pool.release, buf))
            elif placement == Placement.HOST:
                buf = self.pool.acquire(n)
                self.copy.copy_down(src, buf, n)
                rec.host = buf
            else:
                # The write job holds `src` (the tier-0 storage stays alive until written).
                rec.path = self._store().new_path(storage)
                rec.file_live = True
                rec.write = self._store().submit_write(rec.path, src, n)
        return rec

    def _store(self) -> NVMeStore:
        if self.store is None:  # pragma: no cover - the runtime creates the store when the plan needs one
            raise NVMeIOError("an NVMe placement needs an NVMe store")
        return self.store

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, rec: Resident) -> bool:
        """Start the copy back up; True when an NVMe read is now pending (finish it with `poll`/`restore`)."""
        if rec.released or rec.restored is not None or rec.read is not None:
            return False
        if rec.placement == Placement.HOST:
            buf, rec.host = rec.host, None
            self._to_tier0(rec, buf, rec.ready)
            return False
        into = functools.partial(self._staging_for_read, rec.nbytes) if self.copy.asynchronous else None
        rec.file_live = False  # the read job removes the file ([Note: NVMe file lifetime])
        rec.read = self._store().submit_read(rec.path, rec.nbytes, after=rec.write, into=into)
        return True

    def poll(self, pending: list[Resident]) -> list[Resident]:
        """Move finished NVMe reads up to tier 0; the ones still reading."""
        still = []
        for rec in pending:
            if rec.read is not None and rec.read.done():
                self._finish_read(rec)
            elif rec.read is not None:
                still.append(rec)
        return still

    def _staging_for_read(self, n: int):
        buf = self.pool.acquire(n)
        if buf.last_use is not None:  # a host writer reuses it: wait on the host ([Note: buffer reuse])
            buf.last_use.synchronize()
            buf.last_use = None
        return buf

    def _to_tier0(self, rec: Resident, buf, ready) -> None:
        """Copy `buf` (a HostBuffer) into a fresh tier-0 tensor; give `buf` back."""
        with torch.no_grad():
            rec.restored = self.copy.copy_up(buf, rec.nbytes, ready)
        self.pool.release(buf, rec.restored.event)
        rec.base = 0
        self.restored_bytes += rec.nbytes

    def _finish_read(self, rec: Resident) -> None:
        fut, rec.read = rec.read, None
        try:
            result = fut.result()
        except NVMeIOError:
            raise
        except OSError as e:  # pragma: no cover - store wraps OSErrors already
            raise NVMeIOError(str(e)) from e
        if rec.released:
            if self.copy.asynchronous:
                self.pool.release(result)
            return
        if self.copy.asynchronous:
            self._to_tier0(rec, result, None)
        else:
            rec.restored = TensorEvent(result, None)
            rec.base = result.storage_offset()
            self.restored_bytes += rec.nbytes

    # ------------------------------------------------------------------ restore
    def restore(self, rec: Resident) -> "Restored":
        """The tier-0 copy of `rec`, safe to read on compute now.

        Prefetches on demand if nothing started the copy up; waits for a pending NVMe read.
        """
        demand, waited = False, 0.0
        if rec.restored is None:
            if rec.read is None:
                self.prefetch(rec)
                demand = True
            if rec.restored is None:
                t0 = time.perf_counter()
                self._finish_read(rec)
                waited = time.perf_counter() - t0
        assert rec.restored is not None
        self.copy.hand_to_compute(rec.restored)  # (6) compute waits here, and only here
        return Restored(rec.restored.tensor, rec.base, demand, waited)

    # ------------------------------------------------------------------ release
    def release(self, rec: Resident) -> None:
        """Nothing holds `rec` any more: give back its buffer, file and tier-0 copy."""
        if rec.released:
            return
        rec.released = True
        if rec.host is not None:
            self.pool.release(rec.host, rec.ready)
            rec.host = None
        if rec.read is not None:
            fut = rec.read
            rec.read = None
            if self.copy.asynchronous:
                fut.add_done_callback(self._release_staging)
        if rec.file_live and rec.path is not None and self.store is not None and not self.store.closed:
            rec.file_live = False
            self.store.submit_unlink(rec.path, after=rec.write)
        if rec.restored is not None:
            rec.restored = None
            self.restored_bytes -= rec.nbytes

    def _release_staging(self, fut) -> None:
        if fut.exception() is None:
            self.pool.release(fut.result())

    def close(self, *, own_store: bool) -> None:
        """Finish pending I/O, remove the store if this mover's owner created it, free pooled buffers."""
        if self.store is not None and own_store:
            self.store.close()
        self.pool.clear()
