"""The on-disk sample store: decoded, compact samples in checksummed, append-only chunk files.

Layout of a store directory::

    meta.json        format, n, max_side, source fingerprint (written atomically, last)
    index.bin        n fixed-size records (REC): state, chunk, offset, nbytes, label, h, w,
                     crc32 of the data, crc32 of the record itself
    data-00000.bin   chunk files: concatenated (H, W, 3) uint8 samples, append-only
    .lock            flock'd by whoever appends (one writer at a time per node)

[Note: commit protocol]
A sample is *complete* iff its index record has state=1 and a valid record
checksum.  Appending a group of samples, under the lock: (1) check free space,
(2) write the data at the end of a chunk, (3) fsync the chunk, (4) write the
records, (5) fsync the index.  A process killed anywhere in (2)-(4) leaves at
most unreferenced bytes after the last committed sample (the next opener
truncates them, under the lock) or records that were never written: the
sample is simply not complete and is decoded again.  A write that fails
(ENOSPC) truncates the chunk back to its size before the group, so nothing
half-written remains.  We keep appending to a few large files rather than
temp-file + rename per chunk so that a killed build resumes sample by sample.

[Note: reads use pread, not mmap]
Reading a mapping of a file that another process truncated raises SIGBUS and
kills the reader; `os.preadv` returns a short count instead, which we detect.
pread also keeps the page cache (the node's host-DRAM tier, shared by all
ranks) under our control with posix_fadvise: WILLNEED to prefetch, DONTNEED to
demote; mapped pages would ignore DONTNEED.  Every read of a sample not yet
verified by this process checks the data's crc32 (verify="first"; "always"
checks every read); a mismatch or short read is reported and the sample is
rebuilt from the source, never served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptSourceError, StoreFullError, StoreMismatchError
from .source import make_source

__all__ = ["SampleStore", "build_store", "BuildReport", "REC", "default_store_dir"]

log = logging.getLogger("memstrata.data")

FORMAT, VERSION = "memstrata-sample-store", 1
REC = np.dtype([("state", "<u4"), ("chunk", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("label", "<i8"),
                ("h", "<u4"), ("w", "<u4"), ("crc", "<u4"), ("rcrc", "<u4")])
assert REC.itemsize == 48
COMPLETE = 1
VERIFY = ("first", "always", "never")
ON_CORRUPT = ("raise", "skip")
MIN_MAX_SIDE = 8  # smallest stored short side a store accepts


def _write_all(fd: int, data, offset: int) -> None:
    """pwrite all of `data` at `offset` (tests monkeypatch this to simulate a full disk)."""
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes = b"", size: int | None = None) -> None:
    """temp file + fsync + os.replace; the temp is removed on any failure."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if data:
                _write_all(fd, data, 0)
            if size is not None:
                os.ftruncate(fd, size)
                if size:
                    os.posix_fallocate(fd, 0, size) if hasattr(os, "posix_fallocate") else None
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise StoreFullError(str(path.parent), len(data) + (size or 0), _free(path.parent)) from e
        raise


def _free(d) -> int | None:
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def _rec_crc(rec) -> int:
    return zlib.crc32(rec.tobytes()[:44])


