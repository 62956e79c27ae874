"""measure: probing this machine (bounded, cached, leaves nothing behind)."""

import os
import time

import pytest

from memstrata import probe as probe_mod
from memstrata.hardware import Hierarchy
from memstrata.probe import probe, probe_report

MAX_S = 4.0  # a short probe: the phases scale with it


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("cache")
    mp.setenv("XDG_CACHE_HOME", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nvme")


@pytest.fixture(scope="module")
def first(cache_home, disk_dir):
    t = time.perf_counter()
    r = probe_report(disk_dir, cache=True, max_seconds=MAX_S)
    return r, time.perf_counter() - t


def test_probe_is_bounded_and_sane(first, disk_dir):
    r, elapsed = first
    assert not r.cached
    assert elapsed < MAX_S + 3, f"probe took {elapsed:.1f} s for max_seconds={MAX_S}"
    h = r.hierarchy
    assert isinstance(h, Hierarchy)
    names = [t.name for t in h.tiers]
    if probe_mod._cuda_ok():
        assert names == ["hbm", "dram", "nvme"]
        assert h.tier("dram").kind == "pinned_dram"
    else:
        assert names == ["dram", "nvme"]
        assert h.device == "cpu" and h.tier("dram").kind == "dram"
    for t in h.tiers:
        assert t.capacity > 0
    for t in h.tiers[1:]:
        assert t.read_bandwidth > 1e6 and t.write_bandwidth > 1e6  # > 1 MB/s: measured something
        assert 0 < t.latency < 1.0
    nvme = h.tier("nvme")
    assert nvme.path == str(disk_dir.resolve())
    assert h.peak_flops > 1e8 and h.fast_bandwidth > 1e8 and h.kernel_overhead > 0
    assert r.details["disk"]["io"] in ("O_DIRECT", "buffered+fsync+fadvise")
    assert r.details["disk"]["bytes"] > 0


def test_probe_leaves_no_files(first, disk_dir):
    assert list(disk_dir.iterdir()) == []


def test_second_call_hits_the_cache(first, disk_dir, cache_home):
    r1, _ = first
    t = time.perf_counter()
    r2 = probe_report(disk_dir, cache=True, max_seconds=MAX_S)
    assert time.perf_counter() - t < 1.0
    assert r2.cached
    assert r2.cache_path == r1.cache_path and r2.cache_path.startswith(str(cache_home))
    # rates come from the cache; capacities are re-read (see [Note: probe caching])
    assert r2.hierarchy.peak_flops == r1.hierarchy.peak_flops
    assert r2.hierarchy.tier("nvme").read_bandwidth == r1.hierarchy.tier("nvme").read_bandwidth
    assert Hierarchy.from_json(r2.hierarchy.to_json()) == r2.hierarchy
    assert list(disk_dir.iterdir()) == []


def test_cache_is_keyed_by_disk_path_and_can_be_bypassed(first, cache_home, tmp_path):
    # no disk tier: a separate cache entry, measured fresh (short bound keeps it quick)
    r = probe_report(None, cache=True, max_seconds=1.5)
    assert not r.cached
    assert "nvme" not in [t.name for t in r.hierarchy.tiers]
    assert probe_report(None, cache=True, max_seconds=1.5).cached
    assert isinstance(probe(None, max_seconds=1.5), Hierarchy)  # the plain API, from the cache
    assert not probe_report(None, cache=False, max_seconds=1.5).cached


def test_probe_rejects_bad_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        probe(tmp_path / "missing", cache=False)
    with pytest.raises(ValueError, match="max_seconds"):
        probe(None, cache=False, max_seconds=0)


def test_disk_falls_back_to_buffered_io_when_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = probe_mod._open

    def refuse_direct(path, flags, direct):
        if direct:
            raise OSError(22, "Invalid argument (O_DIRECT refused, simulated)")
        return real_open(path, flags, direct)

    monkeypatch.setattr(probe_mod, "_open", refuse_direct)
    w, r, lat, io, nbytes = probe_mod._disk_rates(str(tmp_path), 0.2, 0.2)
    assert io == "buffered+fsync+fadvise"
    assert w > 0 and r > 0 and lat > 0 and nbytes > 0
    assert list(tmp_path.iterdir()) == []
