"""The loader scenario's peers: what users pick instead of torchvision's DataLoader(ImageFolder, PIL).

Each peer is the other project run for real (never a re-implementation); a peer whose package or
system library is missing raises `PeerNotInstalled` with a one-line reason, and the scenario's table
shows "not installed: <reason>".  Every peer is imported lazily, inside its builder, so memstrata
imports none of them (they are the optional extra ``memstrata[peers]``).

All peers yield what memstrata's `TieredLoader` with `TrainAugment` yields on CPU: a float32 batch
(B, 3, res, res), RandomResizedCrop(res, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip
(p=0.5) + ImageNet mean/std normalisation, and int64 labels (B,), from the same ImageFolder of
JPEGs, with the same number of workers (processes or threads, each peer's own unit):

``torchvision-v2``  `torchvision.io.decode_jpeg` + `transforms.v2` (RandomResizedCrop(antialias) ->
                    RandomHorizontalFlip -> ToDtype(float32, scale) -> Normalize), per sample in a
                    `DataLoader` with `workers` processes; torchvision's reference recipe's v2 path.
                    (torchvision 0.29 deprecates `torchvision.io`'s decoders in favour of TorchCodec:
                    a DeprecationWarning, and a future peer.)
``spdl``            SPDL's thread pipeline (`spdl.pipeline.PipelineBuilder`): FFmpeg demux + decode
                    with a crop/scale/flip filter graph per image (crop parameters from
                    RandomResizedCrop.get_params on the image's size), `workers` decode threads, one
                    stage that converts the batch and normalises.  Needs FFmpeg 4-9 shared libraries.
``dali``            NVIDIA DALI's CPU pipeline (`device_id=None`): `readers.file` (a fresh shuffle every
                    epoch) -> `decoders.image_random_crop` (decodes only the crop's region) ->
                    `resize` (linear, antialiased) -> `crop_mirror_normalize` (CHW float32, random
                    mirror), `num_threads=workers`, read through `DALIGenericIterator`.  On CUDA the
                    decoder is "mixed" (nvJPEG) and the rest runs on the GPU: not measured on GPU.
``ffcv``            FFCV: the ImageFolder written once to a ``.beton`` file with `RGBImageField(
                    write_mode="raw", max_resolution=...)` -- decoded pixels at the size memstrata's
                    store keeps (the fairest FFCV set-up against a store of decoded samples, and its
                    fastest mode) -- then `Loader(order=RANDOM, num_workers=workers)` with
                    RandomResizedCropRGBImageDecoder -> RandomHorizontalFlip -> NormalizeImage(float32)
                    -> ToTensor -> ToTorchImage.  Its batches are channels-last views (FFCV's default).
``ffcv-jpeg``       the same FFCV loader over a file of JPEGs (`write_mode="jpg"`, quality 90, the
                    images' full size): it decodes every epoch, as the other peers do.

Sample order: torchvision-v2 and spdl draw the order `RandomSampler` draws with a generator seeded
once (what memstrata and the torchvision contender use); DALI and FFCV use their own seeded
shuffles.  Random crops are drawn by each peer's own generator: same distribution, not the same
boxes.  Every peer (and torchvision) decodes the full JPEG every epoch except FFCV and memstrata,
which read decoded pixels prepared before the timed epochs.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["PEERS", "PEER_PACKAGES", "PeerNotInstalled", "build_peer", "peer_extra"]

PEERS = ("torchvision-v2", "spdl", "dali", "ffcv", "ffcv-jpeg")
# the pip names of each peer (pyproject's `peers` extra lists them)
PEER_PACKAGES = {"torchvision-v2": "torchvision", "spdl": "spdl", "dali": "nvidia-dali-cuda130", "ffcv": "ffcv", "ffcv-jpeg": "ffcv"}
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


class PeerNotInstalled(RuntimeError):
    """A peer's package or system library is missing: the scenario reports it, it does not fail."""


def peer_extra(name: str) -> str:
    return f"pip install {PEER_PACKAGES[name]}  (or memstrata[peers])"


def _missing(name: str, e: BaseException) -> PeerNotInstalled:
    first = (str(e).strip().splitlines() or [""])[0]
    return PeerNotInstalled(f"{PEER_PACKAGES[name]}: {type(e).__name__}: {first}"[:300])


def _samples(root: str) -> list[tuple[str, int]]:
    from torchvision.datasets import ImageFolder

    return list(ImageFolder(root).samples)


