"""Issue 13, data side: changed sources, broken epochs, decompression bombs, damaged or read-only stores,
file-size limits, leftover temp files, concurrent builders, swapped index records."""

import errno
import gc
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest

import memstrata.data.synth as synth_mod
from memstrata.data import (CorruptSourceError, SampleStore, TieredLoader, TrainAugment, build_store,
                            decode_file, synth_imagefolder)
from memstrata.data.errors import StoreReadOnlyError
from memstrata.data.source import ImageFolderSource
from memstrata.data.store import REC

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture()
def tiny(tmp_path):
    return synth_imagefolder(tmp_path / "src", images=16, classes=2, seed=2, progress=False, size=(100, 80),
                             workers=1)


def _fresh(root, i, max_side=160):
    return decode_file(ImageFolderSource(root, max_side).samples[i][0], max_side)


def _assert_all_fresh(store):
    for i in range(store.n):
        a = store.get(i)
        assert a is not None, i
        assert np.array_equal(a, _fresh(store.source.root, i, store.max_side)), i


def _data_bytes(d) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("data-*.bin"))


def _one_copy_bytes(root, max_side=160) -> int:
    src = ImageFolderSource(root, max_side)
    return sum(src.load(i)[0].nbytes for i in range(len(src)))


# ---------------------------------------------------------------- 1. a source overwritten in place
def _overwrite_in_place(path, data):
    with open(path, "r+b") as f:  # same inode, same name: what `cp other.jpg img.jpg` does
        f.truncate(0)
        f.write(data)


def test_source_overwritten_in_place_is_rebuilt_and_reported(tiny, tmp_path):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    src = ImageFolderSource(tiny, 160)
    p5, p6 = src.samples[5][0], src.samples[6][0]
    old = _fresh(tiny, 5)
    ino = os.stat(p5).st_ino
    _overwrite_in_place(p5, Path(p6).read_bytes())
    assert os.stat(p5).st_ino == ino and not np.array_equal(_fresh(tiny, 5), old)
    # a reader (a loader's store) notices on its first read of the sample and serves the new decode
    st = SampleStore(d, tiny)
    assert st.get(5) is None
    a, _ = st.fetch(5)
    assert np.array_equal(a, _fresh(tiny, 5))
    # `data build` finds and reports it; the second build has nothing left to do
    _overwrite_in_place(p5, Path(src.samples[7][0]).read_bytes())
    rep = build_store(tiny, d, progress=False)
    assert rep.changed == (5,) and rep.built == 1 and "1 changed in the source" in str(rep)
    rep = build_store(tiny, d, progress=False)
    assert rep.changed == () and rep.built == 0
    _assert_all_fresh(SampleStore(d, tiny, verify="always"))


def test_same_size_change_with_restored_mtime_is_caught(tiny, tmp_path):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    p = ImageFolderSource(tiny, 160).samples[3][0]
    st0 = os.stat(p)
    data = bytearray(Path(p).read_bytes())
    data[len(data) // 2] ^= 0x55  # same size, other pixels
    _overwrite_in_place(p, bytes(data))
    os.utime(p, ns=(st0.st_atime_ns, st0.st_mtime_ns))  # mtime put back: only ctime tells
    assert os.stat(p).st_size == st0.st_size and os.stat(p).st_mtime_ns == st0.st_mtime_ns
    rep = build_store(tiny, d, progress=False)
    assert rep.changed == (3,)
    _assert_all_fresh(SampleStore(d, tiny))


def test_touched_but_unchanged_source_is_restamped_not_decoded(tiny, tmp_path):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    for p in sorted(tiny.rglob("*.jpg")):
        os.utime(p)  # new mtime, same bytes (a copy with `cp -r`, a `touch`)
    rep = build_store(tiny, d, progress=False)
    assert rep.changed == () and rep.built == 0
    st = SampleStore(d, tiny)
    _assert_all_fresh(st)
    assert st.stats["decodes"] == 0 and st.stats["source_rereads"] == 0  # stamps were updated on disk


def test_content_hash_when_asked(tiny, tmp_path, monkeypatch):
    """A file system whose metadata does not change (stat fooled): only source_check="hash" sees it."""
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    stamps = {i: ImageFolderSource(tiny, 160).stat(i) for i in range(16)}
    src = ImageFolderSource(tiny, 160)
    Path(src.samples[2][0]).write_bytes(Path(src.samples[4][0]).read_bytes())
    monkeypatch.setattr(ImageFolderSource, "stat", lambda self, i: stamps[i])
    assert build_store(tiny, d, progress=False).changed == ()
    rep = build_store(tiny, d, progress=False, verify=True)  # `data build --verify`: content hashes too
    assert rep.changed == (2,)
    assert np.array_equal(SampleStore(d, tiny, source_check="hash").get(2), _fresh(tiny, 2))


# ---------------------------------------------------------------- 2. breaking out of an epoch
def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("memstrata-prefetch")]