def default_store_dir(fingerprint: str) -> Path:
    base = os.environ.get("MEMSTRATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "memstrata")
    return Path(base) / "data" / fingerprint[:20]


@dataclass(frozen=True)
class BuildReport:
    """What `build_store` did."""

    directory: str
    samples: int
    complete: int
    built: int
    skipped: tuple
    bytes: int
    seconds: float
    verified: int | None = None  # with verify=True: stored samples re-read and checked before building
    verify_failed: tuple = ()  # of those, the ones that failed their check (rebuilt with the rest)

    def __str__(self) -> str:
        return (f"store {self.directory}: {self.complete}/{self.samples} samples complete, built {self.built} "
                f"in {self.seconds:.1f}s ({self.bytes / 2**20:.1f} MiB), skipped {len(self.skipped)}")


class SampleStore:
    """Decoded samples of one source in a directory; safe for several processes of a node.

    `get(i)` returns sample i as an (H, W, 3) uint8 numpy array, or None when
    it is not (or no longer verifiably) in the store; `fetch_many` decodes and
    stores what is missing.  Picklable (file descriptors are reopened per
    process), so it can travel to DataLoader workers.

    >>> store = SampleStore("/tmp/store", "/data/imagenet/train")  # doctest: +SKIP
    >>> img, label = store.fetch(0)    # numpy (H, W, 3) uint8 in host memory  # doctest: +SKIP
    """

    def __init__(self, directory, source, *, max_side: int = 160, verify: str = "first",
                 on_corrupt: str = "raise", chunk_bytes: int = 1 << 30):
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if max_side is not None and max_side < MIN_MAX_SIDE:
            raise ValueError(f"max_side must be >= {MIN_MAX_SIDE}, got {max_side}")
        self.source = make_source(source, max_side)
        self.n = len(self.source)
        if self.n == 0:
            raise ValueError("the source has no samples")
        self.max_side = max_side
        self.verify, self.on_corrupt, self.chunk_bytes = verify, on_corrupt, int(chunk_bytes)
        self.fingerprint = self.source.fingerprint()
        self.dir = Path(directory) if directory is not None else default_store_dir(self.fingerprint)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._mu = threading.RLock()
        self._pid = None
        self.skipped: set = set()
        self.stats = {"store_reads": 0, "decodes": 0, "corrupt_store": 0, "bytes_written": 0}
        self._open()

    # ------------------------------------------------------------------ files
    def _fds(self):
        # Double-checked: several loader threads can make the first call at once; `_pid`
        # is set last so no thread sees "ready" before the descriptors exist.
        if self._pid != os.getpid():  # first use in this process (or after fork / unpickling)
            with self._mu:
                if self._pid != os.getpid():
                    self._chunk_fds: dict = {}
                    self._index_fd = os.open(self.dir / "index.bin", os.O_RDWR)
                    self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                    self._pid = os.getpid()
        return self

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in ("_mu", "_chunk_fds", "_index_fd", "_lock_fd"):
            d.pop(k, None)
        d["_pid"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._mu = threading.RLock()

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in list(self._chunk_fds.values()) + [self._index_fd, self._lock_fd]:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pid = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    @contextlib.contextmanager
    def _locked(self):
        """Thread lock + node-wide flock: one appender at a time."""
        with self._mu:
            self._fds()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _chunk_path(self, c: int) -> Path:
        return self.dir / f"data-{c:05d}.bin"

    def _chunk_fd(self, c: int) -> int:
        fd = self._chunk_fds.get(c)
        if fd is None:
            fd = self._chunk_fds[c] = os.open(self._chunk_path(c), os.O_RDONLY)
        return fd

    def _meta(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "n": self.n, "max_side": self.max_side,
                "fingerprint": self.fingerprint, "source": self.source.kind,
                "root": getattr(self.source, "root", None), "record_bytes": REC.itemsize}

    def _open(self) -> None:
        meta_p, index_p = self.dir / "meta.json", self.dir / "index.bin"
        lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not meta_p.exists():
                _atomic_write(index_p, size=self.n * REC.itemsize)
                _atomic_write(meta_p, json.dumps(self._meta(), indent=1).encode())
            else:
                meta = json.loads(meta_p.read_text())
                want = self._meta()
                for k in ("format", "n", "max_side", "fingerprint", "record_bytes"):
                    if meta.get(k) != want[k]:
                        raise StoreMismatchError(
                            f"store {self.dir} was built with {k}={meta.get(k)!r}, this source/settings have "
                            f"{want[k]!r}; use another store_dir or delete {self.dir}")
                if index_p.stat().st_size != self.n * REC.itemsize:
                    raise StoreMismatchError(f"store {self.dir}: index.bin has the wrong size; delete {self.dir}")
            self._index = np.fromfile(index_p, dtype=REC, count=self.n)
            self._recover()
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
        self._verified = np.zeros(self.n, dtype=bool)

    def _valid_mask(self, recs) -> np.ndarray:
        ok = recs["state"] == COMPLETE
        for k in np.flatnonzero(ok):
            if _rec_crc(recs[k]) != int(recs[k]["rcrc"]):
                ok[k] = False
        return ok

    def _recover(self) -> None:
        """Under the lock: drop bytes after the last committed sample of each chunk (a killed append)."""
        ok = self._valid_mask(self._index)
        self._index["state"][~ok] = 0
        ends: dict = {}
        for c, off, nb in zip(self._index["chunk"][ok].tolist(), self._index["offset"][ok].tolist(),
                              self._index["nbytes"][ok].tolist()):
            ends[c] = max(ends.get(c, 0), off + nb)
        for p in sorted(self.dir.glob("data-*.bin")):
            c = int(p.stem.split("-")[1])
            size = p.stat().st_size
            end = ends.get(c, 0)
            if size > end:
                log.info("store %s: dropping %d unreferenced bytes after the last complete sample of %s",
                         self.dir, size - end, p.name)
                os.truncate(p, end)

    # ------------------------------------------------------------------ reads
    def _refresh(self, i: int) -> bool:
        """Re-read record i from index.bin (another process may have completed it)."""
        buf = os.pread(self._index_fd, REC.itemsize, i * REC.itemsize)
        if len(buf) != REC.itemsize:
            return False
        rec = np.frombuffer(buf, dtype=REC)[0]
        if int(rec["state"]) == COMPLETE and _rec_crc(rec) == int(rec["rcrc"]):
            self._index[i] = rec
            return True
        return False

    def is_complete(self, i: int) -> bool:
        self._fds()
        return int(self._index[i]["state"]) == COMPLETE or self._refresh(i)

    def count_complete(self) -> int:
        """Complete samples, re-reading the index file (sees other processes' progress)."""
        self._fds()
        recs = np.fromfile(self.dir / "index.bin", dtype=REC, count=self.n)
        ok = self._valid_mask(recs)
        with self._mu:
            self._index[ok] = recs[ok]
        return int(ok.sum())

    def label(self, i: int) -> int:
        labels = self.source.labels()
        if labels is not None:
            return int(labels[i])
        if self.is_complete(i):
            return int(self._index[i]["label"])
        return int(self.source.load(i)[1])

    def nbytes(self, i: int) -> int:
        """Stored size of sample i (an estimate from max_side if not stored yet)."""
        if int(self._index[i]["state"]) == COMPLETE:
            return int(self._index[i]["nbytes"])
        s = self.max_side or 256
        return int(s * s * 4 / 3) * 3

    def get(self, i: int):
        """Sample i as (H, W, 3) uint8, or None if absent or failing its checksum (then it is rebuilt)."""
        self._fds()
        rec = self._index[i]
        if int(rec["state"]) != COMPLETE:
            if not self._refresh(i):
                return None
            rec = self._index[i]
        c, off, nb, h, w = int(rec["chunk"]), int(rec["offset"]), int(rec["nbytes"]), int(rec["h"]), int(rec["w"])
        buf = np.empty(nb, dtype=np.uint8)
        try:
            got = os.preadv(self._chunk_fd(c), [buf], off)
        except FileNotFoundError:
            got = -1
        self.stats["store_reads"] += 1
        if got != nb:
            return self._corrupt(i, f"truncated ({got} of {nb} bytes at offset {off})")
        if self.verify == "always" or (self.verify == "first" and not self._verified[i]):
            if zlib.crc32(buf) != int(rec["crc"]):
                return self._corrupt(i, "checksum mismatch")
            self._verified[i] = True
        return buf.reshape(h, w, 3)

    def _corrupt(self, i: int, why: str):
        c = int(self._index[i]["chunk"])
        log.warning("store %s: sample %d in %s is corrupt (%s); rebuilding it from %s", self.dir, i,
                    self._chunk_path(c).name, why, self.source.describe(i))
        self.stats["corrupt_store"] += 1
        with self._mu:
            self._index[i]["state"] = 0
            self._verified[i] = False
        return None

    def advise(self, indices, advice: str) -> None:
        """Page-cache hints for stored samples: "willneed" (prefetch to DRAM) or "dontneed" (demote)."""
        if not hasattr(os, "posix_fadvise"):
            return
        adv = os.POSIX_FADV_WILLNEED if advice == "willneed" else os.POSIX_FADV_DONTNEED
        self._fds()
        for i in np.asarray(indices).tolist():
            rec = self._index[i]
            if int(rec["state"]) == COMPLETE:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._chunk_fd(int(rec["chunk"])), int(rec["offset"]), int(rec["nbytes"]), adv)

    # ------------------------------------------------------------------ writes
    def put_many(self, items) -> int:
        """Append [(i, (H, W, 3) uint8 array, label), ...] and commit them.  Returns bytes written."""
        items = [(int(i), np.ascontiguousarray(a, dtype=np.uint8), int(y)) for i, a, y in items]
        if not items:
            return 0
        for i, a, _ in items:
            if a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"sample {i}: expected an (H, W, 3) uint8 array, got shape {a.shape}")
        total = sum(a.nbytes for _, a, _ in items)
        with self._locked():
            free = _free(self.dir)
            if free is not None and free < total:
                raise StoreFullError(str(self.dir), total, free)
            chunks = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("data-*.bin"))
            c = chunks[-1] if chunks else 0
            path = self._chunk_path(c)
            size = path.stat().st_size if path.exists() else 0
            if size and size + total > self.chunk_bytes:
                c, size = c + 1, 0
                path = self._chunk_path(c)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                start = os.fstat(fd).st_size
                offs, pos = [], start
                try:
                    for _, a, _ in items:
                        _write_all(fd, a, pos)
                        offs.append(pos)
                        pos += a.nbytes
                    os.fsync(fd)
                except OSError as e:
                    os.ftruncate(fd, start)  # nothing half-written stays behind
                    with contextlib.suppress(OSError):
                        os.fsync(fd)
                    if created:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                    if e.errno == errno.ENOSPC:
                        raise StoreFullError(str(self.dir), total, _free(self.dir)) from e
                    raise
            finally:
                os.close(fd)
            recs = np.zeros(len(items), dtype=REC)
            for k, ((i, a, y), off) in enumerate(zip(items, offs)):
                r = recs[k]
                r["state"], r["chunk"], r["offset"], r["nbytes"], r["label"] = COMPLETE, c, off, a.nbytes, y
                r["h"], r["w"], r["crc"] = a.shape[0], a.shape[1], zlib.crc32(a)
                r["rcrc"] = _rec_crc(r)
                os.pwrite(self._index_fd, recs[k:k + 1].tobytes(), i * REC.itemsize)
            os.fsync(self._index_fd)
            for k, (i, a, _) in enumerate(items):
                self._index[i] = recs[k]
                self._verified[i] = True
            old = self._chunk_fds.pop(c, None)  # reopen: the chunk may have been recreated
            if old is not None:
                os.close(old)
        self.stats["bytes_written"] += total
        return total

    def load_source(self, i: int):
        """Decode sample i from the source: (array, label), or (None, label) if corrupt and skipping."""
        try:
            a, y = self.source.load(i)
        except CorruptSourceError as e:
            if self.on_corrupt == "raise":
                raise
            if i not in self.skipped:
                log.warning("skipping %s", e)
                self.skipped.add(i)
            return None, -1
        self.stats["decodes"] += 1
        return a, y

    def fetch_many(self, indices, pool=None, write: bool = True):
        """[(array or None if skipped, label)] for `indices`; decodes (in `pool`) and stores misses."""
        indices = [int(i) for i in indices]
        out = [None] * len(indices)
        miss = []
        for k, i in enumerate(indices):
            a = self.get(i)
            if a is None:
                miss.append(k)
            else:
                out[k] = (a, self.label(i))
        if miss:
            mi = [indices[k] for k in miss]
            dec = list(pool.map(self.load_source, mi)) if pool is not None and len(mi) > 1 else \
                [self.load_source(i) for i in mi]
            todo = {}
            for k, i, (a, y) in zip(miss, mi, dec):
                out[k] = (a, y)
                if a is not None:
                    todo[i] = (i, a, y)  # a duplicate index in one batch is written once
            if write and todo:
                self.put_many(list(todo.values()))
        return out

    def fetch(self, i: int):
        return self.fetch_many([i])[0]


