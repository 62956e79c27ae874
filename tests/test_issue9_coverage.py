"""Issue 9: the offload kinds (host, NVMe), segments and a mixed plan, forced, bit-exact on the transformer-style
models and ConvNeXt.  test_units_any_model.py forces the recompute kinds on them; these are the kinds that move
bytes instead (5 steps, `torch.equal` on parameters, gradients, buffers and optimizer states)."""

from __future__ import annotations

import copy

import pytest

from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps

from runtime_cases import cpu_hierarchy
from test_units_any_model import FULL, SMALL, setup_model

STEPS = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", ["host", "nvme", "segment", "mixed"])
@pytest.mark.parametrize("model_name", SMALL + FULL[1:])
def test_forced_offload_and_segment_kinds_bit_exact(model_name, kind, tmp_path):
    base, x, y, ref, trace = setup_model(model_name)
    h = cpu_hierarchy(tmp_path)
    plan = forced_plan(trace, kind, h)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, plan, h)
    try:
        train_steps(model, x, y, steps=STEPS, step_ctx=rt.step)
        stats = rt.last_stats
        assert stats.misaligned is None, stats.misaligned
        assert state_mismatches(ref, model) == []
        if kind in ("host", "nvme"):
            assert stats.offloaded[kind] > 0 and stats.demand_fetches == 0
        if kind == "segment":
            assert any(u.is_segment for u in plan.units), [u for u in plan.units]
            assert stats.recomputed_segments == sum(u.is_segment for u in plan.units)
        if kind == "mixed":
            assert stats.recomputed_units > 0 and stats.offloaded["host"] > 0 and stats.offloaded["nvme"] > 0
    finally:
        rt.close()
    assert not any(tmp_path.iterdir()), "NVMe files or directories left behind"
