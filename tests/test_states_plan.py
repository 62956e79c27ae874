"""Optimizer states in the plan (plan/joint.py, trace/states.py, runtime/managed_states.py): the Manager plans
them with the activations in one budget, executes them through TieredOptimizer, and training stays bit-exact."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from memstrata import Manager
from memstrata.decisions import InfeasibleBudgetError, Plan, StateDecision
from memstrata.hardware import profile
from memstrata.plan.joint import joint_minimum_budget, joint_plan, state_decisions
from memstrata.plan import minimum_budget
from memstrata.runtime.mover import Placement
from memstrata.simulate import simulate
from memstrata.trace import trace_model
from memstrata.trace.states import planned_trace, state_buckets, with_optimizer_phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, ACCUM, CLIP = 5, 2, 0.5


def make_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(12, 32), nn.Tanh()), nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
                         nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 3)).to(device)  # 8 parameters


def batch(step: int, micro: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(16, 12, generator=g).to(device), torch.randn(16, 3, generator=g).to(device)


def make_opt(kind: str, params) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1, foreach=False)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9, foreach=False)


def train(model, opt, step_ctx=None, kind="adamw"):
    """AdamW: 2-step accumulation, clipping, an LR schedule; SGD momentum: plain steps."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    accum = ACCUM if kind == "adamw" else 1
    device = next(model.parameters()).device.type
    for step in range(STEPS):
        for micro in range(accum):
            x, y = batch(step, micro, device)
            with (step_ctx(x) if step_ctx else _null()):
                (nn.functional.mse_loss(model(x), y) / accum).backward()
        if kind == "adamw":
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        if kind == "adamw":
            sched.step()
        opt.zero_grad()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def mixed(tr, h):
    n = len(state_buckets(tr))
    return [("nvme", None, "dram")[i % 3] for i in range(n)]


FORCED = {"kept": "keep", "host": "dram", "nvme": "nvme", "mixed": mixed}


def assert_same(ref_model, ref_opt, model, opt):
    if hasattr(opt, "flush"):  # the Manager's optimizer: deferred updates wait for the next forward until then
        opt.flush()
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    sa, sb = ref_opt.state_dict(), opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (i, k)


def check_bit_exact(kind: str, placement: str, tmp_path, device: str = "cpu") -> None:
    ref_model = make_model(device)
    ref_opt = make_opt(kind, ref_model.parameters())
    train(ref_model, ref_opt, kind=kind)

    model = make_model(device)
    spec = FORCED[placement]
    planner = lambda tr, h, b: joint_plan(tr, h, b, states=spec(tr, h) if callable(spec) else spec)
    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt(kind, model.parameters()),
                  planner=planner)
    train(model, mgr.optimizer, step_ctx=mgr.step, kind=kind)
    opt = mgr.optimizer
    if placement != "kept":
        # the arena ring (NVMe on a CPU) and deferred updates, as TieredOptimizer(model=...) ([Note: deferred
        # updates]; host buckets, and NVMe ones on CUDA: [Note: deferred host buckets]): the last step's updates
        # wait for the next forward; every earlier one ran in a forward
        assert (opt._ring is not None) == (placement in ("nvme", "mixed") and device == "cpu")
        assert opt._defer and opt._npending == len(opt._use_order) > 0
        assert opt.stats.deferred_updates >= len(opt._use_order)
        opt.flush()
    assert_same(ref_model, ref_opt, model, mgr.optimizer)
    plan = mgr.plan
    assert Plan.from_json(plan.to_json()) == plan
    tiers = {d.tier for d in plan.states}
    want = {"kept": {None}, "host": {"dram"}, "nvme": {"nvme"}, "mixed": {None, "nvme", "dram"}}[placement]
    assert tiers == want, plan.states
    tiered = [r for r in opt._records if r.placement != Placement.KEEP]
    if placement != "kept":
        assert tiered and opt.stats.bytes_written > 0 and opt.stats.bytes_read > 0
    if placement in ("nvme", "mixed"):
        assert opt.mover.store.bytes_written > 0
    assert "states" in mgr.report()["shapes"][next(iter(mgr.report()["shapes"]))]
    mgr.close()
    assert os.listdir(tmp_path) == []
    # after close, the user's optimizer is complete again
    assert_same(ref_model, ref_opt, model, opt.inner)


