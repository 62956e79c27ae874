"""Parameters in the plan (trace/params.py, plan/joint.py, runtime/params.py, Manager(tier_params=)): a tiered
module's parameters are in tier 0 only around its forward, its backward and the optimizer step; the objective
tiers them where they set the floor; training under such plans (forced and planned) equals unmanaged training."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
from torch import nn

from memstrata import Manager
from memstrata.decisions import Plan
from memstrata.hardware import profile
from memstrata.plan.forced import forced_plan
from memstrata.plan.joint import joint_minimum_budget, joint_plan, param_decisions
from memstrata.runtime.activations import ActivationRuntime
from memstrata.simulate import simulate
from memstrata.trace.params import param_groups, tier_params
from memstrata.trace.record import trace_step
from memstrata.trace.space import decision_space
from memstrata.trace.states import planned_trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, ACCUM = 4, 2


def make_model() -> nn.Module:
    """A tiny VGG: a convolution with large activations at 64 px, batch norm (buffers), max pooling, and a
    classifier whose 4 MiB weight is most of the parameters (the floor at the convolution's backward at batch
    64 is its operands plus the parameters: what parameter tiering lowers)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(8),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 1024), nn.Tanh(), nn.Linear(1024, 4))


MODULES = {"0", "5", "7"}  # the Conv2d and the Linears (not BatchNorm)


def batch(step: int, micro: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randn(n, 4, generator=g)


def make_opt(kind: str, params) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1, foreach=False)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9, foreach=False)


