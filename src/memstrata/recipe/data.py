"""The recipe's input pipelines: memstrata's TieredLoader, or the reference DataLoader(ImageFolder) (--baseline).

Both read the same ImageFolder (``ROOT/train``, ``ROOT/val``) in the same order
for a seed: training batches follow ``RandomSampler(generator=seeded once)``
(``DistributedSampler(seed=seed)`` + ``set_epoch`` under torchrun), validation
is in file order.  Training augmentation is RandomResizedCrop + flip, validation
Resize(res x 256/224) + CenterCrop(res); memstrata applies both to its stored,
resized samples (see data/augment.py for how values relate).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment
from .config import RecipeConfig, RecipeInputError

__all__ = ["CenterCropAugment", "Pipelines", "check_root", "make_pipelines", "usable_cores"]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def find_classes(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).iterdir() if p.is_dir())


def check_root(root: str) -> tuple[Path, Path]:
    """ROOT/train and ROOT/val, each with at least one class folder (ValueError otherwise)."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise RecipeInputError(f"dataset root {str(r)!r} is not a directory")
    out = []
    for split in ("train", "val"):
        d = r / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            flat = " (ROOT itself holds class folders: move them under ROOT/train and ROOT/val)" if split == "train" \
                and any(p.is_dir() and p.name not in ("train", "val") for p in r.iterdir()) else ""
            raise RecipeInputError(f"{str(d)!r} has no class folders: ROOT must hold train/ and val/ "
                                   f"ImageFolders{flat} "
                                   f"(synthetic ones: `memstrata data synth ROOT/train --images N --classes C`, "
                                   f"then the same for ROOT/val)")
        out.append(d.resolve())
    tc = sorted(p.name for p in out[0].iterdir() if p.is_dir())
    vc = sorted(p.name for p in out[1].iterdir() if p.is_dir())
    if tc != vc:
        raise RecipeInputError(f"train/ and val/ have different class folders ({len(tc)} vs {len(vc)}): "
                         f"labels would not correspond")
    return out[0], out[1]


@dataclass(frozen=True)
class CenterCropAugment(TrainAugment):
    """Resize(short side -> size / crop_fraction) + CenterCrop(size), batched, as crop boxes on the stored image.

    Resizing the short side s to S = round(size / crop_fraction) and cutting the
    centre size x size equals cutting a centred square of side size * s / S from
    the stored image and resizing it to size (one resample instead of two).
    """

    crop_fraction: float = 224 / 256
    flip: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    def params(self, seed, epoch, indices, heights, widths):
        H = np.asarray(heights, dtype=np.int64)
        W = np.asarray(widths, dtype=np.int64)
        oh, ow = self.out_size
        S = int(round(min(oh, ow) / self.crop_fraction))
        short = np.minimum(H, W).astype(np.float64)
        ch = np.clip(np.round(oh * short / S), 1, H).astype(np.int64)
        cw = np.clip(np.round(ow * short / S), 1, W).astype(np.int64)
        top = np.round((H - ch) / 2.0).astype(np.int64)
        left = np.round((W - cw) / 2.0).astype(np.int64)
        return np.stack([top, left, ch, cw], 1), np.zeros(len(H), dtype=bool)


@dataclass
class Pipelines:
    train: object
    val: object
    num_classes: int
    train_images: int
    val_images: int
    kind: str  # "memstrata" | "baseline"
    sampler_generator: torch.Generator | None = None  # baseline, single process: the persistent sampler generator
    train_sampler: object | None = None  # baseline under torchrun: DistributedSampler (set_epoch)
    store_dirs: tuple[str, str] | None = None
    built_here: bool = False  # under torchrun: this rank built the node's stores ahead of training

    def set_epoch(self, epoch: int) -> None:
        if self.kind == "memstrata":
            self.train.set_epoch(epoch)
            self.val.set_epoch(0)
        elif self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)

    def close(self) -> None:
        for ld in (self.train, self.val):
            if hasattr(ld, "close"):
                ld.close()


def _store_dirs(cfg: RecipeConfig) -> tuple[str | None, str | None]:
    if cfg.store is None:
        return None, None  # memstrata's cache, one per dataset fingerprint
    base = Path(cfg.store).expanduser()
    return str(base / "train"), str(base / "val")


