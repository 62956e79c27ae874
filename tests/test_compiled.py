"""torch.compile'd models under the Manager (memstrata/compiled.py, runtime/compiled.py, plan/compiled.py).

CPU inductor; tiny models so that each compile takes seconds.
"""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
from torch import nn

import importlib
from memstrata import Manager
from memstrata.plan.compiled import correct_compiled, plan_compiled
from memstrata.runtime.compiled import CompiledRuntime, is_compiled
from memstrata.trace.compiled import CompiledTrace


class Gate(nn.Module):
    """A module whose forward depends on an attribute (dynamo guards on it: flipping it recompiles)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = False
        self.w = nn.Parameter(torch.eye(128))

    def forward(self, x):
        return x @ self.w if self.extra else x  # extra: one more matmul, whose input the graph saves


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(),
                         Gate(), nn.Linear(128, 10))


def batches(n: int, batch: int = 256):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def train(model, compiled, data, mgr=None, flips=()):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(data):
        if i in flips:
            model[5].extra = not model[5].extra
        if mgr is None:
            nn.functional.cross_entropy(compiled(x), y).backward()
        else:
            with mgr.step(x):
                nn.functional.cross_entropy(compiled(x), y).backward()
        if i < len(data) - 1:
            opt.step()
            opt.zero_grad()
    return opt


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n
    for (n, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(p, q), n


def test_docstrings():
    for mod in (importlib.import_module("memstrata.plan.compiled"), importlib.import_module("memstrata.trace.compiled")):
        failed, _ = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert failed == 0, mod.__name__


def trace(fraction=1.0, act=600, start=300, above=700):
    return CompiledTrace("m", fraction, (), saved_activation_bytes=act, saved_static_bytes=0, unpacks=0,
                         bytes_at_start=start, peak_above_start=above, peak_source="", step_time=0.1)


def test_plan_picks_the_largest_fitting_fraction_and_corrects_down():
    t = trace()  # peak 1000, of which 600 saved activations
    assert plan_compiled(t, 1000).fraction == 1.0
    p = plan_compiled(t, 760)  # (760 - 400) / 600 = 0.6
    assert p.fraction == pytest.approx(0.6) and p.feasible and p.predicted_peak <= 760
    # measured at 0.6: 900 (the partitioner saved more than predicted): correct from that measurement
    c = correct_compiled(t, trace(0.6, act=500, above=600), 760)
    assert c is not None and c.fraction < 0.6
    # a measurement that leaves no room below the current fraction: the most frugal graph at once
    c = correct_compiled(t, trace(0.6, act=100, above=900), 760)
    assert c is not None and c.fraction == 0.0
    assert correct_compiled(t, trace(0.0, act=0, above=900), 760) is None


def test_compiled_model_under_a_fitting_budget_is_bit_exact():
    data = batches(4)
    ref = make_model()
    train(ref, torch.compile(ref), data)
    model = make_model()
    cm = torch.compile(model)
    assert is_compiled(cm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = Manager(cm, budget="100%")
        train(model, cm, data, mgr)
    assert not [str(w.message) for w in caught if "memstrata" in str(w.message)]  # nothing unmanaged, misaligned
    rep = mgr.report()
    assert [s["mode"] for s in rep["steps"]] == ["warmup", "trace", "managed", "managed"]
    for s in rep["steps"][1:]:
        assert s["stats"]["misaligned"] is None and s["stats"]["packs"] > 0 and s["stats"]["graphs"] == 1
    (shape,) = rep["shapes"].values()
    assert shape["compiled"] and shape["fraction"] == 1.0 and shape["misaligned_steps"] == 0
    assert shape["trace"]["saved_activation_bytes"] > 0
    # one watch window at the setting changed nothing: settled (what the bench waits for before timing)
    assert mgr._compiled_life.settled() and shape["settled"]
    mgr.close()
    assert_same(ref, model)


def test_compiled_model_below_its_peak_recompiles_with_a_smaller_activation_budget():
    """The graph changes (it saves less): values equal those of the same model compiled at that fraction."""
    data = batches(5)
    model = make_model()
    cm = torch.compile(model)
    mgr = Manager(cm, budget=1024)  # below the parameters: the most frugal graph, with a warning
    with pytest.warns(UserWarning, match="below what recompute inside the compiled graph can reach"):
        train(model, cm, data, mgr)
    rep = mgr.report()
    steps = rep["steps"]
    fractions = [s["stats"]["fraction"] if s["stats"] else 1.0 for s in steps]
    assert [s["mode"] for s in steps][:3] == ["warmup", "trace", "compile (0)"] and fractions[2:] == [0.0] * 3
    assert steps[1]["stats"]["saved_activation_bytes"] > 0
    # activation budget 0: the graph saves its inputs only (what is left is the eager loss's saves)
    assert steps[2]["stats"]["saved_activation_bytes"] < steps[1]["stats"]["saved_activation_bytes"] / 10
    assert steps[2]["stats"]["graphs"] == 1 and steps[2]["stats"]["eager_packs"] > 0
    assert steps[3]["stats"]["misaligned"] is None and steps[4]["stats"]["misaligned"] is None
    (shape,) = rep["shapes"].values()
    assert set(shape["measured_peaks"]) == {"1", "0"}  # 0 did not fit either: next, one graph per unit
    assert shape["plan"]["split"] and any("one graph per recompute unit" in n for n in shape["notes"])
    assert not mgr._compiled_life.settled() and not shape["settled"]  # the split graphs are yet to compile
    mgr.close()
    assert cm.forward is mgr._compiled_life.runtime.budget.original[0]  # close() gives the user's forward back

    # The reference: the same model, each step compiled at the fraction the managed step ran at.
    import torch._functorch.config as functorch_config

    ref = make_model()
    compiled = {}
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i, ((x, y), f) in enumerate(zip(data, fractions)):
        with functorch_config.patch(activation_memory_budget=f):
            if f not in compiled:
                compiled[f] = torch.compile(ref, backend="inductor")
            nn.functional.cross_entropy(compiled[f](x), y).backward()
        if i < len(data) - 1:
            opt.step()
            opt.zero_grad()
    assert_same(ref, model)


def test_a_step_that_saves_other_tensors_warns_once_and_is_traced_again():
    data = batches(7)
    ref = make_model()
    train(ref, torch.compile(ref), data, flips=(3, 5))
    model = make_model()
    cm = torch.compile(model)
    mgr = Manager(cm, budget="100%")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, cm, data, mgr, flips=(3, 5))  # steps 3 and 5 run another graph than their trace
    ours = [w for w in caught if "saved other tensors than its trace" in str(w.message)]
    assert "compiled graph changed" in str(ours[0].message)
    assert len(ours) == 1, [str(w.message) for w in caught]
    modes = [s["mode"] for s in mgr.report()["steps"]]
    assert modes == ["warmup", "trace", "managed", "managed (misaligned)", "trace", "managed (misaligned)", "trace"]
    (shape,) = mgr.report()["shapes"].values()
    assert shape["misaligned_steps"] == 2 and any("saved other tensors" in n for n in shape["notes"])
    mgr.close()
    assert_same(ref, model)  # nothing was moved: the values are the compiled graphs'


def test_runtime_counts_saves_and_checks_them():
    model = make_model()
    cm = torch.compile(model)
    x = torch.randn(32, 64)
    cm(x).sum().backward()
    rt = CompiledRuntime(cm)
    with rt.step(x) as s:
        cm(x).sum().backward()
    assert s.packs == s.unpacks > 0 and s.graphs == 1 and s.eager_packs == 0 and s.misaligned is None
    t = rt.trace_of(s, 0.1)
    rt.expect(t)
    with rt.step(x) as s2:
        cm(x).sum().backward()
    assert s2.misaligned is None
    with rt.step(x[:16]) as s3:  # another shape: other storages (and a recompile)
        cm(x[:16]).sum().backward()
    assert s3.misaligned is not None
    with pytest.raises(ValueError):
        CompiledRuntime(model)  # not compiled


@pytest.mark.slow  # compiles one graph per unit: ~50 s on the shared 2-core box
def test_when_no_fraction_fits_it_splits_the_graph_at_units_offloads_then_settles_on_the_lowest_peak(tmp_path):
    data = batches(10)
    ref = make_model()
    train(ref, torch.compile(ref), data)
    model = make_model()
    cm = torch.compile(model)
    mgr = Manager(cm, budget=1024, nvme_dir=str(tmp_path))  # below the parameters: nothing fits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, cm, data, mgr)
    steps = mgr.report()["steps"]
    assert [s["mode"] for s in steps] == ["warmup", "trace", "compile (0)", "managed", "managed",
                                          "compile (0 per unit)", "managed", "managed", "managed", "managed"]
    assert steps[3]["stats"]["graphs"] == 1 and steps[6]["stats"]["graphs"] > 1  # one graph per unit
    assert not steps[7]["stats"]["offload"] and steps[8]["stats"]["offload"] and steps[9]["stats"]["offload"]
    assert steps[8]["stats"]["offloaded_bytes"] > 0 and steps[8]["stats"]["restores"] > 0
    (shape,) = mgr.report()["shapes"].values()
    assert set(shape["measured_peaks"]) == {"1", "0", "0 per unit", "0 per unit + offload"}
    assert any("offloading their activation saves" in n for n in shape["notes"])
    assert shape["misaligned_steps"] == 0
    settled = [str(w.message) for w in caught if "no partitioner activation budget keeps" in str(w.message)]
    assert len(settled) == 1 and "the lowest" in settled[0] and "offloading its saves" in settled[0]
    mgr.close()
    assert not mgr._compiled_life.runtime.budget._hooks  # the graph breaks are gone
    # Another graph: not bit-exact in general; the difference stays at rounding level.
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_no_graph_break_before_an_in_place_module():
    """[Note: no break before an in-place module]: a split never isolates `ReLU(inplace=True)` in its own graph,
    nor breaks before the unit that runs just before it."""
    from memstrata.runtime.compiled import PartitionerBudget

    model = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU()))
    kinds = [type(u).__name__ + ("_" if getattr(u, "inplace", False) else "") for u in PartitionerBudget(model).units]
    assert kinds == ["Linear", "ReLU"]  # the second Linear and the last ReLU; not ReLU_ nor the Linear before it


class _Stem(nn.Module):
    """ResNet's stem in miniature: a unit, a norm, an in-place ReLU, a unit (the root splits into its children)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.relu, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.bn(self.fc1(x))))


