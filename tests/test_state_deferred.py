"""Deferred updates of NVMe state buckets (runtime/deferred.py, [Note: deferred updates]): `step()` records the
NVMe buckets' updates and the next forward applies them, bit-exact with the unmanaged optimizer; everything that
observes parameters or states sees them applied."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from memstrata.runtime.states import StatePlacement, TieredOptimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_states as t  # noqa: E402  (the same model, batches, schedule and checks)

NVME = t.PLACEMENTS["nvme"]  # 5 buckets, all NVMe
MIXED = t.PLACEMENTS["mixed"]  # NVMe, kept, host, NVMe
HOST = t.PLACEMENTS["host"]  # 3 buckets, all host (a separate host buffer on CPU: [Note: deferred host buckets])
DEFERRED_PARAMS = {"nvme": range(6), "mixed": range(6), "host": range(6)}  # NVMe, kept and host buckets


def managed(kind: str, placement: StatePlacement, nvme_dir, **kw):
    model = t.make_model()
    opt = TieredOptimizer(t.make_opt(kind, model.parameters()), placement, nvme_dir=nvme_dir, model=model, **kw)
    return model, opt, t.schedule(opt)


def forward(model: nn.Module, step: int) -> torch.Tensor:
    x, _ = t.batch(step, 0)
    return model(x)


@pytest.mark.parametrize("placement", ["nvme", "mixed", "host"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_deferred_bit_exact_after_five_steps(kind, placement, tmp_path):
    """AdamW with clipping, 2-step accumulation and an LR schedule (the schedule changes lr between step()
    and the deferred update), SGD with Nesterov momentum: params and states equal to unmanaged."""
    ref_model, ref_opt = t.run(kind, None)
    model, opt, sched = managed(kind, t.PLACEMENTS[placement], tmp_path)
    t.train(model, opt, sched, 0, t.STEPS)
    assert opt._npending == len(opt._use_order) > 0  # the last step's deferred updates are still pending
    stale = [n for n, (a, b) in enumerate(zip(ref_model.parameters(), model.parameters())) if not torch.equal(a, b)]
    assert set(stale) == set(DEFERRED_PARAMS[placement])  # exactly the deferred buckets' parameters lag
    assert torch.equal(forward(model, 99), forward(ref_model, 99))  # a forward applies them first
    assert opt._npending == 0
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    # every deferred bucket update of steps 1-4 ran in a forward, step 5's in the forward above
    assert opt.stats.deferred_updates == t.STEPS * len(opt._use_order)
    if opt._ring is not None:
        assert len(opt._ring.arenas) <= opt._ring.count  # the budget: the ring's arenas, no more
    opt.close()
    assert os.listdir(tmp_path) == []


def test_defer_off_steps_inside_step(tmp_path):
    model, opt, sched = managed("adamw", NVME, tmp_path, defer=False)
    ref_model, _ = t.run("adamw", None, steps=2)
    t.train(model, opt, sched, 0, 2)
    assert opt._npending == 0 and opt.stats.deferred_updates == 0
    t.assert_same_params(ref_model, model)
    opt.close()


@pytest.mark.parametrize("placement", ["nvme", "mixed", "host"])
def test_state_dict_with_updates_pending_resumes_bit_exactly(placement, tmp_path):
    """model.state_dict() and opt.state_dict() right after step() (updates pending) are the unmanaged ones; a
    fresh model and optimizer loaded from them continue bit-exactly."""
    ref_model, ref_opt = t.run("adamw", None)
    mid_model, mid_opt = t.run("adamw", None, steps=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model, opt, sched = managed("adamw", t.PLACEMENTS[placement], tmp_path / "a")
    t.train(model, opt, sched, 0, 3)
    assert opt._npending > 0
    msd = model.state_dict()  # the model's state-dict hook applies the pending updates
    assert opt._npending == 0
    for n, p in mid_model.state_dict().items():
        assert torch.equal(msd[n], p), n
    osd = opt.state_dict()
    t.assert_same_state(mid_opt.state_dict(), osd)
    ssd = sched.state_dict()
    opt.close()
    model2, opt2, sched2 = managed("adamw", t.PLACEMENTS[placement], tmp_path / "b")
    model2.load_state_dict(msd)
    opt2.load_state_dict(osd)
    sched2.load_state_dict(ssd)
    t.train(model2, opt2, sched2, 3, t.STEPS)
    assert opt2._npending > 0
    opt2.flush()
    t.assert_same_params(ref_model, model2)
    t.assert_same_state(ref_opt.state_dict(), opt2.state_dict())
    opt2.close()


def _train_zero_in_place(model, opt, steps: int) -> None:
    sched = t.schedule(opt)
    for step in range(steps):
        for micro in range(t.ACCUM):
            x, y = t.batch(step, micro)
            (nn.functional.mse_loss(model(x), y) / t.ACCUM).backward()
        nn.utils.clip_grad_norm_(model.parameters(), t.CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)


@pytest.mark.parametrize("placement", ["nvme", "host"])
def test_zero_grad_keeps_the_gradient_a_pending_update_needs(placement, tmp_path):
    """opt.zero_grad(set_to_none=False) between step() and the forward: the parameters get zeroed gradients,
    the pending updates still use the step's gradients."""
    ref_model = t.make_model()
    ref_opt = t.make_opt("adamw", ref_model.parameters())
    _train_zero_in_place(ref_model, ref_opt, 3)
    model = t.make_model()
    opt = TieredOptimizer(t.make_opt("adamw", model.parameters()), t.PLACEMENTS[placement], nvme_dir=tmp_path,
                          model=model)
    _train_zero_in_place(model, opt, 3)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.flush()
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()


