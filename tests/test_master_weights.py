"""Mixed precision with fp32 master weights (runtime/master.py): `MasterWeights` equals the hand-written fp32-master
loop over a plain torch optimizer, and stays bit-exact under every tiering feature (states on host / NVMe / mixed,
tiered gradients, host steps, deferred updates, the Manager's joint plan, a fresh-process resume)."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from memstrata import Manager, MasterWeights
from memstrata.plan.joint import joint_plan
from memstrata.runtime.grads import GradTieredOptimizer
from memstrata.runtime.mover import Placement
from memstrata.runtime.states import StatePlacement, TieredOptimizer, expected_state_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, ACCUM, CLIP = 5, 2, 0.5
BF16 = torch.bfloat16
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def make_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)).to(device, BF16)


def batch(step: int, micro: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(8, 12, generator=g).to(device, BF16), torch.randn(8, 3, generator=g).to(device, BF16)


KINDS = {
    "adamw": (torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1, foreach=False)),
    "adamw_foreach": (torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1, foreach=True)),
    "adamw_fused": (torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1, fused=True)),
    "sgd": (torch.optim.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True, foreach=False)),
}


def make_mw(kind: str, params, **kw) -> MasterWeights:
    cls, hyper = KINDS[kind]
    return MasterWeights(params, cls, **kw, **hyper)


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))


def micro_steps(model, step: int, ctx=None) -> None:
    device = next(model.parameters()).device.type
    for micro in range(ACCUM):
        x, y = batch(step, micro, device)
        if ctx is None:
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        else:
            with ctx(x):
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()


def train(model, opt, sched, start: int, stop: int, clip=None, ctx=None) -> None:
    """Steps [start, stop): 2-step accumulation, global-norm clipping, an LR schedule."""
    for step in range(start, stop):
        micro_steps(model, step, ctx)
        (clip or nn.utils.clip_grad_norm_)(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()


def reference(kind: str, steps: int = STEPS):
    """The hand-written fp32-master loop: fp32 leaf masters in a plain torch optimizer, bf16 model."""
    model = make_model()
    masters = [p.detach().float() for p in model.parameters()]
    cls, kw = KINDS[kind]
    opt = cls(masters, **kw)
    sched = schedule(opt)
    for step in range(steps):
        micro_steps(model, step)
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for p, m in zip(model.parameters(), masters):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
        sched.step()
        model.zero_grad()
        opt.zero_grad()
    return model, opt, masters


def assert_same_params(ma: nn.Module, mb: nn.Module) -> None:
    for (n, a), (_, b) in zip(ma.named_parameters(), mb.named_parameters()):
        assert a.dtype == b.dtype == BF16 and torch.equal(a, b), n


def assert_matches_reference(sd: dict, ref_opt, masters) -> None:
    """`sd` (a MasterWeights state dict) holds the reference's masters and its algorithm states, all fp32."""
    ref = ref_opt.state_dict()
    assert sorted(sd["state"]) == sorted(ref["state"]) == list(range(len(masters)))
    for i, m in enumerate(masters):
        a, b = sd["state"][i], ref["state"][i]
        assert set(a) == set(b) | {"master"}, (i, sorted(a))
        assert a["master"].dtype == torch.float32 and torch.equal(a["master"], m), i
        for k, v in b.items():
            if torch.is_tensor(v):
                assert a[k].dtype == v.dtype and torch.equal(a[k], v), (i, k)
            else:
                assert a[k] == v, (i, k)
    hyper = lambda g: {k: v for k, v in g.items() if k != "params"}  # noqa: E731
    assert [hyper(g) for g in sd["param_groups"]] == [hyper(g) for g in ref["param_groups"]]


def assert_same_state(sa: dict, sb: dict) -> None:
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        a, b = sa["state"][i], sb["state"][i]
        assert a.keys() == b.keys(), i
        for k in a:
            if torch.is_tensor(a[k]):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (i, k)
            else:
                assert a[k] == b[k], (i, k)


