"""Where samples come from before they are in the store: an ImageFolder tree or any map-style dataset.

A source decodes sample i into the store's compact form: an (H, W, 3) uint8
array (RGB, channels last), resized with PIL so the short side is at most
`max_side`.  The decode is deterministic, so "a fresh decode" is a well-defined
reference for checking what the store serves.

[Note: source stamps]
A file source stamps every decode with what the store needs to notice that
the file changed later: `Stamp(size, mtime_ns, ctime_ns, ino, crc)` taken with
fstat on the descriptor the bytes were read from (so the stamp is never newer
than the bytes), crc32 of those bytes.  Checking a stored sample costs one
`stat` (size, mtime, ctime, inode: an overwrite in place changes mtime and
ctime, a replacement changes the inode, and ctime cannot be set back by
`touch`/`utime`); only where the stat differs, or where a content check is
asked for, is the file read again and its crc compared -- equal bytes (a
`touch`, a copy of the tree) just renew the stamp, without a decode.
"""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image as _Image

from .errors import CorruptSourceError
from ..warn import warn_user

__all__ = ["ImageFolderSource", "DatasetSource", "make_source", "to_compact", "decode_file", "decode_bytes",
           "Stamp", "CORRUPT"]


class Stamp(NamedTuple):
    """What a source file looked like when it was decoded (see [Note: source stamps]); crc None = not read."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    crc: int | None = None

    def same_file(self, other: "Stamp") -> bool:
        """Same size, mtime, ctime and inode (the cheap check; crc not compared)."""
        return self[:4] == other[:4]


# PIL raises OSError/ValueError/SyntaxError on corrupt or truncated data, and DecompressionBombError (an
# Exception) when a header claims more than 2 * Image.MAX_IMAGE_PIXELS pixels: a corrupt sample too.
_BOMB = _Image.DecompressionBombError
CORRUPT = (OSError, ValueError, SyntaxError, _BOMB)


def _resize_short(img, max_side: int):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    if max_side and s > max_side:
        r = max_side / s
        nw, nh = (max_side, max(1, round(h * r))) if w <= h else (max(1, round(w * r)), max_side)
        img = img.resize((nw, nh), Image.BILINEAR)
    return img


def decode_file(path: str, max_side: int) -> np.ndarray:
    """Decode an image file into the store form: (H, W, 3) uint8, short side <= max_side.

    Uses the JPEG decoder's DCT scaling (`Image.draft`) to decode big images at
    1/2, 1/4 or 1/8 scale when the result is still >= max_side on the short side.
    """
    return _decode(path, max_side)


def decode_bytes(data: bytes, max_side: int) -> np.ndarray:
    """`decode_file` of a file's bytes (the same result)."""
    return _decode(io.BytesIO(data), max_side)


