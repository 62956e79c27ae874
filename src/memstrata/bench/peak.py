"""Peak memory of one benchmark run, measured independently of memstrata.

CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; the
baseline is `memory_allocated` right before the timed steps.

CPU: the peak resident set of the process above a baseline.  The kernel keeps a
high-water mark of the resident set (VmHWM in /proc/self/status); writing "5"
to /proc/self/clear_refs resets it to the current resident set (Linux >= 4.0).
Where that is not possible a thread polls the resident set through psutil every
millisecond (it can miss a peak shorter than that; the report says which method
was used).

[Note: allocator-held memory] glibc keeps freed memory in its arenas, and
with its default (dynamic) thresholds tensors up to 32 MiB come from the heap,
whose high-water mark depends on fragmentation: on ResNet-18 it read 540-580
MiB for a step whose live tensors peak at 365 MiB, with a spread that hides
the differences between contenders.  So on CPU the worker measures twice:

- during the timed steps, with glibc's defaults (the timing is what users
  get): ``peak_rss_default_bytes``, fragmentation included;
- the last warm-up step, in a process started with `EXACT_ENV` (every
  allocation above 64 KiB its own mapping, returned on free): the resident
  set then follows the live tensors, and this is ``peak_bytes``.  The
  thresholds cannot usefully be changed later (free chunks already in the
  heap would be reused), so the worker starts in this mode, measures, then
  switches to `use_default_host_allocator` for the timed steps (the first
  of which grows the heap again; the median step time absorbs that).

`PeakMeter.start` runs `gc.collect()` and `malloc_trim(0)` first, which hands
every free page back to the kernel, so the baseline is what is live right
before the measured steps.

    >>> import torch
    >>> m = PeakMeter(torch.device("cpu"))
    >>> m.start()
    >>> x = torch.ones(50_000_000)     # 200 MB, touched
    >>> del x
    >>> r = m.stop()
    >>> r.peak_bytes >= 190e6
    True
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from dataclasses import dataclass

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclass(frozen=True)
class PeakReading:
    peak_bytes: int  # high-water mark above the baseline
    peak_total_bytes: int  # high-water mark, absolute
    baseline_bytes: int  # what was live when the meter started
    method: str  # "cuda.max_memory_allocated", "VmHWM" or "psutil-poll"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss


def anon_rss() -> int:
    """Anonymous resident memory (heap, mmapped tensors); excludes file-backed code pages."""
    v = _status_kib("RssAnon")
    return v if v is not None else current_rss()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
EXACT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def exact_host_allocator_active() -> bool:
    """True when this process was started with `EXACT_ENV` (glibc reads it at start-up only)."""
    return all(os.environ.get(k) == v for k, v in EXACT_ENV.items())


def use_default_host_allocator() -> bool:
    """Give glibc back thresholds like its defaults after they have adapted.

    glibc raises its mmap threshold dynamically, up to 32 MiB, when mapped
    chunks are freed (and the trim threshold to twice that); a training loop
    reaches that ceiling within a step, so these static values are what a
    process started without `EXACT_ENV` runs with in its steady state.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20) == 1
    except (OSError, AttributeError):
        return False


def trim_host_allocator() -> None:
    """Return free heap pages to the kernel (glibc only; a no-op elsewhere)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark to the current RSS."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class _Poller(threading.Thread):
    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True, name="memstrata-bench-rss-poll")
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop_evt = threading.Event()
        self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._stop_evt.is_set():
            rss = self._proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            time.sleep(self._interval)

    def finish(self) -> int:
        self._stop_evt.set()
        self.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


class PeakMeter:
    """start() right before the timed steps, stop() right after."""

    def __init__(self, device: torch.device, force_poll: bool = False) -> None:
        self.device = torch.device(device)
        self.force_poll = force_poll
        self._baseline = 0
        self._method = ""
        self._poller: _Poller | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gc.collect()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self._method = "cuda.max_memory_allocated"
            return
        trim_host_allocator()
        if not self.force_poll and reset_hwm():
            self._baseline = current_rss()
            self._method = "VmHWM"
        else:
            self._poller = _Poller()
            self._baseline = self._poller.peak
            self._poller.start()
            self._method = "psutil-poll"

    @property
    def baseline_bytes(self) -> int:
        return self._baseline

    def stop(self) -> PeakReading:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            total = torch.cuda.max_memory_allocated(self.device)
        elif self._poller is not None:
            total = self._poller.finish()
            self._poller = None
        else:
            total = _status_kib("VmHWM") or current_rss()
        return PeakReading(max(0, total - self._baseline), total, self._baseline, self._method)