def _mean_std():
    from memstrata.data import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def _sampler(n: int, seed: int):
    """RandomSampler over n with a generator seeded once: each iteration is the next epoch's order."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.RandomSampler(range(n), generator=g)


# ------------------------------------------------------------------ torchvision.io.decode_jpeg + transforms.v2
class JpegFolder:
    """(path, label) samples read as bytes, decoded by `torchvision.io.decode_jpeg`, then `transform`."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        path, label = self.samples[i]
        img = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        return self.transform(img), label


def _torchvision_v2(spec: dict[str, Any]):
    import torch
    from torchvision.transforms import v2

    mean, std = _mean_std()
    tf = v2.Compose([v2.RandomResizedCrop(spec["res"], scale=SCALE, ratio=RATIO, antialias=True),
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ds = JpegFolder(_samples(spec["root"]), tf)
    w = spec["workers"]
    kw = dict(num_workers=w, persistent_workers=w > 0, pin_memory=spec["device"] == "cuda")
    if w > 0:
        kw["prefetch_factor"] = 2
    g = torch.Generator()
    g.manual_seed(spec["seed"])
    sampler = torch.utils.data.RandomSampler(ds, generator=g)
    return torch.utils.data.DataLoader(ds, batch_size=spec["batch"], sampler=sampler, **kw), len(ds)


# ------------------------------------------------------------------ SPDL
class SpdlLoader:
    """One SPDL pipeline per epoch over that epoch's RandomSampler order."""

    def __init__(self, spec: dict[str, Any]):
        try:
            import spdl.io  # noqa: F401
            import spdl.pipeline  # noqa: F401
        except ImportError as e:
            raise _missing("spdl", e) from None
        import torch

        self.samples = _samples(spec["root"])
        self.n = len(self.samples)
        self.res, self.batch = spec["res"], spec["batch"]
        self.threads = max(1, spec["workers"])
        self.order = _sampler(self.n, spec["seed"])
        mean, std = _mean_std()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        try:  # libspdl loads FFmpeg on first use: find out now, not inside the pipeline
            self._decode(self.samples[0])
        except RuntimeError as e:
            if "libspdl" in str(e) or "FFmpeg" in str(e) or ".so" in str(e):
                raise PeerNotInstalled("spdl: libspdl needs the FFmpeg 4-9 shared libraries "
                                       "(e.g. apt-get install libavformat59 libavfilter8 libavdevice59)") from None
            raise

    def _decode(self, item: tuple[str, int]):
        import spdl.io
        import torch
        from torchvision.transforms import RandomResizedCrop

        path, label = item
        packets = spdl.io.demux_image(path)
        probe = torch.empty((1, 1, 1)).expand(1, packets.height, packets.width)  # a size, no pixels
        top, left, h, w = RandomResizedCrop.get_params(probe, list(SCALE), list(RATIO))
        flip = ",hflip" if torch.rand(()) < 0.5 else ""
        desc = f"crop={w}:{h}:{left}:{top},scale={self.res}:{self.res}:flags=bilinear{flip},format=rgb24"
        return spdl.io.decode_packets(packets, filter_desc=desc), label

    def _collate(self, items):
        import spdl.io
        import torch

        u8 = spdl.io.to_torch(spdl.io.convert_frames([f for f, _ in items]))  # (B, H, W, 3) uint8
        x = torch.empty((u8.shape[0], 3, u8.shape[1], u8.shape[2]), dtype=torch.float32)
        x.copy_(u8.permute(0, 3, 1, 2))
        x.sub_(self.mean).mul_(self.inv_std)
        return x, torch.tensor([lab for _, lab in items], dtype=torch.int64)

    def __iter__(self) -> Iterator:
        from spdl.pipeline import PipelineBuilder

        order = [self.samples[i] for i in self.order]
        pipeline = (PipelineBuilder().add_source(order)
                    .pipe(self._decode, concurrency=self.threads, output_order="input")
                    .aggregate(self.batch)
                    .pipe(self._collate, concurrency=1)
                    .add_sink(2)
                    .build(num_threads=self.threads))
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()


# ------------------------------------------------------------------ NVIDIA DALI
class DaliLoader:
    """DALI's file reader -> ROI decode -> resize -> crop_mirror_normalize, CPU (or GPU on CUDA)."""

    def __init__(self, spec: dict[str, Any]):
        try:
            from nvidia.dali import fn, pipeline_def, types
            from nvidia.dali.plugin.base_iterator import LastBatchPolicy
            from nvidia.dali.plugin.pytorch import DALIGenericIterator
        except ImportError as e:
            raise _missing("dali", e) from None
        import torch

        mean, std = _mean_std()
        cuda = spec["device"] == "cuda"
        res = spec["res"]

        @pipeline_def(batch_size=spec["batch"], num_threads=max(1, spec["workers"]),
                      device_id=torch.cuda.current_device() if cuda else None, seed=spec["seed"] + 1,
                      prefetch_queue_depth=2)
        def pipe():
            jpegs, labels = fn.readers.file(file_root=spec["root"], shuffle_after_epoch=True, name="reader")
            imgs = fn.decoders.image_random_crop(jpegs, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                                 random_area=list(SCALE), random_aspect_ratio=list(RATIO),
                                                 num_attempts=10)
            imgs = fn.resize(imgs, resize_x=res, resize_y=res, interp_type=types.INTERP_LINEAR, antialias=True)
            out = fn.crop_mirror_normalize(imgs, dtype=types.FLOAT, output_layout="CHW",
                                           mean=[m * 255 for m in mean], std=[s * 255 for s in std],
                                           mirror=fn.random.coin_flip(probability=0.5))
            return out, labels

        p = pipe()
        p.build()
        self.it = DALIGenericIterator([p], ["x", "y"], reader_name="reader",
                                      last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        self.n = int(p.epoch_size("reader"))

    def __iter__(self) -> Iterator:
        for b in self.it:
            yield b[0]["x"], b[0]["y"].view(-1).long()


# ------------------------------------------------------------------ FFCV
def ffcv_beton(root: str, max_side: int, cache: str | None = None, mode: str = "raw") -> str:
    """The FFCV file of `root`, written once and reused.

    mode "raw": decoded pixels, long side <= max_side * 4/3 (what memstrata's store keeps for 4:3 images);
    mode "jpg": JPEG quality 90 at the images' own size (long side <= 4096).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    if mode not in ("raw", "jpg"):
        raise ValueError(f"mode must be 'raw' or 'jpg', got {mode!r}")
    # memstrata's store: short side max_side, so ~4:3 images' long side
    max_res = math.ceil(max_side * 4 / 3) if mode == "raw" else 4096
    key = hashlib.sha1(f"{Path(root).resolve()}|{max_res}|{mode}".encode()).hexdigest()[:12]
    base = Path(cache or os.environ.get("MEMSTRATA_CACHE", Path.home() / ".cache" / "memstrata")) / "ffcv"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{Path(root).name}-{key}.beton"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        ds = ImageFolder(root)
        field = RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=90)
        writer = DatasetWriter(str(tmp), {"image": field,
                                          "label": IntField()}, num_workers=max(1, os.cpu_count() or 1))
        writer.from_indexed_dataset(ds)
        os.replace(tmp, path)
    return str(path)


def _ffcv(spec: dict[str, Any], mode: str = "raw"):
    try:
        import numpy as np
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
    except ImportError as e:
        raise _missing("ffcv", e) from None
    mean, std = _mean_std()
    beton = ffcv_beton(spec["root"], spec["max_side"], spec.get("ffcv_cache"), mode)
    image = [RandomResizedCropRGBImageDecoder((spec["res"], spec["res"]), scale=SCALE, ratio=RATIO),
             RandomHorizontalFlip(), NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32),
             ToTensor(), ToTorchImage()]
    loader = Loader(beton, batch_size=spec["batch"], num_workers=max(1, spec["workers"]), order=OrderOption.RANDOM,
                    seed=spec["seed"], drop_last=False,
                    pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
    return loader, len(loader.indices)


def build_peer(name: str, spec: dict[str, Any]):
    """(loader, images) for one peer; `PeerNotInstalled` when it cannot run here."""
    if name == "torchvision-v2":
        return _torchvision_v2(spec)
    if name == "spdl":
        lo = SpdlLoader(spec)
        return lo, lo.n
    if name == "dali":
        lo = DaliLoader(spec)
        return lo, lo.n
    if name == "ffcv":
        return _ffcv(spec, "raw")
    if name == "ffcv-jpeg":
        return _ffcv(spec, "jpg")
    raise ValueError(f"unknown loader peer {name!r}: choose from {', '.join(PEERS)}")
