"""The loader scenario's peers (bench/loader_peers.py) and the GPU-wait arithmetic (bench/gpu_wait.py).

Each installed peer runs for real on a tiny set and must yield what memstrata's TieredLoader yields:
a float32 (B, 3, res, res) batch normalised with the ImageNet mean/std, int64 labels (B,), every
image once per epoch.  A peer that is not installed is skipped here, and reported (not crashed) by
the scenario: checked with a stand-in package that fails to import.
"""

import json
import os
import sys

import pytest
import torch

from memstrata.bench.data_scenarios import annotate_loader_rows, main as bench_main
from memstrata.bench.gpu_wait import H200_RESNET50, cores_to_feed, wait_fraction
from memstrata.bench.loader_peers import PEERS, PeerNotInstalled, build_peer
from memstrata.data import IMAGENET_MEAN, IMAGENET_STD, TieredLoader, TrainAugment, synth_imagefolder

IMAGES, CLASSES, BATCH, RES = 10, 2, 4, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers") / "d"
    synth_imagefolder(root, IMAGES, CLASSES, seed=0, progress=False, size=(96, 72))
    return root


def _spec(root, tmp, **kw):
    s = dict(root=str(root), batch=BATCH, res=RES, workers=1, seed=0, device="cpu", epochs=2, max_side=48,
             ffcv_cache=str(tmp))
    s.update(kw)
    return s


def _epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.fixture(scope="module")
def memstrata_batch(tiny, tmp_path_factory):
    """What memstrata's TieredLoader + TrainAugment yields on CPU for the same set: the reference."""
    lo = TieredLoader(str(tiny), BATCH, seed=0, epochs=1, device="cpu", augment=TrainAugment(size=RES),
                      store_dir=str(tmp_path_factory.mktemp("store")), max_side=48, num_workers=1, progress=False)
    try:
        return next(iter(lo))
    finally:
        lo.close()


# FFCV JIT-compiles its pipeline with numba on the first epoch (~15 CPU-s, minutes on a busy box): slow tier
@pytest.mark.parametrize("name", [pytest.param(p, marks=pytest.mark.slow) if p.startswith("ffcv") else p
                                  for p in PEERS])
def test_peer_yields_what_memstrata_yields(name, tiny, tmp_path, memstrata_batch):
    # torchvision-v2 in-process (workers=0): its worker processes are torch's DataLoader, not the peer's code
    workers = 0 if name == "torchvision-v2" else 1
    try:
        loader, n = build_peer(name, _spec(tiny, tmp_path, workers=workers))
    except PeerNotInstalled as e:
        pytest.skip(f"{name} not installed here: {e}")
    assert n == IMAGES
    ref_x, ref_y = memstrata_batch
    lo = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    try:
        for _epoch_index in range(2):  # a second epoch works too (persistent workers, pipelines rebuilt)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(_epoch_index)
            xs, ys = _epoch(loader)
            assert sum(int(y.shape[0]) for y in ys) == IMAGES
            assert [int(x.shape[0]) for x in xs] == [4, 4, 2]
            for x, y in zip(xs, ys):
                assert x.dtype == ref_x.dtype == torch.float32
                assert tuple(x.shape[1:]) == tuple(ref_x.shape[1:]) == (3, RES, RES)
                assert y.dtype == ref_y.dtype == torch.int64 and y.dim() == ref_y.dim() == 1
                assert ((y >= 0) & (y < CLASSES)).all()
                # normalised like memstrata: inside [(0 - mean) / std, (1 - mean) / std] per channel, not 0..255
                assert torch.isfinite(x).all()
                assert (x >= lo - 1e-3).all() and (x <= hi + 1e-3).all()
                assert float(x.std()) > 0.05  # an image, not a constant
    finally:
        if hasattr(loader, "close"):
            loader.close()


@pytest.mark.parametrize("name,modules", [("spdl", ["spdl", "spdl.io", "spdl.pipeline"]),
                                          ("dali", ["nvidia.dali"]), ("ffcv", ["ffcv", "ffcv.loader"])])
def test_missing_peer_raises_not_installed(name, modules, tiny, tmp_path, monkeypatch):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ImportError
    with pytest.raises(PeerNotInstalled, match="Error"):
        build_peer(name, _spec(tiny, tmp_path))


def test_missing_peer_is_a_row_not_a_crash(tiny, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake"
    (fake / "ffcv").mkdir(parents=True)
    (fake / "ffcv" / "__init__.py").write_text("raise ImportError('simulated: ffcv is not here')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))  # the worker process imports this ffcv first
    monkeypatch.setenv("COLUMNS", "240")  # a wide table: under pytest-xdist there is no terminal to size it by
    out = tmp_path / "r.json"
    rc = bench_main(["--scenario", "loader", "--data", str(tiny), "--batch", str(BATCH), "--res", str(RES),
                     "--epochs", "2", "--repeats", "2", "--workers", "1", "--contenders", "ffcv",
                     "--cores", str(max(os.sched_getaffinity(0))),
                     "--min-timed-s", "0",
                     "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    (row,) = json.loads(out.read_text())
    assert row["name"] == "ffcv" and row["status"] == "not installed" and row["samples_per_s"] is None
    assert "simulated: ffcv is not here" in row["reason"]
    assert [r["status"] for r in row["per_repeat"]] == ["not installed"] * 2  # reported each repeat, run once
    assert "not installed" in printed


def test_gpu_wait_arithmetic():
    assert wait_fraction(100.0, 2, 1000.0) == pytest.approx(0.8)
    assert wait_fraction(100.0, 10, 1000.0) == 0.0
    assert wait_fraction(100.0, 16, 1000.0) == 0.0  # never negative
    assert wait_fraction(None, 2, 1000.0) is None
    assert cores_to_feed(100.0, 1000.0) == 10 and cores_to_feed(99.0, 1000.0) == 11
    assert cores_to_feed(None, 1000.0) is None
    assert 4000 < H200_RESNET50.images_per_s < 5000 and "bench/results/2026-11-28-h200" in H200_RESNET50.source


def test_annotate_picks_the_fastest_installed_peer():
    def row(name, sps, status="ok"):
        return {"name": name, "status": status, "samples_per_s": sps,
                "samples_per_s_per_core": None if sps is None else sps / 2}
    rows = [row("memstrata", 1200.0), row("torchvision", 100.0), row("dali", 300.0),
            row("ffcv", None, "not installed")]
    annotate_loader_rows(rows)
    by = {r["name"]: r for r in rows}
    assert by["memstrata"]["fastest_peer"] == "dali"
    assert by["memstrata"]["memstrata_vs_fastest_peer"] == pytest.approx(4.0)
    assert by["torchvision"]["memstrata_vs_this"] == pytest.approx(12.0)
    assert by["ffcv"]["memstrata_vs_this"] is None and by["ffcv"]["cores_to_feed_gpu"] is None
    gpu = H200_RESNET50.images_per_s
    assert by["dali"]["gpu_wait_fraction"]["2"] == pytest.approx(1 - 300.0 / gpu)
    assert by["memstrata"]["cores_to_feed_gpu"] == cores_to_feed(600.0, gpu)
