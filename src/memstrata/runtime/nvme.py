"""NVMe store: offloaded activations as files under a configured directory.

One file per offloaded storage per step, written and read by a thread pool
(`concurrent.futures`), so file I/O overlaps compute.  Files are opened with
O_DIRECT where the file system accepts it (ext4, xfs); the page cache would
otherwise turn "NVMe" into a second copy in DRAM and make timings meaningless.
O_DIRECT needs the buffer address, the length and the file offset aligned to
the logical block size: every buffer comes from `pool.aligned_empty` (4 KiB
aligned, length rounded up) and files are written in whole 4 KiB blocks.
Where O_DIRECT is refused (tmpfs, overlayfs, some network file systems: open()
or the first write fails with EINVAL) the store falls back to buffered I/O and
says so in `NVMeStore.direct` / `describe()`.

[Note: NVMe file lifetime]
A file is created by the write job started at eviction, and removed by the
read job right after its bytes are back in memory (the step no longer needs
it), or, if the activation is released without ever being read (no backward),
by an unlink job queued behind the write.  Jobs run FIFO, so an unlink never
overtakes the write it follows.  The store lives in a private subdirectory
(`memstrata-<pid>-<random>`) that `close()` removes, so a crash leaves at most
that one directory behind.

[Note: up-front validation]
`NVMeStore(directory, required_bytes=...)` refuses to start (NVMeDirectoryError,
nothing left behind) when the directory is missing, not a directory, not
writable, or lacks `required_bytes` (+ a safety margin) of free space.  Free
space is checked twice: `shutil.disk_usage`, then by asking the file system to
reserve the bytes (`posix_fallocate` on a probe file, capped at
`_FALLOCATE_PROBE_CAP` because file systems without fallocate emulate it by
writing zeros), which also catches quotas that disk_usage does not show.

[Note: read and write lanes]
The state buckets' files (`open_file`, `submit_pread`, `submit_pwrite`) are
read and written by two separate thread pools of ``workers // 2`` threads
each.  With one FIFO pool a read that the optimizer step is about to wait for
queued behind every write-behind chunk submitted before it (a bucket's write
is 4 chunks of 8 MiB); with lanes the disk always has a read and a write in
flight and the read is never last in line.  The activation path (`submit_write`,
`submit_read`) keeps the single FIFO pool: its unlink-after-write ordering
relies on it ([Note: NVMe file lifetime]).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from ..hardware import format_size
from .errors import NVMeDirectoryError, NVMeIOError
from .pool import ALIGN, aligned_empty, round_up

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_SAFETY_MARGIN = 64 * 1024 * 1024  # bytes kept free beyond what the plan needs
_FALLOCATE_PROBE_CAP = 4 * 1024**3


def check_directory(directory: str | os.PathLike, required_bytes: int = 0) -> str:
    """Validate an NVMe directory without writing to it; returns its absolute path."""
    path = os.path.abspath(os.fspath(directory))
    if not os.path.exists(path):
        raise NVMeDirectoryError(
            f"NVMe directory {path!r} does not exist: create it, or pass nvme_dir=None to plan without the NVMe tier"
        )
    if not os.path.isdir(path):
        raise NVMeDirectoryError(f"NVMe directory {path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise NVMeDirectoryError(f"NVMe directory {path!r} is not writable by this process")
    if required_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < required_bytes + _SAFETY_MARGIN:
            raise NVMeDirectoryError(
                f"NVMe directory {path!r} has {format_size(free)} free, the plan needs "
                f"{format_size(required_bytes)} (+{format_size(_SAFETY_MARGIN)} margin) of offloaded activations"
            )
    return path


def _as_memoryview(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def _pwrite_all(fd: int, t: torch.Tensor, offset: int = 0) -> None:
    mv = _as_memoryview(t)
    done = 0
    while done < len(mv):
        k = os.pwritev(fd, [mv[done:]], offset + done)
        if k <= 0:
            raise OSError(errno.EIO, "short write")
        done += k


def _pread_all(fd: int, t: torch.Tensor, nbytes: int, offset: int = 0) -> None:
    mv = _as_memoryview(t)[:nbytes]
    done = 0
    while done < len(mv):
        k = os.preadv(fd, [mv[done:]], offset + done)
        if k <= 0:
            raise OSError(errno.EIO, f"short read ({done} of {len(mv)} bytes)")
        done += k


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_stores(directory: str) -> list[str]:
    """Remove `memstrata-<pid>-*` store directories of processes that no longer run (killed without close)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "memstrata" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        path = os.path.join(directory, name)
        if pid != os.getpid() and not _pid_alive(pid) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class NVMeStore:
    """Files under `directory`, written and read by `workers` threads.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = NVMeStore(d, required_bytes=1 << 20)
    ...     src = torch.arange(10, dtype=torch.float32)
    ...     p = store.new_path(0)
    ...     w = store.submit_write(p, src.view(torch.uint8), 40)
    ...     out = store.submit_read(p, 40, after=w).result()
    ...     torch.equal(out[:40].view(torch.float32), src)
    ...     store.close()
    True
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        required_bytes: int = 0,
        workers: int | None = None,
        direct: bool | None = None,
        pool=None,
    ) -> None:
        self.directory = check_directory(directory, required_bytes)
        self.required_bytes = int(required_bytes)
        self.pool = pool  # HostBufferPool for staging (pinned on CUDA); None = fresh aligned buffers
        remove_stale_stores(self.directory)
        try:
            self.root = tempfile.mkdtemp(prefix=f"memstrata-{os.getpid()}-", dir=self.directory)
        except OSError as e:
            raise NVMeDirectoryError(f"NVMe directory {self.directory!r} is not writable: {e.strerror or e}") from e
        try:
            self.direct = self._probe(direct)
            self._reserve(self.required_bytes)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        n = workers if workers is not None else min(4, max(2, (os.cpu_count() or 2)))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="memstrata-nvme")
        # [Note: read and write lanes]: positioned reads and writes of open files (the state buckets) each
        # get their own threads, so a read the optimizer waits for never queues behind write-behind jobs.
        lane = max(1, n // 2)
        self._read_lane = ThreadPoolExecutor(max_workers=lane, thread_name_prefix="memstrata-nvme-r")
        self._write_lane = ThreadPoolExecutor(max_workers=lane, thread_name_prefix="memstrata-nvme-w")
        self._serial = itertools.count()
        self._lock = threading.Lock()
        self.live_files = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.closed = False
        self._outstanding: set[Future] = set()
        self._open_fds: dict[int, str] = {}  # files of open_file(), closed by close_file() or close()
        self._inflight = 0  # positioned reads/writes running now (busy_seconds: the time this was > 0)
        self._busy_since = 0.0
        self._busy_done = 0.0
        # Ctrl-C or an exception that ends the program without close(): the directory goes at interpreter exit.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)

    # ------------------------------------------------------------------ setup
    def _probe(self, direct: bool | None) -> bool:
        """Write one aligned block; True if O_DIRECT works here.  Errors -> NVMeDirectoryError."""
        probe = os.path.join(self.root, "probe")
        block = aligned_empty(ALIGN)
        block.zero_()
        try_direct = bool(_O_DIRECT) and direct is not False
        if try_direct:
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o600)
                try:
                    _pwrite_all(fd, block)
                finally:
                    os.close(fd)
                os.unlink(probe)
                return True
            except OSError as e:
                if os.path.exists(probe):
                    os.unlink(probe)
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise NVMeDirectoryError(f"cannot write to NVMe directory {self.directory!r}: {e.strerror or e}") from e
                if direct:
                    raise NVMeDirectoryError(f"O_DIRECT was requested but {self.directory!r} refuses it: {e.strerror}") from e
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _pwrite_all(fd, block)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise NVMeDirectoryError(f"cannot write to NVMe directory {self.directory!r}: {e.strerror or e}") from e
        return False

    def _reserve(self, nbytes: int) -> None:
        """Ask the file system for `nbytes` (see [Note: up-front validation])."""
        if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
            return
        probe = os.path.join(self.root, "reserve")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, min(round_up(nbytes), _FALLOCATE_PROBE_CAP))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise NVMeDirectoryError(
                    f"NVMe directory {self.directory!r} cannot hold the plan's {format_size(nbytes)} "
                    f"of offloaded activations: {e.strerror}"
                ) from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise NVMeDirectoryError(f"cannot reserve space in {self.directory!r}: {e.strerror or e}") from e
        finally:
            os.close(fd)
            os.unlink(probe)

    def describe(self) -> str:
        mode = "O_DIRECT" if self.direct else "buffered I/O (O_DIRECT refused by this file system)"
        return f"NVMe store at {self.root} ({mode})"

    # ------------------------------------------------------------------ jobs
    def new_path(self, tag: int | str) -> str:
        return os.path.join(self.root, f"a{tag}-{next(self._serial)}.bin")

    def _flags(self, base: int) -> int:
        return base | (_O_DIRECT if self.direct else 0)

    def submit_write(
        self,
        path: str,
        src: torch.Tensor,
        nbytes: int,
        *,
        event: "torch.cuda.Event | None" = None,
        on_done: Callable[[], None] | None = None,
    ) -> Future:
        """Write the first `nbytes` of uint8 CPU tensor `src` to `path`.

        `event` (CUDA) is synchronized first: the device->host copy into `src`
        must have landed.  `on_done` runs in the worker after the write (success
        or not), e.g. to give a staging buffer back to its pool.
        """
        with self._lock:
            self.live_files += 1
        return self._track(self._pool.submit(self._write_job, path, src, int(nbytes), event, on_done))

    def _write_job(self, path, src, nbytes, event, on_done) -> None:
        staging = None
        try:
            if event is not None:
                event.synchronize()
            data = src
            length = nbytes
            if self.direct:
                length = round_up(nbytes)
                if src.data_ptr() % ALIGN or src.numel() < length:
                    staging = self._staging(nbytes)
                    staging_t = staging.tensor if hasattr(staging, "tensor") else staging
                    staging_t[:nbytes].copy_(src[:nbytes])
                    data = staging_t
            fd = os.open(path, self._flags(os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 0o600)
            try:
                _pwrite_all(fd, data[:length])
            finally:
                os.close(fd)
            with self._lock:
                self.bytes_written += nbytes
        except OSError as e:
            self._unlink_quiet(path)
            raise NVMeIOError(f"writing {format_size(nbytes)} to {path} failed: {e.strerror or e}") from e
        finally:
            if staging is not None and self.pool is not None:
                self.pool.release(staging)
            src = None  # drop the reference to the source (frees it if we held the last one)
            if on_done is not None:
                on_done()

    def _staging(self, nbytes: int):
        if self.pool is not None:
            buf = self.pool.acquire(nbytes)
            if buf.last_use is not None:  # see [Note: buffer reuse] in pool.py
                buf.last_use.synchronize()
                buf.last_use = None
            return buf
        return aligned_empty(nbytes)

    def submit_read(self, path: str, nbytes: int, *, after: Future | None = None, into: Callable[[], object] | None = None) -> Future:
        """Read `path` back; the future's result is the buffer (HostBuffer from `into`, or a fresh aligned tensor).

        Waits for `after` (the write) first and removes the file once read (see
        [Note: NVMe file lifetime]).
        """
        return self._track(self._pool.submit(self._read_job, path, int(nbytes), after, into))

    def _read_job(self, path, nbytes, after, into):
        if after is not None:
            after.result()  # re-raises the write's NVMeIOError
        dest = into() if into is not None else aligned_empty(nbytes)
        t = dest.tensor if hasattr(dest, "tensor") else dest
        length = round_up(nbytes) if self.direct else nbytes
        try:
            fd = os.open(path, self._flags(os.O_RDONLY))
            try:
                _pread_all(fd, t, length)
            finally:
                os.close(fd)
        except OSError as e:
            raise NVMeIOError(f"reading {format_size(nbytes)} from {path} failed: {e.strerror or e}") from e
        finally:
            self._unlink_quiet(path)
        with self._lock:
            self.bytes_read += nbytes
        return dest

    # ------------------------------------------------------------------ files overwritten in place
    # (state buckets: runtime/state_arenas.py, [Note: why arenas and in-place files])
    def open_file(self, tag: int | str) -> tuple[str, int]:
        """A new file of the store, open for positioned reads and writes; `close_file` removes it."""
        path = self.new_path(tag)
        try:
            fd = os.open(path, self._flags(os.O_RDWR | os.O_CREAT | os.O_TRUNC), 0o600)
        except OSError as e:
            raise NVMeIOError(f"creating {path} failed: {e.strerror or e}") from e
        with self._lock:
            self.live_files += 1
            self._open_fds[fd] = path
        return path, fd

    def submit_pwrite(self, fd: int, path: str, src: torch.Tensor, offset: int) -> Future:
        """Write uint8 CPU tensor `src` (aligned, whole blocks under O_DIRECT) at `offset` of an open file."""
        return self._track(self._write_lane.submit(self._pwrite_job, fd, path, src, int(offset)))

    def _busy(self, delta: int) -> None:
        now = time.perf_counter()
        with self._lock:
            if delta > 0 and self._inflight == 0:
                self._busy_since = now
            self._inflight += delta
            if delta < 0 and self._inflight == 0:
                self._busy_done += now - self._busy_since

    @property
    def busy_seconds(self) -> float:
        """Wall seconds with at least one positioned read or write (state buckets) in flight, so far."""
        with self._lock:
            return self._busy_done + (time.perf_counter() - self._busy_since if self._inflight else 0.0)

    def _pwrite_job(self, fd, path, src, offset) -> None:
        self._busy(1)
        try:
            _pwrite_all(fd, src, offset)
        except OSError as e:
            raise NVMeIOError(f"writing {format_size(src.numel())} to {path} failed: {e.strerror or e}") from e
        finally:
            self._busy(-1)
        with self._lock:
            self.bytes_written += src.numel()

    def submit_pread(self, fd: int, path: str, dest: torch.Tensor, offset: int) -> Future:
        """Fill uint8 CPU tensor `dest` from `offset` of an open file."""
        return self._track(self._read_lane.submit(self._pread_job, fd, path, dest, int(offset)))

    def _pread_job(self, fd, path, dest, offset) -> None:
        self._busy(1)
        try:
            _pread_all(fd, dest, dest.numel(), offset)
        except OSError as e:
            raise NVMeIOError(f"reading {format_size(dest.numel())} from {path} failed: {e.strerror or e}") from e
        finally:
            self._busy(-1)
        with self._lock:
            self.bytes_read += dest.numel()

    def close_file(self, path: str, fd: int) -> None:
        with self._lock:
            known = self._open_fds.pop(fd, None) is not None
        if known:
            os.close(fd)
            self._unlink_quiet(path)

    def submit_unlink(self, path: str, *, after: Future | None = None) -> Future | None:
        try:
            return self._track(self._pool.submit(self._unlink_job, path, after))
        except RuntimeError:  # pool already shut down (interpreter exit): unlink here
            self._unlink_job(path, after)
            return None

    def _track(self, fut: Future) -> Future:
        with self._lock:
            self._outstanding.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._outstanding.discard(fut)

    def _unlink_job(self, path, after) -> None:
        if after is not None:
            try:
                after.result()
            except Exception:
                pass
        self._unlink_quiet(path)

    def _unlink_quiet(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        with self._lock:
            self.live_files -= 1

    def files(self) -> list[str]:
        """Files currently in the store (for tests and reports)."""
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []

    def drain(self) -> None:
        """Wait for every job submitted so far (errors are left to their owners)."""
        with self._lock:
            pending = list(self._outstanding)
        for f in pending:
            try:
                f.result()
            except Exception:
                pass

    def close(self) -> None:
        """Finish pending jobs and remove the store's directory."""
        if self.closed:
            return
        self.closed = True
        self._pool.shutdown(wait=True)
        self._read_lane.shutdown(wait=True)
        self._write_lane.shutdown(wait=True)
        with self._lock:
            fds, self._open_fds = list(self._open_fds), {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self._finalizer.detach()

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass
