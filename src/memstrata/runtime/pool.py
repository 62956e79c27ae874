"""Host buffer pool: pinned on CUDA, plain (but page-aligned) host memory without it.

Buffers are uint8 tensors whose data pointer is aligned to `ALIGN` bytes and
whose length is a multiple of `ALIGN`, so the NVMe store can hand them to
O_DIRECT reads and writes.  A training step repeats the same allocation sizes,
so free lists keyed by exact (rounded) size give perfect reuse from the second
step on.

[Note: buffer reuse]
A buffer may still be read or written by an in-flight copy when it is given
back.  `release(buf, event)` stores the event of the last GPU copy that touches
it; whoever reuses it first waits on that event: a GPU copy with
`stream.wait_event` (no host sync), a host writer (the NVMe read thread) with
`event.synchronize()`.  Host-only users (the NVMe write thread) release with
no event once their syscall returned.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

ALIGN = 4096  # O_DIRECT needs buffer address, length and file offset aligned to the logical block size


def round_up(n: int, align: int = ALIGN) -> int:
    return (int(n) + align - 1) // align * align


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of `round_up(nbytes)` bytes whose data pointer is ALIGN-aligned."""
    n = round_up(max(nbytes, 1))
    raw = torch.empty(n + ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off : off + n]


class HostBuffer:
    """One pooled buffer; `last_use` is the event of the last GPU copy touching it."""

    __slots__ = ("tensor", "last_use")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.last_use: "torch.cuda.Event | None" = None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()


class HostBufferPool:
    """Size-keyed free lists of aligned host buffers (pinned when `pin`)."""

    def __init__(self, *, pin: bool) -> None:
        self.pin = bool(pin)
        self._free: dict[int, list[HostBuffer]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocated_bytes = 0  # bytes ever allocated and still owned by the pool or its users
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0

    def acquire(self, nbytes: int) -> HostBuffer:
        """A buffer of at least `nbytes` (rounded up to ALIGN).  Caller handles `last_use`."""
        n = round_up(max(nbytes, 1))
        with self._lock:
            lst = self._free.get(n)
            buf = lst.pop() if lst else None
            self.in_use_bytes += n
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            if buf is None:
                self.allocated_bytes += n
        if buf is None:
            buf = HostBuffer(aligned_empty(n, pin=self.pin))
        return buf

    def release(self, buf: HostBuffer, event: "torch.cuda.Event | None" = None) -> None:
        """Give `buf` back; `event` (if any) marks the end of the last GPU copy using it."""
        if event is not None:
            buf.last_use = event
        with self._lock:
            self.in_use_bytes -= buf.nbytes
            self._free[buf.nbytes].append(buf)

    def clear(self) -> None:
        """Drop every free buffer (memory goes back to the allocator)."""
        with self._lock:
            for lst in self._free.values():
                for b in lst:
                    self.allocated_bytes -= b.nbytes
            self._free.clear()