# ---------------------------------------------------------------------------------------------- the wrapper itself
@pytest.mark.parametrize("chunks", ["one", "many"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_equals_the_hand_written_fp32_master_loop(kind, chunks):
    """One engine step per group ("one"), or one per parameter or two ("many": chunks of 1 KiB of fp32 gradients)."""
    ref_model, ref_opt, masters = reference(kind)
    model = make_model()
    opt = make_mw(kind, model.parameters(), **({"master_chunk_bytes": 1024} if chunks == "many" else {}))
    calls = []
    opt.algorithm.register_step_pre_hook(lambda *_a: calls.append(1))
    train(model, opt, schedule(opt), 0, STEPS)
    assert len(calls) == STEPS * (1 if chunks == "one" else 4)  # weight0 | bias0 | weight1 | bias1 weight2 bias2
    assert_same_params(ref_model, model)
    assert_matches_reference(opt.state_dict(), ref_opt, masters)
    # not a plain bf16 optimizer: the fp32 masters moved by less than a bf16 ulp somewhere
    assert any(not torch.equal(m, m.to(BF16).float()) for m in masters)


def test_fp32_parameters_are_their_own_masters():
    """A bf16 model with an fp32 parameter: that one is stepped directly (no "master"), exactly as a plain optimizer."""
    torch.manual_seed(0)
    w16 = nn.Parameter(torch.randn(4, 4).to(BF16))
    w32 = nn.Parameter(torch.randn(4))
    ref32 = w32.detach().clone()
    opt = MasterWeights([w16, w32], torch.optim.AdamW, lr=1e-1, foreach=False)
    plain = torch.optim.AdamW([ref32], lr=1e-1, foreach=False)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        w16.grad = torch.randn(4, 4, generator=g).to(BF16)
        w32.grad = ref32.grad = torch.randn(4, generator=g)
        opt.step()
        plain.step()
    assert torch.equal(w32, ref32)
    assert set(opt.state[w32]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[w16]) == {"master", "step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(opt.state[w32]["exp_avg"], plain.state[ref32]["exp_avg"])


def test_one_line_errors():
    fp32 = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="master weights add nothing") as e:
        MasterWeights(fp32.parameters(), torch.optim.AdamW)
    assert "\n" not in str(e.value)
    bf = make_model()
    with pytest.raises(ValueError, match="LBFGS"):
        MasterWeights(bf.parameters(), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="not a built optimizer"):
        MasterWeights(torch.optim.AdamW(bf.parameters()), torch.optim.AdamW)
    with pytest.raises(ValueError, match="failed: .*") as e:
        MasterWeights(bf.parameters(), torch.optim.AdamW, lr=-1.0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="MasterWeights itself"):
        MasterWeights(bf.parameters(), MasterWeights)
    with pytest.raises(ValueError, match="one tensor"):
        MasterWeights(bf[0].weight, torch.optim.AdamW)


def test_factory_param_groups_add_param_group_and_in_process_load():
    """A functools.partial factory, two param groups (one added later), a scheduler on our groups; the state dict
    round-trips the fp32 masters exactly (torch's own loader would round them to bf16)."""
    model = make_model()
    factory = functools.partial(torch.optim.AdamW, betas=(0.8, 0.95))
    ps = list(model.parameters())
    opt = MasterWeights([{"params": ps[:4], "lr": 2e-2}], factory, lr=1e-2, weight_decay=0.1, foreach=False)
    opt.add_param_group({"params": ps[4:]})
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 1e-2] and opt.param_groups[1]["betas"] == (0.8, 0.95)
    sched = schedule(opt)
    train(model, opt, sched, 0, 3)
    sd = opt.state_dict()
    model2 = make_model()
    model2.load_state_dict(model.state_dict())
    ps2 = list(model2.parameters())
    opt2 = MasterWeights([{"params": ps2[:4], "lr": 2e-2}], factory, lr=1e-2, weight_decay=0.1, foreach=False)
    opt2.add_param_group({"params": ps2[4:]})
    sched2 = schedule(opt2)
    opt2.load_state_dict(copy.deepcopy(sd))  # as torch's loader, ours aliases the dict's tensors: a copy
    sched2.load_state_dict(sched.state_dict())
    assert all(opt2.state[p]["master"].dtype == torch.float32 for p in ps2)
    assert_same_state(sd, opt2.state_dict())
    train(model, opt, sched, 3, STEPS)
    train(model2, opt2, sched2, 3, STEPS)
    assert_same_params(model, model2)
    assert_same_state(opt.state_dict(), opt2.state_dict())


def test_expected_state_bytes_counts_the_fp32_master():
    model = make_model()
    opt = make_mw("adamw", model.parameters())
    w = model[0].weight
    assert expected_state_bytes(opt, w) == [w.numel() * 4] * 3  # master + exp_avg + exp_avg_sq, fp32
    assert expected_state_bytes(torch.optim.AdamW([w]), w) == [w.numel() * 2] * 2  # the table: the param's dtype
    sgd = make_mw("sgd", model.parameters())
    assert expected_state_bytes(sgd, w) == [w.numel() * 4] * 2
    model(batch(0, 0)[0]).sum().backward()
    opt.step()
    assert sum(v.numel() * v.element_size() for v in opt.state[w].values() if v.dim()) == sum(
        expected_state_bytes(opt, w))


def test_trace_step_records_the_master_as_an_optimizer_state():
    """The tracer (trace/record.py: global optimizer-step hooks, which also see the private engine's step) numbers
    each state by its parameter in MasterWeights' order: master + moments, 12 bytes per bf16 element."""
    from memstrata.trace import trace_step
    from memstrata.trace.states import state_groups

    model = make_model()
    opt = make_mw("adamw", model.parameters())
    x, y = batch(0, 0)
    for _ in range(2):  # the second step's trace sees the states made by the first
        tr = trace_step(model, x, y, loss_fn=nn.functional.mse_loss, optimizer=opt)
    assert [(g.param, g.nbytes) for g in state_groups(tr)] == [(i, 12 * p.numel())
                                                              for i, p in enumerate(model.parameters())]


# ---------------------------------------------------------------------------------------------- tiered
PLACEMENTS = {
    "nvme": StatePlacement(((0,), (1,), (2,), (3,), (4, 5)), ("nvme",) * 5),
    "host": StatePlacement(((0, 1), (2, 3), (4, 5)), ("host",) * 3),
    "mixed": StatePlacement(((0, 1), (2,), (3,), (4, 5)), ("nvme", "keep", "host", "nvme")),
}
GRADS = {
    "host": StatePlacement(((0, 1), (2, 3), (4, 5)), ("host",) * 3),
    "nvme": StatePlacement(((0, 1, 2, 3), (4, 5)), ("nvme", "nvme")),
}


def untiered(kind: str = "adamw", device: str = "cpu"):
    model = make_model(device)
    opt = make_mw(kind, model.parameters())
    train(model, opt, schedule(opt), 0, STEPS)
    return model, opt


def tiered_arm(case: str, tmp_path, kind: str = "adamw", device: str = "cpu"):
    model = make_model(device)
    mw = make_mw(kind, model.parameters())
    clip = None
    if case.startswith("grads_"):
        grads, states = GRADS[case[6:]], PLACEMENTS["mixed"]
        opt = GradTieredOptimizer(mw, states, grads=grads, nvme_dir=tmp_path)
        clip = opt.clip_grad_norm_
    elif case == "host_step":  # the host step's shadow optimizer (CUDA's path for host gradients + host states)
        both = StatePlacement(((0, 1, 2), (3, 4, 5)), ("host", "host"))
        opt = GradTieredOptimizer(mw, both, grads=both, host_step=True)
        clip = opt.clip_grad_norm_
    elif case.endswith("_deferred"):  # [Note: deferred updates]: stepped in the next forward, before the module
        opt = TieredOptimizer(mw, PLACEMENTS[case[:-9]], nvme_dir=tmp_path, model=model)
    else:
        opt = TieredOptimizer(mw, PLACEMENTS[case], nvme_dir=tmp_path, defer=False)
    train(model, opt, schedule(opt), 0, STEPS, clip=clip)
    return model, opt


@pytest.mark.parametrize("case", ["host", "nvme", "mixed", "nvme_deferred", "mixed_deferred", "grads_host",
                                  "grads_nvme", "host_step"])
def test_tiered_master_weights_are_bit_exact(case, tmp_path):
    ref_model, ref_opt = untiered()
    model, opt = tiered_arm(case, tmp_path)
    if case.endswith("_deferred"):
        assert opt._defer and opt._npending > 0 and opt.stats.deferred_updates > 0
    if case == "host_step":
        assert opt.host is not None and isinstance(opt.host.shadow, MasterWeights)
        assert set(opt.host.indices) == set(range(6))
    opt.flush()
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    params = list(model.parameters())
    if case != "host_step":
        # the masters are tiered with the moments: not in the optimizer's tier-0 state between steps
        placement = PLACEMENTS["mixed" if case.startswith("grads_") else case.replace("_deferred", "")]
        below = [i for i, p in enumerate(params) if placement.tier_of(i) != Placement.KEEP]
        assert below and all("master" not in opt.inner.state[params[i]] for i in below)
        assert opt.stats.bytes_written > 0 and opt.stats.bytes_read > 0
        assert opt.stats.resident_bytes == 0  # after flush(): no tiered state (master or moment) on tier 0
        if placement.tier_of(0) == Placement.NVME:  # CPU tier 0: NVMe buckets live in the arena ring's files
            assert opt._ring is not None
            in_files = {(e.indices[j], k) for e in opt._entries if e.file is not None for (j, k) in e.file.layout}
            nv = [i for i in below if placement.tier_of(i) == Placement.NVME]
            assert {(i, "master") for i in nv} <= in_files
            assert all(not f.arena or f.arena.owner is not f for f in opt._ring_files())  # flushed: on disk only
            assert opt.mover.store.bytes_written >= sum(4 * params[i].numel() for i in nv)
        host = [i for i in below if placement.tier_of(i) == Placement.HOST]
        assert all(opt._records[i].slots["master"].tensor is None for i in host)
    opt.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["host", "nvme", "mixed", "grads_nvme"])