def test_gradient_changed_in_place_before_the_update_is_one_line(tmp_path):
    model, opt, sched = managed("adamw", NVME, tmp_path)
    t.train(model, opt, sched, 0, 1)  # zero_grad() sets to None: fine
    model(t.batch(1, 0)[0]).sum().backward()
    opt.step()
    model.zero_grad(set_to_none=False)  # the module's zero_grad clears the recorded gradients in place
    with pytest.raises(ValueError, match=r"changed in place between step\(\) and its deferred update") as e:
        model(t.batch(2, 0)[0])
    assert "\n" not in str(e.value)
    opt.close(keep_states=False, apply_pending=False)


def test_second_step_before_a_forward_and_a_no_grad_eval(tmp_path):
    """step(); step() with the same gradients, no forward in between; then an eval forward under no_grad."""
    def loop(model, opt):
        for s in range(3):
            model(t.batch(s, 0)[0]).square().mean().backward()
            opt.step()
            opt.step()
            opt.zero_grad()
            model.eval()
            with torch.no_grad():
                out = model(t.batch(50 + s, 0)[0])
            model.train()
        return out

    ref_model = t.make_model()
    ref = loop(ref_model, t.make_opt("sgd", ref_model.parameters()))
    model, opt, _ = managed("sgd", MIXED, tmp_path)
    got = loop(model, opt)
    assert torch.equal(ref, got)
    assert opt.stats.deferred_updates > 0
    t.assert_same_params(ref_model, model)
    opt.close()


def test_one_line_errors(tmp_path):
    model = t.make_model()
    with pytest.raises(ValueError, match="defer=True needs model="):
        TieredOptimizer(t.make_opt("adamw", model.parameters()), NVME, nvme_dir=tmp_path, defer=True)
    with pytest.raises(ValueError, match="defer=True needs tiered state buckets"):
        TieredOptimizer(t.make_opt("adamw", model.parameters()), "keep", model=model, defer=True)
    other = t.make_model()
    with pytest.raises(ValueError, match="not parameters of the model"):
        TieredOptimizer(t.make_opt("adamw", model.parameters()), NVME, nvme_dir=tmp_path, model=other)
    assert os.listdir(tmp_path) == []  # the store made before the check is gone


def test_parameters_outside_the_model_are_stepped_in_step(tmp_path):
    """A kept parameter the model does not own (no hook could apply it) is updated inside step()."""
    def pair(tiered: bool):
        model = t.make_model()
        extra = nn.Parameter(torch.ones(3))
        inner = t.make_opt("adamw", [*model.parameters(), extra])
        opt = TieredOptimizer(inner, NVME, nvme_dir=tmp_path, model=model) if tiered else inner
        for s in range(2):
            (model(t.batch(s, 0)[0]).sum() + extra.square().sum()).backward()
            opt.step()
            opt.zero_grad()
        return model, extra, opt

    ref_model, ref_extra, _ = pair(False)
    model, extra, opt = pair(True)
    assert torch.equal(ref_extra, extra)  # not pending
    assert opt._npending == len(opt._use_order) == 5  # the model's five NVMe buckets are
    opt.flush()
    t.assert_same_params(ref_model, model)
    opt.close()


