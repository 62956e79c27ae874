"""The recipe's optional extra augmentations (torchvision v2), the same for both pipelines.

As in torchvision's reference (presets.ClassificationPresetTrain and
train.py): auto-augmentation per sample after the crop and flip, RandomErasing
per sample after normalisation, then MixUp or CutMix (one of them per batch,
at random) on the collated batch.  memstrata runs them through TieredLoader's
`transform` / `collate` hooks, the baseline inside its transform and collate_fn.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from .config import RecipeConfig

__all__ = ["auto_augment", "random_erasing", "MixCut", "MemstrataCollate", "BaselineCollate"]


def auto_augment(cfg: RecipeConfig):
    if cfg.auto_augment is None:
        return None
    bil = v2.InterpolationMode.BILINEAR
    if cfg.auto_augment == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=bil)
    if cfg.auto_augment == "randaugment":
        return v2.RandAugment(interpolation=bil)
    return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bil)


def random_erasing(cfg: RecipeConfig):
    return v2.RandomErasing(p=cfg.random_erase) if cfg.random_erase > 0 else None


class MixCut:
    """MixUp and/or CutMix on a batch (one of them chosen per batch when both are on)."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        ts = []
        if mixup_alpha > 0:
            ts.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ts.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.t = (ts[0] if len(ts) == 1 else v2.RandomChoice(ts)) if ts else None

    def __call__(self, x, y):
        return self.t(x, y) if self.t is not None else (x, y)


class MemstrataCollate:
    """TieredLoader collate hook: RandomErasing per sample, then MixUp/CutMix."""

    def __init__(self, erase, mix: MixCut):
        self.erase, self.mix = erase, mix

    def __call__(self, x, y):
        if self.erase is not None:
            x = torch.stack([self.erase(s) for s in x])
        return self.mix(x, y)


class BaselineCollate:
    """DataLoader collate_fn: default_collate, then MixUp/CutMix (the reference's collate_fn)."""

    def __init__(self, mix: MixCut):
        self.mix = mix

    def __call__(self, batch):
        return self.mix(*torch.utils.data.default_collate(batch))


def has_extras(cfg: RecipeConfig) -> bool:
    return bool(cfg.auto_augment or cfg.random_erase > 0 or cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
