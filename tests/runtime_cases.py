"""Shared set-up of the runtime tests: a model, its batch, the plain-training reference and its trace, built once."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import torch

from memstrata.hardware import profile
from memstrata.runtime.check import train_steps
from memstrata.trace.record import trace_step

_CACHE: dict[tuple, tuple] = {}


def setup_case(key: str, make: Callable[[], torch.nn.Module], res: int, steps: int):
    """(initial model, x, y, reference after `steps` plain SGD steps, trace), cached per key."""
    k = (key, res, steps)
    if k not in _CACHE:
        torch.manual_seed(0)
        base = make()
        x = torch.randn(4, 3, res, res)
        y = torch.randint(0, 10, (4,))
        ref = train_steps(copy.deepcopy(base), x, y, steps=steps)
        trace = trace_step(copy.deepcopy(base), x, y)
        _CACHE[k] = (base, x, y, ref, trace)
    return _CACHE[k]


def cpu_hierarchy(nvme_dir):
    """The CPU profile with its NVMe tier under `nvme_dir`."""
    h = profile("cpu")
    return replace(h, tiers=tuple(replace(t, path=str(nvme_dir)) if t.kind == "nvme" else t for t in h.tiers))
