"""measure — probe the machine we are on into a `Hierarchy`.

`probe()` measures, in well under 20 s:

* tier 0 — GPU HBM when CUDA works (free bytes from `torch.cuda.mem_get_info`),
  else host DRAM (`psutil` available memory);
* host DRAM below HBM on CUDA machines, *pinned*: pinned host -> device copy
  bandwidth (a prefetch, the tier's `read_bandwidth`) and device -> pinned host
  (an eviction, `write_bandwidth`), timed with CUDA events;
* a disk tier at `nvme_dir` when one is given: free bytes (`shutil.disk_usage`)
  and sequential write / read bandwidth of a scratch file, with `O_DIRECT` and
  page-aligned (mmap-allocated) buffers so the page cache does not flatter the
  figures.  Where the file system refuses `O_DIRECT` (tmpfs, some overlays) it
  falls back to buffered writes + `fsync` and drops the file from the page
  cache with `posix_fadvise(DONTNEED)` before reading; which one was used is
  recorded (`ProbeResult.details["disk"]["io"]`).  The scratch file is always
  removed;
* the compute roofline: dense matmul FLOP/s (bf16 on CUDA, fp32 on CPU — the
  dtypes the named profiles are meant for), tier-0 copy bandwidth, and the
  per-op launch overhead.

[Note: probe caching]
Bandwidths and FLOP/s are properties of the machine and cost seconds to
measure, so they are cached as JSON in
``$XDG_CACHE_HOME/memstrata/probe-<hostname>-<device>.json`` (``~/.cache`` when
unset), one entry per disk directory (the key is the resolved path, ``""`` for
no disk tier).  Capacities (free HBM, available RAM, free disk) change from
minute to minute and cost microseconds, so they are re-read on every call even
on a cache hit.  `cache=False` re-measures and rewrites the entry.

[Note: probe capacities]
A tier's capacity is what memstrata may use: 90% of the free bytes seen now
(HBM, RAM, disk), leaving room for the CUDA context, the process itself and the
OS.  Tier 0's capacity is a ceiling for a budget, not a budget.

Example (what lives where: nothing — the probe only measures)::

    >>> from memstrata.probe import probe
    >>> h = probe("/mnt/nvme")          # doctest: +SKIP
    >>> [t.name for t in h.tiers]       # doctest: +SKIP
    ['hbm', 'dram', 'nvme']
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hardware import Hierarchy, Tier

#: Fraction of the free bytes of a tier that memstrata may use ([Note: probe capacities]).
CAPACITY_FRACTION = 0.9
#: Bump when the measurement method changes, so old cache entries are ignored.
PROBE_VERSION = 1

_DISK_BLOCK = 8 * 1024 * 1024  # bytes per write/read call: large, sequential, aligned
_DISK_MAX_BYTES = 1024**3  # at most this much scratch data per probe
_ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the logical block


class ProbeInputError(ValueError):
    """Bad arguments to the probe (a missing or read-only directory, a non-positive time bound)."""


@dataclass
class ProbeResult:
    """A probed hierarchy plus how it was obtained."""

    hierarchy: Hierarchy
    details: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    cache_path: str | None = None
    seconds: float = 0.0  # wall time of this call

    def to_dict(self) -> dict[str, Any]:
        top = self.hierarchy.tiers[0]
        return {
            "hierarchy": self.hierarchy.to_dict(),
            # tier 0's read/write bandwidth and latency are 0.0 in the hierarchy: not measured, not slow
            "not_measured": {top.name: "read_bandwidth, write_bandwidth, latency: the top tier has no faster tier "
                                       "to copy to; its memory traffic is hierarchy.fast_bandwidth"},
            "details": self.details,
            "cached": self.cached,
            "cache_path": self.cache_path,
            "seconds": self.seconds,
        }


def probe(nvme_dir: str | os.PathLike | None = None, *, cache: bool = True, max_seconds: float = 20) -> Hierarchy:
    """Measure this machine into a `Hierarchy` (cached; see [Note: probe caching]).

    nvme_dir: a directory on the disk to use as the lowest tier, or None for
    no disk tier.  max_seconds bounds the measurement (default 20 s; the probe
    aims at about a third of it).
    """
    return probe_report(nvme_dir, cache=cache, max_seconds=max_seconds).hierarchy


def probe_report(
    nvme_dir: str | os.PathLike | None = None, *, cache: bool = True, max_seconds: float = 20
) -> ProbeResult:
    """Like `probe()`, but also says what was measured, how, and whether it came from the cache."""
    t0 = time.perf_counter()
    if max_seconds <= 0:
        raise ProbeInputError(f"max_seconds must be > 0, got {max_seconds}")
    disk_key = ""
    if nvme_dir is not None:
        p = Path(nvme_dir).expanduser()
        if not p.is_dir():
            raise ProbeInputError(f"--nvme directory {str(nvme_dir)!r} does not exist or is not a directory")
        if not os.access(p, os.W_OK):
            raise ProbeInputError(f"--nvme directory {str(nvme_dir)!r} is not writable")
        disk_key = str(p.resolve())

    cuda = _cuda_ok()
    device_label = _device_label(cuda)
    path = cache_file(device_label)

    entry = _read_cache(path, disk_key) if cache else None
    cached = entry is not None
    if entry is None:
        entry = _measure(cuda, disk_key or None, max_seconds)
        _write_cache(path, disk_key, entry)
    hierarchy = _assemble(entry, cuda, disk_key or None)
    details = dict(entry["details"])
    details["capacities_read_at"] = time.time()
    return ProbeResult(hierarchy, details, cached, str(path), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- cache


def cache_file(device_label: str | None = None) -> Path:
    """Where probe results for this host and device are cached."""
    if device_label is None:
        device_label = _device_label(_cuda_ok())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memstrata"
    host = _slug(socket.gethostname() or "host")
    return root / f"probe-{host}-{_slug(device_label)}.json"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-").lower() or "x"


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        entry = data["entries"][key]
        if entry.get("version") != PROBE_VERSION:
            return None
        return entry
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("entries"), dict):
                raise ValueError
        except (OSError, ValueError, AttributeError):
            data = {"entries": {}}
        data["entries"][key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename: a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache we cannot write is not an error: the next call measures again


# ----------------------------------------------------------------------------- environment


def _cuda_ok() -> bool:
    """True when a CUDA device is present *and* usable (a CUDA build on a CPU box says False)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        torch.cuda.mem_get_info()  # raises when the driver is broken
        return True
    except Exception:
        return False


