"""Gradients off tier 0 (runtime/grads.py): after 5 steps with 2-step accumulation, global-norm clipping and an
LR schedule, parameters and optimizer states equal the unmanaged run's, with gradients kept, in NVMe files, on
host and mixed; the clip's total norm equals torch.nn.utils.clip_grad_norm_'s."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from memstrata.runtime.grads import GradTieredOptimizer
from memstrata.runtime.mover import TierMover
from memstrata.runtime.nvme import NVMeStore
from memstrata.runtime.pool import HostBufferPool
from memstrata.runtime.states import StatePlacement
from memstrata.runtime.streams import CopyContext, RecordingStreams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, ACCUM, CLIP = 5, 2, 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))  # 6 params


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g) * 4  # large enough to clip


def make_opt(kind: str, params, foreach: bool = False) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1, foreach=foreach)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=5e-2, momentum=0.9, foreach=foreach)
    raise AssertionError(kind)


ALL = ((0, 1), (2, 3), (4, 5))
# (states placement, gradients placement)
CASES = {
    "kept": (StatePlacement((), ()), StatePlacement((), ())),
    "nvme": (StatePlacement(ALL, ("nvme",) * 3), StatePlacement(ALL, ("nvme",) * 3)),
    "host": (StatePlacement(ALL, ("host",) * 3), StatePlacement(ALL, ("host",) * 3)),
    "mixed": (StatePlacement(((0, 1), (2, 3), (4, 5)), ("nvme", "keep", "host")),
              StatePlacement(((0,), (1,), (4, 5)), ("nvme", "host", "nvme"))),  # params 2, 3: gradients kept
    "grads_only": (StatePlacement((), ()), StatePlacement(ALL, ("nvme",) * 3)),
}


def train(model, opt, sched, clip, norms: list) -> None:
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = batch(step, micro)
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        norms.append(clip(model.parameters(), CLIP))
        opt.step()
        sched.step()
        opt.zero_grad()


def run(kind: str, case: str | None, nvme_dir=None, *, foreach=False, mover=None):
    model = make_model()
    opt = make_opt(kind, model.parameters(), foreach)
    clip = nn.utils.clip_grad_norm_
    if case is not None:
        states, grads = CASES[case]
        opt = GradTieredOptimizer(opt, states, grads=grads, nvme_dir=nvme_dir, mover=mover)
        clip = opt.clip_grad_norm_
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    norms: list = []
    train(model, opt, sched, clip, norms)
    return model, opt, norms


def assert_same(ref_model, ref_opt, ref_norms, model, opt, norms) -> None:
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    sa, sb = ref_opt.state_dict(), opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k], (i, k)
    assert len(ref_norms) == len(norms) == STEPS
    for a, b in zip(ref_norms, norms):
        assert torch.equal(a, b)
    assert any(float(n) > CLIP for n in ref_norms)  # the clip really scaled


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_tiered_gradients_bit_exact_after_five_steps(kind, case, tmp_path):
    ref = run(kind, None)
    model, opt, norms = run(kind, case, tmp_path)
    assert_same(*ref, model, opt, norms)
    if case != "kept":
        st = opt.grads.stats
        assert st.bytes_down > 0 and st.bytes_up > 0
        assert st.accumulations == STEPS * (ACCUM - 1) * len(opt.grads._grads)  # every second micro-step added below
    if case in ("nvme", "mixed", "grads_only"):
        assert opt.mover.store.bytes_written > 0
    if case in ("nvme", "host"):
        assert st.read_ahead > 0  # from the third step on, the next bucket's gradients are read ahead
    opt.close()
    assert os.listdir(tmp_path) == []


def test_tiered_gradient_leaves_tier0_after_its_hook(tmp_path):
    """Between backward and step a tiered parameter's .grad is None (its bytes are below); kept ones stay."""
    model = make_model()
    opt = GradTieredOptimizer(make_opt("adamw", model.parameters()), grads=StatePlacement(((4, 5),), ("nvme",)),
                              nvme_dir=tmp_path)
    x, y = batch(0, 0)
    nn.functional.mse_loss(model(x), y).backward()
    assert model[4].weight.grad is None and model[4].bias.grad is None
    assert model[0].weight.grad is not None
    assert opt.grads.holds(model[4].weight)
    opt.step()
    assert model[4].weight.grad is None and opt.grads.stats.resident_bytes == 0  # consumed by its bucket's step
    opt.close()