@pytest.mark.parametrize("start", ["kept", "nvme"])
def test_set_placement_builds_the_ring_and_defers(start, tmp_path):
    """The Manager's path: a placement installed after construction (from all kept, as the Manager starts, or from
    NVMe buckets already in the ring) gets the arena ring and deferred updates, the ring's states carried over;
    bit-exact with unmanaged after 5 steps."""
    from memstrata.runtime.mover import TierMover
    from memstrata.runtime.nvme import NVMeStore
    from memstrata.runtime.pool import HostBufferPool
    from memstrata.runtime.streams import CopyContext

    ref_model, ref_opt = t.run("adamw", None)
    mover = TierMover(torch.device("cpu"), CopyContext("cpu"), HostBufferPool(pin=False), NVMeStore(tmp_path))
    model, opt, sched = managed("adamw", t.PLACEMENTS[start], None, mover=mover)
    assert (opt._ring is None) == (start == "kept")
    t.train(model, opt, sched, 0, 2)
    opt.set_placement(MIXED)
    assert opt._ring is not None and opt._defer and opt._npending == 0
    assert {i for e in opt._use_order for i in e.indices} == set(DEFERRED_PARAMS["mixed"])
    t.train(model, opt, sched, 2, t.STEPS)
    assert opt._npending == len(opt._use_order) and opt.stats.deferred_updates >= 2 * len(opt._use_order)
    opt.flush()
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.set_placement(t.PLACEMENTS["kept"])  # back to all kept: no ring, nothing deferred
    assert opt._ring is None and not opt._defer and opt._hooks is None
    t.train(model, opt, sched, t.STEPS, t.STEPS + 1)
    t.assert_same_params(t.run("adamw", None, steps=t.STEPS + 1)[0], model)
    opt.close()
    mover.close(own_store=True)
    assert os.listdir(tmp_path) == []


def test_host_buckets_are_updated_in_the_forward_not_in_step(tmp_path):
    """[Note: deferred host buckets]: step() leaves the host buckets' parameters as they were (it only records
    and reads the first bucket ahead); the forward's pre-hooks apply them, one bucket per module, with at most
    prefetch_depth + 1 host buckets' states on tier 0; the result is the unmanaged one."""
    ref_model, ref_opt = t.run("adamw", None, steps=2)
    model, opt, sched = managed("adamw", HOST, None)
    assert opt._defer and opt._ring is None and len(opt._use_order) == 3
    t.train(model, opt, sched, 0, 1)
    before = [p.detach().clone() for p in model.parameters()]
    applied = opt.stats.deferred_updates
    for micro in range(t.ACCUM):
        x, y = t.batch(1, micro)
        (nn.functional.mse_loss(model(x), y) / t.ACCUM).backward()  # the forward applies step 0's updates
    assert opt.stats.deferred_updates == applied + 3
    nn.utils.clip_grad_norm_(model.parameters(), t.CLIP)
    read = opt.stats.bytes_read
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    sched.step()
    opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing updated in step()
    assert opt.stats.bytes_read == read and opt._npending == 3
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, _a: seen.append(
        (opt._npending, [torch.equal(p, before[i]) for i, p in enumerate(model.parameters())])))
        for m in model if any(True for _ in m.parameters())]  # after ours (registered later)
    forward(model, 7)
    for h in hooks:
        h.remove()
    assert [n for n, _ in seen] == [2, 1, 0]  # each Linear's bucket applied just before it runs
    assert seen[0][1] == [False, False, True, True, True, True]  # the first Linear updated, the others not yet
    assert opt.stats.bytes_read > read
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    state_bytes = 2 * max(sum(p.numel() * 4 for p in m.parameters()) for m in model)  # AdamW: 2 fp32 states
    assert 0 < opt.stats.peak_resident_bytes <= 2 * state_bytes  # prefetch_depth (1) + 1 buckets of states
    opt.close()


