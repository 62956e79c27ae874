"""A unit whose forward both offloads a saved storage and replays another (Swin-T at 50% on CPU, 2026-12-05).

The replay capture (a dispatch mode around the unit's forward, runtime/replay.py) numbered every op it saw
against the trace, including the ops the pack hook itself ran to offload a storage (the host buffer's
`aten.empty`, the copy): the numbering broke at the first offload and every replay after it in that unit was
kept.  Swin-T b32 128 px, a plan of 18 NVMe offloads and 41 replays: 17 replayed, 1.51x the budget measured
where the simulator predicted 1.0x.  The runtime's own ops now run outside the capture
([Note: the runtime's own ops] in runtime/activations.py).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torchvision.models.swin_transformer import SwinTransformer

from memstrata.hardware import profile
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.manager import with_nvme_dir
from memstrata.trace.record import trace_step
from memstrata.trace.space import decision_space

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_swin() -> torch.nn.Module:
    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=10)


@pytest.mark.parametrize("tier", ["nvme", "host"])
def test_offload_before_a_replay_in_one_unit_keeps_the_replay(tmp_path, tier):
    torch.manual_seed(0)
    base = tiny_swin()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    trace = trace_step(copy.deepcopy(base), x, y)
    h = with_nvme_dir(profile("cpu"), str(tmp_path))
    space = decision_space(trace)
    # the attention softmax of every block: offloadable, not replayable, and packed before the block's MLP replays
    soft = [s for s in trace.saved_storages() if trace.ops[s.producer].name == "aten._softmax.default"]
    rep = forced_plan(trace, "replay", h)
    rep = replace(rep, replays=tuple(d for d in rep.replays  # not those that hold a softmax (the space forbids it)
                                     if not {s.id for s in soft} & set(space.replay_inputs(d.storage))))
    replayed = {d.storage for d in rep.replays}
    assert soft and all(space.offloadable[s.id] and s.id not in replayed for s in soft)
    assert all(any(r.unit == s.unit and min(r.pack_indices) > max(s.pack_indices)
                   for r in (trace.storages[i] for i in replayed)) for s in soft)
    off = tuple(d for d in forced_plan(trace, tier, h).storages if d.storage in {s.id for s in soft})
    assert len(off) == len(soft)
    mixed = replace(rep, storages=off)
    ref = copy.deepcopy(base)
    train_steps(ref, x, y, steps=2)
    got = {}
    for name, p in (("replay", rep), ("mixed", mixed)):
        model = copy.deepcopy(base)
        rt = ActivationRuntime(model, trace, p, h, nvme_dir=str(tmp_path))
        train_steps(model, x, y, steps=2, step_ctx=rt.step)
        got[name] = rt.last_stats
        assert not [n for n in rt.notes if "replay recording stopped" in n], rt.notes
        assert state_mismatches(ref, model) == [], name
        rt.close()
    assert got["mixed"].replayed == got["replay"].replayed > 0
    if tier == "nvme":
        assert got["mixed"].offloaded["nvme"] == len(soft)