def test_gpu_tiered_master_weights_are_bit_exact(case, tmp_path):
    """On CUDA: bf16 parameters and fp32 masters in HBM, the states through pinned host buffers / NVMe files and
    the copy streams; the device's own kernels step every bucket (no host step here), so bit-exact."""
    ref_model, ref_opt = untiered(device="cuda")
    model, opt = tiered_arm(case, tmp_path, device="cuda")
    opt.flush()
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    assert opt.stats.bytes_written > 0 and opt.stats.bytes_read > 0
    assert all(v.device.type == "cuda" for st in opt.state_dict()["state"].values() for v in st.values() if v.dim())
    opt.close()


def test_tiered_sgd_momentum_is_bit_exact(tmp_path):
    ref_model, ref_opt = untiered("sgd")
    model, opt = tiered_arm("mixed", tmp_path, kind="sgd")
    opt.flush()
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()


# ---------------------------------------------------------------------------------------------- the Manager
def mixed_tiers(tr, h):
    from memstrata.trace.states import state_buckets

    return [("nvme", None, "dram")[i % 3] for i in range(len(state_buckets(tr)))]


@pytest.mark.parametrize("states", ["nvme", "mixed"])
def test_manager_plans_and_trains_master_weights_bit_exact(states, tmp_path):
    ref_model, ref_opt = untiered()
    model = make_model()
    spec = mixed_tiers if states == "mixed" else states
    planner = lambda tr, h, b: joint_plan(tr, h, b, states=spec(tr, h) if callable(spec) else spec)  # noqa: E731
    mgr = Manager(model, budget="100%", nvme_dir=tmp_path, optimizer=make_mw("adamw", model.parameters()),
                  planner=planner)
    train(model, mgr.optimizer, schedule(mgr.optimizer), 0, STEPS, ctx=mgr.step)
    opt = mgr.optimizer
    opt.flush()
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    plan = mgr.plan
    want = {"nvme": {"nvme"}, "mixed": {None, "nvme", "dram"}}[states]
    assert {d.tier for d in plan.states} == want
    # the plan's state bytes are fp32 master + fp32 exp_avg + exp_avg_sq: 12 bytes per bf16 parameter element
    numel = sum(p.numel() for p in model.parameters())
    assert sum(d.nbytes for d in plan.states) == 12 * numel
    assert opt.mover.store.bytes_written > 0
    mgr.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings("ignore:memstrata. budget")
