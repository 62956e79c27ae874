"""Issue 9: the offload kinds (host, NVMe), segments and a mixed plan, forced, bit-exact on the transformer-style
models and ConvNeXt.  test_units_any_model.py forces the recompute kinds on them; these are the kinds that move
bytes instead (5 steps, `torch.equal` on parameters, gradients, buffers and optimizer states)."""

from __future__ import annotations

import pytest

from runtime_cases import run_forced_bit_exact
from test_units_any_model import FULL, SMALL, setup_model

STEPS = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", ["host", "nvme", "segment", "mixed"])
@pytest.mark.parametrize("model_name", SMALL + FULL[1:])
def test_forced_offload_and_segment_kinds_bit_exact(model_name, kind, tmp_path):
    plan, stats = run_forced_bit_exact(setup_model(model_name), kind, tmp_path, STEPS)
    if kind == "segment":
        assert any(u.is_segment for u in plan.units), [u for u in plan.units]
        assert stats.recomputed_segments == sum(u.is_segment for u in plan.units)
