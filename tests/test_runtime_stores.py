"""Execute stage, CPU tier: buffer pool, NVMe store, directory errors, aliasing, parameter safety."""

from __future__ import annotations

import copy
import errno
import os
import shutil

import pytest
import torch
from torch import nn

from memstrata.hardware import profile
from memstrata.manager import Manager, default_hierarchy
from memstrata.decisions import Plan, PlanError, StorageDecision
from memstrata.runtime import (
    ActivationRuntime,
    HostBufferPool,
    NVMeDirectoryError,
    NVMeIOError,
    NVMeStore,
    check_directory,
)
from memstrata.plan.forced import forced_plan
from memstrata.runtime import nvme as nvme_mod
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.runtime.pool import ALIGN
from memstrata.trace.record import trace_step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def batch(n=4, res=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, res, res, generator=g), torch.randint(0, 10, (n,), generator=g)


def nvme_h(d):
    return default_hierarchy(torch.device("cpu"), str(d))


# ------------------------------------------------------------------ pool
def test_pool_buffers_are_aligned_and_reused():
    pool = HostBufferPool(pin=False)
    a = pool.acquire(10_000)
    assert a.tensor.data_ptr() % ALIGN == 0 and a.nbytes % ALIGN == 0 and a.nbytes >= 10_000
    assert pool.in_use_bytes == a.nbytes
    pool.release(a)
    b = pool.acquire(9_000)  # same rounded size class -> the same buffer
    assert b is a and pool.allocated_bytes == a.nbytes
    c = pool.acquire(10_000)
    assert c is not a and pool.peak_in_use_bytes == 2 * a.nbytes
    pool.release(b)
    pool.release(c)
    pool.clear()
    assert pool.allocated_bytes == 0


# ------------------------------------------------------------------ NVMe store
@pytest.mark.parametrize("direct", [None, False])
def test_nvme_store_round_trip_and_cleanup(tmp_path, direct):
    store = NVMeStore(tmp_path, required_bytes=1 << 20, workers=2, direct=direct)
    assert os.path.dirname(store.root) == str(tmp_path)
    if direct is False:
        assert not store.direct
    for n in (1, 100, ALIGN - 1, ALIGN, 3 * ALIGN + 5):
        src = torch.randint(0, 255, (n,), dtype=torch.uint8)
        p = store.new_path(n)
        w = store.submit_write(p, src, n)
        out = store.submit_read(p, n, after=w).result()
        assert torch.equal(out[:n], src)
        assert out.data_ptr() % ALIGN == 0
    store.drain()
    assert store.files() == [] and store.live_files == 0  # read jobs removed every file
    p = store.new_path("unread")
    w = store.submit_write(p, torch.zeros(10, dtype=torch.uint8), 10)
    store.submit_unlink(p, after=w).result()
    assert store.files() == []
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_nvme_directory_missing(tmp_path):
    with pytest.raises(NVMeDirectoryError, match="does not exist"):
        check_directory(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NVMeDirectoryError, match="not a directory"):
        NVMeStore(f)


