"""Batched training augmentation on the device that holds the batch.

`TrainAugment` is torchvision's RandomResizedCrop + RandomHorizontalFlip +
ToTensor + Normalize (+ optional channels_last), applied to a whole batch of
stored uint8 HWC images at once.  Its randomness is a pure function of
``(seed, epoch, sample index)`` (a counter-based hash, no generator state), so
the crop and flip of a sample do not depend on the batch it lands in, the rank
that reads it, the number of workers, or what else the program draws.

[Note: two resampling paths, one set of parameters]
On CPU, each crop is resized with torch's uint8 channels-last bilinear kernel
(the AVX path torchvision v2 uses; ~60 us for 224x224), then converted
and normalised straight into the (pooled) float output, sample by sample
while the uint8 result is still in cache (see [Note: fused CPU path]; with
numba installed the crop copy (with the flip) and the conversion are compiled
one-pass kernels, same bits: [Note: compiled CPU path]).  On CUDA the batch is padded, normalised and
resampled by one `grid_sample` over per-sample affine grids.  Both use the same
crop boxes and flips; values agree to uint8 rounding when the crop is upsampled
(always the case for stored short sides <= 160 and 224 outputs); the CPU path
antialiases when a crop is downsampled, the grid path does not.  Values differ
from torchvision's full-resolution pipeline because the crop is taken from the
stored (resized) image; the crop *parameters* are RandomResizedCrop's algorithm
evaluated on the stored size.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels as _kernels

__all__ = ["TrainAugment", "crop_params", "flip_params", "uniforms", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_DRAWS = 24  # 10 attempts x 2 + i, j + flip (+1 spare)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices, draws: int = _DRAWS) -> np.ndarray:
    """(len(indices), draws) float64 uniforms in [0, 1), a pure function of (seed, epoch, index, draw)."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        k = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
        k = _mix(k ^ (np.uint64(epoch & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)))
        base = _mix(k ^ (idx * np.uint64(0x9E3779B97F4A7C15)))
        ctr = np.arange(1, draws + 1, dtype=np.uint64) * np.uint64(0xA0761D6478BD642F)
        bits = _mix(base[:, None] ^ ctr[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_params(u: np.ndarray, heights, widths, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """RandomResizedCrop.get_params, vectorised: (B, 4) int64 boxes (top, left, height, width).

    `u` are per-sample uniforms from `uniforms`: columns 2a, 2a+1 drive attempt a
    (scale, log-ratio), column 20 and 21 the offsets.  Same algorithm as
    torchvision (10 attempts, then a central crop clamped to `ratio`).
    """
    H = np.asarray(heights, dtype=np.float64)
    W = np.asarray(widths, dtype=np.float64)
    B = len(H)
    area = H * W
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    out = np.zeros((B, 4), dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    for a in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 2 * a])
        aspect = np.exp(lr0 + (lr1 - lr0) * u[:, 2 * a + 1])
        w = np.round(np.sqrt(target * aspect))
        h = np.round(np.sqrt(target / aspect))
        ok = (~done) & (w > 0) & (w <= W) & (h > 0) & (h <= H)
        out[ok, 2] = h[ok]
        out[ok, 3] = w[ok]
        done |= ok
    # offsets for successful attempts
    hh, ww = out[:, 2].astype(np.float64), out[:, 3].astype(np.float64)
    out[:, 0] = np.floor(u[:, 20] * (H - hh + 1)).astype(np.int64)
    out[:, 1] = np.floor(u[:, 21] * (W - ww + 1)).astype(np.int64)
    # fallback: central crop
    nd = ~done
    if nd.any():
        Hn, Wn = H[nd], W[nd]
        in_ratio = Wn / Hn
        w = Wn.copy()
        h = Hn.copy()
        lo, hi = in_ratio < min(ratio), in_ratio > max(ratio)
        h[lo] = np.round(Wn[lo] / min(ratio))
        w[hi] = np.round(Hn[hi] * max(ratio))
        out[nd, 2], out[nd, 3] = h, w
        out[nd, 0] = (Hn.astype(np.int64) - h.astype(np.int64)) // 2
        out[nd, 1] = (Wn.astype(np.int64) - w.astype(np.int64)) // 2
    return out


def flip_params(u: np.ndarray, p: float = 0.5) -> np.ndarray:
    return u[:, 22] < p


@dataclass(frozen=True)
class TrainAugment:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip + normalise, batched.

    Output: float tensor (B, 3, size, size) on the batch's device, normalised
    with `mean`/`std` (or in [0, 1] if normalize=False); channels_last memory
    format if `channels_last`.  `crop=False` resizes the whole image to `size`
    (no randomness; for evaluation).
    """

    size: int | tuple = 224
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    normalize: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    crop: bool = True

    def __post_init__(self):
        s = self.out_size
        if s[0] <= 0 or s[1] <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 entries, std > 0")

    @property
    def out_size(self) -> tuple:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    def params(self, seed: int, epoch: int, indices, heights, widths):
        """(boxes (B,4) top,left,h,w; flips (B,) bool) for these samples at this epoch."""
        B = len(indices)
        if not self.crop:
            boxes = np.stack([np.zeros(B, np.int64), np.zeros(B, np.int64),
                              np.asarray(heights, np.int64), np.asarray(widths, np.int64)], 1)
            return boxes, np.zeros(B, dtype=bool)
        u = uniforms(seed, epoch, indices)
        boxes = crop_params(u, heights, widths, self.scale, self.ratio)
        flips = flip_params(u) if self.flip else np.zeros(B, dtype=bool)
        return boxes, flips

    # ---------------------------------------------------------------- apply
    def __call__(self, images: Sequence[torch.Tensor], boxes: np.ndarray, flips: np.ndarray,
                 impl: str = "auto", scratch: np.ndarray | None = None,
                 pool: "OutputPool | None" = None) -> torch.Tensor:
        """Apply to a list of uint8 HWC images (numpy arrays or tensors, all on one device).

        impl: "auto" (CPU: "loop", else "grid"), "loop" (the fused per-sample CPU path),
        "loop-u8" (the two-stage CPU reference: a uint8 batch, then one conversion; same
        bits, ~2x slower), "grid" (one grid_sample over the padded batch, any device).
        `scratch`: an optional reusable (B, S, S, 3) uint8 numpy buffer for "loop-u8";
        `pool`: an optional `OutputPool` the CPU paths take their float output from.
        """
        if len(images) == 0:
            return torch.empty((0, 3) + self.out_size, dtype=self.dtype)
        dev = images[0].device if isinstance(images[0], torch.Tensor) else torch.device("cpu")
        if impl == "auto":
            impl = "loop" if dev.type == "cpu" else "grid"
        if impl in ("loop", "loop-u8"):
            if dev.type != "cpu":
                raise ValueError(f"impl={impl!r} runs on CPU; use impl='grid' for device batches")
            if impl == "loop-u8":  # the previous two-stage path (uint8 batch, then one conversion pass); reference
                u8 = resized_crop_loop(images, boxes, flips, self.out_size, out=scratch)
                return self._finish_u8(u8, pool)
            return self._fused(images, boxes, flips, pool)
        if impl == "grid":
            Hm = max(int(x.shape[0]) for x in images)
            Wm = max(int(x.shape[1]) for x in images)
            padded = torch.zeros((len(images), Hm, Wm, 3), dtype=torch.uint8, device=dev)
            for k, x in enumerate(images):
                padded[k, : x.shape[0], : x.shape[1]] = torch.as_tensor(x, device=dev)
            return self.apply_padded(padded, boxes, flips)
        raise ValueError(f"impl must be 'auto', 'loop', 'loop-u8' or 'grid', got {impl!r}")

    def apply_padded(self, padded: torch.Tensor, boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """Grid path: `padded` (B, Hm, Wm, 3) uint8 on any device (images top-left aligned)."""
        dev = padded.device
        B, Hm, Wm, _ = padded.shape
        x = padded.permute(0, 3, 1, 2).to(torch.float32)
        x = self._normalize_(x, scale255=True)
        oh, ow = self.out_size
        bx = torch.as_tensor(boxes, dtype=torch.float32, device=dev)
        top, left, h, w = bx[:, 0:1], bx[:, 1:2], bx[:, 2:3], bx[:, 3:4]
        # Source pixel coordinates of output pixel centres (align_corners=False), clamped to the crop box
        # so that borders replicate the crop's edge exactly like crop-then-resize does.
        ox = torch.arange(ow, dtype=torch.float32, device=dev).unsqueeze(0) + 0.5
        oy = torch.arange(oh, dtype=torch.float32, device=dev).unsqueeze(0) + 0.5
        xs = torch.minimum(torch.clamp(left + ox * w / ow - 0.5, min=0) .maximum(left), left + w - 1)
        ys = torch.minimum(torch.clamp(top + oy * h / oh - 0.5, min=0).maximum(top), top + h - 1)
        fl = torch.as_tensor(np.asarray(flips, dtype=bool), device=dev).unsqueeze(1)
        xs = torch.where(fl, xs.flip(1), xs)
        gx = (2 * xs + 1) / Wm - 1  # pixel -> normalised coordinate of the padded image
        gy = (2 * ys + 1) / Hm - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out.to(self.dtype)

    def _normalize_(self, x: torch.Tensor, scale255: bool) -> torch.Tensor:
        shape = (1, 3, 1, 1)
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape) * 255.0
            inv = 1.0 / (torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape) * 255.0)
            return x.sub_(mean).mul_(inv)
        return x.mul_(1.0 / 255.0)

    def _affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """float32 (scale, bias) per channel with out = x * scale + bias == the reference path's rounding."""
        if not self.normalize:
            return None
        inv = 1.0 / (torch.tensor(self.std, dtype=torch.float32) * 255.0)
        bias = -torch.tensor(self.mean, dtype=torch.float32) * 255.0 * inv
        return inv.numpy(), bias.numpy()

    def _fused(self, images, boxes: np.ndarray, flips: np.ndarray, pool: "OutputPool | None") -> torch.Tensor:
        """CPU path, see [Note: fused CPU path]."""
        oh, ow = self.out_size
        B = len(images)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        shape = (B, 3, oh, ow)
        out = pool.get(shape, fmt) if pool is not None else torch.empty(shape, dtype=torch.float32, memory_format=fmt)
        resized_crop_fused(images, boxes, flips, (oh, ow), out, self._affine())
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _finish_u8(self, u8_nhwc: torch.Tensor, pool: "OutputPool | None" = None) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float, one pass over the output."""
        x = u8_nhwc.permute(0, 3, 1, 2)  # NCHW view with channels-last strides
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = pool.get(tuple(x.shape), fmt) if pool is not None else \
            torch.empty(x.shape, dtype=torch.float32, memory_format=fmt)
        out.copy_(x)  # uint8 -> float (and NHWC -> NCHW) in one pass
        if self.normalize:
            shape = (1, 3, 1, 1)
            inv = 1.0 / (torch.tensor(self.std, dtype=torch.float32).view(shape) * 255.0)
            bias = -torch.tensor(self.mean, dtype=torch.float32).view(shape) * 255.0 * inv
            torch.addcmul(bias, out, inv, out=out)  # (x - mean) / std in one more pass
        else:
            out.mul_(1.0 / 255.0)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


def resized_crop_loop(images, boxes: np.ndarray, flips: np.ndarray, size, out: np.ndarray | None = None) -> torch.Tensor:
    """Per-sample uint8 crop + flip + bilinear (antialiased) resize -> (B, oh, ow, 3) uint8 on CPU.

    `images` are HWC uint8 numpy arrays or CPU tensors.  Crops and copies go
    through numpy on purpose: torch parallelises any op over 32k elements, and
    on a busy 2-core box one OpenMP barrier per small op costs milliseconds.
    """
    oh, ow = size
    B = len(images)
    if out is None or out.shape[0] < B or out.shape[1:] != (oh, ow, 3):
        out = np.empty((B, oh, ow, 3), dtype=np.uint8)
    out = out[:B]
    bl = boxes.tolist()
    fl = np.asarray(flips, dtype=bool).tolist()
    up = getattr(torch._C._nn, "_upsample_bilinear2d_aa", None)  # skips F.interpolate's Python checks
    if up is None:  # pragma: no cover - other torch versions
        def up(x, size, align_corners, *_):
            return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners, antialias=True)
    for k in range(B):
        t, l, h, w = bl[k]
        x = images[k]
        if isinstance(x, torch.Tensor):
            x = x.numpy()
        c = x[t:t + h, l:l + w]
        if fl[k]:
            c = c[:, ::-1]
        c = np.ascontiguousarray(c)
        # A (1, 3, h, w) channels-last view with a *real* batch stride: with the stride unsqueeze() gives,
        # torch does not recognise channels-last, takes the slow generic kernel and returns NCHW (~5x slower).
        c = torch.from_numpy(c).as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3))
        if h == oh and w == ow:
            r = c
        else:
            r = up(c, (oh, ow), False, None, None)
        out[k] = r[0].permute(1, 2, 0).numpy()
    return torch.from_numpy(out)


# [Note: fused CPU path]
# Per sample: take the crop (a view; rows are copied only when flipped or not
# contiguous), flip it with `torch.flip` *before* the resample (the crop is
# smaller than the output, and torch's flip copies 3-byte pixels ~8x faster than
# numpy's reversed-stride copy), resample it with the uint8 channels-last AVX
# kernel, then convert the uint8 HWC result into the float CHW output with one
# `copy_` (torch's cast kernel de-interleaves ~25% faster than numpy's strided
# cast), followed by the affine normalisation, one plane at a time, while those
# 600 KB are still in L2.  Flipping before the resize equals flipping after it
# bit for bit: the bilinear (antialiased) weights are mirror-symmetric, and the
# two-stage reference path (`resized_crop_loop`) flips before it too (tests check
# the two against each other).  The affine is x * (1 / (255 std)) + (-mean / std)
# in float32 by torch's fused multiply-add (`add` with alpha, one plane at a time),
# bit for bit what the reference
# `_finish_u8`'s addcmul computes.  Where the time goes and what the floor of
# this work is: bench/results/2026-12-05-cpu-loaders/README.md.


def resized_crop_fused(images, boxes: np.ndarray, flips: np.ndarray, size, out: torch.Tensor,
                       affine: tuple | None) -> torch.Tensor:
    """Crop + resize + flip + convert + normalise each sample straight into `out` (float32, CPU).

    `out`: (B, 3, oh, ow) float32, contiguous or channels_last.  `affine`:
    (scale, bias) float32 arrays of 3 (out = x * scale + bias), or None for x / 255.
    """
    oh, ow = size
    B = len(images)
    bl = boxes.tolist()
    fl = np.asarray(flips, dtype=bool).tolist()
    up = getattr(torch._C._nn, "_upsample_bilinear2d_aa", None)
    if up is None:  # pragma: no cover - other torch versions
        def up(x, size, align_corners, *_):
            return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners, antialias=True)
    cl = out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    if not cl and not out.is_contiguous():
        raise ValueError("out must be contiguous or channels_last")
    inv255 = np.float32(1.0 / 255.0)
    if _kernels.available():
        return _fused_compiled(images, bl, fl, (oh, ow), out, cl, _kernels.affine64(affine, inv255), up)
    if cl:
        on = out.permute(0, 2, 3, 1).numpy()  # (B, oh, ow, 3) contiguous view
        if affine is not None:  # per element of an (ow * 3) row
            sc_t = torch.from_numpy(np.tile(affine[0], ow).astype(np.float32))
            bi_t = torch.from_numpy(np.tile(affine[1], ow).astype(np.float32))
    else:
        on = out.numpy()  # (B, 3, oh, ow)
        if affine is not None:
            sc = [float(v) for v in np.asarray(affine[0], np.float32)]
            bi = [torch.tensor(float(v), dtype=torch.float32) for v in np.asarray(affine[1], np.float32)]
    for k in range(B):
        t, l, h, w = bl[k]
        x = images[k]
        if isinstance(x, torch.Tensor):
            x = x.numpy()
        c = x[t:t + h, l:l + w]
        if fl[k]:
            ct = torch.flip(torch.from_numpy(c), [1])  # contiguous, mirrored
        else:
            ct = torch.from_numpy(c if c.flags.c_contiguous else np.ascontiguousarray(c))  # row copies only
        # (1, 3, h, w) channels-last view with a real batch stride (see resized_crop_loop)
        ct = ct.as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3))
        r = ct[0] if h == oh and w == ow else up(ct, (oh, ow), False, None, None)[0]  # (3, oh, ow) uint8, HWC in memory
        if cl:
            o2 = on[k].reshape(oh, ow * 3)
            np.copyto(o2, r.permute(1, 2, 0).numpy().reshape(oh, ow * 3), casting="unsafe")
            if affine is None:
                np.multiply(o2, inv255, out=o2)
            else:
                t2 = torch.from_numpy(o2)
                torch.addcmul(bi_t, t2, sc_t, out=t2)
        else:
            out[k].copy_(r)  # uint8 HWC -> float CHW, one pass
            if affine is None:
                np.multiply(on[k], inv255, out=on[k])
            else:
                # fused multiply-add per plane (torch's kernel: same rounding as addcmul).  Views made per
                # sample, not for the whole batch at once: 384 live tensors trip Python's cyclic GC (7% here).
                for ch, p in enumerate(out[k].unbind(0)):
                    torch.add(bi[ch], p, alpha=sc[ch], out=p)
    return out


_tls = threading.local()  # per builder thread: the crop and resize buffers of `_fused_compiled`


def _scratch(n_crop: int, size) -> tuple:
    """This thread's reused buffers: a flat uint8 crop buffer (numpy, torch) and the resize output:
    a (1, 3, oh, ow) channels-last tensor and its flat numpy view."""
    sc = getattr(_tls, "fused", None)
    if sc is None or sc[0].size < n_crop or sc[4] != tuple(size):
        oh, ow = size
        cbuf = np.empty(max(n_crop, sc[0].size if sc is not None else 0, 1), np.uint8)
        rbuf = torch.empty((1, oh, ow, 3), dtype=torch.uint8)
        sc = _tls.fused = (cbuf, torch.from_numpy(cbuf), rbuf.permute(0, 3, 1, 2), rbuf.numpy().reshape(-1),
                           tuple(size))
    return sc


def _fused_compiled(images, bl: list, fl: list, size, out: torch.Tensor, cl: bool, affine64, up) -> torch.Tensor:
    """`resized_crop_fused` with the compiled kernels: 2 torch calls + 2 kernel calls per sample, see
    [Note: compiled CPU path]."""
    oh, ow = size
    sc64, bi64 = affine64
    B = len(bl)
    on = out.permute(0, 2, 3, 1).numpy().reshape(B, oh * ow * 3) if cl else out.numpy().reshape(B, 3, oh * ow)
    convert = _kernels.to_hwc_affine if cl else _kernels.to_chw_affine
    need = max(h * w for _, _, h, w in bl) * 3
    cbuf, cbuf_t, rout, rnp, _ = _scratch(need, size)
    for k in range(len(bl)):
        t, l, h, w = bl[k]
        x = images[k]
        if isinstance(x, torch.Tensor):
            x = x.numpy()
        _kernels.crop_into(x, t, l, h, w, fl[k], cbuf)
        if h == oh and w == ow:
            src = cbuf[: h * w * 3]
        else:
            # (1, 3, h, w) channels-last view of the crop with a real batch stride (see resized_crop_loop),
            # resampled into this thread's (1, oh, ow, 3) buffer by torch's uint8 AA kernel
            up(cbuf_t.as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3)), (oh, ow), False, None, None, out=rout)
            src = rnp
        convert(src, on, k, sc64, bi64)
    return out


# [Note: compiled CPU path]
# With numba (kernels.py), the fused path makes per sample: one compiled crop copy (mirrored when
# flipped, exactly the bytes torch.flip / np.ascontiguousarray gave the resize before), one torch
# call to build the crop's (1, 3, h, w) view, torch's uint8 antialiased bilinear resize written into
# a reused buffer (`out=`), and one compiled pass from that uint8 HWC buffer into the float32 slot of
# the batch with the normalisation (one rounding, as torch's fused multiply-add).  Same resize
# kernel, same bytes into it, same arithmetic after it: the batch is bit for bit the torch path's
# (tests/test_data_kernels.py).  Both kernels release the GIL, so the builder threads overlap.


class OutputPool:
    """Recycles CPU output batches once nobody references them any more.

    A fresh 150 MB float batch costs ~40k page faults plus zeroing every time
    (glibc serves big blocks with mmap), about as much as the augmentation
    itself.  The pool hands out a *view* of a buffer it owns; the buffer is
    reused only when its storage's use count is back to the pool's own
    references, i.e. the consumer dropped the batch and every view of it.
    Without `torch._C._storage_Use_Count` (older torch) it allocates afresh.
    """

    def __init__(self, limit: int = 6):
        self.limit = limit
        self._bufs: list = []  # (key, tensor, baseline use count)
        self._count = getattr(torch._C, "_storage_Use_Count", None)
        self._mu = threading.Lock()  # several producer threads take buffers

    def _uses(self, t: torch.Tensor) -> int:
        return self._count(t.untyped_storage()._cdata)

    def get(self, shape: tuple, memory_format=torch.contiguous_format, dtype=torch.float32) -> torch.Tensor:
        if self._count is None:
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        with self._mu:
            return self._get(shape, memory_format, dtype)

    def _get(self, shape, memory_format, dtype):
        key = (shape, memory_format, dtype)
        for k, t, base in self._bufs:
            if k == key and self._uses(t) == base:
                return t.view(t.shape) if memory_format == torch.contiguous_format else t.as_strided(t.shape, t.stride())
        t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        if len(self._bufs) >= self.limit:
            self._bufs.pop(0)
        self._bufs.append((key, t, self._uses(t)))
        return t.view(t.shape) if memory_format == torch.contiguous_format else t.as_strided(t.shape, t.stride())
