"""A synthetic ImageNet-style root for the recipe: ``train/`` and ``val/`` from the same classes, disjoint images.

Image i of `synth_imagefolder(seed)` is a function of (seed, i) and its class
palette of (seed, class); train/ holds images 0..train-1 and val/ images
train..train+val-1 of the same generator, so validation measures generalisation
to unseen images of the same classes.  (Generating val/ with another seed
would change the classes themselves.)
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["synth_recipe_root"]


def synth_recipe_root(root, train: int, val: int, classes: int, seed: int = 0, progress: bool = True,
                      size: tuple[int, int] = (500, 375), workers: int | None = None, noise: float = 6.0) -> Path:
    """Write (or complete) ROOT/train and ROOT/val; returns ROOT.  `noise`: see `data.synth.synth_image`."""
    from ..data.progress import progress_bar
    from ..data.synth import class_name, synth_imagefolder, write_images

    if val <= 0 or val < classes:
        raise ValueError(f"val must hold at least one image per class: val={val} < classes={classes}")
    root = Path(root)
    synth_imagefolder(root / "train", train, classes, seed=seed, progress=progress, size=size, workers=workers,
                      noise=noise)
    vroot = root / "val"
    for c in range(classes):
        (vroot / class_name(c, classes)).mkdir(parents=True, exist_ok=True)
    jobs = [(str(vroot), seed, i, classes, 90, tuple(size), float(noise)) for i in range(train, train + val)]
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    with progress_bar(progress, len(jobs), f"synth {val} validation images -> {vroot}") as bar:
        write_images(jobs, workers, bar)
    return root
