"""The on-disk sample store: decoded, compact samples in checksummed, append-only chunk files.

Layout of a store directory::

    meta.json        format, version, n, max_side, source fingerprint (written atomically, last)
    index.bin        n fixed-size records (REC): state, chunk, offset, nbytes, label, h, w,
                     crc32 of the data, the source file's stamp (size, mtime, ctime, inode,
                     crc32 of its bytes), crc32 of the record itself and its slot number
    data-00000.bin   chunk files: concatenated (H, W, 3) uint8 samples, append-only
    .lock            flock'd by whoever appends (one writer at a time per node)
    .build           flock'd by `build_store` for the whole build (one builder per store)

[Note: commit protocol]
A sample is *complete* iff its index record has state=1 and a valid record
checksum.  The record checksum covers the record's bytes *and its slot number*
(crc32 seeded with the slot), so two records that trade places -- or a record
copied into another slot -- fail it, and the sample is decoded again instead
of being served under another sample's label.  Appending a group of samples,
under the lock: (0) drop the samples another process committed meanwhile
([Note: one writer per sample]), (1) check free space, (2) write the data at
the end of a chunk, (3) fsync the chunk, (4) write the records, (5) fsync the
index.  A process killed anywhere in (2)-(4) leaves at most unreferenced bytes
after the last committed sample (the next opener truncates them, under the
lock) or records that were never written: the sample is simply not complete
and is decoded again.  A write that fails (ENOSPC, EFBIG from `ulimit -f`, EIO)
truncates the chunk back to its size before the group, so nothing
half-written remains, and ends in one typed error ([Note: write errors]).  We
keep appending to a few large files rather than temp-file + rename per chunk
so that a killed build resumes sample by sample.

[Note: one writer per sample]
Several processes of a node (two `data build`s, the ranks' loaders, DataLoader
workers) may decode the same missing sample at once.  Whoever takes the lock
second re-reads the records of its group under the lock and drops every
sample that is already complete there with the same source stamp, so the
chunk files hold one copy of each sample however many processes race.
`build_store` also holds `.build` for the whole build: a second build waits for
the first (saying so) and then finds nothing left to do, instead of decoding
everything a second time.  A record this process rejected (checksum mismatch)
is never taken as "already stored": its sample is written again.

[Note: reads use pread, not mmap]
Reading a mapping of a file that another process truncated raises SIGBUS and
kills the reader; `os.preadv` returns a short count instead, which we detect.
pread also keeps the page cache (the node's host-DRAM tier, shared by all
ranks) under our control with posix_fadvise: WILLNEED to prefetch, DONTNEED to
demote; mapped pages would ignore DONTNEED.  Every read of a sample not yet
verified by this process checks the data's crc32 (verify="first"; "always"
checks every read); a mismatch or short read is reported and the sample is
rebuilt from the source, never served.  The first read of a sample in a
process also checks its source file's stamp (source_check="stat", the
default: one stat; "hash": the file's crc too; see [Note: source stamps] in
source.py): a source changed since the sample was stored is decoded again.

[Note: read-only stores]
A complete store on read-only media (or one this user may not write) opens
for reading: where opening `.lock` or `index.bin` read-write is refused
(EROFS, EACCES, EPERM) the store falls back to read-only descriptors (flock
works on those) and sets `readonly`.  Such a store serves what it holds;
samples it lacks are decoded and served but not stored (one warning), and
`build_store` with samples to build ends in `StoreReadOnlyError`.

[Note: write errors]
ENOSPC and EDQUOT -> StoreFullError; EFBIG -> StoreWriteError naming the
file-size limit; EROFS/EACCES -> StoreReadOnlyError; any other OSError of a
write -> StoreWriteError.  All are DataErrors (the CLI prints one line, exit
status 2) and OSErrors (callers catching OSError still do).  SIGXFSZ, which
the kernel sends to a process that writes past `ulimit -f`, kills it by
default; CPython ignores it at startup, and a store made on the main thread
ignores it again if someone restored the default, so the write fails with
EFBIG and the rollback above runs instead of the process dying mid-append.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptSourceError, StoreFullError, StoreMismatchError, StoreReadOnlyError, StoreWriteError
from .source import Stamp, make_source

__all__ = ["SampleStore", "build_store", "BuildReport", "REC", "default_store_dir"]

log = logging.getLogger("memstrata.data")

FORMAT, VERSION = "memstrata-sample-store", 2
REC = np.dtype([("state", "<u4"), ("chunk", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("label", "<i8"),
                ("h", "<u4"), ("w", "<u4"), ("crc", "<u4"), ("src_crc", "<u4"),
                ("src_size", "<i8"), ("src_mtime", "<i8"), ("src_ctime", "<i8"), ("src_ino", "<u8"),
                ("rcrc", "<u4"), ("pad", "<u4")])
assert REC.itemsize == 88
_SIGNED = REC.fields["rcrc"][1]  # the record checksum covers the bytes before it (and the slot number)
COMPLETE = 1
VERIFY = ("first", "always", "never")
ON_CORRUPT = ("raise", "skip")
MIN_MAX_SIDE = 8  # smallest stored short side a store accepts
SOURCE_CHECKS = ("stat", "hash", "off")
_RO_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # "this media / this user cannot write here"


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
        raise _write_error(e, path.parent, path, len(data) + (size or 0)) from e


def _free(d) -> int | None:
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def _write_error(e: OSError, directory, path, needed: int) -> OSError:
    """The typed, one-line error for a failed write of the store (see [Note: write errors])."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return StoreFullError(str(directory), needed, _free(directory))
    if e.errno == errno.EFBIG:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        lim = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        return StoreWriteError(f"cannot write {path}: the file-size limit (ulimit -f, now {lim}) stops it; "
                               f"raise it (ulimit -f unlimited) and run again: the samples stored so far are kept")
    if e.errno in _RO_ERRNOS:
        return StoreReadOnlyError(f"cannot write the sample store {path}: {e.strerror or e} "
                                  f"(read-only media or no permission); choose a writable store_dir / --out")
    return StoreWriteError(f"cannot write the sample store {path}: [Errno {e.errno}] {e.strerror or e}; "
                           f"the samples stored so far are kept")