def _device_label(cuda: bool) -> str:
    if cuda:
        import torch

        return "cuda-" + torch.cuda.get_device_name()
    return "cpu"


def _capacities(cuda: bool, disk_dir: str | None) -> dict[str, int]:
    import psutil

    caps = {"dram": int(psutil.virtual_memory().available * CAPACITY_FRACTION)}
    if cuda:
        import torch

        free, _total = torch.cuda.mem_get_info()
        caps["hbm"] = int(free * CAPACITY_FRACTION)
    if disk_dir is not None:
        caps["nvme"] = int(shutil.disk_usage(disk_dir).free * CAPACITY_FRACTION)
    return caps


def _assemble(entry: dict[str, Any], cuda: bool, disk_dir: str | None) -> Hierarchy:
    """Build the hierarchy from cached/measured rates and capacities read now."""
    caps = _capacities(cuda, disk_dir)
    m = entry["rates"]
    tiers: list[Tier] = []
    if cuda:
        tiers.append(Tier("hbm", "hbm", capacity=caps["hbm"]))
        tiers.append(
            Tier(
                "dram",
                "pinned_dram",
                capacity=caps["dram"],
                read_bandwidth=m["h2d_bandwidth"],
                write_bandwidth=m["d2h_bandwidth"],
                latency=m["copy_latency"],
            )
        )
    else:
        tiers.append(Tier("dram", "dram", capacity=caps["dram"]))
    if disk_dir is not None:
        tiers.append(
            Tier(
                "nvme",
                "nvme",
                capacity=caps["nvme"],
                read_bandwidth=m["disk_read_bandwidth"],
                write_bandwidth=m["disk_write_bandwidth"],
                latency=m["disk_latency"],
                path=disk_dir,
            )
        )
    d = entry["details"]
    src = f"probe of {d['host']} ({d['device_name']}, {d['compute_dtype']} matmul)"
    if disk_dir is not None:
        src += f"; disk {d['disk']['io']} at {disk_dir}"
    return Hierarchy(
        name=f"probe:{d['host']}",
        device="cuda" if cuda else "cpu",
        tiers=tuple(tiers),
        peak_flops=m["peak_flops"],
        fast_bandwidth=m["fast_bandwidth"],
        kernel_overhead=m["kernel_overhead"],
        source=src,
    )


