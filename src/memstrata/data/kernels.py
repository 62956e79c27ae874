"""Compiled per-sample kernels of the CPU augmentation path (numba, optional).

One job: the two per-sample steps around torch's uint8 resize.  `crop_into`
copies a crop (mirrored when flipped) into a reused buffer, the layout torch's
channels-last resize kernel reads; `to_chw_affine` turns the resized uint8 HWC
sample into its normalised float32 slot of the batch in ONE pass -- read each
byte once, write each float once.  torch and numpy have no such kernel: their
best pair (a cast ``copy_`` that de-interleaves HWC -> CHW, then one fused
multiply-add per plane) reads and writes the 600 KB float sample twice
(bench/results/2026-12-05-cpu-loaders/README.md: ~106 us against ~40).

numba is an optional dependency (``pip install memstrata[fast]``; FFCV pulls
it too).  Without it, or with ``MEMSTRATA_NO_NUMBA=1``, `available()` is
False and the augmentation keeps its torch path, which gives the same bits.

[Note: one rounding, like torch's fused multiply-add]
The torch path computes ``x * scale + bias`` in float32 with one fused
multiply-add (a single rounding; checked in tests).  Here the same value is
computed in float64 and rounded once to float32: for x an integer in
[0, 255] and float32 scale and bias, ``x * scale`` needs at most 8 + 24
significant bits and the sum at most ~24 + 8 + (exponent gap) < 53 bits,
so the float64 result is exact and its one rounding to float32 is the
correctly rounded fused multiply-add: the same bits.  With no normalisation
(bias 0, scale float32(1/255)) it is float32(x) * scale rounded once, as
numpy's float32 multiply.
"""

from __future__ import annotations

import os
import threading

import numpy as np

__all__ = ["available", "form", "affine64", "crop_into", "to_chw_affine", "to_hwc_affine"]

_lock = threading.Lock()
_kernels = None  # (crop, chw, hwc, form, forms) once compiled; False if numba is missing or disabled


def _build():
    import numba

    # [Note: unsigned indices]  numba wraps negative indices around (x[-1] is the last element) unless it can
    # prove an index non-negative; for a computed index such as d0 + q that test runs per element and stops
    # LLVM from vectorising the loop (the crop copy ran at 40-97 us instead of 4).  Indexing with uint64
    # removes the test.
    u = np.uint64

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def crop(img, W, t, l, h, w, flip, buf):  # pragma: no cover - compiled
        # img: a flat (H * W * 3,) uint8 HWC image; buf: flat uint8 >= h * w * 3, filled as (h, w, 3)
        n = w * 3
        for i in range(h):
            s0 = ((t + i) * W + l) * 3
            d0 = i * n
            if flip:
                for j in range(w):
                    s = s0 + n - 3 - 3 * j
                    d = d0 + 3 * j
                    buf[u(d)] = img[u(s)]
                    buf[u(d + 1)] = img[u(s + 1)]
                    buf[u(d + 2)] = img[u(s + 2)]
            else:
                for q in range(n):
                    buf[u(d0 + q)] = img[u(s0 + q)]

    # Two forms of each conversion, cached separately (distinct names): "fast" in float32 arithmetic with LLVM
    # allowed to contract x * s + b into one fused multiply-add (vectorises 8-wide); "exact" the float64 form
    # of [Note: one rounding, like torch's fused multiply-add], correct on any CPU (~1.5x slower here).
    fast = dict(nogil=True, cache=True, boundscheck=False, fastmath={"contract"})
    exact = dict(nogil=True, cache=True, boundscheck=False)
    f32, f64 = np.float32, np.float64

    @numba.njit(**fast)
    def chw_fast(flat, out, k, scale, bias):  # pragma: no cover - compiled
        # flat: (N * 3,) uint8, an HWC sample; out: (B, 3, N) float32 C-contiguous: fills out[k]
        n = flat.shape[0] // 3
        o0, o1, o2 = out[k, 0], out[k, 1], out[k, 2]
        s0, s1, s2 = f32(scale[0]), f32(scale[1]), f32(scale[2])
        b0, b1, b2 = f32(bias[0]), f32(bias[1]), f32(bias[2])
        for p in range(n):
            q = u(3 * p)
            o0[p] = f32(flat[q]) * s0 + b0
            o1[p] = f32(flat[q + u(1)]) * s1 + b1
            o2[p] = f32(flat[q + u(2)]) * s2 + b2

    @numba.njit(**exact)
    def chw_exact(flat, out, k, scale, bias):  # pragma: no cover - compiled
        n = flat.shape[0] // 3
        o0, o1, o2 = out[k, 0], out[k, 1], out[k, 2]
        s0, s1, s2 = f64(scale[0]), f64(scale[1]), f64(scale[2])
        b0, b1, b2 = f64(bias[0]), f64(bias[1]), f64(bias[2])
        for p in range(n):
            q = u(3 * p)
            o0[p] = f32(f64(flat[q]) * s0 + b0)
            o1[p] = f32(f64(flat[q + u(1)]) * s1 + b1)
            o2[p] = f32(f64(flat[q + u(2)]) * s2 + b2)

    @numba.njit(**fast)
    def hwc_fast(flat, out, k, scale, bias):  # pragma: no cover - compiled
        # flat: (N * 3,) uint8, an HWC sample; out: (B, N * 3) float32 (a channels_last batch): fills out[k]
        n = flat.shape[0] // 3
        o = out[k]
        s0, s1, s2 = f32(scale[0]), f32(scale[1]), f32(scale[2])
        b0, b1, b2 = f32(bias[0]), f32(bias[1]), f32(bias[2])
        for p in range(n):
            q = u(3 * p)
            o[q] = f32(flat[q]) * s0 + b0
            o[q + u(1)] = f32(flat[q + u(1)]) * s1 + b1
            o[q + u(2)] = f32(flat[q + u(2)]) * s2 + b2

    @numba.njit(**exact)
    def hwc_exact(flat, out, k, scale, bias):  # pragma: no cover - compiled
        n = flat.shape[0] // 3
        o = out[k]
        s0, s1, s2 = f64(scale[0]), f64(scale[1]), f64(scale[2])
        b0, b1, b2 = f64(bias[0]), f64(bias[1]), f64(bias[2])
        for p in range(n):
            q = u(3 * p)
            o[q] = f32(f64(flat[q]) * s0 + b0)
            o[q + u(1)] = f32(f64(flat[q + u(1)]) * s1 + b1)
            o[q + u(2)] = f32(f64(flat[q + u(2)]) * s2 + b2)

    # [Note: one rounding, like torch's fused multiply-add] holds for the fast form only where LLVM emitted
    # a fused multiply-add (the CPU has one); contraction is decided when the code is generated, so one check
    # over every byte value (and a length that is no multiple of the vector width) tells which form we got.
    chw, hwc = chw_fast, hwc_fast
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.001, 0.05, 3).astype(np.float32).astype(np.float64)
    bias = rng.uniform(-3, 3, 3).astype(np.float32).astype(np.float64)
    x = (np.arange(3 * 257) % 256).astype(np.uint8)
    want = (x.reshape(-1, 3).astype(np.float64) * scale + bias).astype(np.float32)
    got_c = np.empty((1, 3, 257), np.float32)
    got_h = np.empty((1, 3 * 257), np.float32)
    chw(x, got_c, 0, scale, bias)
    hwc(x, got_h, 0, scale, bias)
    forms = {"fast": (chw_fast, hwc_fast), "exact": (chw_exact, hwc_exact)}  # both, for the tests
    if np.array_equal(got_c[0].T, want) and np.array_equal(got_h[0].reshape(-1, 3), want):
        return crop, chw, hwc, "fast", forms
    return crop, chw_exact, hwc_exact, "exact", forms


