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
  ``record_stream`` (see [Note: stream hand-offs] in activations.py).

Without CUDA there are no streams: host copies are synchronous memcpy's on the
calling thread (they are the "device" copies of the CPU tier) and file I/O runs
on the NVMe store's thread pool.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TensorEvent(NamedTuple):
    """A tensor and the event after which its contents are valid (None = valid now)."""

    tensor: torch.Tensor
    event: "torch.cuda.Event | None"


class CopyContext:
    """All streams of one device, created once per runtime.

    >>> ctx = CopyContext(torch.device("cpu"))
    >>> ctx.cuda, ctx.d2h, ctx.h2d
    (False, None, None)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.cuda:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            # d2h: evictions during the forward (see [Note: copy streams]).
            self.d2h: torch.cuda.Stream | None = torch.cuda.Stream(self.device)
            # h2d: prefetches during the backward; compute waits on its events,
            # so it gets the highest priority the device offers.
            lo, hi = torch.cuda.Stream.priority_range()
            self.h2d: torch.cuda.Stream | None = torch.cuda.Stream(self.device, priority=hi)
        else:
            self.d2h = None
            self.h2d = None

    def compute_stream(self) -> "torch.cuda.Stream | None":
        """The stream compute is issuing to right now (None without CUDA)."""
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def synchronize(self) -> None:
        if self.cuda:
            assert self.d2h is not None and self.h2d is not None
            self.d2h.synchronize()
            self.h2d.synchronize()
