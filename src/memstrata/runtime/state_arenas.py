"""NVMe state buckets on a CPU: one file per bucket, overwritten in place, read into a ring of arenas.

`TieredOptimizer` (states.py) uses this for NVMe buckets when tier 0 is host
memory (no asynchronous device copies).  Each NVMe bucket's states live in one
file of the NVMe store; on tier 0 they live in one of ``depth + 2``
preallocated, 4 KiB-aligned *arenas*, and the optimizer steps on views into
the arena, so bytes go file -> arena -> file with no staging copy and no fresh
allocation after the first step.

[Note: why arenas and in-place files]
Measured on the 2-core CPU box (ext4 mounted with ``discard``, O_DIRECT, 32 MiB
blocks): writing a new file and unlinking it ran at 1.24 GB/s, overwriting a
file in place at 2.9 GB/s, reading at 2.1 GB/s; read and write together at
2.5 GB/s in sum.  The per-state path of the tier mover (one new file per state
tensor per step, a fresh aligned buffer per read, a staging copy per write
because torch's CPU tensors are only 64-byte aligned) paid the slow writes, a
page fault per 4 KiB of every read buffer and a memcpy of every write, all on
the same two cores as the optimizer's arithmetic: the AdamW kernels themselves
ran ~3x slower next to it (bench/results/2026-12-02-cpu-states/README.md).
The arenas are the state window of the planner ([Note: what the state planner
models] in plan/states.py): ``window`` buckets, each as large as the largest
NVMe bucket, allocated once.

[Note: the pipeline of the arena ring]
`TieredOptimizer._step_ring` walks the step's buckets (NVMe buckets
interleaved with the kept ones, the order reversed every step).  Before each
bucket it *pumps*: the next ``count`` NVMe buckets (the one about to be
stepped included) are read, in the order the step needs them, into any arena
that is free or whose bucket was stepped already and whose write has landed
(`try_acquire`, which never waits); the first bucket that finds none stops
the pump until the next boundary.  A bucket whose read is still running is
waited for together with the writes that could free an arena
(`wait_any`), and the pump runs again whenever one of them lands, so a
read starts as soon as its arena is clean, not when the step gets to it.
Writes are submitted right after a bucket's update and never waited for
inside the step unless an arena is needed for a bucket about to be stepped
and none is clean (counted as a demand fetch).  Reads and writes run on
separate thread lanes ([Note: read and write lanes] in nvme.py).  The ring's
last ``count`` buckets stay in their arenas after the step: the next step,
in reverse order, starts with them (no read) and their writes land during the
forward and backward in between.  Inside a step the disk therefore moves the
NVMe bytes less the ring's, each way: with the ring within the budget that is
about (all states - budget) each way, the least any placement can move
([Note: what the state planner models] in plan/states.py), and the step is
disk-bound once that I/O takes longer than the step's compute.  With
deferred updates ([Note: deferred updates] in deferred.py) the same pump runs
from `TieredOptimizer._apply` (a forward pre-hook) with the pending buckets in
the forward's use order, and from post-accumulate-grad hooks during backward
(the next step's first buckets into the arenas whose writes landed), so the
window is the step plus the next forward.  Before
(2026-12-02) a bucket's arena was taken from bucket k-1 by *waiting* for its
write (a one-bucket-deep pipeline) and reads queued behind writes in one FIFO
pool.

[Note: no state is ever lost, with arenas]
A bucket's current values are always complete in its file or its arena.  The
file is overwritten only from the arena that holds the newer values, and the
arena is handed to another bucket only after that write finished without
error.  A failed write keeps its arena with its bucket (the ring gets a new
arena for others: the fast tier grows by one bucket instead of losing data);
the next step uses the bucket from memory and writes it again.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Callable, Sequence

import torch

from .errors import NVMeIOError
from .nvme import NVMeStore
from .pool import ALIGN, aligned_empty, round_up

TENSOR_ALIGN = 64  # state tensors inside a bucket start on cache lines
CHUNK_BYTES = 8 * 1024 * 1024  # one I/O job: a bucket's file is read and written in chunks, several at once


class Arena:
    """One preallocated aligned buffer holding at most one bucket's states."""

    __slots__ = ("buf", "owner")

    def __init__(self, nbytes: int) -> None:
        self.buf = aligned_empty(max(nbytes, ALIGN))
        self.owner: "BucketFile | None" = None

    @property
    def nbytes(self) -> int:
        return self.buf.numel()


