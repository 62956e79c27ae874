"""Shared replays ([Note: shared replays] in trace/space.py): one run of a chain regenerates every replayed
storage it writes (the stem convolution's output inside the stem ReLU's run, max-pool's output with its
indices); legality, pricing (one run, honest transients), the planner's share pass, and bit-exact training
with it forced and planned (torchvision ResNet-18, CPU)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from memstrata.decisions import PlanError, ReplayDecision
from memstrata.hardware import profile
from memstrata.plan import greedy as G
from memstrata.plan.api import to_plan
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.simulate import replay_effects, run_transient, simulate
from memstrata.trace.index import trace_index
from memstrata.trace.record import trace_step
from memstrata.trace.space import decision_space

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stem():
    """ResNet-18's measured trace, the stem's conv1 output, its ReLU output and max-pool's two outputs."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    trace = trace_step(copy.deepcopy(base), x, y)
    space = decision_space(trace)
    ops = trace.ops
    conv = next(s.id for s in trace.saved_storages() if s.producer == 0)
    relu = next(s.id for s in trace.saved_storages() if space.replay_chain(s.id)
                and trace.units[ops[space.replay_chain(s.id)[-1]].unit].module == "relu")
    pool = sorted(s.id for s in trace.saved_storages() if space.replay_chain(s.id)
                  and ops[space.replay_chain(s.id)[-1]].name.startswith("aten.max_pool2d_with_indices"))
    assert space.replay_chain(conv) == (0,) and 0 in space.replay_chain(relu) and len(pool) == 2
    return base, x, y, trace, conv, relu, pool


def _plan(trace, replays):
    keep = forced_plan(trace, "keep", profile("cpu"))
    return replace(keep, replays=tuple(ReplayDecision(s, tuple(c)) for s, c in sorted(replays.items())))


def test_shared_replay_legality(stem):
    _, _, _, trace, conv, relu, pool = stem
    space = decision_space(trace)
    h = profile("cpu")
    rc = space.replay_chain(relu)
    ok = {relu: rc, conv: rc}
    assert space.why_not_shared(conv, rc, ok) == "" and space.replay_groups(ok) == {rc: (relu, conv)}
    simulate(trace, _plan(trace, ok), h, check=False)  # legal
    with pytest.raises(PlanError, match="no replay in the plan has these ops"):
        simulate(trace, _plan(trace, {conv: rc}), h, check=False)  # the host is not replayed
    pc = space.replay_chain(pool[0])
    with pytest.raises(PlanError, match="last forward writer"):
        simulate(trace, _plan(trace, {pool[0]: pc, conv: pc}), h, check=False)  # conv1 is not written by max-pool
    assert space.shared_chains([conv, relu, *pool]) == {conv: rc, relu: rc, pool[0]: pc, pool[1]: pc}


def test_shared_run_is_priced_once_and_its_transient_counted(stem):
    _, _, _, trace, conv, relu, pool = stem
    space, ix = decision_space(trace), trace_index(trace)
    h = profile("cpu")
    rc = space.replay_chain(relu)
    apart = {conv: (0,), relu: rc}
    shared = {conv: rc, relu: rc}
    a, s = replay_effects(ix, h, apart), replay_effects(ix, h, shared)
    # apart, the ReLU's run makes conv1's output afresh and drops it: that is its transient (it was left out
    # because conv1's output is replayed by a run of its own)
    assert a[relu].transient >= ix.nbytes[conv]
    assert sum(e.time for e in s.values()) == pytest.approx(sum(e.time for e in a.values()) - float(ix.dur[0]))
    assert s[conv].event == s[relu].event == min(a[conv].event, a[relu].event) and s[relu].transient < ix.nbytes[conv]
    # max-pool's two outputs: one run, at the earlier of their replay events
    pc = space.replay_chain(pool[0])
    p = replay_effects(ix, h, {pool[0]: pc, pool[1]: pc})
    assert p[pool[0]].event == p[pool[1]].event and sorted(e.time > 0 for e in p.values()) == [False, True]
    # a run drops a value after its last reader: conv -> bn -> relu holds at most two stem-sized values at once
    assert run_transient(ix, rc, (relu,)) <= ix.nbytes[conv] + 2**16