def test_nvme_directory_read_only(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make access() say what a read-only mount says
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p).startswith(str(ro)) and m & os.W_OK
                            else real(p, m, *a, **k))
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(NVMeDirectoryError, match="not writable"):
            NVMeStore(ro)
        with pytest.raises(NVMeDirectoryError, match="not writable"):
            Manager(small_net(), budget="50%", nvme_dir=ro)
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_nvme_directory_full(tmp_path, monkeypatch):
    # disk_usage says there is too little room
    real = shutil.disk_usage
    monkeypatch.setattr(nvme_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(NVMeDirectoryError, match="free"):
        NVMeStore(tmp_path, required_bytes=10 << 20)
    monkeypatch.setattr(nvme_mod.shutil, "disk_usage", real)
    # disk_usage looks fine but the file system refuses to reserve the bytes (quota, thin pool)
    def enospc(fd, off, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    with pytest.raises(NVMeDirectoryError, match="No space left"):
        NVMeStore(tmp_path, required_bytes=10 << 20)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_manager_nvme_full_fails_before_managed_steps(tmp_path, monkeypatch):
    def enospc(fd, off, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    model = small_net()
    x, y = batch()
    mgr = Manager(model, budget="50%", nvme_dir=tmp_path, warmup_steps=0,
                  planner=lambda tr, h, b: forced_plan(tr, "nvme", h))
    with pytest.raises(NVMeDirectoryError, match="cannot hold"):
        train_steps(model, x, y, steps=2, step_ctx=lambda: mgr.step(x))
    assert [s["mode"] for s in mgr.report()["steps"]] == ["trace"]
    assert list(tmp_path.iterdir()) == []


def test_nvme_write_failure_mid_step_is_clear_and_cleaned(tmp_path, monkeypatch):
    model = small_net()
    x, y = batch()
    tr = trace_step(copy.deepcopy(model), x, y)
    h = nvme_h(tmp_path)
    rt = ActivationRuntime(model, tr, forced_plan(tr, "nvme", h), h)

    def boom(fd, t, offset=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nvme_mod, "_pwrite_all", boom)
    with pytest.raises(NVMeIOError, match="No space left on device"):
        with rt.step():
            nn.functional.cross_entropy(model(x), y).backward()
    rt.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ aliasing and parameters
class Aliasing(nn.Module):
    """Saves several views of one storage (slices, a transpose, an in-place result)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        h = self.lin(x)  # (n, 16)
        a, b = h[:, :8], h[:, 8:]
        t = h.t()  # view
        z = torch.cat([a * b, a], 1) + (t.t() * h).sin()  # mul saves both views of h; sin saves its input
        z = torch.relu_(z)  # in place: saves its result (same storage as z)
        return self.out(z * z[:, :1])


def test_aliased_views_offloaded_once_and_exact(tmp_path):
    torch.manual_seed(0)
    base = Aliasing()
    x, y = torch.randn(6, 16), torch.randint(0, 10, (6,))
    ref = train_steps(copy.deepcopy(base), x, y, steps=3)
    tr = trace_step(copy.deepcopy(base), x, y)
    h = nvme_h(tmp_path)
    for kind in ("host", "nvme"):
        m = copy.deepcopy(base)
        rt = ActivationRuntime(m, tr, forced_plan(tr, kind, h), h)
        train_steps(m, x, y, steps=3, step_ctx=rt.step)
        assert rt.last_stats.deduplicated > 0
        assert state_mismatches(ref, m) == []
        rt.close()


def test_parameters_are_never_offloaded(tmp_path):
    model = small_net()
    x, y = batch()
    tr = trace_step(copy.deepcopy(model), x, y)
    h = nvme_h(tmp_path)
    params = [s for s in tr.storages if s.kind == "parameter" and s.pack_indices]
    assert params
    bad = Plan("evil", h.name, tr.observed_peak, storages=tuple(
        StorageDecision(s.id, "offload", "nvme", evict_after=0, prefetch_at=tr.forward_end + 1) for s in params))
    # The decision space refuses the plan before anything runs (no store, no step): the runtime is handed
    # legal plans only, instead of quietly keeping what the plan said to move.
    with pytest.raises(PlanError, match="kind parameter"):
        ActivationRuntime(model, tr, bad, h)
    assert not list(tmp_path.glob("memstrata-*"))
    # a legal plan for the same trace never moves a parameter's storage
    rt = ActivationRuntime(model, tr, forced_plan(tr, "nvme", h), h)
    with rt.step():
        nn.functional.cross_entropy(model(x), y).backward()
    moved = {d.storage for d in forced_plan(tr, "nvme", h).storages}
    assert moved and not moved & {s.id for s in params}
    assert rt.last_stats.offloaded["nvme"] == len(moved)
    rt.close()


# ------------------------------------------------------------------ issue 13: cleanup when a step or a process ends badly
def test_failed_step_releases_its_records_before_close(tmp_path):
    """A step that fails after its forward wrote files (a failed NVMe write, an error in the model, Ctrl-C):
    the files and buffers of that step are given back as it unwinds, even while its graph is still referenced."""
    model = small_net()
    x, y = batch()
    tr = trace_step(copy.deepcopy(model), x, y)
    h = nvme_h(tmp_path)
    rt = ActivationRuntime(model, tr, forced_plan(tr, "nvme", h), h)
    kept = []
    last = [m for m in model.modules() if not list(m.children())][-1]

    def keep_and_fail(module, inputs, output):
        kept.append(output)  # the graph (and every packed record in it) stays alive after the error
        raise RuntimeError("boom in the model")

    handle = last.register_forward_hook(keep_and_fail)
    with pytest.raises(RuntimeError, match="boom"):
        with rt.step():
            nn.functional.cross_entropy(model(x), y).backward()
    handle.remove()
    assert rt.last_stats.offloaded["nvme"] > 0
    rt.store.drain()
    assert rt.store.files() == [], "files of the failed step outlive it"
    kept.clear()
    rt.close()
    assert list(tmp_path.iterdir()) == []


def test_store_of_a_killed_process_is_removed_at_next_start(tmp_path):
    """A process ended by SIGINT without close() leaves nothing; a SIGKILLed one is cleaned by the next store."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time, torch; from memstrata.runtime.nvme import NVMeStore; "
            "s = NVMeStore(sys.argv[1], required_bytes=1 << 16); print(s.root, flush=True); time.sleep(60)")
    for sig in (signal.SIGINT, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        root = p.stdout.readline().strip()
        assert os.path.isdir(root)
        p.send_signal(sig)
        p.wait(timeout=60)
        if sig == signal.SIGINT:
            assert not os.path.exists(root), "Ctrl-C left the store directory behind"
        else:
            assert os.path.isdir(root)  # nothing runs on SIGKILL ...
            s = NVMeStore(tmp_path, required_bytes=1 << 16)  # ... the next store of this directory removes it
            assert not os.path.exists(root)
            s.close()
    assert list(tmp_path.iterdir()) == []