def test_manager_own_plan_with_tiered_gradients_is_bit_exact(tmp_path):
    """No forced plan: a budget below the unmanaged peak; the planner sends the fp32 states (masters included) and
    the bf16 gradients down, and training through `mgr.optimizer.clip_grad_norm_` stays bit-exact."""
    ref_model, ref_opt = untiered()
    model = make_model()
    mgr = Manager(model, budget="75%", nvme_dir=tmp_path, optimizer=make_mw("adamw", model.parameters()),
                  tier_grads=True)
    opt = mgr.optimizer
    train(model, opt, schedule(opt), 0, STEPS, ctx=mgr.step, clip=opt.clip_grad_norm_)
    opt.flush()
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    assert any(d.tier is not None for d in mgr.plan.states) and any(d.grads is not None for d in mgr.plan.states)
    assert opt.grads.stats.bytes_down > 0 and opt.stats.bytes_read > 0
    mgr.close()
    assert os.listdir(tmp_path) == []


def test_module_doctest():
    import doctest

    import memstrata.runtime.master as mod

    failed, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failed == 0


# ---------------------------------------------------------------------------------------------- fresh process
RESUME = """
import sys, torch
sys.path.insert(0, {here!r})
import test_master_weights as t
from memstrata.runtime.states import TieredOptimizer
torch.set_num_threads(1)
ck = torch.load({ck!r}, weights_only=False)
model = t.make_model()
model.load_state_dict(ck["model"])
opt = TieredOptimizer(t.make_mw("adamw", model.parameters()), t.PLACEMENTS["mixed"], nvme_dir={nvme!r})
sched = t.schedule(opt)
opt.load_state_dict(ck["opt"])
sched.load_state_dict(ck["sched"])
t.train(model, opt, sched, 3, t.STEPS)
torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, {out!r})
opt.close()
"""


