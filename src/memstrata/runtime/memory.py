"""Measuring tier-0 memory honestly.

* CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at the
  step start: every byte the caching allocator handed out during the step
  (activations, temporaries, gradients, parameters), independent of memstrata's
  own accounting.
* CPU: PyTorch's CPU allocator is glibc malloc, so `mallinfo2()` (bytes in use
  in all arenas + mmapped chunks) is the process's live heap.  It is cheap
  enough (0.5 us .. 0.1 ms: it walks the arenas' free lists) to sample at every
  unit boundary and, rate-limited, at packs and unpacks; the reported
  figure is the sampled peak *above the heap at the step start*, so it misses
  transients inside a single op and includes memstrata's own host buffers (on
  a CPU box the "host" tier is the same RAM).  Unavailable (None) off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load() -> Callable[[], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []

    def heap_in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return heap_in_use


heap_in_use: Callable[[], int] | None = _load()