def _slot_seed(slot: int) -> int:
    return zlib.crc32(struct.pack("<q", int(slot)))


def _rec_crc(rec, slot: int) -> int:
    """Checksum of record `rec` *in slot `slot`* (see [Note: commit protocol])."""
    return zlib.crc32(rec.tobytes()[:_SIGNED], _slot_seed(slot))


def _stamp_of(rec) -> Stamp | None:
    if int(rec["src_size"]) < 0:
        return None
    return Stamp(int(rec["src_size"]), int(rec["src_mtime"]), int(rec["src_ctime"]), int(rec["src_ino"]),
                 int(rec["src_crc"]))


def _set_stamp(rec, stamp: Stamp | None) -> None:
    if stamp is None:
        rec["src_size"], rec["src_mtime"], rec["src_ctime"], rec["src_ino"], rec["src_crc"] = -1, 0, 0, 0, 0
    else:
        rec["src_size"], rec["src_mtime"], rec["src_ctime"] = stamp.size, stamp.mtime_ns, stamp.ctime_ns
        rec["src_ino"], rec["src_crc"] = stamp.ino, stamp.crc or 0


def _ignore_sigxfsz() -> None:
    """Writes past `ulimit -f` must fail with EFBIG, not kill the process (see [Note: write errors])."""
    sig = getattr(signal, "SIGXFSZ", None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError, TypeError):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_IGN)


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
    changed: tuple = ()  # samples whose source file changed since they were stored (rebuilt, in `built`)

    def __str__(self) -> str:
        changed = f", {len(self.changed)} changed in the source (rebuilt)" if self.changed else ""
        return (f"store {self.directory}: {self.complete}/{self.samples} samples complete, built {self.built} "
                f"in {self.seconds:.1f}s ({self.bytes / 2**20:.1f} MiB), skipped {len(self.skipped)}{changed}")


