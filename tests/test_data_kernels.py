"""The compiled CPU kernels (memstrata.data.kernels) give the torch path's bits and torchvision's.

Reference: torchvision v2's `resized_crop` (uint8, antialiased bilinear) + `horizontal_flip` on the
same crop boxes and flip decisions, then the normalisation as torch computes it (one fused
multiply-add, `addcmul`), or x * float32(1/255) without normalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from memstrata.data import augment as A
from memstrata.data import kernels as K
from memstrata.data.augment import TrainAugment

pytest.importorskip("numba")


def _affine(aug: TrainAugment):
    if aug.normalize:
        sc, bi = aug._affine()
    else:
        sc, bi = np.full(3, np.float32(1 / 255), np.float32), np.zeros(3, np.float32)
    return torch.from_numpy(sc).view(1, 3, 1, 1), torch.from_numpy(bi).view(1, 3, 1, 1)


def _torchvision_reference(aug: TrainAugment, images, boxes, flips) -> torch.Tensor:
    crops = []
    for x, (t, l, h, w), f in zip(images, boxes.tolist(), flips.tolist()):
        x = torch.as_tensor(x).permute(2, 0, 1)
        c = TF.resized_crop(x, t, l, h, w, list(aug.out_size), antialias=True)
        crops.append(TF.horizontal_flip(c) if f else c)
    sc, bi = _affine(aug)
    out = torch.addcmul(bi, torch.stack(crops).float(), sc)
    if aug.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(aug.dtype)


def _images(rng, n):
    imgs = [rng.integers(0, 256, (int(rng.integers(40, 260)), int(rng.integers(40, 260)), 3), dtype=np.uint8)
            for _ in range(n)]
    imgs[1] = np.asfortranarray(imgs[1])  # not C-contiguous
    imgs[2] = torch.from_numpy(imgs[2])  # a tensor
    return imgs


@pytest.mark.parametrize("aug", [TrainAugment(size=48), TrainAugment(size=(40, 56), channels_last=True),
                                 TrainAugment(size=48, normalize=False), TrainAugment(size=32, dtype=torch.bfloat16),
                                 TrainAugment(size=64, mean=(0.1, 0.9, 0.5), std=(0.01, 2.0, 0.33))],
                         ids=["normalised", "channels_last", "unnormalised", "bf16", "other-mean-std"])
def test_compiled_path_is_torchvision_bit_for_bit(aug):
    assert K.available()
    rng = np.random.default_rng(1)
    imgs = _images(rng, 24)
    H = [int(x.shape[0]) for x in imgs]
    W = [int(x.shape[1]) for x in imgs]
    boxes, flips = aug.params(3, 1, np.arange(24), H, W)
    oh, ow = aug.out_size
    # edge cases: a crop of exactly the output size (no resample), a whole image, a 1x1 crop, flipped and not
    boxes[3] = (0, 0, min(oh, H[3]), min(ow, W[3]))
    boxes[4] = (0, 0, H[4], W[4])
    boxes[5] = (H[5] - 1, W[5] - 1, 1, 1)
    flips[3:6] = (True, False, True)
    assert flips.any() and not flips.all()
    assert (boxes[:, 2] > oh).any() and (boxes[:, 2] < oh).any()  # down- and upsampled crops
    got = aug(imgs, boxes, flips, impl="loop")
    assert torch.equal(got, _torchvision_reference(aug, imgs, boxes, flips))
    assert got.is_contiguous(memory_format=torch.channels_last if aug.channels_last else torch.contiguous_format)


def test_compiled_path_equals_the_torch_path_and_the_two_stage_reference(monkeypatch):
    aug = TrainAugment(size=56)
    imgs = _images(np.random.default_rng(2), 16)
    boxes, flips = aug.params(0, 2, np.arange(16), [x.shape[0] for x in imgs], [x.shape[1] for x in imgs])
    compiled = aug(imgs, boxes, flips, impl="loop")
    two_stage = aug(imgs, boxes, flips, impl="loop-u8")
    monkeypatch.setattr(K, "_kernels", False)  # numba "missing": the torch path
    assert not K.available()
    torch_path = aug(imgs, boxes, flips, impl="loop")
    assert torch.equal(compiled, torch_path) and torch.equal(compiled, two_stage)


@pytest.mark.parametrize("normalize", [True, False])
def test_conversion_rounds_like_torchs_fused_multiply_add_for_every_byte(normalize):
    """Both forms of the conversion (fast float32 FMA where the CPU has it, exact float64) on all 256 values."""
    import numba  # noqa: F401  (the module's kernels)

    aug = TrainAugment(normalize=normalize)
    sc, bi = _affine(aug)
    x = (np.arange(3 * 300) % 256).astype(np.uint8)  # every byte in every channel, length not a multiple of 8
    want = torch.addcmul(bi.view(3, 1), torch.from_numpy(x.reshape(-1, 3).T.astype(np.float32)), sc.view(3, 1))
    sc64, bi64 = K.affine64(aug._affine() if normalize else None, 1 / 255)
    forms = K._get()[4]
    assert K.form() in ("fast", "exact")
    names = ["exact", "fast"] if K.form() == "fast" else ["exact"]  # "fast" is used only where it checked equal
    for chw, hwc in (forms[n] for n in names):
        c = np.full((2, 3, 300), np.nan, np.float32)
        h = np.full((2, 900), np.nan, np.float32)
        chw(x, c, 1, sc64, bi64)
        hwc(x, h, 1, sc64, bi64)
        assert torch.equal(torch.from_numpy(c[1]), want)
        assert torch.equal(torch.from_numpy(h[1].reshape(300, 3).T.copy()), want)
        assert np.isnan(c[0]).all() and np.isnan(h[0]).all()  # only slot k is written


def test_crop_copy_mirrors_exactly():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    buf = np.zeros(37 * 53 * 3 + 5, np.uint8)
    for t, l, h, w in [(0, 0, 37, 53), (5, 7, 11, 13), (36, 52, 1, 1), (2, 0, 30, 1)]:
        for flip in (False, True):
            K.crop_into(img, t, l, h, w, flip, buf)
            ref = img[t:t + h, l:l + w][:, ::-1] if flip else img[t:t + h, l:l + w]
            assert np.array_equal(buf[: h * w * 3].reshape(h, w, 3), ref)
    K.crop_into(img[:, ::2], 1, 2, 3, 4, True, buf)  # a strided view
    assert np.array_equal(buf[:36].reshape(3, 4, 3), img[:, ::2][1:4, 2:6][:, ::-1])


def test_thread_scratch_follows_size_and_crop_growth():
    """Two augments of different sizes in one thread, then larger crops: the per-thread buffers grow/rebuild."""
    rng = np.random.default_rng(4)
    small = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(3)]
    big = [rng.integers(0, 256, (200, 210, 3), dtype=np.uint8) for _ in range(3)]
    for aug, imgs in [(TrainAugment(size=16), small), (TrainAugment(size=24), small), (TrainAugment(size=24), big)]:
        boxes = np.array([[0, 0, x.shape[0], x.shape[1]] for x in imgs])
        flips = np.array([True, False, True])
        assert torch.equal(aug(imgs, boxes, flips, impl="loop"), _torchvision_reference(aug, imgs, boxes, flips))
    assert A._tls.fused[0].size >= 200 * 210 * 3
