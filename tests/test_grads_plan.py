"""Gradients in the plan (trace/grads.py, plan/joint.py, Manager(tier_grads=True)): a tiered gradient leaves
tier 0 when final, the objective chooses it where parameters + gradients + states set the floor, and training
under such a plan (2-step accumulation, clipping by memstrata, LR schedule) equals unmanaged training."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from memstrata import Manager
from memstrata.decisions import InfeasibleBudgetError, Plan, StateDecision
from memstrata.hardware import profile
from memstrata.plan.joint import joint_minimum_budget, joint_plan, state_decisions
from memstrata.simulate import simulate
from memstrata.trace import trace_model
from memstrata.trace.grads import grad_groups, grad_ready, host_step, renumber_grads, tier_grads
from memstrata.trace.record import record_step, trace_step
from memstrata.trace.states import planned_trace, state_buckets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, ACCUM, CLIP = 5, 2, 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(12, 48), nn.Tanh()), nn.Sequential(nn.Linear(48, 48), nn.Tanh()),
                         nn.Sequential(nn.Linear(48, 48), nn.Tanh()), nn.Linear(48, 3))  # 8 parameters


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(4, 12, generator=g), torch.randn(4, 3, generator=g) * 4


def make_opt(kind: str, params) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1, foreach=False)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9, foreach=False)


def train(model, opt, clip, step_ctx=None) -> list:
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    norms = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = batch(step, micro)
            if step_ctx is None:
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
            else:
                with step_ctx(x):
                    (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        norms.append(clip(model.parameters(), CLIP))
        opt.step()
        sched.step()
        opt.zero_grad()
    return norms


def assert_same(ref_model, ref_opt, model, opt) -> None:
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    sa, sb = ref_opt.state_dict(), opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (i, k)


def _roundtrip(tr):
    from memstrata.trace.schema import Trace

    return Trace.from_json(tr.to_json())


def _traced(opt_kind: str = "sgd"):
    model = make_model()
    opt = make_opt(opt_kind, model.parameters())
    x, y = batch(0, 0)
    return trace_step(model, x, y, optimizer=opt, mode="meta", profile=profile("cpu")), model


def test_gradient_records_carry_the_optimizer_index_and_leave_tier0_when_final():
    tr, model = _traced()
    groups = grad_groups(tr)
    assert sorted(groups) == list(range(8))  # every parameter's gradient, numbered like the optimizer
    for p, (sid,) in groups.items():
        assert tr.storages[sid].nbytes == list(model.parameters())[p].numel() * 4
    ready = grad_ready(tr)
    sids = [s for v in groups.values() for s in v]
    out = tier_grads(tr, sids)
    for sid in sids:
        s = out.storages[sid]
        assert not s.persistent and s.freed_after == ready[sid] and tr.ops[ready[sid]].phase == "backward"
    assert out.observed_peak < tr.observed_peak
    with pytest.raises(ValueError, match="not a gradient"):
        tier_grads(tr, [next(s.id for s in tr.storages if s.kind == "parameter")])
    # under DDP (the Manager sets grads_at_backward_end) they leave at the end of the backward, once reduced,
    # and their copies down are exposed
    from dataclasses import replace

    from memstrata.trace.grads import grad_stall_seconds

    ddp = tier_grads(replace(tr, grads_at_backward_end=True), sids)
    assert {ddp.storages[sid].freed_after for sid in sids} == {tr.backward_end}
    assert ddp.observed_peak > out.observed_peak
    assert _roundtrip(ddp).grads_at_backward_end
    h = profile("cpu")
    decs = state_decisions(tr, h, "keep", None, "nvme")
    assert grad_stall_seconds(ddp, h, decs)[0] > grad_stall_seconds(tr, h, decs)[0]
    # the Manager's trace (no optimizer step in it) numbers gradients by the model's order: renumbered
    swapped = renumber_grads(tr, {i: 7 - i for i in range(8)})
    assert sorted(grad_groups(swapped)) == list(range(8)) and grad_groups(swapped)[7] == groups[0]


def test_planned_trace_with_tiered_gradients_on_cpu_and_on_a_device():
    tr, _ = _traced()
    cpu = profile("cpu")
    n = len(state_buckets(tr))
    dec = state_decisions(tr, cpu, "nvme", grads="nvme")
    assert all(d.grads == "nvme" and d.grad_nbytes > 0 for d in dec)
    grads = sum(d.grad_nbytes for d in dec)
    base = planned_trace(tr, state_decisions(tr, cpu, "nvme"), cpu)
    pt = planned_trace(tr, dec, cpu)
    # on a CPU box the step reads each bucket's gradients back into tier 0 (the window grows), but the gradients
    # no longer sit in tier 0 from backward to the step
    assert pt.observed_peak < base.observed_peak + 1 and sum(
        s.nbytes for s in pt.storages if s.kind == "gradient" and s.persistent) == 0
    assert Plan.from_json(Plan("greedy", "cpu", 1, states=dec).to_json()).states == dec
    assert Plan("greedy", "cpu", 1, states=dec).counts()["grads:nvme"] == n
    # on a device hierarchy the bucket steps on the host: nothing of it in tier 0 at the step
    a100 = profile("a100-80gb")
    ddec = state_decisions(tr, a100, "dram", grads="dram")
    assert all(host_step(a100, d) for d in ddec)
    dpt = planned_trace(tr, ddec, a100)
    params = sum(s.nbytes for s in tr.storages if s.kind == "parameter")
    span = [op.index for op in tr.ops if op.phase == "optimizer"]
    live_at_step = sum(s.nbytes for s in dpt.storages if (s.producer or 0) <= span[0]
                       and (s.freed_after is None or s.freed_after >= span[0]) and s.kind != "parameter"
                       and s.kind not in ("activation", "temporary", "input", "buffer"))
    assert live_at_step == 0, live_at_step  # no gradient, no state, no window in HBM while the host steps
    assert dpt.observed_peak < planned_trace(tr, state_decisions(tr, a100, "dram"), a100).observed_peak
    assert grads == params
    with pytest.raises(ValueError, match="tier 0"):
        state_decisions(tr, a100, "dram", grads="hbm")


def test_objective_tiers_gradients_only_where_they_set_the_floor():
    tr, _ = _traced("adamw")
    h = profile("a100-80gb")
    without = joint_minimum_budget(tr, h, tier_grads=False)
    least = joint_minimum_budget(tr, h)
    assert least < without
    p = joint_plan(tr, h, least)
    assert any(d.grads is not None for d in p.states) and dict(p.predicted_peaks)["hbm"] <= least
    with pytest.raises(InfeasibleBudgetError):
        joint_plan(tr, h, least, tier_grads=False)
    tl = simulate(tr, p, h)
    assert tl.step_time == pytest.approx(p.predicted_step_time)
    roomy = joint_plan(tr, h, tr.observed_peak)
    assert all(d.grads is None and d.tier is None for d in roomy.states)  # nothing moves when it all fits


def test_meta_vit_minimum_drops_with_gradients_in_the_plan():
    """vit_b_32 on meta: parameters + gradients + momentum set the floor with states alone; gradients lower it."""
    h = profile("a100-80gb")
    tr = trace_model("vit_b_32", 2, 224, h)
    assert joint_minimum_budget(tr, h) < 0.8 * joint_minimum_budget(tr, h, tier_grads=False)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("placement", ["nvme", "mixed"])
def test_manager_with_tiered_gradients_is_bit_exact(kind, placement, tmp_path):
    ref_model = make_model()
    ref_opt = make_opt(kind, ref_model.parameters())
    ref_norms = train(ref_model, ref_opt, nn.utils.clip_grad_norm_)

    model = make_model()

    def planner(tr, h, b):
        n = len(state_buckets(tr))
        if placement == "nvme":
            return joint_plan(tr, h, b, states="nvme", grads="nvme")
        return joint_plan(tr, h, b, states=[("nvme", None, "dram")[i % 3] for i in range(n)],
                          grads=[("nvme", "nvme", None)[i % 3] for i in range(n)])

    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt(kind, model.parameters()),
                  planner=planner, tier_grads=True)
    norms = train(model, mgr.optimizer, mgr.optimizer.clip_grad_norm_, step_ctx=mgr.step)
    assert_same(ref_model, ref_opt, model, mgr.optimizer)
    assert all(torch.equal(a, b) for a, b in zip(ref_norms, norms))
    assert any(d.grads == "nvme" for d in mgr.plan.states)
    st = mgr.optimizer.grads.stats
    assert st.bytes_down > 0 and st.accumulations > 0 and mgr.optimizer.mover.store.bytes_written > 0
    mgr.close()
    assert os.listdir(tmp_path) == []


def test_manager_plans_gradients_below_when_the_budget_needs_it(tmp_path):
    """A budget under what tiering states alone reaches: the plan tiers gradients and training stays exact."""
    ref_model = make_model()
    ref_opt = make_opt("adamw", ref_model.parameters())
    train(ref_model, ref_opt, nn.utils.clip_grad_norm_)
    model = make_model()
    seen = {}

    def between(tr):  # between the least budget with gradients tiered and the least with them kept
        h = mgr.hierarchy
        seen["with"], seen["without"] = joint_minimum_budget(tr, h), joint_minimum_budget(tr, h, tier_grads=False)
        return (seen["with"] + seen["without"]) // 2

    mgr = Manager(model, budget=between, nvme_dir=tmp_path, optimizer=make_opt("adamw", model.parameters()),
                  tier_grads=True, fallback="raise")
    train(model, mgr.optimizer, mgr.optimizer.clip_grad_norm_, step_ctx=mgr.step)
    assert seen["with"] < seen["without"]
    assert any(d.grads is not None for d in mgr.plan.states), mgr.plan.notes
    assert_same(ref_model, ref_opt, model, mgr.optimizer)
    mgr.close()
    assert os.listdir(tmp_path) == []


def test_tier_grads_needs_the_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        Manager(make_model(), tier_grads=True)
    assert StateDecision((0,), "nvme").grads is None  # the default keeps gradients