# ----------------------------------------------------------------------------- measuring


def _measure(cuda: bool, disk_dir: str | None, max_seconds: float) -> dict[str, Any]:
    """Measure all rates.  Phases get slices of `max_seconds`; the total stays well inside it."""
    import torch

    start = time.perf_counter()
    # Each loop below stops at its slice; fixed costs (allocation, warm-up,
    # fsync) come on top, so the slices add up to well under the whole.
    budget = float(max_seconds)
    rates: dict[str, float] = {}
    details: dict[str, Any] = {
        "host": socket.gethostname(),
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "torch": torch.__version__,
        "measured_at": time.time(),
        "max_seconds": max_seconds,
        "capacity_fraction": CAPACITY_FRACTION,
    }

    flops, dtype, overhead = _compute_rate(cuda, 0.10 * budget)
    rates["peak_flops"] = flops
    rates["kernel_overhead"] = overhead
    details["compute_dtype"] = dtype
    rates["fast_bandwidth"] = _fast_copy_rate(cuda, 0.06 * budget)
    if cuda:
        h2d, d2h, lat = _pinned_copy_rates(0.12 * budget)
        rates.update(h2d_bandwidth=h2d, d2h_bandwidth=d2h, copy_latency=lat)
    if disk_dir is not None:
        w, r, lat, io, nbytes = _disk_rates(disk_dir, 0.14 * budget, 0.10 * budget)
        rates.update(disk_write_bandwidth=w, disk_read_bandwidth=r, disk_latency=lat)
        details["disk"] = {"io": io, "bytes": nbytes, "path": disk_dir}
    details["measure_seconds"] = time.perf_counter() - start
    return {"version": PROBE_VERSION, "rates": rates, "details": details}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    import platform

    return (platform.processor() or platform.machine() or "cpu") + f" x{os.cpu_count()}"