@pytest.mark.parametrize("placement", sorted(FORCED))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_manager_with_states_in_the_plan_is_bit_exact(kind, placement, tmp_path):
    check_bit_exact(kind, placement, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("placement", ["host", "nvme", "mixed"])
def test_gpu_manager_with_states_in_the_plan_is_bit_exact(placement, tmp_path):
    """The same on CUDA: pinned host buffers ('dram' is the host tier below HBM there), copy streams."""
    check_bit_exact("adamw", placement, tmp_path, device="cuda")


def test_the_objective_picks_the_split_and_the_runtime_follows(tmp_path):
    """A budget below params + grads + states + activations: the plan sends states down (not a user fraction),
    its predicted peak fits, and training under it is still bit-exact."""
    ref_model = make_model()
    ref_opt = make_opt("adamw", ref_model.parameters())
    train(ref_model, ref_opt)
    model = make_model()
    mgr = Manager(model, budget="75%", nvme_dir=tmp_path, optimizer=make_opt("adamw", model.parameters()))
    train(model, mgr.optimizer, step_ctx=mgr.step)
    plan = mgr.plan
    assert any(d.tier == "nvme" for d in plan.states), plan.notes
    assert dict(plan.predicted_peaks)["dram"] <= plan.budget
    tl = simulate(mgr.trace, plan, mgr.hierarchy)
    assert tl.peaks["dram"] <= plan.budget and tl.step_time == pytest.approx(plan.predicted_step_time)
    assert_same(ref_model, ref_opt, model, mgr.optimizer)
    mgr.close()
    assert os.listdir(tmp_path) == []


def _toy_trace():
    """A Manager trace of the toy model with its optimizer phase appended (as the Manager builds it)."""
    from memstrata.trace.record import record_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), *(nn.Sequential(nn.Tanh(), nn.Linear(32, 32)) for _ in range(8)),
                          nn.Linear(32, 3))
    x, y = batch(0, 0)
    with record_step(model) as r:
        nn.functional.mse_loss(model(x), y).backward()
    sizes = [[p.numel() * 4] * 2 for p in model.parameters()]
    return with_optimizer_phase(r.trace(), sizes, 1e-4), model