def build_store(root, out=None, *, max_side: int = 160, on_corrupt: str = "raise", workers: int | None = None,
                progress: bool = True, group: int = 64, verify: bool = False) -> BuildReport:
    """Build (or complete) the store of `root` ahead of time; resumes where a killed build stopped.

    root: an ImageFolder directory (or a map-style dataset); out: store directory
    (default: ~/.cache/memstrata/data/<fingerprint>).  `workers` decode threads
    (PIL releases the GIL while decoding; default: all cores).  verify=True
    also re-reads and checks every stored sample (rebuilding corrupt ones).
    """
    t0 = time.perf_counter()
    store = SampleStore(out, root, max_side=max_side, on_corrupt=on_corrupt, verify="always" if verify else "first")
    n = store.n
    done = np.array([store.is_complete(i) for i in range(n)])
    verified, failed = None, []
    if verify:
        stored = np.flatnonzero(done).tolist()
        verified = len(stored)
        for i in stored:
            if store.get(i) is None:
                done[i] = False
                failed.append(i)
    todo = np.flatnonzero(~done)
    from concurrent.futures import ThreadPoolExecutor

    from .synth import _progress

    workers = workers if workers is not None else (os.cpu_count() or 1)
    written = 0
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            _progress(progress and len(todo) > 0, len(todo), f"building store {store.dir}") as bar:
        for s in range(0, len(todo), group):
            ids = todo[s:s + group].tolist()
            dec = list(pool.map(store.load_source, ids))
            items = [(i, a, y) for i, (a, y) in zip(ids, dec) if a is not None]
            written += store.put_many(items)
            bar.advance(len(ids))
    complete = store.count_complete()
    rep = BuildReport(directory=str(store.dir), samples=n, complete=complete, built=len(todo) - len(store.skipped),
                      skipped=tuple(sorted(store.skipped)), bytes=written, seconds=time.perf_counter() - t0,
                      verified=verified, verify_failed=tuple(failed))
    store.close()
    return rep