class SampleStore:
    """Decoded samples of one source in a directory; safe for several processes of a node.

    `get(i)` returns sample i as an (H, W, 3) uint8 numpy array, or None when
    it is not (or no longer verifiably) in the store; `fetch_many` decodes and
    stores what is missing.  Picklable (file descriptors are reopened per
    process), so it can travel to DataLoader workers.

    source_check: how a stored sample's source file is checked on its first read
    in a process: "stat" (size, mtime, ctime, inode; the default), "hash" (also
    the crc of the file's bytes: reads every file once), "off".  `readonly` is
    True where the directory cannot be written ([Note: read-only stores]).

    >>> store = SampleStore("/tmp/store", "/data/imagenet/train")  # doctest: +SKIP
    >>> img, label = store.fetch(0)    # numpy (H, W, 3) uint8 in host memory  # doctest: +SKIP
    """

    def __init__(self, directory, source, *, max_side: int = 160, verify: str = "first",
                 on_corrupt: str = "raise", chunk_bytes: int = 1 << 30, source_check: str = "stat"):
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if source_check not in SOURCE_CHECKS:
            raise ValueError(f"source_check must be one of {SOURCE_CHECKS}, got {source_check!r}")
        if max_side is not None and max_side < MIN_MAX_SIDE:
            raise ValueError(f"max_side must be >= {MIN_MAX_SIDE}, got {max_side}")
        self.source = make_source(source, max_side)
        self.n = len(self.source)
        if self.n == 0:
            raise ValueError("the source has no samples")
        self.max_side = max_side
        self.verify, self.on_corrupt, self.chunk_bytes = verify, on_corrupt, int(chunk_bytes)
        self.source_check = source_check
        self.fingerprint = self.source.fingerprint()
        self.dir = Path(directory) if directory is not None else default_store_dir(self.fingerprint)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in _RO_ERRNOS:
                raise StoreReadOnlyError(f"cannot create the store directory {self.dir}: {e.strerror or e}; "
                                         f"choose a writable store_dir / --out") from e
            raise
        _ignore_sigxfsz()
        self.readonly = False
        self._mu = threading.RLock()
        self._pid = None
        self.skipped: set = set()
        self._warned_ro = False
        self.stats = {"store_reads": 0, "decodes": 0, "corrupt_store": 0, "bytes_written": 0,
                      "samples_written": 0, "source_changed": 0, "source_rereads": 0}
        self._open()

    # ------------------------------------------------------------------ files
    def _open_file(self, path: Path, create: bool = False) -> int | None:
        """Read-write (created if `create`), or read-only where writes are refused (then `readonly`).

        None for a lock file that does not exist on read-only media (no writer can exist there).
        """
        if not self.readonly:
            try:
                return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except OSError as e:
                if e.errno not in _RO_ERRNOS:
                    raise
                self.readonly = True
                log.info("store %s is not writable (%s): opening it read-only", self.dir, e.strerror)
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if create:
                return None
            raise

    def _fds(self):
        # Double-checked: several loader threads can make the first call at once; `_pid`
        # is set last so no thread sees "ready" before the descriptors exist.
        if self._pid != os.getpid():  # first use in this process (or after fork / unpickling)
            with self._mu:
                if self._pid != os.getpid():
                    self._chunk_fds: dict = {}
                    self._index_fd = self._open_file(self.dir / "index.bin")
                    self._lock_fd = self._open_file(self.dir / ".lock", create=True)
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
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self._pid = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _readonly_error(self, what: str) -> StoreReadOnlyError:
        return StoreReadOnlyError(f"store {self.dir} is read-only (read-only media or no permission): {what}; "
                                  f"build it where it can be written (another store_dir / --out)")

    @contextlib.contextmanager
    def _locked(self):
        """Thread lock + node-wide flock: one appender at a time."""
        with self._mu:
            self._fds()
            if self.readonly:
                raise self._readonly_error("cannot store samples in it")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def builder(self):
        """Hold the store's build lock: one `build_store` per store at a time ([Note: one writer per sample])."""
        fd = None if self.readonly else self._open_file(self.dir / ".build", create=True)
        if fd is None:  # read-only: nobody builds here
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("store %s: another build of it is running; waiting for it to finish", self.dir)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

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

    def _read_meta(self, meta_p: Path) -> dict | None:
        """meta.json, or None if there is none -- or it is damaged: then nothing in the store can be trusted
        (its settings are unknown) and it is rebuilt, like a store that was never finished."""
        try:
            raw = meta_p.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(raw.decode("utf-8"))
            why = f"a JSON {type(meta).__name__}, not an object"
        except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            meta, why = None, f"{type(e).__name__}: {e}" if raw.strip() else "empty"
        if isinstance(meta, dict):
            return meta
        if self.readonly:
            raise self._readonly_error(f"its meta.json is damaged ({why}), so it cannot be used or rebuilt")
        log.warning("store %s: meta.json is damaged (%s); rebuilding the store from the source", self.dir, why)
        return None

    def _open(self) -> None:
        meta_p, index_p = self.dir / "meta.json", self.dir / "index.bin"
        lock_fd = self._open_file(self.dir / ".lock", create=True)
        try:
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            meta = self._read_meta(meta_p)
            if meta is None:
                if self.readonly:
                    raise self._readonly_error("it holds no sample store, and none can be made there")
                _atomic_write(index_p, size=self.n * REC.itemsize)  # every record "not complete"
                _atomic_write(meta_p, json.dumps(self._meta(), indent=1).encode())
            else:
                want = self._meta()
                if meta.get("format") == FORMAT and meta.get("version") != VERSION:
                    raise StoreMismatchError(
                        f"store {self.dir} was written by another memstrata (store format version "
                        f"{meta.get('version')!r}, this one uses {VERSION}); delete {self.dir} (it is rebuilt "
                        f"from the source) or use another store_dir")
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
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)
        self._verified = np.zeros(self.n, dtype=bool)
        self._src_ok = np.zeros(self.n, dtype=bool)  # source stamp checked in this process
        self._rejected: dict = {}  # i -> (chunk, offset) of a record this process found corrupt

    def _valid_mask(self, recs) -> np.ndarray:
        """recs: the whole index (slot k = sample k)."""
        ok = recs["state"] == COMPLETE
        for k in np.flatnonzero(ok).tolist():
            if _rec_crc(recs[k], k) != int(recs[k]["rcrc"]):
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
                if self.readonly:  # harmless for reads; a writable opener drops them
                    log.info("store %s: %d unreferenced bytes after the last complete sample of %s (read-only: "
                             "kept)", self.dir, size - end, p.name)
                    continue
                log.info("store %s: dropping %d unreferenced bytes after the last complete sample of %s",
                         self.dir, size - end, p.name)
                os.truncate(p, end)

    # ------------------------------------------------------------------ reads
    def _disk_record(self, i: int):
        """Record i as index.bin holds it now, if complete and valid in slot i (else None)."""
        buf = os.pread(self._index_fd, REC.itemsize, i * REC.itemsize)
        if len(buf) != REC.itemsize:
            return None
        rec = np.frombuffer(buf, dtype=REC)[0]
        if int(rec["state"]) != COMPLETE or _rec_crc(rec, i) != int(rec["rcrc"]):
            return None
        if self._rejected.get(i) == (int(rec["chunk"]), int(rec["offset"])):
            return None  # the very record this process found corrupt
        return rec

    def _refresh(self, i: int) -> bool:
        """Re-read record i from index.bin (another process may have completed it)."""
        rec = self._disk_record(i)
        if rec is None:
            return False
        self._index[i] = rec
        return True

    def is_complete(self, i: int) -> bool:
        self._fds()
        return int(self._index[i]["state"]) == COMPLETE or self._refresh(i)

    def count_complete(self) -> int:
        """Complete samples, re-reading the index file (sees other processes' progress)."""
        self._fds()
        recs = np.fromfile(self.dir / "index.bin", dtype=REC, count=self.n)
        ok = self._valid_mask(recs)
        for i, where in list(self._rejected.items()):
            if ok[i] and (int(recs[i]["chunk"]), int(recs[i]["offset"])) == where:
                ok[i] = False
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
        """Sample i as (H, W, 3) uint8, or None if absent, failing its checksum or stale (then it is rebuilt)."""
        self._fds()
        rec = self._index[i]
        if int(rec["state"]) != COMPLETE:
            if not self._refresh(i):
                return None
            rec = self._index[i]
        if self.source_check != "off" and not self._src_ok[i] and not self.source_unchanged(i):
            return None
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

    def source_unchanged(self, i: int) -> bool:
        """Is stored sample i still the decode of its source file?  Checked once per process.

        One stat; the file's bytes are read (and crc'd) only when the stat differs or
        source_check="hash".  Equal bytes under a new stat renew the stamp; other bytes
        mark the sample not complete in this process, so it is decoded and stored again.
        """
        rec = self._index[i]
        old = _stamp_of(rec)
        if old is None or not hasattr(self.source, "stat"):  # a dataset item: no file to compare
            self._src_ok[i] = True
            return True
        try:
            now = self.source.stat(i)
            if self.source_check == "hash" or not now.same_file(old):
                now = self.source.content_stamp(i)
                self.stats["source_rereads"] += 1
        except OSError:
            now = None  # gone or unreadable now: decode it again (a corrupt source is reported there)
        if now is not None and (now.crc is None or now.crc == old.crc):
            if not now.same_file(old):
                self._restamp(i, now._replace(crc=old.crc))
            self._src_ok[i] = True
            return True
        log.info("store %s: the source of sample %d (%s) changed since it was stored; decoding it again",
                 self.dir, i, self.source.describe(i))
        self.stats["source_changed"] += 1
        with self._mu:
            where = (int(rec["chunk"]), int(rec["offset"]))
            self._index[i]["state"] = 0
            self._verified[i] = False
            if not self.readonly:  # on disk too: a stale decode is no longer "complete" for anyone
                with self._locked():
                    disk = self._disk_record(i)
                    if disk is not None and (int(disk["chunk"]), int(disk["offset"])) == where:
                        try:
                            os.pwrite(self._index_fd, bytes(REC.itemsize), i * REC.itemsize)
                        except OSError as e:
                            raise _write_error(e, self.dir, self.dir / "index.bin", REC.itemsize) from e
        return False

    def _restamp(self, i: int, stamp: Stamp) -> None:
        """The source file's stat changed but not its bytes (a touch, a copy): record the new stamp."""
        with self._mu:
            mine = self._index[i:i + 1].copy()
            _set_stamp(mine[0], stamp)
            mine[0]["rcrc"] = _rec_crc(mine[0], i)
            if self.readonly:
                self._index[i] = mine[0]
                return
            with self._locked():
                disk = self._disk_record(i)
                if disk is None or (int(disk["chunk"]), int(disk["offset"])) != (int(mine[0]["chunk"]),
                                                                                 int(mine[0]["offset"])):
                    return  # rewritten by someone else meanwhile: leave theirs
                try:
                    os.pwrite(self._index_fd, mine.tobytes(), i * REC.itemsize)
                except OSError as e:
                    raise _write_error(e, self.dir, self.dir / "index.bin", REC.itemsize) from e
                self._index[i] = mine[0]

    def _corrupt(self, i: int, why: str):
        c = int(self._index[i]["chunk"])
        log.warning("store %s: sample %d in %s is corrupt (%s); rebuilding it from %s", self.dir, i,
                    self._chunk_path(c).name, why, self.source.describe(i))
        self.stats["corrupt_store"] += 1
        with self._mu:
            self._rejected[i] = (c, int(self._index[i]["offset"]))
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
    def _stored_elsewhere(self, i: int, stamp: Stamp | None) -> bool:
        """Under the lock: did another process (or thread) commit sample i, from the same source bytes?"""
        rec = self._disk_record(i)
        if rec is None:
            return False
        if _stamp_of(rec) != stamp:
            return False  # stored from other source bytes (or given without a stamp): ours replaces it
        self._index[i] = rec
        self._src_ok[i] = stamp is not None
        return True

    def put_many(self, items) -> int:
        """Append [(i, (H, W, 3) uint8 array, label[, source stamp]), ...] and commit them.  Returns bytes written.

        Samples another process stored meanwhile are not appended again ([Note: one writer per sample]).
        """
        items = [(int(t[0]), np.ascontiguousarray(t[1], dtype=np.uint8), int(t[2]), t[3] if len(t) > 3 else None)
                 for t in items]
        if not items:
            return 0
        for i, a, _, _ in items:
            if a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"sample {i}: expected an (H, W, 3) uint8 array, got shape {a.shape}")
        with self._locked():
            items = [t for t in items if not self._stored_elsewhere(t[0], t[3])]
            if not items:
                return 0
            total = sum(a.nbytes for _, a, _, _ in items)
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
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            except OSError as e:
                raise _write_error(e, self.dir, path, total) from e
            try:
                start = os.fstat(fd).st_size
                offs, pos = [], start
                try:
                    for _, a, _, _ in items:
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
                    raise _write_error(e, self.dir, path, total) from e
            finally:
                os.close(fd)
            recs = np.zeros(len(items), dtype=REC)
            try:
                for k, ((i, a, y, stamp), off) in enumerate(zip(items, offs)):
                    r = recs[k]
                    r["state"], r["chunk"], r["offset"], r["nbytes"], r["label"] = COMPLETE, c, off, a.nbytes, y
                    r["h"], r["w"], r["crc"] = a.shape[0], a.shape[1], zlib.crc32(a)
                    _set_stamp(r, stamp)
                    r["rcrc"] = _rec_crc(r, i)
                    os.pwrite(self._index_fd, recs[k:k + 1].tobytes(), i * REC.itemsize)
                os.fsync(self._index_fd)
            except OSError as e:  # records written so far are complete and valid; the rest are not
                raise _write_error(e, self.dir, self.dir / "index.bin", total) from e
            for k, (i, a, _, stamp) in enumerate(items):
                self._index[i] = recs[k]
                self._verified[i] = True
                self._src_ok[i] = True  # just decoded from the file this stamp describes
                self._rejected.pop(i, None)
            old = self._chunk_fds.pop(c, None)  # reopen: the chunk may have been recreated
            if old is not None:
                os.close(old)
        self.stats["bytes_written"] += total
        self.stats["samples_written"] += len(items)
        return total

    def load_source(self, i: int):
        """Decode sample i: (array, label, source stamp), or (None, -1, None) if corrupt and skipping."""
        try:
            a, y, stamp = self.source.load_stamped(i)
        except CorruptSourceError as e:
            if self.on_corrupt == "raise":
                raise
            if i not in self.skipped:
                log.warning("skipping %s", e.what)
                self.skipped.add(i)
            return None, -1, None
        self.stats["decodes"] += 1
        return a, y, stamp

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
            for k, i, (a, y, stamp) in zip(miss, mi, dec):
                out[k] = (a, y)
                if a is not None:
                    todo[i] = (i, a, y, stamp)  # a duplicate index in one batch is written once
            if write and todo and self.readonly:
                if not self._warned_ro:
                    log.warning("store %s is read-only: samples it lacks are decoded on every read, not stored",
                                self.dir)
                    self._warned_ro = True
            elif write and todo:
                self.put_many(list(todo.values()))
        return out

    def fetch(self, i: int):
        return self.fetch_many([i])[0]


