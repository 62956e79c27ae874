"""Gradients and parameters off tier 0 under torch.compile (memstrata/compiled.py's offload rung,
runtime/grads.py, runtime/params.py [Note: parameters of a compiled unit], plan/compiled.py `offload_plan`
[Note: the what-if of a split step]): bit-exact against the same compiled graphs unmanaged, no recompiles,
and the offload plan's predicted peak counts gradients and parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from memstrata import Manager
from memstrata.runtime.compiled import PartitionerBudget

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model() -> nn.Module:
    """Parameters (1 MiB per Linear) and gradients as large as the activations at batch 512: all three count."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.LayerNorm(512), nn.GELU(),
                         nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))


def batches(n: int, batch: int = 512):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow  # compiles the model three ways (as given, at 0, split per unit): ~60 s on the shared box
def test_gradients_and_parameters_tiered_under_compile_are_bit_exact_against_the_same_graphs(tmp_path):
    data = batches(11)
    ref, model = make_model(), make_model()
    cref, cm = torch.compile(ref), torch.compile(model)
    ref_budget = PartitionerBudget(cref)
    oref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = Manager(cm, budget=1 << 20, optimizer=opt, tier_grads=True, tier_params=True,
                      nvme_dir=str(tmp_path))  # below the parameters: only the lowest rung comes close
    rt = mgr._compiled_life.runtime
    tiered_steps, frames = [], []
    for i, (x, y) in enumerate(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mgr.step(x):
                nn.functional.cross_entropy(cm(x), y).backward()
        s = mgr.report()["steps"][-1]
        ref_budget.set(rt.budget.fraction, rt.budget.split)  # the graphs the managed step ran
        nn.functional.cross_entropy(cref(x), y).backward()
        st = s["stats"] or {}
        if st.get("params_tiered"):
            tiered_steps.append(i)
            frames.append(_frames())
            assert all(p.grad is None for p in model.parameters())  # every gradient below tier 0 after its hook
            assert rt.params.stats.releases > 0 and rt.params.stats.bytes_read > 0
        if i < len(data) - 1:
            mgr.optimizer.step()
            mgr.optimizer.zero_grad()
            oref.step()
            oref.zero_grad()
            for p, q in zip(ref.parameters(), model.parameters()):
                assert torch.equal(p, q), i
    assert len(tiered_steps) >= 2, [s["mode"] for s in mgr.report()["steps"]]
    assert frames[0] == frames[-1]  # the tiered steps compiled nothing new (no recompile per step)
    assert mgr.optimizer.grads.stats.bytes_down > 0
    (shape,) = mgr.report()["shapes"].values()
    assert shape["misaligned_steps"] == 0
    assert any("0 per unit + offload + gradients + parameters" == k for k in shape["measured_peaks"])
    states = {k: {n: v.clone() for n, v in d.items()} for k, d in mgr.optimizer.state_dict()["state"].items()}
    mgr.close()  # the last step's gradients back in p.grad
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(p.grad, q.grad), n
    for (n, p), (_, q) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(p, q), n
    want = oref.state_dict()["state"]
    assert set(want) == set(states)
    for k in want:
        for n in want[k]:
            assert torch.equal(want[k][n], states[k][n]), (k, n)


@pytest.mark.slow  # compiles the model three ways: ~60 s on the shared box
def test_offload_plan_counts_gradients_and_parameters(tmp_path):
    """The offload rung's predicted peak (from the split step's what-if readings) against the peak measured when
    it runs: they agree within a small margin.  The earlier prediction subtracted every save from the split
    step's peak and ignored the gradients, which exist at the end of the backward where that peak is."""
    data = batches(11)
    model = make_model()
    cm = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = Manager(cm, budget=1 << 20, optimizer=opt, tier_grads=True, tier_params=True, nvme_dir=str(tmp_path))
        for x, y in data:
            with mgr.step(x):
                nn.functional.cross_entropy(cm(x), y).backward()
            mgr.optimizer.step()
            mgr.optimizer.zero_grad()
    steps = mgr.report()["steps"]
    offload = [s for s in steps if (s["stats"] or {}).get("params_tiered") and s["mode"] == "managed"]
    assert offload, [s["mode"] for s in steps]
    predicted = offload[0]["predicted_peak_bytes"]
    # the lowest of the (three) offload steps: on a loaded box a step's buffered NVMe writes can stay in flight
    # past its peak (seen: 5.41, 5.41, 7.50 MB against 5.41 predicted; twice in one run made the median 6.45)
    measured = min(s["peak_bytes"] for s in offload)
    split = [s for s in steps if s["mode"] == "managed" and (s["stats"] or {}).get("graphs", 0) > 1
             and not s["stats"]["offload"]]
    grads = split[-1]["stats"]["grad_bytes"]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert grads == params  # every gradient was made in the step (zeroed to None before it)
    # within a quarter of the parameters' size (2.2 MB); the same reading without the gradients and parameters
    # counted (saves offloaded only) is off by more than half of it
    assert abs(measured - predicted) <= params // 4, (measured, predicted, params)
    saves_only = max(s["stats"]["bytes_at_start"] + s["stats"]["whatif_peaks"][0] for s in split[-2:])
    assert saves_only - measured > params // 2, (saves_only, measured, params)
    mgr.close()