def train(model, opt, step_ctx=None, clip=None, n: int = 4) -> dict:
    """STEPS optimizer steps of ACCUM micro-batches, then one more backward: returns its gradients (None where
    a gradient is tiered: test_grads_plan.py checks those)."""
    for step in range(STEPS + 1):
        for micro in range(ACCUM):
            x, y = batch(step, micro, n)
            ctx = step_ctx(x) if step_ctx is not None else torch.enable_grad()
            with ctx:
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        if step == STEPS:
            break
        if clip is not None:
            clip(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def assert_same(ref_model, ref_opt, ref_grads, model, opt, grads) -> None:
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
        assert grads[n] is None or torch.equal(ref_grads[n], grads[n]), n
    for (n, a), (_, b) in zip(ref_model.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), n
    sa, sb = ref_opt.state_dict(), opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (i, k)


def _traced(kind: str = "sgd"):
    model = make_model()
    x, y = batch(0, 0, 64)
    return trace_step(model, x, y, optimizer=make_opt(kind, model.parameters()), mode="meta",
                      profile=profile("cpu"))


def test_parameter_groups_and_their_resident_windows():
    tr = _traced()
    assert set(tr.param_modules) == MODULES
    groups = {g.module: g for g in param_groups(tr)}
    assert set(groups) == MODULES
    for g in groups.values():
        assert len(g.storages) == 2 and g.nbytes == sum(tr.storages[s].nbytes for s in g.storages)
        a, b = g.backward
        assert g.forward_end <= tr.forward_end < a <= b <= tr.backward_end
        reads = [op.index for op in tr.ops if op.phase == "backward" and set(op.inputs) & set(g.storages)]
        assert a <= min(reads) and max(reads) <= b
    # the later a module runs forward, the earlier its backward ends (a window starts where a segment containing
    # the module would recompute it: the same event for modules of one segment)
    assert groups["7"].backward[1] < groups["5"].backward[1] < groups["0"].backward[1]
    assert groups["7"].backward[0] <= groups["5"].backward[0] <= groups["0"].backward[0]
    out = tier_params(tr, [groups["5"]])
    conv_bwd = groups["0"].backward[1]  # the convolution's backward: the classifier is not resident there
    assert live_at(out, conv_bwd) == live_at(tr, conv_bwd) - groups["5"].nbytes
    assert out.observed_peak <= tr.observed_peak
    for sid in groups["5"].storages:
        s = out.storages[sid]
        assert s.freed_after == -1 and not s.persistent  # never in tier 0 as such: its windows are
    wins = [s for s in out.storages[len(tr.storages):] if s.module.startswith("5 ")]
    assert [(w.producer, w.freed_after) for w in wins] == [
        (None, groups["5"].forward_end), groups["5"].backward, (tr.backward_end + 1, None)]
    assert all(w.nbytes == groups["5"].nbytes for w in wins)
    with pytest.raises(ValueError, match="not a parameter"):
        tier_params(tr, [type(groups["5"])("x", (len(tr.storages) - 1,), 1, 0, (1, 2))])


def live_at(tr, e: int) -> int:
    return sum(s.nbytes for s in tr.storages if (s.producer or 0) <= e and (s.freed_after is None or s.freed_after >= e))


def test_param_decisions_round_trip_and_price():
    tr = _traced()
    assert {d.tier for d in param_decisions(tr, profile("cpu"), "all")} == {"nvme"}  # host RAM is tier 0 there
    a100 = profile("a100-80gb")
    pd = param_decisions(tr, a100, ["5", "7"])
    assert [d.tier for d in pd] == ["dram", "dram"]
    with pytest.raises(ValueError, match="no tierable parameters"):
        param_decisions(tr, a100, ["1"])  # BatchNorm
    p = Plan("greedy", "a100-80gb", 1, params=pd)
    assert Plan.from_json(p.to_json()).params == pd and p.counts()["params:dram"] == 2
    pt = planned_trace(tr, (), a100, params=pd)
    assert pt.observed_peak <= tr.observed_peak
    # the simulator counts them only while resident and adds their (synchronous) copies to the step
    budget = tr.observed_peak
    keep = joint_plan(tr, a100, budget, states="keep")
    tiered = joint_plan(tr, a100, budget, states="keep", params=["5", "7"])
    assert tiered.params == pd
    tk, tt = simulate(tr, keep, a100), simulate(tr, tiered, a100)
    assert tt.peaks["hbm"] < tk.peaks["hbm"] and tt.step_time > tk.step_time
    assert tt.step_time == pytest.approx(tiered.predicted_step_time)


def test_objective_tiers_parameters_only_where_they_set_the_floor():
    tr = _traced("adamw")
    h = profile("a100-80gb")
    without = joint_minimum_budget(tr, h, tier_params=False)
    least = joint_minimum_budget(tr, h)
    assert least < without
    p = joint_plan(tr, h, least)
    assert p.params and dict(p.predicted_peaks)["hbm"] <= least
    roomy = joint_plan(tr, h, tr.observed_peak)
    assert not roomy.params  # nothing moves when it all fits


def test_a_replay_never_reads_a_tiered_parameter():
    """The stem convolution reads only the batch and its weight: a replay may re-run it, unless its weight is
    tiered (the replay would run in another module's backward, where the weight is not resident)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    tr = trace_step(model, x, y, optimizer=make_opt("sgd", model.parameters()), mode="meta", profile=profile("cpu"))
    sp = decision_space(tr)
    via_stem = [s for s in sp.replayable_storages()
                if any(tr.ops[j].module == "0" for j in sp.replay_chain(s))]
    assert via_stem, "the stem convolution's output chain should be replayable"
    h = profile("a100-80gb")
    pt = planned_trace(tr, (), h, params=param_decisions(tr, h, ["0"]))
    sp2 = decision_space(pt)
    for s in via_stem:
        assert "tiered" in sp2.why_not_replay(s) or "below tier 0" in sp2.why_not_replay(s), sp2.why_not_replay(s)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_forced_parameter_tiering_is_bit_exact(kind, tmp_path):
    ref_model = make_model()
    ref_opt = make_opt(kind, ref_model.parameters())
    ref_grads = train(ref_model, ref_opt)
    model = make_model()

    def planner(tr, h, b):  # every tierable module's parameters in NVMe files, offloads and recompute as planned
        return joint_plan(tr, h, b, states="keep", params="all")

    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt(kind, model.parameters()),
                  planner=planner)
    grads = train(model, mgr.optimizer, step_ctx=mgr.step)
    assert_same(ref_model, ref_opt, ref_grads, model, mgr.optimizer, grads)
    assert {d.module for d in mgr.plan.params} == MODULES
    st = mgr._params.stats
    managed = sum(1 for s in mgr.report()["steps"] if s["mode"] == "managed")
    assert managed >= 2 * ACCUM and st.releases >= 2 * len(MODULES) * managed and st.bytes_written > 0
    mgr.close()
    assert os.listdir(tmp_path) == []
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())


@pytest.mark.parametrize("kind", ["recompute", "segment", "selective", "mixed"])
def test_parameter_tiering_under_forced_activation_plans_is_bit_exact(kind, tmp_path):
    """Recompute re-runs a tiered module's forward inside backward (checkpoint: possibly inside the very node
    that reads its weight); offloads and parameter tiering run side by side."""
    ref_model = make_model()
    ref_opt = make_opt("sgd", ref_model.parameters())
    ref_grads = train(ref_model, ref_opt)
    model = make_model()

    def planner(tr, h, b):
        p = forced_plan(tr, kind, h)
        assert p.units or p.storages
        return replace(p, params=param_decisions(tr, h, "all"))

    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt("sgd", model.parameters()),
                  planner=planner, tune=False)
    grads = train(model, mgr.optimizer, step_ctx=mgr.step)
    assert_same(ref_model, ref_opt, ref_grads, model, mgr.optimizer, grads)
    steps = [s for s in mgr.report()["steps"] if s["mode"] == "managed"]
    assert steps and not any(s["stats"].get("misaligned") for s in steps)
    assert mgr._params.stats.releases > 0
    mgr.close()
    assert os.listdir(tmp_path) == []


def test_planned_parameter_tiering_with_gradients_and_states_is_bit_exact(tmp_path):
    """A budget only parameter tiering reaches: the plan tiers them (and whatever else it likes); exact."""
    ref_model = make_model()
    ref_opt = make_opt("adamw", ref_model.parameters())
    ref_grads = train(ref_model, ref_opt, clip=nn.utils.clip_grad_norm_, n=64)
    model = make_model()
    seen = {}

    def between(tr):  # between the least budget with parameters tiered and the least with them kept
        h = mgr.hierarchy
        seen["with"], seen["without"] = joint_minimum_budget(tr, h), joint_minimum_budget(tr, h, tier_params=False)
        return (seen["with"] + seen["without"]) // 2

    mgr = Manager(model, budget=between, nvme_dir=tmp_path, optimizer=make_opt("adamw", model.parameters()),
                  tier_grads=True, fallback="raise")
    grads = train(model, mgr.optimizer, step_ctx=mgr.step, clip=mgr.optimizer.clip_grad_norm_, n=64)
    assert seen["with"] < seen["without"], seen
    assert mgr.plan.params, mgr.plan.notes
    assert_same(ref_model, ref_opt, ref_grads, model, mgr.optimizer, grads)
    mgr.close()
    assert os.listdir(tmp_path) == []


def test_optimizer_step_inside_the_block_sees_resident_parameters(tmp_path):
    ref_model = make_model()
    ref_opt = make_opt("sgd", ref_model.parameters())
    model = make_model()
    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_opt("sgd", model.parameters()),
                  planner=lambda tr, h, b: joint_plan(tr, h, b, states="keep", params="all"))
    for step in range(4):
        x, y = batch(step, 0)
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with mgr.step(x):
            nn.functional.mse_loss(model(x), y).backward()
            mgr.optimizer.step()  # inside the block: the step pre-hook fetches them first
            mgr.optimizer.zero_grad()
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    mgr.close()


def test_predicted_peak_matches_what_the_runtime_holds(tmp_path, monkeypatch):
    """Forced parameter offload: the heap saving measured against the same plan without it equals the
    simulator's predicted saving of tier-0 peak, within 1 MiB + 5% of the parameters (heap sampled at packs,
    unpacks and unit boundaries, not inside an op; allocator rounding).  At batch 64 the peak is the
    convolution's backward, where the classifier (4 MiB) is not resident."""
    monkeypatch.setattr(ActivationRuntime, "_SAMPLE_INTERVAL", 0.0)
    base = make_model()
    x, y = batch(0, 0, 64)
    measured, predicted = {}, {}
    for kind in ("keep", "params"):
        model = copy.deepcopy(base)

        def planner(tr, h, b, kind=kind):
            return joint_plan(tr, h, b, states="keep", params="all" if kind == "params" else None)

        mgr = Manager(model, budget="100%", nvme_dir=tmp_path, planner=planner, tune=False,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for _ in range(4):
            with mgr.step(x):
                nn.functional.mse_loss(model(x), y).backward()
            mgr.optimizer.step()
            mgr.optimizer.zero_grad()
        steps = [s for s in mgr.report()["steps"] if s["mode"] == "managed"]
        measured[kind] = min(s["peak_above_start_bytes"] for s in steps[1:])
        predicted[kind] = simulate(mgr.trace, mgr.plan, mgr.hierarchy, check=False).peaks[mgr.hierarchy.fast.name]
        assert bool(mgr.plan.params) == (kind == "params")
        mgr.close()
    params = sum(p.numel() * 4 for p in base.parameters())
    m, p = measured["keep"] - measured["params"], predicted["keep"] - predicted["params"]
    assert p > params // 2, (p, params)
    assert abs(m - p) <= 2**20 + 0.05 * params, (m, p, measured, predicted)


def test_tier_params_is_off_under_distributed_and_compile_and_opt_out():
    model = make_model()
    opt = make_opt("sgd", model.parameters())
    with pytest.raises(ValueError, match="torch.distributed"):
        Manager(model, optimizer=opt, tier_params=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="optimizer"):
        Manager(model, tier_params=True)
    assert Manager(model, optimizer=opt, rank=0, world_size=2).tier_params is False  # default: off there
    assert Manager(model, optimizer=opt, tier_params=False).tier_params is False
    assert Manager(model, optimizer=opt).tier_params is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_parameter_tiering_through_host_memory_is_bit_exact():
    """On CUDA the parameter tier is pinned host DRAM: fetched before each forward and backward, released after;
    AdamW training equals unmanaged training bit for bit (linear layers: deterministic kernels)."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 4)).cuda()

    def run(managed: bool):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mgr = None
        if managed:
            mgr = Manager(model, budget="100%", optimizer=opt, tune=False,
                          planner=lambda tr, h, b: joint_plan(tr, h, b, states="keep", params="all"))
            opt = mgr.optimizer
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(32, 64, generator=g).cuda(), torch.randn(32, 4, generator=g).cuda()
            ctx = mgr.step(x) if mgr is not None else torch.enable_grad()
            with ctx:
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return model, mgr

    ref, _ = run(False)
    model, mgr = run(True)
    assert {d.tier for d in mgr.plan.params} == {"dram"} and mgr._params.stats.releases > 0
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    mgr.close()
