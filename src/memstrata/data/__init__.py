"""The data side: a tiered sample store, clairvoyant placement, and a drop-in loader.

    synth_imagefolder(root, images, classes, seed=0, progress=True)   # `memstrata data synth`
    build_store(root, out, ...)                                       # `memstrata data build`
    TieredLoader(root_or_dataset, batch_size, seed=..., epochs=...)   # the loader
    simulate_hit_rates(seq, capacities, policy)                       # cache-policy benchmark
"""

from .augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, crop_params, flip_params, uniforms
from .errors import CorruptSourceError, DataError, StoreFullError, StoreMismatchError
from .loader import DataBudget, StoreDataset, TieredLoader, cuda_available
from .order import SAMPLERS, access_sequence, epoch_length, epoch_order, node_sequence
from .policy import POLICIES, BeladyCache, CacheSimResult, LRUCache, next_use, simulate_hit_rates
from .source import DatasetSource, ImageFolderSource, decode_file
from .store import BuildReport, SampleStore, build_store
from .synth import synth_imagefolder

__all__ = [
    "synth_imagefolder", "build_store", "BuildReport", "SampleStore", "StoreDataset",
    "TieredLoader", "DataBudget", "TrainAugment", "IMAGENET_MEAN", "IMAGENET_STD", "crop_params", "flip_params",
    "uniforms", "epoch_order", "access_sequence", "node_sequence", "epoch_length", "SAMPLERS",
    "simulate_hit_rates", "CacheSimResult", "BeladyCache", "LRUCache", "next_use", "POLICIES",
    "ImageFolderSource", "DatasetSource", "decode_file", "cuda_available",
    "DataError", "CorruptSourceError", "StoreFullError", "StoreMismatchError",
]
