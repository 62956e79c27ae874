"""Segments (a run of consecutive Sequential children recomputed as one region) and op-level replay (a saved
storage regenerated from kept inputs through a chain of cheap ops): legality, cost, and bit-exact training,
forced and planned, on a ResNet-style stack, a flat VGG-style `features` and a small ViT.

The forced kinds on the suite's models (resnet18, efficientnet_b0, mobilenet_v3_small, densenet, rng_net) run in
test_runtime_equivalence.py (KINDS "segment" and "replay").
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from memstrata.decisions import Offload, Plan, PlanError, ReplayDecision, StorageDecision, UnitDecision
from memstrata.hardware import profile
from memstrata.plan.api import minimum_budget, plan
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.simulate import simulate
from memstrata.trace.index import trace_index
from memstrata.trace.space import decision_space, draws_random_numbers, is_replayable_op

from runtime_cases import setup_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3


def resnet_stack() -> nn.Module:
    """A stem and four BasicBlocks in one Sequential: activations dominate, as in a real ResNet step."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Sequential(*[BasicBlock(16, 16) for _ in range(4)]),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class TinyVGG(nn.Module):
    """VGG's shape: a flat `features` Sequential (every unit one layer), a classifier with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=10)


CASES = {"resnet_stack": (resnet_stack, 32), "tiny_vgg": (TinyVGG, 16), "tiny_vit": (tiny_vit, 16)}


def case(name):
    make, res = CASES[name]
    return setup_case(name, make, res, STEPS)


def steady(trace):
    """The trace with op durations from its flops and bytes (a fixed roofline) instead of this loaded box's
    timings, so what the planner picks does not depend on the load; the runtime reads no durations."""
    ops = tuple(replace(op, duration=op.bytes_accessed / 20e9 + op.flops / 50e9 + 2e-6) for op in trace.ops)
    pre = [0.0]
    for op in ops:
        pre.append(pre[-1] + op.duration)
    units = tuple(replace(u, recompute_time=pre[u.last_op + 1] - pre[u.first_op]) for u in trace.units)
    return replace(trace, ops=ops, units=units)


def run_plan(name, p, h, trace=None):
    base, x, y, ref, measured = case(name)
    trace = measured if trace is None else trace
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, p, h)
    try:
        train_steps(model, x, y, steps=STEPS, step_ctx=rt.step)
        return rt.last_stats, state_mismatches(ref, model)
    finally:
        rt.close()


@pytest.mark.parametrize("kind", ["segment", "replay"])
@pytest.mark.parametrize("name", list(CASES))
def test_forced_bit_exact(name, kind):
    trace = case(name)[4]
    h = profile("cpu")
    p = forced_plan(trace, kind, h)
    stats, bad = run_plan(name, p, h)
    assert stats.misaligned is None, stats.misaligned
    assert bad == []
    if kind == "segment":
        segs = [u for u in p.units if u.is_segment]
        assert segs and stats.recomputed_segments == len(segs)
    else:
        assert p.replays and stats.replayed >= len([r for r in p.replays])  # every replayed storage packed as a recipe


@pytest.mark.parametrize("name", ["resnet_stack", "tiny_vit"])
def test_planned_segments_and_replays_bit_exact(name):
    """The greedy planner (recompute only, a tight budget) picks segments or replays; training stays bit-exact."""
    trace = steady(case(name)[4])
    h = profile("cpu")
    lo, hi = minimum_budget(trace, h), trace.observed_peak
    p = plan(trace, h, int(lo + 0.3 * (hi - lo)), planner="greedy", tiers=(), replays=True)
    assert p.replays or any(u.is_segment for u in p.units), p.notes
    stats, bad = run_plan(name, p, h, trace)
    assert stats.misaligned is None and bad == []
    assert stats.replayed > 0 or stats.recomputed_segments > 0


def test_segments_cover_sequential_runs_only():
    trace = case("tiny_vgg")[4]
    ix = trace_index(trace)
    space = decision_space(trace)
    names = {ix.units[k].module for k in space.legal_segments()}
    assert "features.0..features.4" in names  # VGG's flat features: a run of its layers is one decision
    assert all(ix.units[k].parent in ("features", "classifier") for k in space.legal_segments())
    # a segment frees what single-layer units cannot: the inner ReLU outputs
    single = sum(len(ix.unit_effect(u, (), frozenset(ix.units[u].inputs)).dropped) for u in range(5))
    k = space.segment_of(0, 4)
    seg = ix.unit_effect(k, (), frozenset(ix.units[k].inputs))
    assert len(seg.dropped) > single


def test_illegal_segment_and_replay_decisions_raise():
    trace = case("resnet_stack")[4]
    h = profile("cpu")
    space = decision_space(trace)
    ix = trace_index(trace)
    k = space.legal_segments()[0]
    a, b = ix.span(k)
    mk = lambda **kw: Plan("t", h.name, trace.observed_peak, **kw)  # noqa: E731
    with pytest.raises(PlanError, match="share a unit"):
        simulate(trace, mk(units=(UnitDecision(a, (), end_unit=b), UnitDecision(b))), h, check=False)
    with pytest.raises(PlanError, match="not a segment"):
        simulate(trace, mk(units=(UnitDecision(0, (), end_unit=len(trace.units) - 1),)), h, check=False)
    sid = max(space.replayable_storages(), key=lambda s: trace.storages[s].nbytes)
    chain = space.replay_chain(sid)
    with pytest.raises(PlanError, match="not its chain"):
        simulate(trace, mk(replays=(ReplayDecision(sid, chain[-1:] + chain[:-1] if len(chain) > 1 else (chain[0] + 1,)),)), h,
                 check=False)
    d = StorageDecision(sid, "offload", "nvme", evict_after=trace.storages[sid].producer,
                        prefetch_at=min(trace.storages[sid].backward_reads))
    with pytest.raises(PlanError, match="pick one"):
        simulate(trace, mk(storages=(d,), replays=(ReplayDecision(sid, chain),)), h, check=False)


def test_random_ops_and_heavy_ops_are_never_replayed():
    assert draws_random_numbers("aten.native_dropout.default") and not is_replayable_op("aten.native_dropout.default")
    assert not is_replayable_op("aten.bernoulli_.float") and not is_replayable_op("aten.convolution.default")
    assert is_replayable_op("aten.native_batch_norm.default") and is_replayable_op("aten.relu_.default")
    trace = case("tiny_vgg")[4]
    space = decision_space(trace)
    for s in trace.saved_storages():
        if s.producer is not None and "dropout" in trace.ops[s.producer].name:
            assert "random" in space.why_not_replay(s.id) or "not a saved" in space.why_not_replay(s.id)
        for j in space.replay_chain(s.id):
            assert not draws_random_numbers(trace.ops[j].name)


def test_plan_json_round_trip_with_segments_and_replays():
    trace = case("resnet_stack")[4]
    h = profile("cpu")
    p = forced_plan(trace, "segment", h)
    q = forced_plan(trace, "replay", h)
    both = replace(p, replays=q.replays)
    assert Plan.from_json(both.to_json()) == both
    old = both.to_dict()
    del old["replays"]
    for u in old["units"]:
        u.pop("end_unit")
    assert Plan.from_dict(old).replays == () and not any(u.is_segment for u in Plan.from_dict(old).units)


def test_simulated_replay_cost_and_saving():
    trace = case("resnet_stack")[4]
    h = profile("cpu")
    ix = trace_index(trace)
    space = decision_space(trace)
    p = forced_plan(trace, "replay", h)
    keep = simulate(trace, forced_plan(trace, "keep", h), h)
    eager = simulate(trace, p, h, check=False)
    fused = simulate(trace, p, replace(h, fused_replay=True), check=False)
    # one run per group of replays with the same ops ([Note: shared replays] in trace/space.py)
    runs = space.replay_groups(space.replays_of(p))
    assert len(runs) < len(p.replays)  # the forced plan shares (BatchNorm's statistics with each other)
    chains = sum(float(ix.dur[list(ops)].sum()) for ops in runs)
    assert eager.recompute_time == pytest.approx(chains)
    assert fused.recompute_time < eager.recompute_time
    assert eager.peaks[h.fast.name] < keep.peaks[h.fast.name]
    assert len(eager.recomputes) == len(runs) and all(u < 0 for u, _, _ in eager.recomputes)
    # a segment is priced as the run of its units read as one: its dropped bytes include the inner block outputs
    k = space.legal_segments()[0]
    a, b = ix.span(k)
    inner = set(trace.units[b].inputs)
    assert inner & set(ix.unit_effect(k, (), frozenset(ix.units[k].inputs)).dropped)
    assert not inner & set(ix.unit_effect(a, (), frozenset(ix.units[a].inputs)).dropped)
    assert Offload(1, 0, 1).tier == 1  # the record the planners use is unchanged


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_replay_frees_what_the_simulator_predicts(monkeypatch, arch):
    """[Note: what a recipe holds] in runtime/replay.py: a recipe holds only what the replay model counts (before:
    mobilenet_v3_small -1.35 MB measured against 3.25 MB predicted, resnet18 -5.49 MB against 0.46 MB)."""
    from memstrata.runtime import ActivationRuntime
    from memstrata.runtime.check import train_steps
    from memstrata.simulate import simulate
    from memstrata.trace.record import trace_step

    monkeypatch.setattr(ActivationRuntime, "_SAMPLE_INTERVAL", 0.0)
    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)(num_classes=10)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    trace = trace_step(copy.deepcopy(base), x, y)
    h = profile("cpu")
    got = {}
    for kind in ("keep", "replay"):
        p = forced_plan(trace, kind, h)
        rt = ActivationRuntime(copy.deepcopy(base), trace, p, h)
        train_steps(rt.model, x, y, steps=1, step_ctx=rt.step)
        got[kind] = (rt.last_stats.heap_peak_bytes, simulate(trace, p, h, check=False).peaks[h.fast.name])
        rt.close()
    measured, predicted = got["keep"][0] - got["replay"][0], got["keep"][1] - got["replay"][1]
    assert predicted > 0 and measured >= predicted - 2**20, (measured, predicted)


def test_stem_replays_across_units_from_the_batch(monkeypatch):
    """[Note: replays across units] and [Note: replays from the batch] in trace/space.py: torchvision ResNet's
    stem (conv1, bn1, relu: sibling units) replays its ReLU output from the batch without pinning the
    convolution output, the convolution output replays on its own, and both free what the simulator predicts,
    bit-exactly."""
    from memstrata.runtime import ActivationRuntime
    from memstrata.runtime.check import state_mismatches, train_steps
    from memstrata.trace.record import trace_step

    monkeypatch.setattr(ActivationRuntime, "_SAMPLE_INTERVAL", 0.0)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    trace = trace_step(copy.deepcopy(base), x, y)
    space = decision_space(trace)
    ops = trace.ops
    relu = next(s for s in trace.saved_storages() if space.replay_chain(s.id)
                and trace.units[ops[space.replay_chain(s.id)[-1]].unit].module == "relu")  # relu_ on bn1's output
    conv = next(s for s in trace.saved_storages() if s.producer == 0)
    chain = space.replay_chain(relu.id)
    assert chain and chain[0] == 0, space.why_not_replay(relu.id)  # conv1, bn1, relu: three units
    assert len({ops[j].unit for j in chain}) == 3 and conv.id not in space.replay_inputs(relu.id)
    assert space.replay_chain(conv.id) == (0,)
    h = profile("cpu")
    keep = forced_plan(trace, "keep", h)
    p = replace(keep, replays=(ReplayDecision(conv.id, (0,)), ReplayDecision(relu.id, chain)))
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    got = {}
    for name, q in (("keep", keep), ("replay", p)):
        model = copy.deepcopy(base)
        rt = ActivationRuntime(model, trace, q, h)
        train_steps(model, x, y, steps=2, step_ctx=rt.step)
        got[name] = (rt.last_stats.heap_peak_bytes, simulate(trace, q, h, check=False).peaks[h.fast.name],
                     rt.last_stats.replayed, state_mismatches(ref, model))
        rt.close()
    assert got["replay"][2] >= 2 and got["replay"][3] == [] and got["keep"][3] == []
    measured, predicted = got["keep"][0] - got["replay"][0], got["keep"][1] - got["replay"][1]
    assert predicted >= conv.nbytes and measured >= predicted - 2**18, (measured, predicted)