def test_deferred_host_and_nvme_buckets_on_the_cuda_hand_off_path(tmp_path):
    """The CUDA path on CPU (RecordingStreams: no arena ring, every tiered bucket in slots): host and NVMe
    buckets deferred, bit-exact; step() issues only the first bucket's read ahead (h2d), the forward the
    rest: every copy on the d2h / h2d side streams, none on compute."""
    from memstrata.runtime.mover import TierMover
    from memstrata.runtime.nvme import NVMeStore
    from memstrata.runtime.pool import HostBufferPool
    from memstrata.runtime.streams import CopyContext, RecordingStreams

    ref_model, ref_opt = t.run("adamw", None)
    copy = CopyContext("cpu", streams=RecordingStreams())
    pool = HostBufferPool(pin=False)
    mover = TierMover(torch.device("cpu"), copy, pool, NVMeStore(tmp_path, pool=pool))
    placement = StatePlacement(((0, 1), (2, 3), (4, 5)), ("host", "nvme", "host"))
    model, opt, sched = managed("adamw", placement, None, mover=mover)
    assert opt._defer and opt._ring is None and len(opt._use_order) == 3
    t.train(model, opt, sched, 0, t.STEPS - 1)
    log = copy.streams.entries
    for micro in range(t.ACCUM):
        x, y = t.batch(t.STEPS - 1, micro)
        (nn.functional.mse_loss(model(x), y) / t.ACCUM).backward()
    nn.utils.clip_grad_norm_(model.parameters(), t.CLIP)
    n0 = len(log)
    opt.step()
    sched.step()
    opt.zero_grad()
    n1 = len(log)
    forward(model, 99)
    n2 = len(log)
    in_step = [e[1] for e in log[n0:n1] if e[0] == "copy"]
    in_forward = [e[1] for e in log[n1:n2] if e[0] == "copy"]
    assert in_step == ["h2d"] * 4  # the first bucket (weight, bias) x (exp_avg, exp_avg_sq), read ahead
    assert in_forward.count("h2d") == 8 and in_forward.count("d2h") == 12  # the other two up; all three down
    assert all(e[1] != "compute" for e in log if e[0] == "copy")
    assert ("wait_event", "compute") in {(e[0], e[1]) for e in log[n1:n2]}  # compute waits only at the update
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()
    mover.close(own_store=True)
    assert os.listdir(tmp_path) == []


