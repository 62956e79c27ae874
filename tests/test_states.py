"""Optimizer states on host / NVMe (runtime/states.py): bit-exact with the unmanaged optimizer, resumable
from a standard state_dict in a fresh process, safe when the NVMe directory fills up, nothing left on disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import memstrata.runtime.nvme as nvme_mod
from memstrata.runtime import NVMeIOError
from memstrata.runtime.mover import Placement, TierMover
from memstrata.runtime.nvme import NVMeStore
from memstrata.runtime.pool import HostBufferPool
from memstrata.runtime.states import StatePlacement, TieredOptimizer, buckets_by_size, remove_stale_stores
from memstrata.runtime.streams import CopyContext, RecordingStreams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, ACCUM, CLIP = 5, 2, 0.5
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))  # 6 params


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)


def make_opt(kind: str, params, foreach: bool = False) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1, foreach=foreach)
    if kind == "adam_amsgrad":
        return torch.optim.Adam(params, lr=3e-2, amsgrad=True, foreach=foreach)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, foreach=foreach)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=5e-2, foreach=foreach)
    raise AssertionError(kind)


PLACEMENTS = {
    "kept": StatePlacement(((0, 1, 2, 3, 4, 5),), ("keep",)),
    "nvme": StatePlacement(((0,), (1,), (2,), (3,), (4, 5)), ("nvme",) * 5),
    "host": StatePlacement(((0, 1), (2, 3), (4, 5)), ("host",) * 3),
    "mixed": StatePlacement(((0, 1), (2,), (3,), (4, 5)), ("nvme", "keep", "host", "nvme")),
}


def train(model, opt, sched, start: int, stop: int) -> None:
    """Steps [start, stop): 2-step accumulation, global-norm clipping, an LR schedule."""
    for step in range(start, stop):
        for micro in range(ACCUM):
            x, y = batch(step, micro)
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))


def run(kind: str, placement, nvme_dir=None, *, foreach=False, mover=None, steps=STEPS):
    model = make_model()
    opt = make_opt(kind, model.parameters(), foreach)
    if placement is not None:
        opt = TieredOptimizer(opt, placement, nvme_dir=nvme_dir, mover=mover)
    sched = schedule(opt)
    train(model, opt, sched, 0, steps)
    return model, opt


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


def assert_same_params(ma: nn.Module, mb: nn.Module) -> None:
    for (n, a), (_, b) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("kind", ["adamw", "sgd", "adagrad", "adam_amsgrad"])
def test_bit_exact_after_five_steps(kind, placement, tmp_path):
    ref_model, ref_opt = run(kind, None)
    model, opt = run(kind, PLACEMENTS[placement], tmp_path)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    tiered = sum(len(r.slots) for r in opt._records if r.placement != Placement.KEEP)
    tiered += sum(len(f.layout) for f in opt._ring_files()) if opt._ring is not None else 0  # NVMe buckets in arenas
    if placement != "kept":
        assert tiered >= 2  # states really went down
        assert opt.stats.bytes_written > 0 and opt.stats.bytes_read > 0
    if placement in ("nvme", "mixed"):
        assert opt.mover.store.bytes_written > 0
    opt.close()
    assert os.listdir(tmp_path) == []


def test_foreach_kernels_per_bucket_equal_full_step(tmp_path):
    ref_model, ref_opt = run("adamw", None, foreach=True)
    model, opt = run("adamw", PLACEMENTS["mixed"], tmp_path, foreach=True)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()


def test_cuda_hand_off_path_on_cpu_is_exact(tmp_path):
    """The asynchronous (CUDA) path of the mover, run on CPU with the recording fake streams."""
    copy = CopyContext("cpu", streams=RecordingStreams())
    pool = HostBufferPool(pin=False)
    store = NVMeStore(tmp_path, pool=pool)
    mover = TierMover(torch.device("cpu"), copy, pool, store)
    ref_model, ref_opt = run("adamw", None)
    model, opt = run("adamw", PLACEMENTS["mixed"], mover=mover)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    prims = {e[0] for e in copy.streams.entries}
    assert {"copy", "record_event", "wait_event", "wait_stream"} <= prims
    opt.close()
    mover.close(own_store=True)
    assert os.listdir(tmp_path) == []


def test_state_window_bounds_resident_states(tmp_path):
    """All-NVMe: at most prefetch_depth + 2 buckets of states on tier 0 ([Note: the state window])."""
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(8)])
    opt = TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                          StatePlacement(tuple((i,) for i in range(8)), ("nvme",) * 8), nvme_dir=tmp_path)
    for _ in range(3):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
    per_bucket = 2 * 16 * 16 * 4  # exp_avg + exp_avg_sq of one weight
    assert per_bucket <= opt.stats.peak_resident_bytes <= 3 * per_bucket
    opt.flush()
    assert opt.stats.resident_bytes == 0
    assert all(set(opt.inner.state[p]) == {"step"} for p in model.parameters())
    opt.close()


RESUME = """
import sys, torch
sys.path.insert(0, {here!r})
import test_states as t
from memstrata.runtime.states import TieredOptimizer
torch.set_num_threads(1)
ck = torch.load({ck!r}, weights_only=False)
model = t.make_model()
model.load_state_dict(ck["model"])
opt = TieredOptimizer(t.make_opt("adamw", model.parameters()), t.PLACEMENTS[{placement!r}], nvme_dir={nvme!r})
sched = t.schedule(opt)  # the usual order: scheduler made, then both states loaded
opt.load_state_dict(ck["opt"])
sched.load_state_dict(ck["sched"])
t.train(model, opt, sched, 3, t.STEPS)
torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, {out!r})
opt.close()
"""


@pytest.mark.parametrize("placement", ["nvme", "mixed"])
def test_state_dict_resumes_bit_exactly_in_a_fresh_process(placement, tmp_path):
    ref_model, ref_opt = run("adamw", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model = make_model()
    opt = TieredOptimizer(make_opt("adamw", model.parameters()), PLACEMENTS[placement], nvme_dir=tmp_path / "a")
    sched = schedule(opt)
    train(model, opt, sched, 0, 3)
    sd = opt.state_dict()
    # The standard format: a plain AdamW loads it.
    plain = make_opt("adamw", make_model().parameters())
    plain.load_state_dict(sd)
    ck = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "opt": sd, "sched": sched.state_dict()}, ck)
    train(model, opt, sched, 3, STEPS)  # this process goes on too
    out = tmp_path / "out.pt"
    code = RESUME.format(here=HERE, ck=str(ck), placement=placement, nvme=str(tmp_path / "b"), out=str(out))
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


def test_disk_full_mid_run_one_line_error_state_intact(tmp_path, monkeypatch):
    ref3_model, ref3_opt = run("adamw", None, steps=3)
    ref_model, ref_opt = run("adamw", None)
    model = make_model()
    opt = TieredOptimizer(make_opt("adamw", model.parameters()), PLACEMENTS["nvme"], nvme_dir=tmp_path)
    sched = schedule(opt)
    train(model, opt, sched, 0, 2)
    opt.flush()
    real = nvme_mod._pwrite_all

    def full(fd, t, offset=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nvme_mod, "_pwrite_all", full)
    for micro in range(ACCUM):  # step 3 of the run, written out: step() is where the error surfaces
        x, y = batch(2, micro)
        (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    with pytest.raises(NVMeIOError) as ei:
        opt.step()
        opt.flush()  # (if every failing write was still in flight when step() returned)
    sched.step()
    opt.zero_grad()
    msg = str(ei.value)
    assert "\n" not in msg and f"NVMe directory {tmp_path} is full" in msg and "intact" in msg
    assert opt.stats.write_failures > 0
    # Parameters and states are exactly those after step 3, on tier 0; no partial file remains.
    assert_same_params(ref3_model, model)
    assert_same_state(ref3_opt.state_dict(), opt.state_dict())
    # Space comes back: training goes on and ends where the unmanaged run does.
    monkeypatch.setattr(nvme_mod, "_pwrite_all", real)
    try:
        opt.flush()
    except NVMeIOError:
        pass  # writes started by state_dict() while the disk was still full
    train(model, opt, sched, 3, STEPS)
    opt.flush()
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()
    assert os.listdir(tmp_path) == []


CHILD = """
import sys, time, torch
sys.path.insert(0, {here!r})
import test_states as t
from memstrata.runtime.states import TieredOptimizer
model = t.make_model()
opt = TieredOptimizer(t.make_opt("adamw", model.parameters()), "nvme", nvme_dir={nvme!r})
t.train(model, opt, t.schedule(opt), 0, 1)
opt.flush()
print("ready", flush=True)
time.sleep(60)
"""


def _child(nvme) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(here=HERE, nvme=str(nvme))], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_nothing_left_after_sigint_or_sigkill(tmp_path):
    p = _child(tmp_path)
    assert len(os.listdir(tmp_path)) == 1  # the running process's store
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    assert os.listdir(tmp_path) == []  # KeyboardInterrupt -> atexit -> close()
    p = _child(tmp_path)
    p.kill()
    p.wait(timeout=60)
    (stale,) = os.listdir(tmp_path)
    assert stale.startswith(f"memstrata-{p.pid}-")
    model = make_model()
    opt = TieredOptimizer(make_opt("sgd", model.parameters()), "nvme", nvme_dir=tmp_path)  # the next start
    assert stale not in os.listdir(tmp_path)
    opt.close()
    assert os.listdir(tmp_path) == []
    assert remove_stale_stores(tmp_path) == []


def test_one_line_errors(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="need nvme_dir"):
        TieredOptimizer(make_opt("adamw", model.parameters()), "nvme")
    with pytest.raises(ValueError, match="unknown state tier"):
        StatePlacement(((0,),), ("ssd",))
    with pytest.raises(ValueError, match="in two buckets"):
        StatePlacement(((0, 1), (1,)), ("nvme", "host"))
    with pytest.raises(ValueError, match="names parameter 9"):
        TieredOptimizer(make_opt("adamw", model.parameters()), StatePlacement(((9,),), ("host",)))
    opt = TieredOptimizer(make_opt("adamw", model.parameters()), "host")
    opt.close()
    with pytest.raises(ValueError, match="after close"):
        opt.step()


def test_close_keeps_states_in_the_plain_optimizer(tmp_path):
    ref_model, ref_opt = run("sgd", None)
    model, opt = run("sgd", PLACEMENTS["nvme"], tmp_path)
    opt.close()
    assert os.listdir(tmp_path) == []
    assert_same_state(ref_opt.state_dict(), opt.inner.state_dict())


def test_buckets_by_size():
    assert buckets_by_size([4, 4, 4, 10, 1], 8) == ((0, 1), (2,), (3,), (4,))
    assert buckets_by_size([], 8) == ()


# ---------------------------------------------------------------------------------------------- the planner side
from itertools import combinations  # noqa: E402

from memstrata.decisions import InfeasibleBudgetError  # noqa: E402
from memstrata.hardware import profile  # noqa: E402
from memstrata.plan.states import WINDOWS, pipeline_stall, plan_states  # noqa: E402


def test_plan_keeps_everything_when_it_fits():
    p = plan_states([1000, 2000], state_bytes_per_element=8, fast_budget=24_000, hierarchy=profile("cpu"))
    assert set(p.tiers) == {"keep"} and p.nvme_bytes == 0 and p.stall_seconds == 0 and p.fast_bytes == 24_000


@pytest.mark.parametrize("seed", range(6))
def test_plan_fits_budget_and_is_near_the_best_plan(seed):
    """Against brute force over every subset of buckets and every ring depth (one bucket size): within budget,
    predicted time within a few % of the exact best under the same model, NVMe bytes as the plan says."""
    g = torch.Generator().manual_seed(seed)
    numels = [int(n) for n in torch.randint(100, 5000, (13,), generator=g)]
    sizes = [n * 8 for n in numels]
    total = sum(sizes)
    budget = int(total * (0.55 + 0.07 * seed))
    bw = (1e9, 1e9, 2e-6, 0.0)
    step = 20e-6
    best = None
    for k in range(len(sizes) + 1):
        for c in combinations(range(len(sizes)), k):
            chosen = [sizes[i] for i in c]
            for w in WINDOWS:
                fast = total - sum(chosen) + min(len(chosen), w) * max(chosen, default=0)
                if fast <= budget:
                    t = step + pipeline_stall(chosen, w, step, 0.0, bw)[1]
                    best = t if best is None else min(best, t)
    kw = dict(state_bytes_per_element=8, fast_budget=budget, read_bandwidth=bw[0], write_bandwidth=bw[1],
              latency=bw[2], step_seconds=step, bucket_bytes=1, bucket_splits=0, per_bucket_seconds=0.0)
    if best is None:  # the ring of the largest parameters alone exceeds the budget
        with pytest.raises(InfeasibleBudgetError):
            plan_states(numels, **kw)
        return
    p = plan_states(numels, **kw)
    assert p.fast_bytes <= budget
    assert best <= p.predicted_seconds <= best * 1.15 + 1e-12  # the greedy cover is close to the exact one
    assert p.nvme_bytes == sum(s for s, t in zip(p.bucket_state_bytes, p.tiers) if t == "nvme")
    nv = [s for s, t in zip(p.bucket_state_bytes, p.tiers) if t == "nvme"]
    assert p.fast_bytes == total - p.nvme_bytes + min(len(nv), p.window) * max(nv, default=0)


def test_plan_models_the_ring_pipeline():
    """[Note: what the state planner models]: the ring's last buckets stay for the next step, so the bytes moved
    inside a step are the NVMe bytes less the ring; a shallow ring is bound by each arena's write-read cycle,
    and the planner deepens it (within the budget) when that is what stalls."""
    h = profile("cpu")
    nv = h.nvme_tier()
    p = plan_states([1 << 17] * 64, state_bytes_per_element=8, fast_budget=40 << 20, hierarchy=h,
                    bucket_bytes=8 << 20)
    sizes = [s for s, t in zip(p.bucket_state_bytes, p.tiers) if t == "nvme"]
    n, w = len(sizes), p.window
    assert p.fast_bytes <= 40 << 20 and 3 <= w <= n
    moved = sum(sizes) - min(n, w) * sum(sizes) / n
    io = moved / nv.read_bandwidth + moved / nv.write_bandwidth + 2 * nv.latency * (n - w)
    assert p.io_seconds == pytest.approx(io)
    assert moved == pytest.approx(64 * (1 << 17) * 8 - (40 << 20), rel=0.02)  # ~ states beyond the budget
    assert p.stall_seconds >= max(0.0, io - p.step_seconds) - 1e-12
    hidden = plan_states([1 << 17] * 64, state_bytes_per_element=8, fast_budget=40 << 20, hierarchy=h,
                         bucket_bytes=8 << 20, overlap_seconds=1.0)
    assert hidden.stall_seconds == 0
    # A disk with a long latency per request: three arenas cannot keep it busy; a deeper ring can.
    per = (1 << 20) / 2e9 * 2 + 2 * 2e-3  # read + write + latencies of one 1 MiB bucket: ~= its compute
    kw = dict(state_bytes_per_element=8, fast_budget=40 << 20, read_bandwidth=2e9, write_bandwidth=2e9,
              latency=2e-3, step_seconds=27 * per, bucket_bytes=1 << 20, bucket_splits=0)
    shallow = plan_states([1 << 17] * 64, window=3, **kw)
    deep = plan_states([1 << 17] * 64, **kw)
    assert shallow.stall_seconds > 0 and deep.window > 3
    assert deep.stall_seconds < shallow.stall_seconds and deep.fast_bytes <= 40 << 20


def test_plan_models_deferred_updates():
    """[Note: what the state planner models], deferred updates: the next forward's compute joins the step's as
    the window of the ring's I/O (the same bytes move, the same budget holds; the stall shrinks by the forward)."""
    kw = dict(state_bytes_per_element=8, fast_budget=40 << 20, read_bandwidth=1e9, write_bandwidth=1e9,
              step_seconds=0.02, bucket_bytes=8 << 20, window=6)
    inside = plan_states([1 << 17] * 64, **kw)
    deferred = plan_states([1 << 17] * 64, forward_seconds=0.015, **kw)
    assert (deferred.buckets, deferred.tiers, deferred.window) == (inside.buckets, inside.tiers, inside.window)
    assert deferred.io_seconds == pytest.approx(inside.io_seconds) and deferred.fast_bytes <= 40 << 20
    assert inside.stall_seconds == pytest.approx(inside.io_seconds - 0.02)
    assert deferred.stall_seconds == pytest.approx(inside.io_seconds - 0.035)
    assert "deferred to the next forward" in deferred.describe()
    assert "buckets on NVMe" in deferred.describe()
    host = plan_states([1 << 17] * 64, forward_seconds=0.015, below="host RAM", **kw)  # PCIe below HBM (CUDA)
    assert host.tiers == deferred.tiers and "buckets on host RAM" in host.describe()
    assert "NVMe" not in host.describe()


