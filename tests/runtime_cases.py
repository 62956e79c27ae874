"""Shared set-up of the runtime tests: a model, its batch, the plain-training reference and its trace, built once."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import torch

from memstrata.hardware import profile
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
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


def run_forced_bit_exact(case, kind: str, nvme_dir, steps: int):
    """Train a copy of `case`'s model under the plan forced to `kind` for `steps` steps; assert it matches the
    plain run exactly, no step was misaligned and no NVMe file was left.  Returns (plan, the last step's stats)
    for the kind-specific checks of the caller."""
    base, x, y, ref, trace = case
    h = cpu_hierarchy(nvme_dir)
    plan = forced_plan(trace, kind, h)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, plan, h)
    try:
        train_steps(model, x, y, steps=steps, step_ctx=rt.step)
        stats = rt.last_stats
        assert stats.misaligned is None, stats.misaligned
        assert state_mismatches(ref, model) == []
        if kind in ("host", "nvme"):
            assert stats.offloaded[kind] > 0 and stats.demand_fetches == 0
        if kind == "mixed":
            assert stats.recomputed_units > 0 and stats.offloaded["host"] > 0 and stats.offloaded["nvme"] > 0
    finally:
        rt.close()
    assert not any(nvme_dir.iterdir()), "NVMe files or directories left behind"
    return plan, stats
