"""[Note: checkpoint's dummy save]: an empty leaf that requires grad, saved beside a unit's inputs only in the
managed step (torch <= 2.11's non-reentrant checkpoint does this), must not shift the pack positions."""

from __future__ import annotations

import copy

import torch
from torch import nn

from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.plan.forced import forced_plan
from memstrata.trace.record import trace_step
from runtime_cases import cpu_hierarchy


class _SaveWithDummy(torch.autograd.Function):
    """Identity that saves an empty leaf, as checkpoint's `_NoopSaveInputs` did beside the inputs up to torch
    2.11 (the inputs themselves are packs of the trace too: here the identity has none)."""

    @staticmethod
    def forward(ctx, dummy, x):
        ctx.save_for_backward(dummy)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


class DummySaver(nn.Module):
    """Saves an extra empty leaf only while `armed` (the managed steps), like a checkpointed unit on torch 2.11."""

    armed = False

    def forward(self, x):
        if DummySaver.armed:
            x = _SaveWithDummy.apply(torch.empty((0,), requires_grad=True), x)
        return x


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), DummySaver(),
                         nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def test_an_extra_empty_leaf_save_does_not_misalign_the_step(tmp_path):
    torch.manual_seed(0)
    base = net()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ref = train_steps(copy.deepcopy(base), x, y, steps=3)
    trace = trace_step(copy.deepcopy(base), x, y)  # plain: no dummy
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, forced_plan(trace, "host", cpu_hierarchy(tmp_path)), cpu_hierarchy(tmp_path))
    DummySaver.armed = True
    try:
        train_steps(model, x, y, steps=3, step_ctx=rt.step)
        assert rt.last_stats.misaligned is None, rt.last_stats.misaligned
        assert rt.last_stats.offloaded["host"] > 0
        assert state_mismatches(ref, model) == []
    finally:
        DummySaver.armed = False
        rt.close()
