"""What a loader's images/s per core means for a GPU: the fraction of its time it would wait.

[Note: GPU wait from a CPU loader rate]
A GPU that trains at ``gpu_rate`` images/s (measured with its input already on the device) fed by
a loader that delivers ``per_core * cores`` images/s waits, in steady state and with loading fully
overlapped with compute,

    wait(cores) = max(0, 1 - per_core * cores / gpu_rate)

of its time, and needs ``ceil(gpu_rate / per_core)`` cores to never wait.  Assumptions, each of
which makes the figure optimistic for the loader: the rate scales linearly with cores (measured
here on at most this box's cores; memory bandwidth and the training process's own core are not
counted), and a core of the GPU's host is as fast as a core of the box the rate was measured on.
The GPU rates are measurements, not datasheet figures (`GPU_REFERENCES` says where each is from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GpuReference", "GPU_REFERENCES", "H200_RESNET50", "WAIT_CORES", "wait_fraction", "cores_to_feed"]


@dataclass(frozen=True)
class GpuReference:
    """A measured training rate of one model on one GPU (input already on the GPU)."""

    label: str
    images_per_s: float
    source: str


H200_RESNET50 = GpuReference(
    "H200 ResNet-50", 4682.3,
    "measured: bench/results/2026-11-28-h200/run2-5101fcc/resnet50.json, contender 'unmanaged' "
    "(batch 256, 224 px, bf16 autocast, channels_last, SGD; synthetic input on the GPU; run 1: 4,634.5)")
H200_EFFICIENTNET_B0 = GpuReference(
    "H200 EfficientNet-B0", 5089.8,
    "measured: bench/results/2026-11-28-h200/run2-5101fcc/efficientnet_b0.json, contender 'unmanaged' "
    "(same settings)")
GPU_REFERENCES = (H200_RESNET50, H200_EFFICIENTNET_B0)
# core counts the table reports: this box has 2; the lent H200 machine has 16; 32 for a roomier host
WAIT_CORES = (2, 16, 32)


def wait_fraction(per_core: float | None, cores: int, gpu_rate: float) -> float | None:
    """Fraction of its time a GPU training at `gpu_rate` waits for a loader of `per_core` x `cores`."""
    if per_core is None or gpu_rate <= 0:
        return None
    return max(0.0, 1.0 - per_core * cores / gpu_rate)


def cores_to_feed(per_core: float | None, gpu_rate: float) -> int | None:
    """Cores a loader needs to keep a GPU of `gpu_rate` busy (linear scaling assumed)."""
    if not per_core:
        return None
    return math.ceil(gpu_rate / per_core)