def _wait_no_prefetch(timeout=5.0):
    t0 = time.monotonic()
    while _prefetch_threads() and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return len(_prefetch_threads())


def test_break_out_of_epoch_stops_thread_and_frees_batches(tmp_path):
    import psutil
    import torch

    root = synth_imagefolder(tmp_path / "src", images=48, classes=2, seed=1, progress=False, size=(64, 48),
                             workers=1)
    loader = TieredLoader(root, 16, augment=TrainAugment(size=96), num_workers=2, prefetch=2,
                          store_dir=tmp_path / "s", progress=False, device="cpu")
    batch_bytes = 16 * 3 * 96 * 96 * 4
    for _ in loader:  # build the store
        pass
    assert _wait_no_prefetch() == 0
    proc = psutil.Process()
    refs, rss = [], []
    torch.set_num_threads(1)
    for e in range(30):
        for k, (x, _) in enumerate(loader):
            if k == 0:
                break
        it = iter(loader)
        next(it)
        refs.append(weakref.ref(it))
        del it, x
        if e == 4:
            gc.collect()
            rss.append(proc.memory_info().rss)
    assert _wait_no_prefetch() == 0  # every epoch's thread ended
    gc.collect()
    assert all(r() is None for r in refs)  # and its iterator (with the queued batches) was freed
    rss.append(proc.memory_info().rss)
    growth = rss[1] - rss[0]
    assert growth < 6 * batch_bytes, (growth / 2**20, batch_bytes / 2**20)
    loader.close()


def test_iterator_close_and_loader_close_stop_threads(tmp_path):
    root = synth_imagefolder(tmp_path / "src", images=24, classes=2, seed=1, progress=False, size=(48, 40),
                             workers=1)
    loader = TieredLoader(root, 4, augment=None, num_workers=1, prefetch=2, store_dir=tmp_path / "s",
                          progress=False, device="cpu")
    it = iter(loader)
    next(it)
    it.close()
    assert _wait_no_prefetch(1.0) == 0
    with pytest.raises(StopIteration):
        next(it)
    keep = [iter(loader) for _ in range(3)]  # held by the caller, never finished
    for k in keep:
        next(k)
    loader.close()
    assert _wait_no_prefetch(1.0) == 0