def test_split_graphs_never_start_with_an_in_place_write_to_their_input():
    """A break before `bn` made the graph after its call start with the in-place ReLU on bn's output; at
    activation budget 0 that graph saved its input, which the write then changed: autograd's version check
    failed in the unmanaged split graphs (ResNet-18's stem, 2026-12-05)."""
    from memstrata.runtime.compiled import PartitionerBudget

    torch.manual_seed(0)
    model, x = _Stem(), torch.randn(4, 8)
    eager = _Stem()
    eager.load_state_dict(model.state_dict())
    cm = torch.compile(model)
    budget = PartitionerBudget(cm)
    budget.set(0.0, True)
    cm(x).sum().backward()  # raised "modified by an inplace operation" before
    eager(x).sum().backward()
    for p, q in zip(eager.parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert [type(u).__name__ for u in budget.units] == ["Linear", "Linear"]  # fc1 (graph 1), fc2 (graph 2)
    budget.restore()


def test_a_fraction_that_measured_no_lower_than_compiled_goes_to_split_graphs_at_once():
    """[Note: a fraction that saved nothing] in memstrata/compiled.py: no further one-graph recompiles."""
    from memstrata.compiled import CompiledLifecycle, _Shape
    from memstrata.hardware import Budget

    life = CompiledLifecycle(torch.compile(make_model()), Budget.parse(760))  # nothing compiles: no step runs
    assert life.runtime.budget.units  # the model has units to split at
    for peak_at_06, split in ((1100, True), (900, False)):
        cs = _Shape(key=())
        cs.default, cs.budget, cs.fraction = trace(), 760, 0.6  # compiled as is: 1000
        for _ in range(life.WATCH_STEPS):
            life._watch(cs, trace(0.6, act=300, above=peak_at_06 - 300))
        assert cs.recompile and cs.split is split, peak_at_06
        if split:  # higher than as compiled: one graph per unit at once, and said why
            assert cs.fraction == 0.0 and any("does not lower this step's peak" in n for n in cs.notes)
        else:  # lower, not enough: a smaller fraction of the one graph, as before
            assert 0.0 <= cs.fraction < 0.6 and not any("does not lower" in n for n in cs.notes)
    life.close()