class BucketFile:
    """One NVMe bucket: its states' layout, its file, and where its current values are.

    `layout` maps (record position in the bucket, state key) to (offset, dtype,
    shape, nbytes) inside the bucket's bytes.  `arena` is the arena holding
    the bucket (None: only the file has it); `reads` are the read jobs filling
    the arena, `writes` the write jobs of its current values; `on_disk` says the
    file holds the current values (the write finished without error).
    """

    __slots__ = ("position", "layout", "nbytes", "raw_bytes", "path", "fd", "arena", "reads", "writes",
                 "on_disk", "failed", "last_used")

    def __init__(self, position: int) -> None:
        self.position = position
        self.layout: dict[tuple[int, str], tuple[int, torch.dtype, torch.Size, int]] = {}
        self.nbytes = 0  # bytes of the layout (states 64-byte aligned, the whole rounded up to ALIGN)
        self.raw_bytes = 0  # bytes of the states themselves
        self.path: str | None = None
        self.fd: int | None = None
        self.arena: Arena | None = None
        self.reads: list[Future] = []
        self.writes: list[Future] = []
        self.on_disk = False
        self.failed = False
        self.last_used = -1

    def set_layout(self, states: Sequence[tuple[int, str, torch.Tensor]]) -> None:
        self.layout.clear()
        off = raw = 0
        for j, key, t in states:  # 64-byte aligned inside the bucket; only the whole is in O_DIRECT blocks
            n = t.numel() * t.element_size()
            self.layout[(j, key)] = (off, t.dtype, t.shape, n)
            off += round_up(n, TENSOR_ALIGN)
            raw += n
        self.nbytes, self.raw_bytes = round_up(off), raw

    def view(self, j: int, key: str) -> torch.Tensor:
        """The state tensor (`j`, `key`) over this bucket's arena (no copy)."""
        assert self.arena is not None
        off, dtype, shape, n = self.layout[(j, key)]
        return self.arena.buf[off:off + n].view(dtype).view(shape)