# ---------------------------------------------------------------- 13. a decompression bomb
def _png_claiming(w, h) -> bytes:
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_a_corrupt_sample(tiny, tmp_path, capsys):
    from memstrata.cli import main

    bomb = tiny / "c0000" / "img_zbomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    with pytest.raises(CorruptSourceError, match="img_zbomb.png.*DecompressionBomb"):
        build_store(tiny, tmp_path / "s", progress=False)
    rep = build_store(tiny, tmp_path / "s", progress=False, on_corrupt="skip")
    assert rep.complete == 16 and len(rep.skipped) == 1
    loader = TieredLoader(tiny, 4, store_dir=tmp_path / "s", progress=False, on_corrupt="skip", augment=None,
                          num_workers=0)
    assert sum(len(y) for _, y in loader) == 16
    capsys.readouterr()
    assert main(["data", "build", str(tiny), "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "img_zbomb.png" in err and "--on-corrupt skip" in err


# ---------------------------------------------------------------- 15. a damaged meta.json
@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00", b"[1, 2]", b"null"])
def test_damaged_meta_json_rebuilds(tiny, tmp_path, content):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    (d / "meta.json").write_bytes(content)
    st = SampleStore(d, tiny)
    assert st.count_complete() == 0  # nothing trusted from a store whose settings are unknown
    st.close()
    rep = build_store(tiny, d, progress=False)
    assert rep.complete == 16 and rep.built == 16
    assert _data_bytes(d) == _one_copy_bytes(tiny)  # the old chunks did not stay behind
    assert json.loads((d / "meta.json").read_text())["n"] == 16
    _assert_all_fresh(SampleStore(d, tiny, verify="always"))


# ---------------------------------------------------------------- 16. read-only media
@pytest.fixture()
def read_only(monkeypatch):
    """Make a directory behave as on a read-only mount (EROFS for every write), even for root.

    Tests run as root, and chmod does not stop root, so the store's own system calls are refused instead:
    os.open with a write flag, os.truncate, os.replace and mkdir under the directory.
    """
    dirs = []
    real_open, real_truncate, real_replace = os.open, os.truncate, os.replace
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(p):
        p = os.path.abspath(os.fspath(p))
        return any(p == d or p.startswith(d + os.sep) for d in dirs)

    def ro_open(path, flags, *a, **k):
        if flags & write and inside(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *a, **k)

    def ro_truncate(path, *a):
        if not isinstance(path, int) and inside(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_truncate(path, *a)

    def ro_replace(a, b, *r, **k):
        if inside(b):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(b))
        return real_replace(a, b, *r, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "truncate", ro_truncate)
    monkeypatch.setattr(os, "replace", ro_replace)
    return lambda d: dirs.append(os.path.abspath(d))


def test_complete_store_on_read_only_media_opens_for_reading(tiny, tmp_path, read_only):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    read_only(d)
    st = SampleStore(d, tiny)
    assert st.readonly
    _assert_all_fresh(st)
    assert st.stats["decodes"] == 0
    rep = build_store(tiny, d, progress=False)
    assert rep.complete == 16 and rep.built == 0
    loader = TieredLoader(tiny, 4, store_dir=d, progress=False, augment=None, num_workers=1)
    assert sum(len(y) for _, y in loader) == 16 and loader.stats["source_reads"] == 0


def test_incomplete_store_on_read_only_media(tiny, tmp_path, read_only, capsys):
    from memstrata.cli import main

    d = tmp_path / "s"
    st = SampleStore(d, tiny)
    st.fetch_many(range(8))
    st.close()
    read_only(d)
    with pytest.raises(StoreReadOnlyError, match="read-only.*8 of 16"):
        build_store(tiny, d, progress=False)
    capsys.readouterr()
    assert main(["data", "build", str(tiny), "--out", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "read-only" in err
    # a loader still serves every sample: the missing ones decoded, not stored
    st = SampleStore(d, tiny)
    got = st.fetch_many(range(16))
    assert all(np.array_equal(a, _fresh(tiny, i)) for i, (a, _) in enumerate(got))
    assert st.count_complete() == 8
    # an empty directory on read-only media: no store to read, and none can be made
    (tmp_path / "ro-empty").mkdir()
    read_only(tmp_path / "ro-empty")
    with pytest.raises(StoreReadOnlyError, match="ro-empty"):
        SampleStore(tmp_path / "ro-empty", tiny)


# ---------------------------------------------------------------- 17, 18. file-size limit (ulimit -f)
_FSIZE_CHILD = textwrap.dedent("""
    import contextlib, io, os, resource, signal, sys
    root, out, synth_dir = sys.argv[1:4]
    # the default action of SIGXFSZ kills the process; a library must not die of it
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    from memstrata.data import DataError, build_store, synth_imagefolder
    from memstrata.cli import main
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))  # < one 500x375 JPEG
    try:
        synth_imagefolder(synth_dir, images=4, classes=2, progress=False, size=(500, 375), workers=1)
        print("synth: no error")
    except OSError as e:
        print("synth:", e.errno)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))  # about half the samples
    try:
        build_store(root, out, progress=False, workers=1, group=4)
        print("build: no error")
    except DataError as e:
        print("build:", type(e).__name__, str(e))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["data", "build", root, "--out", out + "-cli", "--workers", "1"])
    print("cli:", rc, repr(err.getvalue()))
""")


def test_file_size_limit_one_line_error_rollback_and_no_temp_files(tiny, tmp_path):
    out, synth_dir = tmp_path / "s", tmp_path / "synth"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tiny), str(out), str(synth_dir)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    # 18: the synth write that hit the limit left no img_*.jpg.tmp<pid> behind
    assert lines["synth"] == str(errno.EFBIG)
    assert not list(synth_dir.rglob("*.tmp*"))
    # 17: a one-line error naming the limit; what was committed before it stays, nothing half-written
    assert lines["build"].startswith("StoreWriteError") and "ulimit -f" in lines["build"]
    rc, err = lines["cli"].split(" ", 1)
    err = eval(err).strip()
    assert rc == "2" and "\n" not in err and "ulimit -f" in err
    for d, least in ((out, 1), (Path(str(out) + "-cli"), 0)):  # the CLI's one group of 64 committed nothing
        st = SampleStore(d, tiny, verify="always")
        k = st.count_complete()
        assert least <= k < 16 and _data_bytes(d) <= 200_000
        assert _data_bytes(d) == sum(st.nbytes(i) for i in range(16) if st.is_complete(i))
        st.close()
    rep = build_store(tiny, out, progress=False)  # without the limit it completes
    assert rep.complete == 16 and _data_bytes(out) == _one_copy_bytes(tiny)
    _assert_all_fresh(SampleStore(out, tiny, verify="always"))


def test_synth_removes_its_temp_file_on_failure_and_stale_ones(tmp_path, monkeypatch):
    root = tmp_path / "synth"
    real = os.replace

    def full(a, b, *r, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synth_mod.os, "replace", full)
    with pytest.raises(OSError):
        synth_imagefolder(root, images=4, classes=2, progress=False, size=(64, 48), workers=1)
    monkeypatch.setattr(synth_mod.os, "replace", real)
    assert not list(root.rglob("*.tmp*"))
    # a killed run's leftover (its pid is gone) is removed; a live writer's temp file is not touched
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / "c0000" / f"img_00000000.jpg.tmp{dead.pid}"
    live = root / "c0001" / f"img_00000001.jpg.tmp{os.getppid()}"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    synth_imagefolder(root, images=4, classes=2, progress=False, size=(64, 48), workers=1)
    assert not stale.exists() and live.exists() and len(list(root.rglob("*.jpg"))) == 4


# ---------------------------------------------------------------- 19. one builder per store
def test_put_many_does_not_append_what_another_process_stored(tiny, tmp_path):
    d = tmp_path / "s"
    a, b = SampleStore(d, tiny), SampleStore(d, tiny)  # two processes' views (separate descriptors and locks)
    assert all(b.get(i) is None for i in range(16))
    decoded = [(i,) + b.load_source(i) for i in range(16)]  # b decoded (with stamps) while a was writing
    a.fetch_many(range(16))
    assert b.put_many(decoded) == 0
    assert _data_bytes(d) == _one_copy_bytes(tiny)
    _assert_all_fresh(b)


def test_concurrent_builders_write_one_copy(tiny, tmp_path):
    d = tmp_path / "s"
    go = threading.Barrier(2)
    reps, errs = [], []

    def build():
        try:
            go.wait()
            reps.append(build_store(tiny, d, progress=False, workers=1, group=4))
        except BaseException as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=build) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs
    assert sorted(r.built for r in reps) == [0, 16] and all(r.complete == 16 for r in reps)
    assert _data_bytes(d) == _one_copy_bytes(tiny)


def test_four_lazy_loaders_on_one_empty_store_write_one_copy(tiny, tmp_path):
    d = tmp_path / "s"
    go = threading.Barrier(4)
    seen, errs = [], []

    def run(r):
        try:
            loader = TieredLoader(tiny, 4, seed=r, store_dir=d, progress=False, augment=None, num_workers=0,
                                  prefetch=0)
            go.wait()
            seen.append(sum(len(y) for _, y in loader))
            loader.close()
        except BaseException as e:  # pragma: no cover
            errs.append(e)

    ts = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and seen == [16] * 4
    assert _data_bytes(d) == _one_copy_bytes(tiny)
    _assert_all_fresh(SampleStore(d, tiny, verify="always"))


# ---------------------------------------------------------------- 24. swapped index records
def test_swapped_index_records_are_not_served(tiny, tmp_path):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    raw = bytearray((d / "index.bin").read_bytes())
    R = REC.itemsize
    r2, r9 = raw[2 * R:3 * R], raw[9 * R:10 * R]  # samples of two classes
    raw[2 * R:3 * R], raw[9 * R:10 * R] = r9, r2
    (d / "index.bin").write_bytes(bytes(raw))
    st = SampleStore(d, tiny)
    assert st.get(2) is None and st.get(9) is None
    assert st.count_complete() == 14
    rep = build_store(tiny, d, progress=False)
    assert rep.built == 2 and rep.complete == 16
    st = SampleStore(d, tiny)
    _assert_all_fresh(st)
    assert [st.label(i) for i in range(16)] == ImageFolderSource(tiny, 160).targets.tolist()


def test_store_of_an_older_format_is_refused_in_one_line(tiny, tmp_path):
    from memstrata.data import StoreMismatchError

    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    meta = json.loads((d / "meta.json").read_text())
    meta.update(version=1, record_bytes=48)  # a store written before records carried stamps and slots
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreMismatchError, match=r"format version 1.*delete") as ei:
        SampleStore(d, tiny)
    assert "\n" not in str(ei.value)


def test_changed_source_that_is_now_corrupt_is_skipped_not_counted(tiny, tmp_path):
    d = tmp_path / "s"
    build_store(tiny, d, progress=False)
    p = ImageFolderSource(tiny, 160).samples[4][0]
    _overwrite_in_place(p, Path(p).read_bytes()[:200])  # replaced by a truncated JPEG
    rep = build_store(tiny, d, progress=False, on_corrupt="skip")
    assert rep.changed == (4,) and rep.skipped == (4,) and rep.complete == 15
    assert SampleStore(d, tiny).get(4) is None  # the old decode is not served for the new file


@pytest.mark.parametrize("kw, words", [
    (dict(augment=TrainAugment), "augment must be an instance such as TrainAugment"),  # the class, not an instance
    (dict(augment="train"), "augment must be an instance"),
    (dict(batch_size="4"), "batch_size must be an int"),
])
def test_wrong_loader_arguments_are_one_line_errors_at_construction(tiny, tmp_path, kw, words):
    """These failed deep in the batch thread (TrainAugment.params() missing 'widths', "'<=' not supported")."""
    args = dict(batch_size=4, seed=0, epochs=1, store_dir=tmp_path / "st", progress=False) | kw
    with pytest.raises(TypeError, match=words):
        TieredLoader(tiny, **args)


def test_a_dataset_whose_items_are_not_pairs_is_named(tmp_path):
    """A dataset of bare ints was "cannot unpack non-iterable int object" from inside the source."""
    loader = TieredLoader([1, 2, 3], batch_size=2, seed=0, epochs=1, store_dir=tmp_path / "st", progress=False)
    with pytest.raises(TypeError, match=r"dataset\[\d\] must be an \(image, label\) pair, got int"):
        next(iter(loader))