def test_foreach_kernels_and_cuda_hand_off_path_are_exact(tmp_path):
    """foreach optimizers and clipping, through the mover's asynchronous (CUDA) path with recording streams."""
    copy = CopyContext("cpu", streams=RecordingStreams())
    pool = HostBufferPool(pin=False)
    mover = TierMover(torch.device("cpu"), copy, pool, NVMeStore(tmp_path, pool=pool))
    ref = run("adamw", None, foreach=True)
    model, opt, norms = run("adamw", "mixed", foreach=True, mover=mover)
    assert_same(*ref, model, opt, norms)
    opt.close()
    mover.close(own_store=True)
    assert os.listdir(tmp_path) == []


def test_close_puts_gradients_back_and_unknown_norm_is_one_line(tmp_path):
    model = make_model()
    opt = GradTieredOptimizer(make_opt("sgd", model.parameters()), grads=StatePlacement(ALL, ("nvme",) * 3),
                              nvme_dir=tmp_path)
    x, y = batch(0, 0)
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="norm_types"):
        opt.clip_grad_norm_(model.parameters(), 1.0, norm_type=1.0)
    ref = make_model()
    nn.functional.mse_loss(ref(x), y).backward()
    opt.close()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert os.listdir(tmp_path) == []


HOST_CASES = {
    "host_step": (StatePlacement(ALL, ("host",) * 3), StatePlacement(ALL, ("host",) * 3)),
    # params 0, 1: host step; 2, 3: states on NVMe, gradients on host (stepped in tier 0); 4, 5: all kept
    "host_step_mixed": (StatePlacement(((0, 1), (2, 3)), ("host", "nvme")),
                        StatePlacement(((0, 1), (2, 3)), ("host", "host"))),
}


def run_host(kind: str, case: str, nvme_dir, *, foreach=False, mover=None):
    model = make_model()
    states, grads = HOST_CASES[case]
    opt = GradTieredOptimizer(make_opt(kind, model.parameters(), foreach), states, grads=grads, nvme_dir=nvme_dir,
                              mover=mover, host_step=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    norms: list = []
    train(model, opt, sched, opt.clip_grad_norm_, norms)
    return model, opt, norms


@pytest.mark.parametrize("case", sorted(HOST_CASES))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_host_step_is_bit_exact_on_cpu(kind, case, tmp_path):
    """The host step (runtime/host_step.py: a shadow optimizer over host copies, the path CUDA takes for buckets
    whose gradients and states are in host memory), forced on CPU: the same values as unmanaged training."""
    ref = run(kind, None)
    model, opt, norms = run_host(kind, case, tmp_path)
    assert opt.host is not None and set(opt.host.indices) == ({0, 1, 2, 3, 4, 5} if case == "host_step" else {0, 1})
    assert model[0].weight not in opt.inner.state  # its states are the shadow's, on the host
    assert opt.host.state_bytes() > 0
    assert_same(*ref, model, opt, norms)
    opt.close()
    assert os.listdir(tmp_path) == []


def test_host_step_through_the_cuda_hand_off_path_and_resume(tmp_path):
    """Recording streams (events waited on before the host reads a gradient); a state_dict taken mid-run loads
    into a plain optimizer and into a host-stepping one, and both continue exactly."""
    copy = CopyContext("cpu", streams=RecordingStreams())
    pool = HostBufferPool(pin=False)
    mover = TierMover(torch.device("cpu"), copy, pool, NVMeStore(tmp_path, pool=pool))
    ref = run("adamw", None, foreach=True)
    model, opt, norms = run_host("adamw", "host_step", None, foreach=True, mover=mover)
    assert_same(*ref, model, opt, norms)
    assert any(e[0] == "synchronize" for e in copy.streams.entries)
    sd = opt.state_dict()
    plain = make_opt("adamw", make_model().parameters(), True)
    plain.load_state_dict(sd)
    opt.load_state_dict(sd)
    assert model[0].weight not in opt.inner.state and opt.host.state_bytes() > 0
    opt.close()  # states back in the wrapped optimizer
    assert torch.equal(opt.inner.state[model[0].weight]["exp_avg"], sd["state"][0]["exp_avg"])
    mover.close(own_store=True)


def test_docstring_example():
    import doctest

    import memstrata.runtime.grads as mod

    failed, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failed == 0


def _cuda_run(case: str | None, host_step: bool, tmp_path):
    torch.manual_seed(0)
    model = make_model().cuda()
    opt = make_opt("adamw", model.parameters(), foreach=True)
    clip = nn.utils.clip_grad_norm_
    if case is not None:
        states, grads = CASES[case]
        opt = GradTieredOptimizer(opt, states, grads=grads, nvme_dir=tmp_path, host_step=host_step)
        clip = opt.clip_grad_norm_
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    norms: list = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = batch(step, micro)
            (nn.functional.mse_loss(model(x.cuda()), y.cuda()) / ACCUM).backward()
        norms.append(clip(model.parameters(), CLIP))
        opt.step()
        sched.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    return model, opt, norms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tiered_gradients(tmp_path):
    """On CUDA: gradients through pinned host buffers and back for a device step are bit-exact; the host step
    (states and gradients in host memory, CPU kernels) matches to float rounding and keeps states off the GPU."""
    ref_model, ref_opt, ref_norms = _cuda_run(None, False, tmp_path)
    model, opt, norms = _cuda_run("host", False, tmp_path)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ref_norms, norms))
    opt.close()
    model, opt, norms = _cuda_run("host", True, tmp_path)
    assert opt.host is not None and len(opt.host.indices) == 6 and opt.host.state_bytes() > 0
    assert not any(torch.is_tensor(v) and v.is_cuda for st in opt.inner.state.values() for v in st.values())
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    opt.close()