def _compute_rate(cuda: bool, seconds: float) -> tuple[float, str, float]:
    """(dense matmul FLOP/s, dtype, seconds per tiny op launch)."""
    import torch

    if cuda:
        dev, dtype, n = "cuda", torch.bfloat16, 8192
    else:
        dev, dtype, n = "cpu", torch.float32, 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)

    def timed(iters: int) -> float:
        _sync(cuda)
        t = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        _sync(cuda)
        return time.perf_counter() - t

    per = max(timed(1), 1e-6)  # warm-up, also an estimate of one call
    best = float("inf")
    deadline = time.perf_counter() + seconds * 0.85
    iters = max(1, min(50, int(seconds * 0.2 / per)))
    while True:  # best of several batches: the least disturbed by neighbours
        best = min(best, timed(iters) / iters)
        if time.perf_counter() + iters * per > deadline:
            break
    flops = 2.0 * n**3 / best

    # Launch overhead: a tiny op, many times (the roofline's per-op floor).
    x = torch.zeros(16, device=dev)
    _sync(cuda)
    k = 200
    samples = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(k):
            x.add_(1.0)
        _sync(cuda)
        samples.append((time.perf_counter() - t) / k)
    return flops, str(dtype).replace("torch.", ""), min(samples)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _fast_copy_rate(cuda: bool, seconds: float) -> float:
    """Tier-0 memory traffic (bytes read + written per second) of a large copy."""
    import torch

    dev = "cuda" if cuda else "cpu"
    n = (1024 if cuda else 128) * 1024 * 1024
    if cuda:  # two buffers: stay well inside free HBM on small or busy cards
        n = max(16 * 1024 * 1024, min(n, torch.cuda.mem_get_info()[0] // 8))
    src = torch.ones(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, faults the pages in
    _sync(cuda)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for _ in range(50):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(cuda)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n / best


def _pinned_copy_rates(seconds: float) -> tuple[float, float, float]:
    """(pinned -> device B/s, device -> pinned B/s, small-copy latency s), timed with CUDA events."""
    import torch

    n = max(16 * 1024 * 1024, min(256 * 1024 * 1024, torch.cuda.mem_get_info()[0] // 8))
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()  # a side stream, as the runtime's copy lanes use

    def rate(dst: Any, src: Any, nbytes: int, slice_s: float) -> float:
        best = float("inf")
        deadline = time.perf_counter() + slice_s
        with torch.cuda.stream(stream):
            dst[:nbytes].copy_(src[:nbytes], non_blocking=True)  # warm-up
            for _ in range(20):
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record(stream)
                dst[:nbytes].copy_(src[:nbytes], non_blocking=True)
                e1.record(stream)
                e1.synchronize()
                best = min(best, e0.elapsed_time(e1) / 1e3)
                if time.perf_counter() > deadline:
                    break
        return nbytes / best

    h2d = rate(dev, host, n, seconds * 0.4)
    d2h = rate(host, dev, n, seconds * 0.4)
    small = 4096
    t_small = small / rate(dev, host, small, seconds * 0.1)  # time of one tiny copy ~ latency
    del host, dev
    return h2d, d2h, t_small


def _aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous mmap: page-aligned, as O_DIRECT requires; filled with incompressible bytes."""
    import numpy as np

    buf = mmap.mmap(-1, nbytes)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    del view
    return buf


def _disk_rates(directory: str, write_s: float, read_s: float) -> tuple[float, float, float, str, int]:
    """(write B/s, read B/s, 4 KiB read latency s, io mode, bytes written) of a scratch file in `directory`."""
    free = shutil.disk_usage(directory).free
    cap = max(_DISK_BLOCK, min(_DISK_MAX_BYTES, int(free * 0.05)) // _DISK_BLOCK * _DISK_BLOCK)
    buf = _aligned_buffer(_DISK_BLOCK)
    fd_tmp, path = tempfile.mkstemp(dir=directory, prefix=".memstrata-probe-", suffix=".bin")
    os.close(fd_tmp)
    try:
        io = "O_DIRECT"
        try:
            written, w_time = _disk_write(path, buf, cap, write_s, direct=True)
        except OSError:
            io = "buffered+fsync+fadvise"
            written, w_time = _disk_write(path, buf, cap, write_s, direct=False)
        r_bytes, r_time, lat = _disk_read(path, buf, written, read_s, direct=(io == "O_DIRECT"))
        return written / w_time, r_bytes / r_time, lat, io, written
    finally:
        buf.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _open(path: str, flags: int, direct: bool) -> int:
    if direct:
        if not hasattr(os, "O_DIRECT"):
            raise OSError("O_DIRECT is not available on this platform")
        flags |= os.O_DIRECT
    return os.open(path, flags)


def _disk_write(path: str, buf: mmap.mmap, cap: int, seconds: float, direct: bool) -> tuple[int, float]:
    fd = _open(path, os.O_WRONLY | os.O_TRUNC, direct)
    try:
        written = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while written < cap:
            n = os.write(fd, buf)
            if n != len(buf):
                raise OSError(f"short write ({n} of {len(buf)} bytes)")
            written += n
            if time.perf_counter() > deadline:
                break
        os.fsync(fd)  # counted: the data is on the device when the clock stops
        elapsed = time.perf_counter() - t0
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # so the read below comes from the disk
        return written, elapsed
    finally:
        os.close(fd)


def _disk_read(path: str, buf: mmap.mmap, size: int, seconds: float, direct: bool) -> tuple[int, float, float]:
    fd = _open(path, os.O_RDONLY, direct)
    try:
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # Latency: small aligned reads at spread-out offsets, before the sequential
        # pass so that (buffered mode) they are not served from read-ahead.
        small = memoryview(buf)[:_ALIGN]
        lats = []
        blocks = max(1, size // _ALIGN)
        for i in range(8):
            off = ((i * 7919 + 13) % blocks) * _ALIGN
            t = time.perf_counter()
            os.preadv(fd, [small], off)
            lats.append(time.perf_counter() - t)
        small.release()
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while read < size:
            n = os.preadv(fd, [buf], read)
            if n <= 0:
                break
            read += n
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - t0
        return read, max(elapsed, 1e-9), statistics.median(lats)
    finally:
        os.close(fd)
