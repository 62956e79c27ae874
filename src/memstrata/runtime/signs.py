"""Sign replays: a saved ReLU output whose backward readers need only its sign, kept as one bit per element.

[Note: sign replays]
Some saved activations are read in backward only through their sign pattern:
ReLU's own backward is `threshold_backward(grad, result, 0)` (grad where
result > 0, else 0: it compares, never multiplies), and max-pooling's backward
`max_pool2d_with_indices_backward(grad, self, ..., indices)` reads `self` for
its sizes and memory format only (the indices say where each gradient goes;
so do ATen's CPU and CUDA kernels: `gradInput.zero_()`, then a scatter of
`gradOutput` by `indices`).
A ResNet's stem ReLU output (ResNet-18, b64, 112 px: 49 MiB) is read by
exactly these two.  A replay of it re-ran conv1 + BatchNorm + ReLU in the
backward (the costliest replay of the CPU plan: conv1 alone is ~2% of a step);
a sign replay instead keeps, at its pack, one bit per element of
``x <= 0`` (1.6 MB) and at its first unpack makes a tensor of the same
dtype and geometry holding 0.0 where the bit is set, 1.0 elsewhere.  Both
readers then compute the very same bits: `threshold_backward` sees ``v <= 0``
exactly where the forward value was ``<= 0`` (NaN included: ``NaN <= 0`` is
false, so its bit is clear and its gradient passes, as in the forward), and the
max-pool backward never reads the values.  No capture, no inputs held: the
pack costs one compare and a bit-packing pass, the unpack one table lookup
(priced at twice the ReLU's own time: `simulate.replay_time`).

Which storages qualify is the decision space's call (`DecisionSpace.sign_only`, trace/space.py):
written once in the forward, by ``aten.relu``; read in backward only by
``threshold_backward`` and ``max_pool2d_with_indices_backward``; never read in
the forward by ``aten.threshold`` (whose backward is a `threshold_backward`
with another threshold); a floating dtype.  Otherwise the storage replays its
chain, or is kept.
"""

from __future__ import annotations

import sys

import torch

_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def _table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """256 x 8: byte b -> column i is 0.0 where bit i of b is set (the value was <= 0), else 1.0, in `dtype`."""
    hit = _TABLES.get((device, dtype))
    if hit is None:
        b = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8).unsqueeze(1)
        hit = _TABLES[(device, dtype)] = torch.eq(b & _weights(device), 0).to(dtype)
    return hit


def packed_nbytes(nbytes: int, itemsize: int) -> int:
    """Bytes a sign replay keeps for a storage of `nbytes` (one bit per element, whole bytes)."""
    return (nbytes // itemsize + 7) // 8


class SignBits:
    """One bit per element of a storage, set where the value is <= 0; shared by the storage's packs.

    `value()` makes the 0.0/1.0 storage once and caches it until every pack holding this object is gone
    (autograd frees them after their nodes ran): the same life as a replay's materialised value."""

    __slots__ = ("bits", "numel", "dtype", "device", "_value", "__weakref__")

    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        n = storage.nbytes() // itemsize
        flat = torch.empty(0, dtype=dtype, device=storage.device)
        flat.set_(storage, 0, (n,), (1,))
        padded = (n + 7) // 8 * 8
        with torch.no_grad():
            flags = torch.empty(padded, dtype=torch.bool, device=flat.device)
            flags[n:] = False
            torch.le(flat, 0, out=flags[:n])  # set: the value was <= 0 (so its gradient is 0)
            groups = flags.view(torch.uint8).view(-1, 8)
            if sys.byteorder == "little":
                # eight 0/1 bytes read as one int64; the multiply gathers byte i into bit i of the top byte
                x = groups.view(torch.int64).view(-1)
                bits = ((x * 0x0102040810204080) >> 56).bitwise_and_(0xFF).to(torch.uint8)
            else:  # pragma: no cover - no big-endian box here
                bits = (groups * _weights(flat.device)).sum(1, dtype=torch.uint8)
        self.bits = bits
        self.numel = n
        self.dtype = dtype
        self.device = flat.device
        self._value: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def value(self) -> torch.Tensor:
        """The flat storage of 0.0 / 1.0 (dtype of the forward tensor), made at the first call."""
        if self._value is None:
            with torch.no_grad():
                idx = self.bits.to(torch.int32)
                self._value = torch.index_select(_table(self.device, self.dtype), 0, idx).view(-1)[: self.numel]
            self.bits = self.bits[:0]  # the bits are no longer needed
        return self._value


class SignPacked:
    """What the pack hook stores for a sign-replayed saved tensor: the shared bits and the tensor's view."""

    __slots__ = ("signs", "size", "stride", "offset", "anchor")

    def __init__(self, signs: SignBits, t: torch.Tensor, anchor: int | None) -> None:
        self.signs = signs
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.anchor = anchor

    def unpack(self) -> torch.Tensor:
        flat = self.signs.value()
        out = torch.empty(0, dtype=flat.dtype, device=flat.device)
        out.set_(flat.untyped_storage(), flat.storage_offset() + self.offset, self.size, self.stride)
        return out


__all__ = ["SignBits", "SignPacked", "packed_nbytes"]