def test_plan_infeasible_budget_is_one_line():
    with pytest.raises(InfeasibleBudgetError, match="window of 3 NVMe buckets") as ei:
        plan_states([1 << 20] * 4, state_bytes_per_element=8, fast_budget=1 << 20, hierarchy=profile("cpu"))
    assert "\n" not in str(ei.value) and ei.value.minimum_budget == 3 * (8 << 20)
    with pytest.raises(ValueError, match="NVMe bandwidths"):
        plan_states([10], state_bytes_per_element=8, fast_budget=0)


def test_planned_placement_runs_within_its_budget(tmp_path):
    """plan_states -> StatePlacement.from_plan -> TieredOptimizer: kept states + the measured window <= budget."""
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(12)])  # 24 params
    numels = [p.numel() for p in model.parameters()]
    total = sum(numels) * 8
    budget = int(total * 0.7)
    plan = plan_states(numels, state_bytes_per_element=8, fast_budget=budget, hierarchy=profile("cpu"),
                       bucket_bytes=2 * 32 * 33 * 8)
    assert "nvme" in plan.tiers and "keep" in plan.tiers
    ref = nn.Sequential(*[nn.Linear(32, 32) for _ in range(12)])
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), StatePlacement.from_plan(plan),
                          nvme_dir=tmp_path)
    for s in range(3):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(s))
        for m, o in ((ref, ref_opt), (model, opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    kept = sum(numels[i] * 8 for b, t in zip(plan.buckets, plan.tiers) if t == "keep" for i in b)
    assert kept + opt.stats.peak_resident_bytes <= budget
    assert_same_params(ref, model)
    opt.close()
