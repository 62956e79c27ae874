"""Streams and (tensor, event) hand-offs: every copy stream memstrata uses is created here.

[Note: copy streams]
Compute runs on the caller's current stream.  Copies between tiers run on two
dedicated streams so that they overlap compute and never wait behind each
other:

* ``d2h`` (evictions, forward): device -> pinned host.  Separate from compute so
  the forward keeps running while activations drain to the host; separate from
  ``h2d`` because PCIe is full duplex: an eviction burst must not delay a
  prefetch the backward is about to wait on.
* ``h2d`` (prefetches, backward): pinned host -> device.  Created with high
  priority, because compute will block on its events; every device buffer a
  prefetch allocates is allocated *on this stream* and handed to compute with
  ``record_stream``.

Without CUDA there are no streams: host copies are synchronous memcpy's on the
calling thread (they are the "device" copies of the CPU tier) and file I/O runs
on the NVMe store's thread pool.

[Note: stream hand-offs]
Every cross-stream hand-off is written once, here, in terms of six primitives
(`wait_stream`, `wait_event`, `record_event`, `copy`, `record_stream`, `empty`)
that a backend carries out: real CUDA streams (`CudaStreams`), synchronous
host copies (`HostStreams`), or a recording fake (`RecordingStreams`) that runs
the CUDA path on CPU tensors and logs every primitive, so the CPU test tier can
check the order that otherwise only a GPU exercises.

* copy down (eviction): (1) d2h waits for compute, so the copy reads the
  finished tensor; (2) d2h waits for the pinned buffer's `last_use` event, so a
  buffer a previous H2D still reads is not overwritten; the copy; (4) an event
  on d2h marks its end; (3) ``src.record_stream(d2h)``, so the caching
  allocator does not recycle the source block before the copy ran.
* copy up (prefetch): (5) h2d waits for the D2H event of the bytes it reads;
  the tier-0 buffer is allocated on h2d; the copy; an event marks its end (the
  pinned buffer is released with it: reuse waits on it, pool.py).
* hand to compute (unpack): (6) compute waits for the H2D event, and
  ``restored.record_stream(compute)``, because the block was allocated on h2d
  but is read and freed on compute.
Nothing here synchronizes the host with the device; only the NVMe write thread
does (it waits for the D2H event before writing the pinned buffer to a file).
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, NamedTuple

import torch

COMPUTE, D2H, H2D = "compute", "d2h", "h2d"


class TensorEvent(NamedTuple):
    """A tensor and the event after which its contents are valid (None = valid now)."""

    tensor: torch.Tensor
    event: Any  # torch.cuda.Event, a RecordingStreams event, or None


class HostStreams:
    """No streams: every primitive is synchronous on the calling thread; there are no events."""

    asynchronous = False  # True: copies complete later, events say when

    def wait_stream(self, stream: str, other: str) -> None:
        pass

    def wait_event(self, stream: str, event: Any) -> None:
        pass

    def record_event(self, stream: str) -> Any:
        return None

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def record_stream(self, tensor: torch.Tensor, stream: str) -> None:
        pass

    def empty(self, stream: str, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


class CudaStreams:
    """The two copy streams of one device ([Note: copy streams])."""

    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # d2h: evictions during the forward.
        self.d2h = torch.cuda.Stream(device)
        # h2d: prefetches during the backward; compute waits on its events, so it gets the highest priority.
        _, hi = torch.cuda.Stream.priority_range()
        self.h2d = torch.cuda.Stream(device, priority=hi)

    def _s(self, stream: str) -> "torch.cuda.Stream":
        if stream == COMPUTE:
            return torch.cuda.current_stream(self.device)
        return self.d2h if stream == D2H else self.h2d

    def wait_stream(self, stream: str, other: str) -> None:
        self._s(stream).wait_stream(self._s(other))

    def wait_event(self, stream: str, event: Any) -> None:
        self._s(stream).wait_event(event)

    def record_event(self, stream: str) -> Any:
        ev = torch.cuda.Event()
        ev.record(self._s(stream))
        return ev

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self._s(stream)):
            dst.copy_(src, non_blocking=True)

    def record_stream(self, tensor: torch.Tensor, stream: str) -> None:
        tensor.record_stream(self._s(stream))

    def empty(self, stream: str, nbytes: int, device: torch.device) -> torch.Tensor:
        with torch.cuda.stream(self._s(stream)):  # allocated on `stream`: its block belongs to that stream
            return torch.empty(nbytes, dtype=torch.uint8, device=device)


class RecordedEvent:
    """An event of `RecordingStreams`: valid at once (copies are synchronous), logged when waited on."""

    __slots__ = ("id", "log")

    def __init__(self, id: int, log: "RecordingStreams") -> None:
        self.id = id
        self.log = log

    def synchronize(self) -> None:  # the NVMe threads' host wait
        self.log.append(("synchronize", "host", self.id, None))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"RecordedEvent({self.id})"


class RecordingStreams(HostStreams):
    """Runs the CUDA hand-off path on CPU tensors and logs every primitive (for the CPU test tier).

    Log entries are (primitive, stream, a, b): buffers by their storage's data
    pointer, events by id.  Copies run at once, so values are exact and the log
    is an execution order the CUDA path would also issue.
    """

    asynchronous = True

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, Any, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def append(self, entry: tuple[str, str, Any, Any]) -> None:
        with self._lock:
            self.entries.append(entry)

    @staticmethod
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def wait_stream(self, stream: str, other: str) -> None:
        self.append(("wait_stream", stream, other, None))

    def wait_event(self, stream: str, event: Any) -> None:
        self.append(("wait_event", stream, event.id, None))

    def record_event(self, stream: str) -> Any:
        ev = RecordedEvent(next(self._ids), self)
        self.append(("record_event", stream, ev.id, None))
        return ev

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)
        self.append(("copy", stream, self.key(dst), self.key(src)))

    def record_stream(self, tensor: torch.Tensor, stream: str) -> None:
        self.append(("record_stream", stream, self.key(tensor), None))

    def empty(self, stream: str, nbytes: int, device: torch.device) -> torch.Tensor:
        t = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.append(("empty", stream, self.key(t), None))
        return t


class CopyContext:
    """All streams of one device, created once per runtime, and the hand-offs between them.

    >>> ctx = CopyContext(torch.device("cpu"))
    >>> ctx.cuda, ctx.asynchronous
    (False, False)
    """

    def __init__(self, device: torch.device | str, streams: HostStreams | CudaStreams | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if streams is None:
            streams = CudaStreams(self.device) if self.cuda else HostStreams()
        self.streams = streams

    @property
    def asynchronous(self) -> bool:
        """True when copies go through streams and events (CUDA, or the recording fake)."""
        return self.streams.asynchronous

    @property
    def d2h(self) -> "torch.cuda.Stream | None":
        return self.streams.d2h if isinstance(self.streams, CudaStreams) else None

    @property
    def h2d(self) -> "torch.cuda.Stream | None":
        return self.streams.h2d if isinstance(self.streams, CudaStreams) else None

    def compute_stream(self) -> "torch.cuda.Stream | None":
        """The stream compute is issuing to right now (None without CUDA)."""
        return torch.cuda.current_stream(self.device) if self.cuda else None

    # ------------------------------------------------------------------ hand-offs ([Note: stream hand-offs])
    def copy_down(self, src: torch.Tensor, buf: Any, nbytes: int) -> Any:
        """Copy tier-0 bytes `src` into host buffer `buf`; the event marking the end of the copy."""
        s = self.streams
        s.wait_stream(D2H, COMPUTE)  # (1)
        if buf.last_use is not None:
            s.wait_event(D2H, buf.last_use)  # (2)
            buf.last_use = None
        s.copy(D2H, buf.tensor[:nbytes], src)
        ev = s.record_event(D2H)  # (4)
        s.record_stream(src, D2H)  # (3)
        return ev

    def copy_up(self, buf: Any, nbytes: int, ready: Any) -> TensorEvent:
        """A fresh tier-0 tensor holding `buf`'s bytes, and the event marking the end of the copy."""
        s = self.streams
        if ready is not None:
            s.wait_event(H2D, ready)  # (5)
        dev = s.empty(H2D, nbytes, self.device)
        s.copy(H2D, dev, buf.tensor[:nbytes])
        return TensorEvent(dev, s.record_event(H2D))

    def hand_to_compute(self, restored: TensorEvent) -> None:
        """Make a restored tensor safe to read and free on the compute stream (6)."""
        if restored.event is not None:
            self.streams.wait_event(COMPUTE, restored.event)
            self.streams.record_stream(restored.tensor, COMPUTE)

    def synchronize(self) -> None:
        if isinstance(self.streams, CudaStreams):
            self.streams.d2h.synchronize()
            self.streams.h2d.synchronize()
