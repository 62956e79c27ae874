"""Sign replays ([Note: sign replays] in runtime/signs.py): a saved ReLU output read in backward only by ReLU's
own backward and max-pool's backward is kept as one bit per element; which storages qualify, the simulator's
price and bytes, and bit-exact training with it forced and planned (torchvision ResNet-18 with out-of-place
ReLUs, as the Manager runs it; CPU)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memstrata.decisions import ReplayDecision
from memstrata.hardware import profile
from memstrata.plan.api import minimum_budget, plan as make_plan
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.runtime.signs import SignBits, SignPacked
from memstrata.simulate import replay_effects, replay_time, simulate
from memstrata.trace.index import trace_index
from memstrata.trace.record import trace_step
from memstrata.trace.space import decision_space

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 9, 9), (3, 5, 7)])
def test_bits_give_the_same_gradients(dtype, shape):
    torch.manual_seed(0)
    a = torch.randn(shape).to(dtype)
    flat = a.view(-1)
    flat[0], flat[1], flat[2] = float("nan"), -0.0, 0.0
    r = torch.relu(a)
    signs = SignBits(r.untyped_storage(), r.dtype)
    assert signs.nbytes == (r.numel() + 7) // 8
    u = SignPacked(signs, r, None).unpack()
    assert u.dtype == r.dtype and u.shape == r.shape and u.stride() == r.stride()
    g = torch.randn(shape).to(dtype)
    assert torch.equal(torch.ops.aten.threshold_backward(g, r, 0), torch.ops.aten.threshold_backward(g, u, 0))
    if len(shape) == 4:
        out, idx = torch.ops.aten.max_pool2d_with_indices(r, [3, 3], [2, 2], [1, 1])
        go = torch.randn_like(out)
        args = ([3, 3], [2, 2], [1, 1], [1, 1], False, idx)
        want = torch.ops.aten.max_pool2d_with_indices_backward(go, r, *args)
        assert torch.equal(torch.ops.aten.max_pool2d_with_indices_backward(go, u, *args), want)


def _out_of_place(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # as the Manager runs a model (its trace and runtime use out-of-place activations)
    return model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    base = _out_of_place(torchvision.models.resnet18(num_classes=10))
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    trace = trace_step(copy.deepcopy(base), x, y)
    space = decision_space(trace)
    ops = trace.ops
    stem = next(s.id for s in trace.saved_storages() if s.producer is not None and ops[s.producer].module == "relu")
    return base, x, y, trace, stem


def test_which_storages_are_sign_only(resnet):
    _, _, _, trace, stem = resnet
    space = decision_space(trace)
    ops = trace.ops
    signs = [s.id for s in trace.saved_storages() if space.sign_only(s.id)]
    # the stem ReLU (read by max-pool's and its own backward) and the last ReLU (average pooling's backward does
    # not save its input); a block's inner ReLU output feeds a convolution, whose backward reads its values
    assert stem in signs and {ops[trace.storages[s].producer].module for s in signs} == {"relu", "layer4.1.relu"}
    inner = next(s.id for s in trace.saved_storages()
                 if s.producer is not None and ops[s.producer].module == "layer1.0.relu")
    assert not space.sign_only(inner)
    conv = next(s.id for s in trace.saved_storages() if s.producer == 0)
    assert not space.sign_only(conv)
    chain = space.replay_chain(stem)
    assert space.sign_replays({stem: chain}) == {stem}
    assert space.sign_replays({stem: chain, conv: chain}) == frozenset()  # a shared run re-runs the chain
    pool = [s.id for s in trace.saved_storages() if stem in space.replay_inputs(s.id)]
    assert pool and space.sign_replays({stem: chain, pool[0]: space.replay_chain(pool[0])}) == frozenset()


def test_simulator_prices_twice_the_relu_and_counts_the_bits(resnet):
    _, _, _, trace, stem = resnet
    space = decision_space(trace)
    ix = trace_index(trace)
    h = profile("cpu")
    chain = space.replay_chain(stem)
    relu = trace.storages[stem].producer
    t = replay_time(ix, h, stem, chain)
    assert t == pytest.approx(2 * trace.ops[relu].duration)
    assert replay_time(ix, h, stem, chain, sign=False) == pytest.approx(sum(trace.ops[j].duration for j in chain))
    eff = replay_effects(ix, h, {stem: chain})[stem]
    assert eff.held == () and eff.signs == (trace.storages[stem].nbytes // 4 + 7) // 8 and eff.transient > 0


class _CountConvolutions(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_sign_replay_trains_bit_exact_and_reruns_nothing(resnet, monkeypatch):
    base, x, y, trace, stem = resnet
    monkeypatch.setattr(ActivationRuntime, "_SAMPLE_INTERVAL", 0.0)
    h = profile("cpu")
    space = decision_space(trace)
    keep = forced_plan(trace, "keep", h)
    p = replace(keep, replays=(ReplayDecision(stem, space.replay_chain(stem)),))
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    got = {}
    for name, plan in (("sign", p), ("keep", keep)):
        model = copy.deepcopy(base)
        rt = ActivationRuntime(model, trace, plan, h)
        try:
            train_steps(model, x, y, steps=2, step_ctx=rt.step)
            assert state_mismatches(ref, model) == []  # params, grads, buffers, optimizer states
            stats = rt.last_stats
            with rt.step():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                with _CountConvolutions() as count:
                    loss.backward()
            got[name] = (stats, count.n, simulate(trace, plan, h, check=False).peaks[h.fast.name])
        finally:
            rt.close()
    stats, convs, _ = got["sign"]
    assert stats.replayed == len(trace.storages[stem].pack_indices) and stats.misaligned is None
    assert convs == 0  # the stem ReLU's replay re-ran conv1 + BatchNorm + ReLU before
    measured = got["keep"][0].heap_peak_bytes - stats.heap_peak_bytes
    predicted = got["keep"][2] - got["sign"][2]
    assert predicted > 0 and measured >= predicted - 2**18, (measured, predicted)


@pytest.mark.slow
def test_planned_with_sign_replays_trains_bit_exact():
    torch.manual_seed(0)
    base = _out_of_place(torchvision.models.resnet18(num_classes=10))
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))  # activations outweigh the parameters
    trace = trace_step(copy.deepcopy(base), x, y)
    h = profile("cpu")
    # at the smallest budget without offloads (the bench's CPU budget sits at the minimum)
    p = make_plan(trace, h, minimum_budget(trace, h, tiers=()), tiers=())
    # Which replays the plan picks at that budget depends on the measured op times (on the shared box: the stem as
    # a sign replay, or inside max-pool's shared replay, or not at all, across runs), so the choice is not pinned
    # here; the forced tests above pin the sign path, and this one that whatever was planned runs exactly.
    assert p.replays, p.notes
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, p, h)
    try:
        train_steps(model, x, y, steps=2, step_ctx=rt.step)
        assert state_mismatches(ref, model) == [] and rt.last_stats.misaligned is None
        assert rt.last_stats.replayed >= len(p.replays)
    finally:
        rt.close()
