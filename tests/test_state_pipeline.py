"""The arena ring's pipeline (runtime/state_arenas.py, [Note: the pipeline of the arena ring]): reads start as
soon as an arena is free, never behind write-behind jobs; a deep ring stays bit-exact, survives a disk that
fills mid-step, and leaves nothing on disk when the run is interrupted inside a step."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future

import pytest
import torch
from torch import nn

import memstrata.runtime.nvme as nvme_mod
from memstrata.runtime import NVMeIOError
from memstrata.runtime.nvme import NVMeStore
from memstrata.runtime.pool import aligned_empty
from memstrata.runtime.states import StatePlacement, TieredOptimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, HERE)
import test_states as t  # noqa: E402  (the same model, batches, schedule and checks)

BUCKETS = tuple((i,) for i in range(8))


def deep_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(8)])


def test_reads_run_ahead_by_the_whole_ring(tmp_path, monkeypatch):
    """With writes that land at once, every arena but the stepped one holds an upcoming bucket (read ahead):
    ring - 1 buckets ahead, not just `prefetch_depth` (the old one-deep window waited for bucket k-1's write)."""
    real = NVMeStore.submit_pwrite

    def landed(self, fd, path, src, offset):  # the write runs now; the future is done when step() looks
        fut: Future = Future()
        try:
            self._pwrite_job(fd, path, src, offset)
            fut.set_result(None)
        except Exception as e:  # noqa: BLE001
            fut.set_exception(e)
        return fut

    monkeypatch.setattr(NVMeStore, "submit_pwrite", landed)
    model = deep_model()
    ref = deep_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                          StatePlacement(BUCKETS, ("nvme",) * 8, prefetch_depth=2), nvme_dir=tmp_path)
    ring = opt._ring
    assert ring.count == 4
    missing: list[int] = []
    step_bucket = opt._step_bucket

    def spy(bucket):
        if opt.stats.steps >= 1:  # states exist: buckets come from their files
            order = [e.file for e in (opt._entries if opt.stats.steps % 2 == 0 else opt._entries[::-1])]
            k = next(n for n, f in enumerate(order) if f is opt._entries[bucket[0]].file)
            later = order[k + 1:k + ring.count]
            missing.append(sum(f.arena is None for f in later))
        step_bucket(bucket)

    opt._step_bucket = spy
    for s in range(4):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(s))
        for m, o in ((ref, ref_opt), (model, opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    assert len(missing) == 3 * 8 and not any(missing), missing  # the ring - 1 next buckets: all in arenas
    assert opt.stats.demand_fetches == 0
    t.assert_same_params(ref, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()
    monkeypatch.setattr(NVMeStore, "submit_pwrite", real)
    assert os.listdir(tmp_path) == []


def test_a_read_never_queues_behind_writes(tmp_path, monkeypatch):
    """[Note: read and write lanes]: with every write thread stuck (a slow disk), a read still runs."""
    store = NVMeStore(tmp_path, workers=4)
    path, fd = store.open_file("x")
    buf = aligned_empty(1 << 16)
    buf.fill_(7)
    store.submit_pwrite(fd, path, buf, 0).result()
    gate = threading.Event()
    real = nvme_mod._pwrite_all

    def stuck(fd_, t_, offset=0):
        gate.wait(30)
        real(fd_, t_, offset)

    monkeypatch.setattr(nvme_mod, "_pwrite_all", stuck)
    writes = [store.submit_pwrite(fd, path, buf, 0) for _ in range(4)]  # as many as the old single pool had
    out = aligned_empty(1 << 16)
    read = store.submit_pread(fd, path, out, 0)
    try:
        read.result(timeout=10)
        assert torch.equal(out, buf)
        assert not any(w.done() for w in writes)
    finally:
        gate.set()
    for w in writes:
        w.result(timeout=30)
    store.close_file(path, fd)
    store.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("depth", [2, 6])
def test_deep_ring_is_bit_exact_with_state_dict_mid_run(depth, tmp_path):
    """AdamW with clipping, accumulation and a schedule, a ring of depth + 2 arenas, NVMe and kept buckets
    interleaved; a state_dict() taken mid-run does not disturb the run and loads into a plain AdamW."""
    ref_model, ref_opt = t.run("adamw", None)
    model = t.make_model()
    placement = StatePlacement(((0,), (1,), (2,), (3,), (4, 5)), ("nvme", "keep", "nvme", "nvme", "nvme"),
                               prefetch_depth=depth)
    opt = TieredOptimizer(t.make_opt("adamw", model.parameters()), placement, nvme_dir=tmp_path)
    sched = t.schedule(opt)
    t.train(model, opt, sched, 0, 3)
    mid = opt.state_dict()
    plain = t.make_opt("adamw", t.make_model().parameters())
    plain.load_state_dict(mid)
    t.train(model, opt, sched, 3, t.STEPS)
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    assert opt.stats.arena_bytes > 0
    opt.close()
    assert os.listdir(tmp_path) == []


def test_disk_full_inside_a_step_with_writes_in_flight(tmp_path, monkeypatch):
    """The disk fills while the ring is full of buckets whose writes are in flight (no flush before): one line,
    the states after the step intact, and training continues exactly once space is back."""
    ref3_model, ref3_opt = t.run("adamw", None, steps=3)
    ref_model, ref_opt = t.run("adamw", None)
    model = t.make_model()
    opt = TieredOptimizer(t.make_opt("adamw", model.parameters()),
                          StatePlacement(((0,), (1,), (2,), (3,), (4, 5)), ("nvme",) * 5, prefetch_depth=2),
                          nvme_dir=tmp_path)
    sched = t.schedule(opt)
    t.train(model, opt, sched, 0, 2)
    real = nvme_mod._pwrite_all

    def full(fd, tensor, offset=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nvme_mod, "_pwrite_all", full)
    for micro in range(t.ACCUM):
        x, y = t.batch(2, micro)
        (nn.functional.mse_loss(model(x), y) / t.ACCUM).backward()
    nn.utils.clip_grad_norm_(model.parameters(), t.CLIP)
    with pytest.raises(NVMeIOError) as ei:
        opt.step()
        opt.flush()
    sched.step()
    opt.zero_grad()
    msg = str(ei.value)
    assert "\n" not in msg and f"NVMe directory {tmp_path} is full" in msg and "intact" in msg
    t.assert_same_params(ref3_model, model)
    t.assert_same_state(ref3_opt.state_dict(), opt.state_dict())
    monkeypatch.setattr(nvme_mod, "_pwrite_all", real)
    try:
        opt.flush()
    except NVMeIOError:
        pass  # writes started while the disk was still full
    t.train(model, opt, sched, 3, t.STEPS)
    opt.flush()
    t.assert_same_params(ref_model, model)
    t.assert_same_state(ref_opt.state_dict(), opt.state_dict())
    opt.close()
    assert os.listdir(tmp_path) == []


CHILD = """
import sys, time, torch
sys.path.insert(0, {here!r})
import memstrata.runtime.nvme as nvme_mod
from memstrata.runtime.states import StatePlacement, TieredOptimizer
from torch import nn
torch.set_num_threads(1)
real = nvme_mod._pwrite_all
def slow(fd, t, offset=0):  # a slow disk: the SIGINT lands while writes and reads are in flight
    time.sleep(0.02)
    real(fd, t, offset)
nvme_mod._pwrite_all = slow
model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
opt = TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                      StatePlacement(tuple((i,) for i in range(16)), ("nvme",) * 16, prefetch_depth=3),
                      nvme_dir={nvme!r}, io_workers=2)
step = TieredOptimizer.step
def announce(self, *a, **k):
    print("in step", flush=True)
    return step(self, *a, **k)
TieredOptimizer.step = announce
while True:
    model(torch.randn(4, 256)).square().mean().backward()
    opt.step()
    opt.zero_grad()
"""


def test_nothing_left_after_sigint_inside_a_step(tmp_path):
    """Ctrl-C while step() has reads and writes of the ring in flight: the process ends and its store is gone."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(here=HERE, nvme=str(tmp_path))], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # the third step: states exist, files are read and written
            assert p.stdout.readline().strip() == "in step"
        assert len(os.listdir(tmp_path)) == 1
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "KeyboardInterrupt" in err
    assert os.listdir(tmp_path) == []