class _CountConvolutions(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _train(base, ref, trace, p, x, y, steps=2):
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, p, profile("cpu"))
    try:
        train_steps(model, x, y, steps=steps, step_ctx=rt.step)
        assert state_mismatches(ref, model) == []
        stats = rt.last_stats
        with rt.step():  # one more step, counting the convolutions its backward runs (replays only)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            with _CountConvolutions() as count:
                loss.backward()
        return stats, count.n
    finally:
        rt.close()


def test_shared_replay_bit_exact_runs_once_and_frees_what_is_predicted(stem, monkeypatch):
    base, x, y, trace, conv, relu, pool = stem
    monkeypatch.setattr(ActivationRuntime, "_SAMPLE_INTERVAL", 0.0)
    space = decision_space(trace)
    h = profile("cpu")
    rc, pc = space.replay_chain(relu), space.replay_chain(pool[0])
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    got = {}
    for name, rp in (("apart", {conv: (0,), relu: rc, pool[0]: pc}),
                     ("shared", {conv: rc, relu: rc, pool[0]: pc, pool[1]: pc}),
                     ("keep", {})):
        p = _plan(trace, rp)
        stats, convs = _train(base, ref, trace, p, x, y)  # bit-exact with the unmanaged reference
        got[name] = (convs, stats.replayed, stats.heap_peak_bytes,
                     simulate(trace, p, h, check=False).peaks[h.fast.name])
    assert got["apart"][0] == 2 and got["shared"][0] == 1  # the stem convolution runs once when shared
    assert got["shared"][1] >= 4
    measured = got["keep"][2] - got["shared"][2]
    predicted = got["keep"][3] - got["shared"][3]
    assert predicted > 0 and measured >= predicted - 2**18, (measured, predicted)


def test_planner_shares_and_the_planned_plan_trains_bit_exact(stem):
    base, x, y, trace, conv, relu, pool = stem
    space, ix = decision_space(trace), trace_index(trace)
    h = profile("cpu")
    ev_ = G.Evaluator(ix, h, int(trace.observed_peak), ())
    st = G.State(replays={conv: (0,), relu: space.replay_chain(relu)})
    res = ev_(st)
    st2, res2 = G.share_replays(ev_, st, res)
    assert st2.replays[conv] == space.replay_chain(relu)  # one convolution fewer, and room for conv1's output
    assert res2.step_time < res.step_time and res2.feasible
    p = to_plan(trace, h, int(trace.observed_peak), st2, res2, "greedy")
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, p, h)
    try:
        train_steps(model, x, y, steps=2, step_ctx=rt.step)
        assert rt.last_stats.replayed >= 2 and rt.last_stats.misaligned is None
    finally:
        rt.close()
    assert state_mismatches(ref, model) == []


def test_heavy_replay_reruns_one_convolution_bit_exact(stem, monkeypatch):
    """[Note: heavy replays] in trace/space.py: a convolution output inside a block replays by that
    convolution alone from its kept input, priced at its forward time; bit-exact, and it frees what the
    simulator predicts."""
    base, x, y, trace, conv, relu, pool = stem
    monkeypatch.setattr(ActivationRuntime, "_SAMPLE_INTERVAL", 0.0)
    space, ix = decision_space(trace), trace_index(trace)
    h = profile("cpu")
    heavy = [s.id for s in trace.saved_storages() if s.producer and s.module.startswith("layer1")
             and trace.ops[s.producer].name == "aten.convolution.default"]
    assert heavy and all(space.replay_chain(s) == (trace.storages[s].producer,) for s in heavy)
    held = {x for s in heavy for x in space.replay_inputs(s)}
    assert held and all(trace.storages[x].saved for x in held)
    rp = {s: space.replay_chain(s) for s in heavy}
    assert sum(e.time for e in replay_effects(ix, replace(h, fused_replay=True), rp).values()) == pytest.approx(
        sum(float(ix.dur[trace.storages[s].producer]) for s in heavy) + h.kernel_overhead * len(heavy))
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    got = {}
    for name, q in (("keep", {}), ("heavy", rp)):
        p = _plan(trace, q)
        stats, convs = _train(base, ref, trace, p, x, y)
        got[name] = (convs, stats.heap_peak_bytes, simulate(trace, p, h, check=False).peaks[h.fast.name])
    assert got["keep"][0] == 0 and got["heavy"][0] == len(heavy)
    measured, predicted = got["keep"][1] - got["heavy"][1], got["keep"][2] - got["heavy"][2]
    assert predicted > 0 and measured >= predicted - 2**18, (measured, predicted)