class ArenaRing:
    """The arenas, the bucket files and the I/O between them (one per `TieredOptimizer`)."""

    def __init__(self, store: NVMeStore, arena_bytes: int, count: int, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.store = store
        self.arena_bytes = round_up(max(arena_bytes, ALIGN))
        self.count = count
        self.chunk_bytes = round_up(chunk_bytes)
        self.arenas: list[Arena] = []
        self.clock = 0
        self.reads_waited_s = 0.0
        self.writes_waited_s = 0.0
        self.bytes_read = 0
        self.bytes_written = 0
        self.write_failures = 0
        self._late_failures: list[str] = []  # write errors found by try_acquire (reported by the next raise)

    @property
    def allocated_bytes(self) -> int:
        return sum(a.nbytes for a in self.arenas)

    # ------------------------------------------------------------------ arenas
    def _grow_if_needed(self, arena: Arena, nbytes: int) -> None:
        if arena.nbytes < nbytes:  # an optimizer with more (or larger) states than expected
            arena.buf = aligned_empty(nbytes)
            self.arena_bytes = max(self.arena_bytes, round_up(nbytes))

    def acquire(self, bucket: BucketFile, protect: set[int], failures: list[str]) -> None:
        """Give `bucket` an arena: a free one, else the least recently used one outside `protect`
        (bucket positions in use) whose bucket is safely on disk (waiting for its write if needed)."""
        if bucket.arena is not None:
            return
        arena = next((a for a in self.arenas if a.owner is None), None)
        if arena is None and len(self.arenas) < self.count:
            arena = Arena(max(self.arena_bytes, bucket.nbytes))
            self.arenas.append(arena)
        while arena is None:
            cands = sorted((a for a in self.arenas if a.owner.position not in protect and not a.owner.failed),
                           key=lambda a: a.owner.last_used)
            for a in cands:
                self.settle(a.owner, block=True, failures=failures)
                if a.owner.on_disk:
                    self._detach(a.owner)
                    arena = a
                    break
            if arena is None:  # every candidate failed to write: keep them, add an arena
                arena = Arena(max(self.arena_bytes, bucket.nbytes))
                self.arenas.append(arena)
        self._grow_if_needed(arena, bucket.nbytes)
        arena.owner = bucket
        bucket.arena = arena

    def try_acquire(self, bucket: BucketFile, protect: set[int]) -> bool:
        """`acquire` without waiting: a free arena, a new one below `count`, or the least recently used
        arena outside `protect` whose bucket's write has already landed.  False when none is ready."""
        if bucket.arena is not None:
            return True
        arena = next((a for a in self.arenas if a.owner is None), None)
        if arena is None and len(self.arenas) < self.count:
            arena = Arena(max(self.arena_bytes, bucket.nbytes))
            self.arenas.append(arena)
        if arena is None:
            best = None
            for a in self.arenas:
                o = a.owner
                if o.position in protect or o.failed or o.reads:
                    continue
                if o.writes and not all(f.done() for f in o.writes):
                    continue
                if best is None or o.last_used < best.owner.last_used:
                    best = a
            if best is None:
                return False
            self.settle(best.owner, block=False, failures=self._late_failures)
            if not best.owner.on_disk:  # its write failed: the arena keeps its values
                return False
            self._detach(best.owner)
            arena = best
        self._grow_if_needed(arena, bucket.nbytes)
        arena.owner = bucket
        bucket.arena = arena
        return True

    def pump(self, upcoming: Sequence[BucketFile], protect: set[int]) -> int:
        """Start the reads of `upcoming` (in need order) that can start now without waiting.

        [Note: the pipeline of the arena ring]: stops at the first bucket that finds no ready arena,
        so reads start in the order the step needs them.  Returns the reads started."""
        started = 0
        for b in upcoming:
            if b.arena is not None or not b.on_disk:
                continue
            if not self.try_acquire(b, protect):
                break
            self.read(b)
            started += 1
        return started

    def wait_any(self, bucket: BucketFile, protect: set[int]) -> None:
        """Block until `bucket`'s reads finished or some write that frees an arena outside `protect` did."""
        pending = [f for f in bucket.reads if not f.done()]
        if not pending:
            return
        for a in self.arenas:
            o = a.owner
            if o is not None and o.position not in protect:
                pending.extend(f for f in o.writes if not f.done())
        t0 = time.perf_counter()
        wait(pending, return_when=FIRST_COMPLETED)
        self.reads_waited_s += time.perf_counter() - t0

    def take_failures(self) -> list[str]:
        out, self._late_failures = self._late_failures, []
        return out

    def _detach(self, bucket: BucketFile) -> None:
        assert bucket.arena is not None and not bucket.reads and not bucket.writes
        bucket.arena.owner = None
        bucket.arena = None

    def release_all_clean(self, failures: list[str]) -> None:
        """Every bucket whose values are on disk gives its arena back (the arenas stay allocated)."""
        for a in self.arenas:
            if a.owner is not None:
                self.settle(a.owner, block=True, failures=failures)
                if a.owner.on_disk and not a.owner.reads:
                    self._detach(a.owner)

    # ------------------------------------------------------------------ I/O
    def _chunks(self, nbytes: int):
        for off in range(0, round_up(nbytes), self.chunk_bytes):
            yield off, min(self.chunk_bytes, round_up(nbytes) - off)

    def read(self, bucket: BucketFile) -> None:
        """Start reading `bucket`'s file into its arena (it has one; the file holds its values)."""
        assert bucket.arena is not None and bucket.on_disk and bucket.fd is not None
        buf = bucket.arena.buf
        bucket.reads = [self.store.submit_pread(bucket.fd, bucket.path, buf[off:off + n], off)
                        for off, n in self._chunks(bucket.nbytes)]

    def wait_reads(self, bucket: BucketFile) -> None:
        if not bucket.reads:
            return
        t0 = time.perf_counter()
        try:
            for f in bucket.reads:
                f.result()
        except NVMeIOError as e:
            bucket.reads = []
            raise NVMeIOError(f"optimizer states of bucket {bucket.position} are lost: {e}") from None
        finally:
            self.reads_waited_s += time.perf_counter() - t0
        bucket.reads = []
        self.bytes_read += bucket.nbytes

    def write(self, bucket: BucketFile) -> None:
        """Start writing `bucket`'s arena over its file (created on first use)."""
        assert bucket.arena is not None and not bucket.writes
        if bucket.fd is None:
            bucket.path, bucket.fd = self.store.open_file(f"s{bucket.position}")
        bucket.on_disk = False
        buf = bucket.arena.buf
        bucket.writes = [self.store.submit_pwrite(bucket.fd, bucket.path, buf[off:off + n], off)
                         for off, n in self._chunks(bucket.nbytes)]

    def settle(self, bucket: BucketFile, *, block: bool, failures: list[str]) -> bool:
        """Finish `bucket`'s writes (waiting if `block`); True when none is in flight."""
        if not bucket.writes:
            return True
        if not block and not all(f.done() for f in bucket.writes):
            return False
        t0 = time.perf_counter()
        errs = []
        for f in bucket.writes:
            e = f.exception()
            if e is not None:
                errs.append(str(e))
        self.writes_waited_s += time.perf_counter() - t0
        bucket.writes = []
        if errs:
            self.write_failures += 1
            bucket.failed = True  # [Note: no state is ever lost, with arenas]: the arena keeps the values
            failures.extend(errs[:1])
        else:
            bucket.on_disk = True
            bucket.failed = False
            self.bytes_written += bucket.nbytes
        return True

    def drain(self, buckets: Sequence[BucketFile], failures: list[str]) -> None:
        for b in buckets:
            self.settle(b, block=True, failures=failures)
            if b.reads:
                for f in b.reads:
                    try:
                        f.result()
                    except Exception:  # noqa: BLE001 - the values are gone with the store anyway
                        pass
                b.reads = []

    def read_copy(self, bucket: BucketFile) -> torch.Tensor:
        """The bucket's bytes in a fresh buffer, read synchronously from its file (for snapshots)."""
        buf = aligned_empty(bucket.nbytes)
        futs = [self.store.submit_pread(bucket.fd, bucket.path, buf[off:off + n], off)
                for off, n in self._chunks(bucket.nbytes)]
        for f in futs:
            f.result()
        return buf

    def forget(self, bucket: BucketFile, remove_file: Callable[[str, int], None] | None = None) -> None:
        """Drop `bucket`'s arena and file (states loaded anew, or the optimizer closed)."""
        if bucket.arena is not None:
            bucket.arena.owner = None
            bucket.arena = None
        if bucket.fd is not None:
            self.store.close_file(bucket.path, bucket.fd)
        bucket.fd, bucket.path = None, None
        bucket.on_disk = bucket.failed = False
        bucket.layout.clear()
        bucket.nbytes = bucket.raw_bytes = 0

    def clear(self) -> None:
        self.arenas.clear()


__all__ = ["Arena", "ArenaRing", "BucketFile", "CHUNK_BYTES"]
