"""Faults: corrupt source JPEGs, corrupt or truncated store files, killed builds, a full disk."""

import errno
import os

import numpy as np
import pytest
import torch

import memstrata.data.store as store_mod
from memstrata.data import (CorruptSourceError, SampleStore, StoreFullError, StoreMismatchError, TieredLoader,
                            build_store, decode_file, synth_imagefolder)
from memstrata.data.source import ImageFolderSource


@pytest.fixture()
def tiny(tmp_path):
    return synth_imagefolder(tmp_path / "src", images=16, classes=2, seed=2, progress=False, size=(100, 80),
                             workers=1)


def _all_equal_fresh(store):
    src = ImageFolderSource(store.source.root, store.max_side)
    for i in range(store.n):
        a = store.get(i)
        assert a is not None, i
        assert np.array_equal(a, decode_file(src.samples[i][0], store.max_side)), i


def _corrupt_jpeg(root):
    p = sorted(root.rglob("*.jpg"))[3]
    p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    return p


def test_corrupt_jpeg_raise_names_file(tiny, tmp_path):
    bad = _corrupt_jpeg(tiny)
    with pytest.raises(CorruptSourceError, match=bad.name):
        build_store(tiny, tmp_path / "s", progress=False)
    loader = TieredLoader(tiny, 4, seed=0, store_dir=tmp_path / "s2", progress=False, augment=None, num_workers=0)
    with pytest.raises(CorruptSourceError, match=bad.name):
        for _ in loader:
            pass


def test_corrupt_jpeg_skip(tiny, tmp_path):
    bad = _corrupt_jpeg(tiny)
    rep = build_store(tiny, tmp_path / "s", progress=False, on_corrupt="skip")
    assert len(rep.skipped) == 1 and rep.complete == 15
    loader = TieredLoader(tiny, 4, seed=0, store_dir=tmp_path / "s", progress=False, on_corrupt="skip",
                          num_workers=0)
    n = sum(len(y) for _, y in loader)
    assert n == 15 and loader.stats["skipped"] == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_store_detected_and_rebuilt(tiny, tmp_path, damage):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    chunk = d / "data-00000.bin"
    size = chunk.stat().st_size
    if damage == "flip":
        with open(chunk, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.truncate(chunk, size - 1000)
    st = SampleStore(d, tiny)  # a new process's view: nothing verified yet
    bad = [i for i in range(st.n) if st.get(i) is None]
    assert len(bad) >= 1
    assert st.stats["corrupt_store"] == len(bad)
    for i in bad:  # served value is a fresh decode, and it is stored again
        a, _ = st.fetch(i)
        assert np.array_equal(a, decode_file(st.source.samples[i][0], 160))
    _all_equal_fresh(SampleStore(d, tiny))


def test_killed_build_resumes(tiny, tmp_path, monkeypatch):
    d = tmp_path / "s"
    real = ImageFolderSource.load_stamped
    calls = {"n": 0}

    def dying(self, i):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("killed")
        return real(self, i)

    monkeypatch.setattr(ImageFolderSource, "load_stamped", dying)
    with pytest.raises(KeyboardInterrupt):
        build_store(tiny, d, progress=False, workers=0 or 1, group=4)
    monkeypatch.setattr(ImageFolderSource, "load_stamped", real)
    partial = SampleStore(d, tiny).count_complete()
    assert 0 < partial < 16
    # a killed append: garbage after the last committed sample is dropped on open, never served
    with open(d / "data-00000.bin", "ab") as f:
        f.write(os.urandom(5000))
    rep = build_store(tiny, d, progress=False)
    assert rep.built == 16 - partial and rep.complete == 16
    _all_equal_fresh(SampleStore(d, tiny, verify="always"))


def test_disk_full_clear_error_nothing_half_written(tiny, tmp_path, monkeypatch):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    before = {p.name: p.stat().st_size for p in d.iterdir()}
    st = SampleStore(d, tiny)
    real = store_mod._write_all
    state = {"n": 0}

    def full(fd, data, offset):
        state["n"] += 1
        if state["n"] >= 2:  # the second write of the group hits ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(store_mod, "_write_all", full)
    a = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(StoreFullError) as ei:
        st.put_many([(0, a, 0), (1, a, 1)])
    msg = str(ei.value)
    assert str(d) in msg and "600" in msg  # names the directory and the bytes needed
    after = {p.name: p.stat().st_size for p in d.iterdir()}
    assert after == before  # no partial data, no temp files
    monkeypatch.setattr(store_mod, "_write_all", real)
    _all_equal_fresh(SampleStore(d, tiny))
    # a fresh store on a full disk: no chunk file left behind
    st2 = SampleStore(tmp_path / "s2", tiny)
    monkeypatch.setattr(store_mod, "_write_all", full)
    state["n"] = 1
    with pytest.raises(StoreFullError):
        st2.fetch(0)
    assert not list((tmp_path / "s2").glob("data-*")) and not list((tmp_path / "s2").glob(".*tmp*"))


def test_store_mismatch(tiny, tmp_path):
    build_store(tiny, tmp_path / "s", progress=False, max_side=64)
    with pytest.raises(StoreMismatchError, match="max_side"):
        SampleStore(tmp_path / "s", tiny, max_side=160)


def test_synth_deterministic(tmp_path):
    a = synth_imagefolder(tmp_path / "a", images=6, classes=3, seed=9, progress=False, size=(60, 40), workers=1)
    b = synth_imagefolder(tmp_path / "b", images=6, classes=3, seed=9, progress=False, size=(60, 40), workers=1)
    fa = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.jpg")) and len(fa) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)