def _logged_cuda_streams(device: torch.device):
    """`CudaStreams` that also log each copy: (its stream's name, whether that is not the compute stream)."""
    from memstrata.runtime.streams import CudaStreams

    class Logged(CudaStreams):
        def __init__(self, device):
            super().__init__(device)
            self.copies: list[tuple[str, bool]] = []

        def copy(self, stream, dst, src):
            self.copies.append((stream, self._s(stream) != torch.cuda.current_stream(self.device)))
            super().copy(stream, dst, src)

    return Logged(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_gpu_deferred_host_buckets_are_exact_and_copy_on_the_side_streams(kind, tmp_path):
    """On CUDA ([Note: deferred host buckets]): host buckets deferred to the forward (pinned buffers, d2h/h2d
    streams) are bit-exact with the plain optimizer after 5 steps (clip, accumulation, schedule); every state copy
    was issued on a side stream, none on the compute stream; the forward did the host buckets' copies."""
    from memstrata.runtime.mover import TierMover
    from memstrata.runtime.pool import HostBufferPool
    from memstrata.runtime.streams import CopyContext

    def run(tiered: bool):
        torch.manual_seed(0)
        model = t.make_model().cuda()
        inner = t.make_opt(kind, model.parameters(), foreach=True)
        opt, copy, mover = inner, None, None
        if tiered:
            dev = torch.device("cuda", torch.cuda.current_device())
            copy = CopyContext(dev, streams=_logged_cuda_streams(dev))
            mover = TierMover(dev, copy, HostBufferPool(pin=True))
            opt = TieredOptimizer(inner, HOST, mover=mover, model=model)
            assert opt._defer and len(opt._use_order) == 3
        sched = t.schedule(opt)
        for step in range(t.STEPS):
            for micro in range(t.ACCUM):
                x, y = t.batch(step, micro)
                (nn.functional.mse_loss(model(x.cuda()), y.cuda()) / t.ACCUM).backward()
            nn.utils.clip_grad_norm_(model.parameters(), t.CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
        if tiered:
            n = len(copy.streams.copies)
            model(t.batch(99, 0)[0].cuda())  # applies step 5's updates
            assert len(copy.streams.copies) > n  # the forward copied states up and down
            opt.flush()
        torch.cuda.synchronize()
        return model, opt, copy

    ref_model, ref_opt, _ = run(False)
    model, opt, copy = run(True)
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    assert opt.stats.deferred_updates == t.STEPS * 3
    streams = {s for s, _ in copy.streams.copies}
    assert streams == {"d2h", "h2d"} and all(side for _, side in copy.streams.copies)
    assert not any(torch.is_tensor(v) and v.dim() > 0 for st in opt.inner.state.values() for v in st.values())
    opt.close()
    opt.mover.close(own_store=True)


def test_manager_states_with_host_decisions_defer_them():
    """The Manager's runtime half (ManagedStates): a plan's decisions naming host DRAM (on a CPU hierarchy: tier
    0's own host copy, which the CPU planner never picks, so forced here) give host buckets whose updates are
    deferred to the forward; bit-exact after 5 steps."""
    from memstrata.decisions import StateDecision
    from memstrata.hardware import profile
    from memstrata.runtime.managed_states import ManagedStates
    from memstrata.runtime.pool import HostBufferPool
    from memstrata.runtime.streams import CopyContext

    ref_model, ref_opt = t.run("adamw", None)
    model = t.make_model()
    ms = ManagedStates(t.make_opt("adamw", model.parameters()), device=torch.device("cpu"),
                       copy=CopyContext("cpu"), pool=HostBufferPool(pin=False), model=model)
    opt = ms.optimizer
    sched = t.schedule(opt)
    t.train(model, opt, sched, 0, 1)
    ms.apply([StateDecision((0, 1), "dram"), StateDecision((2, 3)), StateDecision((4, 5), "dram")], profile("cpu"))
    assert opt._defer and [e.tier.label for e in opt._use_order] == ["keep", "host", "host"]
    t.train(model, opt, sched, 1, t.STEPS)
    assert opt._npending == 3
    opt.flush()
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    assert "host" in ms.describe()
    ms.close()


def test_disk_full_during_deferred_nvme_slot_writes_is_one_line_state_intact(tmp_path, monkeypatch):
    """NVMe buckets outside the ring (the CUDA path, RecordingStreams here), deferred: writes that fail in the
    forward's write-behind surface at flush() / the next step() as one line; the states are those after the
    step, on tier 0; once space comes back training ends where the unmanaged run does."""
    import errno

    import memstrata.runtime.nvme as nvme_mod
    from memstrata.runtime import NVMeIOError
    from memstrata.runtime.mover import TierMover
    from memstrata.runtime.nvme import NVMeStore
    from memstrata.runtime.pool import HostBufferPool
    from memstrata.runtime.streams import CopyContext, RecordingStreams

    ref3_model, ref3_opt = t.run("adamw", None, steps=3)
    ref_model, ref_opt = t.run("adamw", None)
    pool = HostBufferPool(pin=False)
    mover = TierMover(torch.device("cpu"), CopyContext("cpu", streams=RecordingStreams()), pool,
                      NVMeStore(tmp_path, pool=pool))
    model, opt, sched = managed("adamw", NVME, None, mover=mover)
    assert opt._defer and opt._ring is None
    t.train(model, opt, sched, 0, 2)
    opt.flush()
    real = nvme_mod._pwrite_all

    def full(fd, x, offset=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nvme_mod, "_pwrite_all", full)
    t.train(model, opt, sched, 2, 3)  # step 3 recorded; its updates wait for the next forward
    with pytest.raises(NVMeIOError) as ei:
        opt.flush()  # applies them: every write behind fails
    msg = str(ei.value)
    assert "\n" not in msg and "is full" in msg and "intact" in msg and opt.stats.write_failures > 0
    t.assert_same_params(ref3_model, model)
    t.assert_same_state(ref3_opt.state_dict(), opt.state_dict())
    monkeypatch.setattr(nvme_mod, "_pwrite_all", real)
    try:
        opt.flush()
    except NVMeIOError:
        pass  # writes started by state_dict() while the disk was still full
    t.train(model, opt, sched, 3, t.STEPS)
    opt.flush()
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()
    mover.close(own_store=True)
    assert os.listdir(tmp_path) == []
