"""A deterministic, learnable, ImageNet-shaped ImageFolder of JPEGs.

No real dataset can be downloaded on our machines, so demos, tests and
benchmarks use this one.  Every image is a function of ``(seed, index)`` only,
so two runs (or two machines) produce byte-identical files.

Content is structured so that a small CNN can learn the classes (accuracy
curves mean something) but not trivially from one pixel:

* each class has a palette (two grating colours and a shape colour), a grating
  orientation and frequency, and a shape kind (disc, square, triangle, ring,
  cross, diamond);
* each image jitters all of them (colour +-12%, angle +-12 degrees, frequency
  +-15%, shape position/size, phase), adds a second, weaker distractor grating
  and pixel noise, and has its own size around 500x375 (portrait ~20%).

>>> root = synth_imagefolder("/tmp/synth", images=64, classes=4, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .progress import progress_bar as _progress

import numpy as np

__all__ = ["synth_imagefolder", "synth_image", "class_name"]

_SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")


def class_name(c: int, classes: int) -> str:
    """Directory name of class `c`; zero-padded so ImageFolder's sorted order is numeric."""
    width = max(4, len(str(classes - 1)))
    return f"c{c:0{width}d}"


def _class_params(seed: int, c: int) -> dict:
    rng = np.random.default_rng([seed, 0xC1A55, c])
    cols = rng.uniform(0, 255, size=(3, 3))
    # make the two grating colours clearly distinct
    if np.abs(cols[0] - cols[1]).sum() < 150:
        cols[1] = 255 - cols[0]
    return {
        "colors": cols,
        "angle": np.pi * ((c * 0.618034) % 1.0),
        "freq": 4.0 + 14.0 * rng.uniform(),  # cycles per image width
        "shape": _SHAPES[c % len(_SHAPES)],
        "shape_scale": rng.uniform(0.18, 0.32),
    }


def synth_image(seed: int, index: int, classes: int, base_size: tuple[int, int] = (500, 375),
                noise: float = 6.0) -> tuple[np.ndarray, int]:
    """Image `index` of the set as an (H, W, 3) uint8 array, and its class.

    `noise`: the per-pixel noise's standard deviation (grey levels); more makes
    bigger, slower-to-decode JPEGs (16 at quality 90: ~95 KB at 500x375, like an
    ImageNet photo's ~110 KB; the default 6: ~55 KB).
    """
    c = index % classes
    p = _class_params(seed, c)
    rng = np.random.default_rng([seed, index])
    bw, bh = base_size
    w = int(round(bw * rng.uniform(0.8, 1.2)))
    h = int(round(bh * rng.uniform(0.8, 1.2)))
    if rng.uniform() < 0.2:
        w, h = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = xx / w, yy / w  # keep spatial frequency independent of aspect
    ang = p["angle"] + rng.uniform(-0.21, 0.21)
    freq = p["freq"] * rng.uniform(0.85, 1.15)
    g = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xs * np.cos(ang) + ys * np.sin(ang)) + rng.uniform(0, 2 * np.pi))
    # weak distractor grating, random for every image (not class information)
    dang, dfreq = rng.uniform(0, np.pi), rng.uniform(3, 20)
    g2 = 0.5 + 0.5 * np.sin(2 * np.pi * dfreq * (xs * np.cos(dang) + ys * np.sin(dang)))
    cols = p["colors"] * rng.uniform(0.88, 1.12, size=(3, 3))
    img = (cols[0][None, None, :] * g[..., None] + cols[1][None, None, :] * (1 - g[..., None]))
    img = img * (0.8 + 0.2 * g2[..., None])
    # the class shape
    r = p["shape_scale"] * min(h, w) * rng.uniform(0.75, 1.3)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    dx, dy = xx - cx, yy - cy
    kind = p["shape"]
    if kind == "disc":
        m = dx * dx + dy * dy <= r * r
    elif kind == "square":
        m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif kind == "triangle":
        m = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    elif kind == "ring":
        d2 = dx * dx + dy * dy
        m = (d2 <= r * r) & (d2 >= (0.6 * r) ** 2)
    elif kind == "cross":
        m = ((np.abs(dx) <= r * 0.25) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.25) & (np.abs(dx) <= r))
    else:  # diamond
        m = np.abs(dx) + np.abs(dy) <= r
    img[m] = cols[2]
    img += rng.normal(0, 8, size=(1, 1, 1)).astype(np.float32) + rng.normal(0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), c


def write_one_image(args) -> int:
    """Render and write one synthetic JPEG: args = (root, seed, index, classes, quality, size[, noise]); returns 1 if written."""
    root, seed, index, classes, quality, size = args[:6]
    noise = args[6] if len(args) > 6 else 6.0
    from PIL import Image

    # the class (and so the path) is index % classes: check for the file before rendering
    path = Path(root) / class_name(index % classes, classes) / f"img_{index:08d}.jpg"
    if path.exists():
        return 0
    arr, c = synth_image(seed, index, classes, size, noise)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)  # a killed run never leaves a half-written JPEG
    except BaseException:  # a full disk, `ulimit -f`, Ctrl-C: no temp file stays behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return 1


def _remove_stale_temps(root: Path, classes: int) -> None:
    """Remove `img_*.jpg.tmp<pid>` left by a killed run: only those whose process is gone."""
    for c in range(classes):
        for p in (root / class_name(c, classes)).glob("img_*.jpg.tmp*"):
            pid = p.name.rpartition(".tmp")[2]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # alive: another run is writing it
            except ProcessLookupError:
                pass
            except OSError:  # alive but not ours (EPERM)
                continue
            with contextlib.suppress(OSError):
                p.unlink()


def synth_imagefolder(root, images: int, classes: int, seed: int = 0, progress: bool = True, *,
                      size: tuple[int, int] = (500, 375), workers: int | None = None, quality: int = 90,
                      noise: float = 6.0) -> Path:
    """Write `images` deterministic JPEGs in `classes` classes under `root` (ImageFolder layout).

    Image i belongs to class ``i % classes`` and lives at
    ``root/c0003/img_00000042.jpg``.  Existing files are kept (a rerun completes
    a partial set); files are written atomically.  Returns `root` as a Path.
    `size` is the nominal (width, height), jittered +-20% per image;
    `workers` processes generate in parallel (default: all cores, at most 8);
    `noise`: per-pixel noise sd (see `synth_image`).
    """
    if images <= 0 or classes <= 0:
        raise ValueError(f"images and classes must be > 0, got images={images}, classes={classes}")
    if classes > images:
        raise ValueError(f"need at least one image per class: images={images} < classes={classes}")
    from .store import _ignore_sigxfsz

    _ignore_sigxfsz()  # past `ulimit -f` a write must fail (EFBIG), not kill the process
    root = Path(root)
    for c in range(classes):
        (root / class_name(c, classes)).mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, classes)
    jobs = [(str(root), seed, i, classes, quality, tuple(size), float(noise)) for i in range(images)]
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    it_progress = _progress(progress, images, f"synth {images} images -> {root}")
    with it_progress as bar:
        write_images(jobs, workers, bar)
    return root


def write_images(jobs: list[tuple], workers: int, bar) -> None:
    """`write_one_image` over `jobs`, in `workers` spawned processes when there are enough, advancing `bar`."""
    if workers <= 1 or len(jobs) < 64:
        for j in jobs:
            write_one_image(j)
            bar.advance()
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for _ in ex.map(write_one_image, jobs, chunksize=16):
            bar.advance()