def make_pipelines(cfg: RecipeConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                   local_rank: int = 0) -> Pipelines:
    train_dir, val_dir = check_root(cfg.root)
    workers = usable_cores() if cfg.workers is None else cfg.workers
    cuda = device.type == "cuda"
    if cfg.baseline:
        return _baseline(cfg, train_dir, val_dir, workers, cuda, rank, world_size)
    return _memstrata(cfg, train_dir, val_dir, workers, device, rank, world_size, local_rank)


def _memstrata(cfg, train_dir, val_dir, workers, device, rank, world_size, local_rank) -> Pipelines:
    from ..data import TieredLoader, build_store

    st_train, st_val = _store_dirs(cfg)
    dist = world_size > 1
    built = False
    if dist:
        # [Note: one store per node] the node's local rank 0 builds both stores ahead of training while the
        # other ranks wait at the barrier; then every rank opens the same files (the page cache is shared).
        if local_rank == 0:
            st_train = build_store(train_dir, st_train, max_side=cfg.max_side, workers=workers or 1,
                                   progress=rank == 0).directory
            st_val = build_store(val_dir, st_val, max_side=cfg.max_side, workers=workers or 1,
                                 progress=rank == 0).directory
            built = True
        torch.distributed.barrier()
    cl = device.type == "cuda"
    train_dir_n = len(find_classes(train_dir))
    from .augment import MemstrataCollate, MixCut, auto_augment, random_erasing

    mix = MixCut(train_dir_n, cfg.mixup_alpha, cfg.cutmix_alpha)
    erase = random_erasing(cfg)
    hooks = dict(transform=auto_augment(cfg),
                 collate=MemstrataCollate(erase, mix) if (erase is not None or mix.t is not None) else None)
    common = dict(seed=cfg.seed, max_side=cfg.max_side, num_workers=workers, progress=False,
                  device=device, rank=rank, world_size=world_size)
    train = TieredLoader(str(train_dir), cfg.batch, epochs=cfg.epochs, shuffle=True,
                         sampler="distributed" if dist else "random",
                         augment=TrainAugment(size=cfg.res, channels_last=cl), store_dir=st_train, **hooks, **common)
    val = TieredLoader(str(val_dir), cfg.batch, epochs=1, shuffle=False,
                       sampler="distributed" if dist else "random",
                       augment=CenterCropAugment(size=cfg.res, channels_last=cl, crop_fraction=cfg.res / cfg.val_resize),
                       store_dir=st_val, **common)
    classes = train.store.source.classes if hasattr(train.store.source, "classes") else None
    n_classes = len(classes) if classes is not None else int(max(train.labels) + 1)
    return Pipelines(train, val, n_classes, train.n, val.n, "memstrata",
                     store_dirs=(str(train.store.dir), str(val.store.dir)), built_here=built)


def _baseline(cfg, train_dir, val_dir, workers, cuda, rank, world_size) -> Pipelines:
    from torchvision import datasets, transforms

    from .augment import BaselineCollate, MixCut, auto_augment, random_erasing

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    aa, erase = auto_augment(cfg), random_erasing(cfg)
    tr = datasets.ImageFolder(str(train_dir), transforms.Compose(
        [transforms.RandomResizedCrop(cfg.res), transforms.RandomHorizontalFlip()] + ([aa] if aa is not None else [])
        + [transforms.ToTensor(), norm] + ([erase] if erase is not None else [])))
    mix = MixCut(len(tr.classes), cfg.mixup_alpha, cfg.cutmix_alpha)
    va = datasets.ImageFolder(str(val_dir), transforms.Compose([
        transforms.Resize(cfg.val_resize), transforms.CenterCrop(cfg.res), transforms.ToTensor(), norm]))
    gen = None
    tsampler = None
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        tsampler = DistributedSampler(tr, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
        vsampler = DistributedSampler(va, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        tsampler = torch.utils.data.RandomSampler(tr, generator=gen)
        vsampler = torch.utils.data.SequentialSampler(va)
    # the reference's loaders: no persistent workers (each epoch starts its workers, seeded from the global RNG)
    kw = dict(num_workers=workers, pin_memory=cuda)
    DL = torch.utils.data.DataLoader
    train = DL(tr, batch_size=cfg.batch, sampler=tsampler, collate_fn=BaselineCollate(mix) if mix.t is not None else None,
               **kw)
    val = DL(va, batch_size=cfg.batch, sampler=vsampler, **kw)
    return Pipelines(train, val, len(tr.classes), len(tr), len(va), "baseline", sampler_generator=gen,
                     train_sampler=tsampler if world_size > 1 else None)