def _decode(fp, max_side: int) -> np.ndarray:
    from PIL import Image

    with Image.open(fp) as img:
        if max_side and img.format == "JPEG":
            w, h = img.size
            s = min(w, h)
            if s > max_side:
                img.draft("RGB", (max(1, (w * max_side) // s), max(1, (h * max_side) // s)))
        img = img.convert("RGB")
        img = _resize_short(img, max_side)
        return np.asarray(img, dtype=np.uint8).copy()


def to_compact(x, max_side: int) -> np.ndarray:
    """A dataset item's image (PIL image, CHW/HWC tensor or array, uint8 or float in [0,1]) -> store form."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return np.asarray(_resize_short(x.convert("RGB"), max_side), dtype=np.uint8).copy()
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3:
            raise ValueError(f"expected an image tensor of 2 or 3 dims, got shape {tuple(t.shape)}")
        if t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)  # CHW -> HWC
        a = t.numpy()
    else:
        a = np.asarray(x)
        if a.ndim == 2:
            a = a[..., None]
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    img = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(_resize_short(img, max_side), dtype=np.uint8).copy()


class ImageFolderSource:
    """The ImageFolder layout read exactly as torchvision does (same classes, same sample order)."""

    kind = "imagefolder"

    def __init__(self, root, max_side: int = 160, samples=None, classes=None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root = str(Path(root).resolve())
        if samples is not None:  # an existing torchvision DatasetFolder: reuse its scan
            self.samples = [(str(p), int(t)) for p, t in samples]
            self.classes = list(classes or [])
        else:
            if not os.path.isdir(self.root):
                raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
            self.classes, self.class_to_idx = find_classes(self.root)
            self.samples = make_dataset(self.root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        self.targets = np.array([t for _, t in self.samples], dtype=np.int64)
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return self.targets

    def describe(self, i: int) -> str:
        return self.samples[i][0]

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for p, t in self.samples:
            h.update(os.path.relpath(p, self.root).encode())
            h.update(b"\0%d\n" % t)
        return h.hexdigest()

    def load(self, i: int) -> tuple[np.ndarray, int]:
        return self.load_stamped(i)[:2]

    def load_stamped(self, i: int) -> tuple[np.ndarray, int, Stamp]:
        """Decode sample i: (array, label, the stamp of the bytes decoded)."""
        path, t = self.samples[i]
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # before the read: the stamp is never newer than the bytes
                data = f.read()
            stamp = Stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, zlib.crc32(data))
            return decode_bytes(data, self.max_side), t, stamp
        except CORRUPT as e:
            raise CorruptSourceError(path, i, e) from e

    def stat(self, i: int) -> Stamp:
        """The file's stamp now, without its crc (raises OSError if it is gone)."""
        st = os.stat(self.samples[i][0])
        return Stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def content_stamp(self, i: int) -> Stamp:
        """The file's stamp now, with the crc32 of its bytes (reads the file)."""
        with open(self.samples[i][0], "rb") as f:
            st = os.fstat(f.fileno())
            crc = zlib.crc32(f.read())
        return Stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, crc)


class DatasetSource:
    """Any map-style dataset whose items are (image, label); image a PIL image or tensor/array."""

    kind = "dataset"

    def __init__(self, dataset, max_side: int = 160):
        self.dataset = dataset
        self.max_side = max_side
        self.n = len(dataset)
        t = getattr(dataset, "targets", None)
        self._labels = np.asarray(t, dtype=np.int64) if t is not None and len(t) == self.n else None

    def __len__(self) -> int:
        return self.n

    def labels(self):
        return self._labels  # None when only known after loading

    def describe(self, i: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        if samples is not None:
            try:
                return str(samples[i][0])
            except Exception:
                pass
        return f"{type(self.dataset).__name__}[{i}]"

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}:{self.n}".encode())
        if self._labels is not None:
            h.update(self._labels.tobytes())
        root = getattr(self.dataset, "root", None)
        if root is not None:
            h.update(str(root).encode())
        return h.hexdigest()

    def load(self, i: int) -> tuple[np.ndarray, int]:
        try:
            item = self.dataset[i]
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"dataset[{i}] must be an (image, label) pair, got {type(item).__name__}")
            x, y = item
            return to_compact(x, self.max_side), int(y)
        except (OSError, SyntaxError, _BOMB) as e:
            raise CorruptSourceError(self.describe(i), i, e) from e

    def load_stamped(self, i: int):
        """(array, label, None): a dataset item has no file to stamp, so its changes are not detected."""
        return self.load(i) + (None,)


def make_source(data, max_side: int = 160):
    if isinstance(data, (str, os.PathLike)):
        return ImageFolderSource(data, max_side)
    if isinstance(data, (ImageFolderSource, DatasetSource)):
        return data
    from torchvision.datasets import DatasetFolder

    if isinstance(data, DatasetFolder):
        # Read its files directly (JPEG draft decoding, same samples and labels); its transform is
        # replaced by the loader's batched augmentation.
        if getattr(data, "transform", None) is not None:
            
            warn_user("memstrata reads the ImageFolder's files directly; its transform is not applied "
                          "(the loader's `augment` is)")
        return ImageFolderSource(data.root, max_side, samples=data.samples, classes=getattr(data, "classes", None))
    return DatasetSource(data, max_side)