def build_store(root, out=None, *, max_side: int = 160, on_corrupt: str = "raise", workers: int | None = None,
                progress: bool = True, group: int = 64, verify: bool = False,
                source_check: str | None = None) -> BuildReport:
    """Build (or complete) the store of `root` ahead of time; resumes where a killed build stopped.

    root: an ImageFolder directory (or a map-style dataset); out: store directory
    (default: ~/.cache/memstrata/data/<fingerprint>).  `workers` decode threads
    (PIL releases the GIL while decoding; default: all cores).  Stored samples
    whose source file changed (size, mtime, ctime or inode; see [Note: source
    stamps]) are rebuilt and reported in `changed`.  verify=True also re-reads
    and checks every stored sample (rebuilding corrupt ones) and compares the
    crc of every source file (source_check="hash").  One build per store at a
    time: a second one waits for the first, then finds nothing left to do.
    """
    t0 = time.perf_counter()
    store = SampleStore(out, root, max_side=max_side, on_corrupt=on_corrupt, verify="always" if verify else "first",
                        source_check=source_check or ("hash" if verify else "stat"))
    try:
        with store.builder():
            return _build(store, t0, workers, progress, group, verify)
    finally:
        store.close()


def _build(store: SampleStore, t0: float, workers, progress: bool, group: int, verify: bool) -> BuildReport:
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress_bar as _progress

    n = store.n
    store.count_complete()  # what other processes finished while this one waited
    done = np.array([store.is_complete(i) for i in range(n)])
    workers = workers if workers is not None else (os.cpu_count() or 1)
    written0 = store.stats["samples_written"], store.stats["bytes_written"]
    changed: list = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        if store.source_check != "off":  # one stat per stored sample (stat releases the GIL: in threads)
            stored = np.flatnonzero(done).tolist()
            parts = [stored[s:s + 1024] for s in range(0, len(stored), 1024)]
            for part, ok in zip(parts, pool.map(lambda p: [store.source_unchanged(i) for i in p], parts)):
                changed += [i for i, good in zip(part, ok) if not good]
            done[changed] = False
        verified, failed = None, []
        if verify:
            stored = np.flatnonzero(done).tolist()
            verified = len(stored)
            for i in stored:
                if store.get(i) is None:
                    done[i] = False
                    failed.append(i)
        todo = np.flatnonzero(~done)
        if len(todo) and store.readonly:
            raise store._readonly_error(f"cannot store the {len(todo)} of {n} samples it lacks")
        with _progress(progress and len(todo) > 0, len(todo), f"building store {store.dir}") as bar:
            for s in range(0, len(todo), group):
                ids = todo[s:s + group].tolist()
                dec = list(pool.map(store.load_source, ids))
                store.put_many([(i, a, y, stamp) for i, (a, y, stamp) in zip(ids, dec) if a is not None])
                bar.advance(len(ids))
    complete = store.count_complete()
    return BuildReport(directory=str(store.dir), samples=n, complete=complete,
                       built=store.stats["samples_written"] - written0[0], skipped=tuple(sorted(store.skipped)),
                       bytes=store.stats["bytes_written"] - written0[1], seconds=time.perf_counter() - t0,
                       verified=verified, verify_failed=tuple(failed), changed=tuple(sorted(changed)))