def _get():
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                if os.environ.get("MEMSTRATA_NO_NUMBA", "") not in ("", "0"):
                    _kernels = False
                else:
                    try:
                        _kernels = _build()
                    except ImportError:
                        _kernels = False
    return _kernels


def form() -> str | None:
    """Which conversion runs: "fast" (float32 fused multiply-add), "exact" (float64), None (no numba)."""
    k = _get()
    return k[3] if k else None


def available() -> bool:
    """True when the compiled kernels can run (numba importable and not disabled)."""
    return bool(_get())


def affine64(affine, inv255: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 (scale, bias) of 3 from the augment's float32 affine (or None: x * float32(1/255))."""
    if affine is None:
        return np.full(3, np.float32(inv255), np.float64), np.zeros(3, np.float64)
    return (np.asarray(affine[0], np.float32).astype(np.float64),
            np.asarray(affine[1], np.float32).astype(np.float64))


def crop_into(img: np.ndarray, t: int, l: int, h: int, w: int, flip: bool, buf: np.ndarray) -> None:
    """buf[: h * w * 3] = img[t:t+h, l:l+w] (mirrored left-right if flip), as a C-contiguous (h, w, 3).

    img: an (H, W, 3) uint8 array (copied once if it is not C-contiguous)."""
    if not img.flags.c_contiguous:
        img = np.ascontiguousarray(img)
    _get()[0](img.reshape(-1), img.shape[1], t, l, h, w, flip, buf)


def to_chw_affine(src: np.ndarray, out: np.ndarray, k: int, scale: np.ndarray, bias: np.ndarray) -> None:
    """out[k, c, p] = float32(src[3p + c] * scale[c] + bias[c]): one pass, see the module's Note.

    src: a flat (N * 3,) uint8 HWC sample; out: (B, 3, N) float32, C-contiguous."""
    _get()[1](src, out, k, scale, bias)


def to_hwc_affine(src: np.ndarray, out: np.ndarray, k: int, scale: np.ndarray, bias: np.ndarray) -> None:
    """Like `to_chw_affine` into out[k] of a (B, N * 3) float32 array (a channels_last batch)."""
    _get()[2](src, out, k, scale, bias)