def test_joint_plan_keeps_states_when_everything_fits_and_tiers_them_when_not():
    h = profile("cpu")
    tr, model = _toy_trace()
    states = sum(s.nbytes for s in tr.storages if s.kind == "optimizer_state")
    assert states == 2 * sum(p.numel() * 4 for p in model.parameters())
    loose = joint_plan(tr, h, tr.observed_peak)
    assert loose.states and all(d.tier is None for d in loose.states)  # nothing moved when it all fits
    tight = joint_plan(tr, h, tr.observed_peak - states // 2)
    assert sum(d.nbytes for d in tight.states if d.tier == "nvme") >= states // 2 - 1
    assert dict(tight.predicted_peaks)["dram"] <= tight.budget
    assert tight.predicted_step_time > loose.predicted_step_time  # the NVMe I/O is charged
    assert Plan.from_json(tight.to_json()) == tight
    # below what even every state on NVMe leaves: one-line error naming the joint minimum
    least = joint_minimum_budget(tr, h)
    assert least < minimum_budget(tr, h)
    with pytest.raises(InfeasibleBudgetError) as e:
        joint_plan(tr, h, least - 1)
    assert e.value.minimum_budget == least and "\n" not in str(e.value)
    joint_plan(tr, h, least)  # the minimum itself is plannable


def test_planned_trace_models_the_state_window():
    h = profile("cpu")
    tr, _ = _toy_trace()
    dec = state_decisions(tr, h, "nvme")
    total = sum(d.nbytes for d in dec)
    pt = planned_trace(tr, dec, h)
    opt_ev = next(op.index for op in tr.ops if op.phase == "optimizer")
    win = [s for s in pt.storages[len(tr.storages):] if s.producer == opt_ev]
    sizes = [d.nbytes for d in dec]
    assert len(win) == 1 and win[0].nbytes == max(sum(sizes[max(0, k - 1):k + 2]) for k in range(len(sizes)))
    assert pt.bytes_at_start < tr.bytes_at_start - total + win[0].nbytes
    with pytest.raises(ValueError, match="unknown tier"):
        state_decisions(tr, h, "hbm")


def test_deferred_updates_below_a_device_are_priced_against_the_forward_too():
    """[Note: optimizer states as trace records]: on a device hierarchy with every gradient kept, the moved buckets'
    copies overlap the forward too (the runtime defers their updates there), and the forward holds a window of two
    buckets; with gradients tiered, or on a CPU hierarchy, priced as before."""
    from memstrata.trace.states import (STATE_WINDOW_MODULE, deferred_forward_seconds, defers_updates,
                                        moved_state_bytes, placement_stall_seconds, state_stall_seconds)

    h = profile("h200")
    tr, _ = _toy_trace()
    dec = state_decisions(tr, h, "dram")
    fwd = sum(op.duration for op in tr.ops if op.phase == "forward")
    assert defers_updates(h, dec) and deferred_forward_seconds(tr, h, dec) == fwd > 0
    moved = moved_state_bytes(h, dec)
    stall, _ = placement_stall_seconds(tr, h, dec)
    assert stall == state_stall_seconds(tr, h, moved, fwd)[0] < state_stall_seconds(tr, h, moved)[0]
    pt = planned_trace(tr, dec, h)
    first = next(op.index for op in tr.ops if op.phase == "forward")
    win = [s for s in pt.storages[len(tr.storages):] if s.module == STATE_WINDOW_MODULE and s.producer == first]
    sizes = [d.nbytes for d in dec]
    assert len(win) == 1 and win[0].nbytes == max(sum(sizes[k:k + 2]) for k in range(len(sizes)))
    with_grads = state_decisions(tr, h, "dram", grads="dram")
    assert not defers_updates(h, with_grads) and deferred_forward_seconds(tr, h, with_grads) == 0.0
    assert not defers_updates(profile("cpu"), state_decisions(tr, profile("cpu"), "nvme"))  # CPU: unchanged
    # a budget the states must leave half of: the joint plan sends some down, its predicted peak within budget
    states = sum(d.nbytes for d in dec)
    tight = joint_plan(tr, h, tr.observed_peak - states // 2, tier_params=False)
    assert any(d.tier == "dram" for d in tight.states) and dict(tight.predicted_peaks)["hbm"] <= tight.budget


def test_plan_json_without_states_still_loads():
    d = Plan("greedy", "cpu", 10).to_dict()
    d.pop("states")
    assert Plan.from_dict(d).states == ()
    p = Plan("greedy", "cpu", 10, states=(StateDecision((0, 1), "nvme", (3, 4), 64),))
    assert Plan.from_json(p.to_json()) == p and p.counts()["states:nvme"] == 1


def test_meta_trace_minimum_drops_with_states_in_the_plan():
    """vit_b_32 (issue 9's table: minimum 71% of the peak): with its optimizer states in the plan, lower."""
    h = profile("a100-80gb")
    tr = trace_model("vit_b_32", 4, 224, h)
    assert all(s.param_index is not None for s in tr.storages if s.kind == "optimizer_state")
    assert joint_minimum_budget(tr, h) < 0.9 * minimum_budget(tr, h)


def test_disabled_manager_hands_back_the_plain_optimizer(tmp_path):
    model = make_model()
    opt = make_opt("adamw", model.parameters())
    mgr = Manager(model, optimizer=opt, enabled=False)
    assert mgr.optimizer is opt and mgr.states is None
    mgr.close()


def test_state_dict_of_the_managed_optimizer_resumes_a_plain_one(tmp_path):
    """Saved mid-run from the Manager's tiered optimizer (states on NVMe), loaded into a plain optimizer: the
    rest of the run equals the unmanaged run; a second input shape gets its own plan over the same states."""
    ref_model = make_model()
    ref_opt = make_opt("adamw", ref_model.parameters())
    train(ref_model, ref_opt)
    train(ref_model, ref_opt)

    model = make_model()
    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt("adamw", model.parameters()),
                  planner=lambda tr, h, b: joint_plan(tr, h, b, states="nvme"))
    train(model, mgr.optimizer, step_ctx=mgr.step)
    sd = mgr.optimizer.state_dict()
    x2 = torch.randn(4, 12)  # another shape: traced and planned too, states stay exact
    with mgr.step(x2):
        model(x2).sum().mul(0).backward()
    with mgr.step(x2):
        model(x2).sum().mul(0).backward()
    mgr.optimizer.zero_grad()
    assert len(mgr.report()["shapes"]) == 2 and all(d.tier == "nvme" for d in mgr.plan.states)
    mgr.close()
    assert os.listdir(tmp_path) == []
    fresh = make_opt("adamw", model.parameters())
    fresh.load_state_dict(sd)
    train(model, fresh)
    assert_same(ref_model, ref_opt, model, fresh)


def test_each_shape_runs_under_its_own_state_placement(tmp_path):
    """Two input shapes whose plans place the states differently: each managed step moves the states to its
    shape's placement first (between optimizer steps), and training stays exact."""
    def steps(model, opt, ctx=None):
        for i in range(6):
            x, y = batch(i, 0)
            x, y = (x, y) if i % 2 else (x[:8], y[:8])
            with (ctx(x) if ctx else _null()):
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if ctx:
                placed.append(tuple(t.label for t in opt.placement.tiers))

    placed: list = []
    ref = make_model()
    ref_opt = make_opt("adamw", ref.parameters())
    steps(ref, ref_opt)
    model = make_model()
    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt("adamw", model.parameters()),
                  warmup_steps=0,
                  planner=lambda tr, h, b: joint_plan(tr, h, b, states="nvme" if tr.batch_size == 8 else "keep"))
    steps(model, mgr.optimizer, mgr.step)
    assert_same(ref, ref_opt, model, mgr.optimizer)
    # steps 0, 1: traces (planned at their end); 2..5 managed, alternating NVMe / kept
    assert [bool(p) and set(p) == {"nvme"} for p in placed[2:]] == [True, False, True, False]
    mgr.close()


@pytest.mark.filterwarnings("ignore:memstrata")
@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1),  # no per-parameter state at all
                                  lambda p: torch.optim.Adagrad(p, lr=0.1),  # states made at construction
                                  lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9)],
                         ids=["sgd-plain", "adagrad", "rmsprop"])
def test_other_optimizers_through_the_manager(make, tmp_path):
    ref = make_model()
    ref_opt = make(ref.parameters())
    train(ref, ref_opt, kind="sgd")
    model = make_model()
    mgr = Manager(model, budget="80%", nvme_dir=tmp_path, optimizer=make(model.parameters()))
    train(model, mgr.optimizer, step_ctx=mgr.step, kind="sgd")
    assert_same(ref, ref_opt, model, mgr.optimizer)  # also: no empty state entries for stateless parameters
    mgr.close()


def test_lbfgs_is_refused_in_one_line():
    model = make_model()
    with pytest.raises(ValueError, match="LBFGS") as e:
        Manager(model, optimizer=torch.optim.LBFGS(model.parameters()))
    assert "\n" not in str(e.value)