def test_state_dict_resumes_bit_exactly_in_a_fresh_process(tmp_path):
    ref_model, ref_opt = untiered()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model = make_model()
    opt = TieredOptimizer(make_mw("adamw", model.parameters()), PLACEMENTS["mixed"], nvme_dir=tmp_path / "a")
    sched = schedule(opt)
    train(model, opt, sched, 0, 3)
    sd = opt.state_dict()
    assert all(s["master"].dtype == torch.float32 for s in sd["state"].values())
    ck = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "opt": sd, "sched": sched.state_dict()}, ck)
    train(model, opt, sched, 3, STEPS)
    out = tmp_path / "out.pt"
    code = RESUME.format(here=HERE, ck=str(ck), nvme=str(tmp_path / "b"), out=str(out))
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    got = torch.load(out, weights_only=False)
    for n, p in ref_model.state_dict().items():
        assert torch.equal(got["model"][n], p), n
        assert torch.equal(model.state_dict()[n], p), n
    assert_same_state(ref_opt.state_dict(), got["opt"])
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()
    assert os.listdir(tmp_path / "a") == [] and os.listdir(tmp_path / "b") == []


# ---------------------------------------------------------------------------------------------- two ranks
def _dist_worker(rank: int, world: int, port: int, out_dir: str, nvme_dir: str) -> None:
    """DDP and FSDP2 (gloo, 2 ranks) with a bf16 model and MasterWeights under the Manager (states on NVMe, host
    and kept), against the same without memstrata (test_distributed_states.py's harness)."""
    import json

    import torch.distributed as dist

    from memstrata.trace.states import state_buckets
    from test_distributed_states import _mismatches, _net, _train, _wrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    try:
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(16, 12, generator=g).to(BF16), torch.randn(16, 4, generator=g).to(BF16)

        def mixed(tr, h, b):
            n = len(state_buckets(tr))
            return joint_plan(tr, h, b, states=[("nvme", "dram", None)[i % 3] for i in range(n)])

        for mode in ("ddp", "fsdp2"):
            try:
                ref = _wrap(mode, _net().to(BF16))
                ref_opt = make_mw("adamw", ref.parameters())
                _train(ref, ref_opt, x, y)
                model = _wrap(mode, _net().to(BF16))
                d = os.path.join(nvme_dir, f"{mode}{rank}")
                os.makedirs(d)
                mgr = Manager(model, budget="100%", nvme_dir=d, planner=mixed,
                              optimizer=make_mw("adamw", model.parameters()))
                _train(model, mgr.optimizer, x, y, step_ctx=mgr.step)
                opt = mgr.optimizer
                masters = [st["master"] for st in opt.state_dict()["state"].values()]
                res[mode] = {"mismatches": _mismatches(ref, ref_opt, model, opt),
                             "tiers": sorted({str(dd.tier) for dd in mgr.plan.states}),
                             "masters": len(masters), "fp32": all(m.dtype == torch.float32 for m in masters),
                             "nvme_written": opt.mover.store.bytes_written if opt.mover.store else 0}
                mgr.close()
                res[mode]["left"] = os.listdir(d)
            except Exception as e:  # noqa: BLE001 - reported to the test
                res[mode] = {"error": f"{type(e).__name__}: {e}"}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.slow
def test_ddp_and_fsdp2_master_weights_under_the_manager_equal_unmanaged(tmp_path):
    from ranks import run_two_ranks

    ranks = run_two_ranks(_dist_worker, tmp_path)
    for i, r in enumerate(ranks):
        for mode in ("ddp", "fsdp2"):
            m = r[mode]
            assert "error" not in m, (i, mode, m)
            assert m["mismatches"] == [], (i, mode, m)
            assert m["tiers"] == ["None", "dram", "nvme"] and m["nvme_written"] > 0, m
            assert m["masters"] == 8 and m["fp32"] and m["left"] == [], m