def test_clipping_twice_before_the_step_is_torchs(tmp_path):
    """A second clip sees the clipped gradients (their norms taken again), as torch.nn.utils.clip_grad_norm_ does."""
    def go(managed: bool):
        model = make_model()
        opt = make_opt("sgd", model.parameters())
        if managed:
            opt = GradTieredOptimizer(opt, grads=StatePlacement(ALL, ("nvme",) * 3), nvme_dir=tmp_path)
        clip = opt.clip_grad_norm_ if managed else nn.utils.clip_grad_norm_
        x, y = batch(0, 0)
        nn.functional.mse_loss(model(x), y).backward()
        norms = [clip(model.parameters(), CLIP), clip(model.parameters(), CLIP / 3)]
        opt.step()
        return model, norms, opt

    ref, ref_norms, _ = go(False)
    model, norms, opt = go(True)
    assert all(torch.equal(a, b) for a, b in zip(ref_norms, norms)) and float(norms[1]) < float(norms[0])
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    opt.close()


def test_tier_grads_under_distributed_needs_ddp_or_fsdp2_one_line():
    """Ranks without a DDP / FSDP2 wrapper: gradients would leave unreduced; the error says what to wrap with (the
    DDP and FSDP2 paths themselves: tests/test_distributed_grads.py)."""
    from types import SimpleNamespace

    from memstrata import Manager
    from memstrata.runtime.ddp_grads import check_ddp

    model = nn.Sequential(nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"DistributedDataParallel\(\.\.\., gradient_as_bucket_view=True\) or FSDP2"):
        Manager(model, optimizer=opt, tier_grads=True, rank=0, world_size=2)
    mgr = Manager(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), tier_grads=True)  # one process
    assert mgr.tier_grads
    mgr.close()
    for kw, what in (({"gradient_as_bucket_view": False}, "gradient_as_bucket_view=True"),
                     ({"gradient_as_bucket_view": True, "static_graph": True}, "static_graph=False"),
                     ({"gradient_as_bucket_view": True, "_use_python_reducer": True}, "python reducer")):
        with pytest.raises(ValueError, match=what) as e:
            check_ddp(SimpleNamespace(**kw))
        assert "\n" not in str(e.value)
    check_ddp(SimpleNamespace(gradient_as_bucket_view=True, static_graph=False))
