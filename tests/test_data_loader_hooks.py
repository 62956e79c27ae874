"""TieredLoader's `transform` (per-sample torchvision v2) and `collate` (batch) hooks."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from memstrata.data import TieredLoader, TrainAugment


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from memstrata.data import synth_imagefolder

    return synth_imagefolder(tmp_path_factory.mktemp("hooks") / "train", 24, 3, progress=False, size=(64, 48),
                             workers=1)


def _loader(folder, tmp_path, **kw):
    base = dict(seed=3, epochs=2, store_dir=str(tmp_path / "store"), num_workers=2, progress=False, device="cpu",
                augment=TrainAugment(size=32))
    base.update(kw)
    return TieredLoader(str(folder), 8, **base)


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_identity_transform_gives_the_plain_batches(folder, tmp_path):
    """uint8 crops -> identity -> normalise == the fused path (same crops, same rounding up to float error)."""
    plain = _epoch(_loader(folder, tmp_path))
    hooked = _epoch(_loader(folder, tmp_path, transform=lambda s: s))
    assert len(plain) == len(hooked) == 3
    for (a, ya), (b, yb) in zip(plain, hooked):
        assert torch.equal(ya, yb) and a.shape == b.shape == (8, 3, 32, 32) and b.dtype == torch.float32
        assert (a - b).abs().max() < 1e-5


def test_transform_sees_uint8_chw_crops_and_changes_them(folder, tmp_path):
    seen = []

    def invert(s):
        seen.append((s.dtype, tuple(s.shape)))
        return 255 - s

    plain = _epoch(_loader(folder, tmp_path, augment=TrainAugment(size=32, normalize=False)))
    inv = _epoch(_loader(folder, tmp_path, augment=TrainAugment(size=32, normalize=False), transform=invert))
    assert set(seen) == {(torch.uint8, (3, 32, 32))} and len(seen) == 24
    for (a, _), (b, _) in zip(plain, inv):
        assert (a + b - 1).abs().max() < 1e-5  # x / 255 vs (255 - x) / 255


def test_v2_trivialaugment_is_reproducible_for_a_seed(folder, tmp_path):
    ta = v2.TrivialAugmentWide()
    torch.manual_seed(0)
    a = _epoch(_loader(folder, tmp_path, transform=ta))
    torch.manual_seed(0)
    b = _epoch(_loader(folder, tmp_path, transform=ta, num_workers=1))  # other thread count, same values
    torch.manual_seed(1)
    c = _epoch(_loader(folder, tmp_path, transform=ta))
    plain = _epoch(_loader(folder, tmp_path))
    assert all(torch.equal(x, z) for (x, _), (z, _) in zip(a, b))
    assert any(not torch.equal(x, z) for (x, _), (z, _) in zip(a, c))
    assert any((x - p).abs().max() > 0.1 for (x, _), (p, _) in zip(a, plain))


def test_collate_hook_mixup_cutmix_and_random_erasing(folder, tmp_path):
    mix = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=3), v2.CutMix(alpha=1.0, num_classes=3)])
    erase = v2.RandomErasing(p=1.0)

    def collate(x, y):
        x, y = mix(x, y)
        return torch.stack([erase(s) for s in x]), y

    torch.manual_seed(0)
    out = _epoch(_loader(folder, tmp_path, collate=collate, augment=TrainAugment(size=32, channels_last=True)))
    for x, y in out:
        assert x.shape == (8, 3, 32, 32) and y.shape == (8, 3) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(8))  # soft labels
        assert (x == 0).flatten(1).any(1).all()  # every sample has an erased (zero) region


def test_hooks_are_validated(folder, tmp_path):
    with pytest.raises(ValueError, match="transform must be callable"):
        _loader(folder, tmp_path, transform=3)
    with pytest.raises(ValueError, match="pass an augment"):
        _loader(folder, tmp_path, transform=lambda s: s, augment=None)
    ld = _loader(folder, tmp_path, transform=lambda s: s.float())
    with pytest.raises(TypeError, match="uint8"):
        next(iter(ld))
    ld.close()
