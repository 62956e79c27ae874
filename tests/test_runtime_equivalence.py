"""Execute stage, CPU tier: managed training is bit-identical to unmanaged training.

For every decision kind forced on (keep, host, NVMe, full recompute, selective
recompute, segments, op-level replay, a deterministic mix of all of them) and for a plan from the planner,
parameters, gradients and buffers (BatchNorm running stats, num_batches_tracked)
after 5 SGD-momentum steps are torch.equal to plain training from the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from memstrata.hardware import profile
from memstrata.manager import Manager
from memstrata.plan.api import minimum_budget
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps

from runtime_cases import cpu_hierarchy, run_forced_bit_exact, setup_case

STEPS = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("keep", "host", "nvme", "recompute", "selective", "segment", "replay", "mixed")


class DropBlock(nn.Module):
    """conv-bn-relu-dropout with a residual: dropout inside a recompute unit."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return x + self.drop(torch.relu(self.bn(self.conv(x))))


class StochasticBlock(nn.Module):
    """Stochastic depth (torchvision's op) and a random mask drawn with torch.rand."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.sd = torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        mask = (torch.rand_like(x) > 0.2).to(x.dtype)
        return x + self.sd(torch.nn.functional.gelu(self.conv(x)) * mask)


def rng_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), DropBlock(8), StochasticBlock(8), DropBlock(8), StochasticBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 10),
    )


def small_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2,
                                       num_classes=10)


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "densenet": (small_densenet, 32),
    "rng_net": (rng_net, 16),
}

def setup_model(name: str):
    """(initial model, x, y, reference after STEPS plain steps, trace) — built once per model."""
    make, res = MODELS[name]
    return setup_case(name, make, res, STEPS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_forced_kind_bit_exact(model_name, kind, tmp_path):
    plan, stats = run_forced_bit_exact(setup_model(model_name), kind, tmp_path, STEPS)
    if kind in ("recompute", "selective"):
        assert stats.recomputed_units > 0
    if kind == "segment" and any(u.is_segment for u in plan.units):
        assert stats.recomputed_segments == sum(u.is_segment for u in plan.units)
    if kind == "replay":
        assert plan.replays and stats.replayed > 0


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "densenet"])
def test_planner_plan_bit_exact(model_name, tmp_path):
    """A plan from the planner, at a budget halfway between its minimum and the unmanaged peak."""
    base, x, y, ref, trace = setup_model(model_name)
    h = cpu_hierarchy(tmp_path)
    lo, hi = minimum_budget(trace, h), trace.observed_peak
    budget = (lo + hi) // 2  # margin: the Manager re-traces, and the minimum moves with measured op times
    model = copy.deepcopy(base)
    mgr = Manager(model, budget=budget, nvme_dir=tmp_path, warmup_steps=0)
    try:
        # step 0 is the trace step (plain training, observed), steps 1..4 run under the plan
        train_steps(model, x, y, steps=STEPS, step_ctx=lambda: mgr.step(x))
        modes = [s["mode"] for s in mgr.report()["steps"]]
        assert modes == ["trace"] + ["managed"] * (STEPS - 1)
        assert len(mgr.plan.storages) + len(mgr.plan.units) + len(mgr.plan.replays) > 0, mgr.plan.notes
        assert [s["stats"]["misaligned"] for s in mgr.report()["steps"][1:]] == [None] * (STEPS - 1)
        assert state_mismatches(ref, model) == []
    finally:
        mgr.close()
    assert not any(tmp_path.iterdir())


def test_selective_policy_saves_the_planned_ops():
    """SAC really keeps the planned outputs: no conv is re-run during the backward."""
    base, x, y, _, trace = setup_model("resnet18")
    h = profile("cpu")
    plan = forced_plan(trace, "selective", h)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, plan, h)
    assert rt.describe()["selective_units"] > 0
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "convolution.default" in str(func) and torch._C._current_graph_task_id() != -1:
                self.n += 1
            return func(*args, **(kwargs or {}))

    for p in (plan, forced_plan(trace, "recompute", h)):
        rt = ActivationRuntime(copy.deepcopy(base), trace, p, h)
        c = Count()
        with rt.step(), c:
            torch.nn.functional.cross_entropy(rt.model(x), y).backward()
        if p.planner.endswith("selective"):
            assert c.n == 0  # every forward conv output came from SAC's cache
        else:
            assert c.n > 0  # full recompute re-runs them
