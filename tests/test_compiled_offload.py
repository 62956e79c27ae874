"""Offloading the saves of a split compiled graph (runtime/compiled.py, [Note: offloading the saves of a split
graph]): bit-exact against the same split graphs unmanaged, and the saves really leave tier 0."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from memstrata.runtime.compiled import CompiledRuntime, PartitionerBudget


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(),
                         nn.Linear(128, 10))


@pytest.mark.slow  # compiles one graph per unit (twice: cache hits the second time): ~40 s on the shared box
def test_offloaded_split_graph_is_bit_exact_against_the_same_split_graph_unmanaged(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)) for _ in range(3)]
    ref, model = make_model(), make_model()
    cref, cm = torch.compile(ref), torch.compile(model)
    ref_budget = PartitionerBudget(cref)
    ref_budget.set(0.0, True)  # the same graphs, unmanaged
    rt = CompiledRuntime(cm, nvme_dir=str(tmp_path))
    rt.set_fraction(0.0, True, offload=True)
    oref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        nn.functional.cross_entropy(cref(x), y).backward()
        with rt.step(x) as s:
            live = []
            out = cm(x)
            live.append(len(rt.offloader._live))  # records held between forward and backward
            nn.functional.cross_entropy(out, y).backward()
        assert s.graphs > 1 and s.offloaded_bytes > 0 and s.restores > 0 and live[0] > 0
        for p, q in zip(ref.parameters(), model.parameters()):
            assert torch.equal(p.grad, q.grad)
        for o in (oref, opt):
            o.step()
            o.zero_grad()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert not rt.offloader._live  # every record released after its backward
    store = rt.offloader.store
    assert store is not None and not [f for _, _, fs in os.walk(tmp_path) for f in fs]  # files read back and gone
    rt.close()
    with pytest.raises(ValueError, match="no lower tier"):
        CompiledRuntime(torch.compile(make_model())).set_fraction(0.0, True, offload=True)  # CPU without nvme_dir
