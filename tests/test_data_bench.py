"""Data benchmarks (`--scenario loader|data-train|cache-policy`) and the `memstrata data` command line."""

import json
import os

import numpy as np
import pytest
import torch

from memstrata.bench.data_scenarios import DATA_SCENARIOS, main as bench_main, parse_core_sets
from memstrata.cli import main

ROW_KEYS = {"name", "status", "reason", "samples_per_s", "samples_per_s_values", "repeats", "per_repeat",
            "ratio_to_torchvision", "samples_per_s_per_core", "scenario"}


LAST_CORE = max(os.sched_getaffinity(0))


def _one_line_error(capsys, rc):
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cache_policy_belady_beats_lru(tmp_path, capsys):
    out = tmp_path / "cp.json"
    rc = bench_main(["--scenario", "cache-policy", "--images", "1500", "--epochs", "3", "--json", str(out),
                     "--plot", str(tmp_path / "cp.png"), "--quiet"])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"belady", "lru"}
    for r in rows.values():
        assert set(r["hit_rate"]) == {"25%", "50%", "100%"}
        for cap, hr in r["hit_rate"].items():
            assert set(hr) == {"device", "host"}
            assert sum(r["capacities"][cap].values()) == round(float(cap[:-1]) / 100 * 1500)
    for cap in ("25%", "50%"):
        assert rows["belady"]["total_hit_rate"][cap] > rows["lru"]["total_hit_rate"][cap]
    # with everything in the fast tiers, both hit on every non-compulsory access
    assert rows["belady"]["total_hit_rate"]["100%"] == pytest.approx(rows["lru"]["total_hit_rate"]["100%"])
    assert (tmp_path / "cp.png").stat().st_size > 0


def test_loader_scenario_json(tmp_path, capsys):
    out = tmp_path / "loader.json"
    rc = bench_main(["--scenario", "loader", "--data", str(tmp_path / "d"), "--images", "12", "--classes", "3",
                     "--batch", "4", "--res", "32", "--epochs", "2", "--repeats", "1", "--workers", "1",
                     "--contenders", "memstrata,torchvision",  # the peers: tests/test_loader_peers.py
                     "--cores", str(LAST_CORE),  # pinned: each run's process, its threads and workers
                     "--min-timed-s", "0",  # --epochs only: [12, 12] images below
                     "--store", str(tmp_path / "store"), "--json", str(out), "--quiet"])
    rows = json.loads(out.read_text())
    assert rc == 0, rows
    assert isinstance(rows, list) and [r["name"] for r in rows] == ["memstrata", "torchvision"]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["status"] == "ok" and r["repeats"] == 1 and r["samples_per_s"] > 0
        assert len(r["samples_per_s_values"]) == 1
        ep = r["per_repeat"][0]["epochs"]
        assert [e["images"] for e in ep] == [12, 12]  # every sample once per epoch, both loaders
        # the worker saw only the named core (its own sched_getaffinity), whatever this process may use
        assert r["core_set"] == [LAST_CORE] and r["per_repeat"][0]["core_set"] == [LAST_CORE]
        assert r["cores"] == 1 and r["workers"] == 1 and r["threads"] == 1
        assert r["samples_per_s_per_core"] == pytest.approx(r["samples_per_s"])
        if r["samples_per_cpu_s"] is None:  # 12 images used less CPU than the process clock resolves (0.00 s)
            assert r["cpu_s_per_image"] is None
        else:
            assert r["cpu_s_per_image"] == pytest.approx(1 / r["samples_per_cpu_s"])
        assert r["run_queue_wait"] is None or 0 <= r["run_queue_wait"] < 1.5
        assert r["steal"] is None or 0 <= r["steal"] <= 1.01
    tv = rows[1]
    assert tv["ratio_to_torchvision"] == pytest.approx(1.0)
    assert rows[0]["ratio_to_torchvision"] == pytest.approx(rows[0]["samples_per_s"] / tv["samples_per_s"])


def test_bench_bad_input_one_line(capsys):
    assert "loader" in DATA_SCENARIOS
    line = _one_line_error(capsys, bench_main(["--scenario", "nope"]))
    assert "--scenario" in line
    line = _one_line_error(capsys, bench_main(["--scenario", "loader", "--contenders", "webdataset"]))
    assert "webdataset" in line
    line = _one_line_error(capsys, bench_main(["--scenario", "loader", "--images", "x"]))
    assert "--images" in line
    for bad in ("x", "99999", "1-0", "0/0"):
        line = _one_line_error(capsys, bench_main(["--scenario", "loader", "--cores", bad]))
        assert "--cores" in line, line
    line = _one_line_error(capsys, bench_main(["--scenario", "data-train", "--cores", "0"]))
    assert "--cores" in line and "loader" in line
    for bad in ("x", "-1"):
        line = _one_line_error(capsys, bench_main(["--scenario", "loader", "--min-timed-s", bad]))
        assert "--min-timed-s" in line, line


def test_core_sets_default_to_one_core_then_all():
    assert parse_core_sets(None, [2, 5]) == [[2], [2, 5]]
    assert parse_core_sets(None, [3]) == [[3]]
    assert parse_core_sets("5/2-5", [2, 3, 4, 5]) == [[5], [2, 3, 4, 5]]
    assert parse_core_sets("3,2/all", [2, 3, 4]) == [[2, 3], [2, 3, 4]]


def test_data_cli_synth_and_build(tmp_path, capsys):
    d, s = tmp_path / "d", tmp_path / "s"
    assert main(["data", "synth", str(d), "--images", "6", "--classes", "2", "--seed", "3", "--size", "96x72"]) == 0
    out, _ = capsys.readouterr()
    assert "6 written" in out
    assert len(list(d.glob("*/img_*.jpg"))) == 6 and sorted(p.name for p in d.iterdir()) == ["c0000", "c0001"]
    assert main(["data", "build", str(d), "--out", str(s), "--max-side", "48"]) == 0
    out, _ = capsys.readouterr()
    assert "6/6 samples complete" in out
    from memstrata.data import SampleStore

    st = SampleStore(s, d, max_side=48)
    assert st.count_complete() == 6 and min(st.get(0).shape[:2]) <= 48
    # rerun: nothing left to build
    assert main(["data", "build", str(d), "--out", str(s), "--max-side", "48"]) == 0
    assert "built 0" in capsys.readouterr()[0]
    # a corrupt JPEG: named, one line, exit 2 (raise); skipped with --on-corrupt skip
    (d / "c0000" / "img_99999999.jpg").write_bytes(b"not a jpeg")
    line = _one_line_error(capsys, main(["data", "build", str(d), "--out", str(tmp_path / "s2")]))
    assert "img_99999999.jpg" in line and "--on-corrupt skip" in line
    assert main(["data", "build", str(d), "--out", str(tmp_path / "s2"), "--on-corrupt", "skip"]) == 0
    assert "skipped 1" in capsys.readouterr()[0]


@pytest.mark.parametrize("argv,needle", [
    (["data", "build", "/nonexistent/root"], "not a directory"),
    (["data", "synth", "X", "--images", "2", "--classes", "3"], "exceeds"),
    (["data", "synth", "X", "--images", "0", "--classes", "1"], "--images"),
    (["data", "build", ".", "--on-corrupt", "maybe"], "--on-corrupt"),
    (["data"], "choose an action"),
])
def test_data_cli_bad_input(capsys, argv, needle):
    line = _one_line_error(capsys, main(argv))
    assert needle in line


def test_data_cli_store_mismatch_and_empty_root(tmp_path, capsys):
    d = tmp_path / "d"
    assert main(["data", "synth", str(d), "--images", "3", "--classes", "1", "--size", "64x48"]) == 0
    assert main(["data", "build", str(d), "--out", str(tmp_path / "s"), "--max-side", "40"]) == 0
    capsys.readouterr()
    line = _one_line_error(capsys, main(["data", "build", str(d), "--out", str(tmp_path / "s"), "--max-side", "32"]))
    assert "max_side" in line
    (tmp_path / "empty").mkdir()
    line = _one_line_error(capsys, main(["data", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "s3")]))
    assert "class folder" in line


def test_fused_cpu_path_is_bitwise_the_reference():
    """The fused per-sample CPU path equals the two-stage reference (uint8 batch, then convert) bit for bit."""
    from memstrata.data import TrainAugment

    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 256, size=(int(rng.integers(20, 170)), int(rng.integers(20, 230)), 3), dtype=np.uint8)
            for _ in range(40)]
    hs, ws = [x.shape[0] for x in imgs], [x.shape[1] for x in imgs]
    for kw in (dict(), dict(size=48), dict(size=(40, 90)), dict(normalize=False), dict(channels_last=True),
               dict(channels_last=True, normalize=False, size=64), dict(dtype=torch.bfloat16)):
        a = TrainAugment(**kw)
        b, f = a.params(1, 2, np.arange(len(imgs)), hs, ws)
        assert f.any() and not f.all()
        ref = a(imgs, b, f, impl="loop-u8")
        got = a(imgs, b, f, impl="loop")
        assert got.dtype == ref.dtype and got.stride() == ref.stride(), kw
        assert torch.equal(got, ref), kw
    # a crop of exactly the output size (no resample), flipped and not
    a = TrainAugment(size=(20, 30))
    im = [rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)] * 2
    box = np.array([[0, 0, 20, 30]] * 2)
    fl = np.array([False, True])
    assert torch.equal(a(im, box, fl, impl="loop"), a(im, box, fl, impl="loop-u8"))


def test_loader_table_and_chart_one_group_per_core_set(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # a wide table: under pytest-xdist there is no terminal to size it by
    from memstrata.bench.data_scenarios import annotate_loader_rows, loader_groups, print_table, write_plot, _console

    def row(name, sps, cs):
        return dict(name=name, status="ok", reason="", samples_per_s=sps, samples_per_s_values=[sps],
                    samples_per_s_per_core=sps / len(cs), samples_per_cpu_s=sps, cpu_s_per_image=1 / sps,
                    cpu_utilisation=1.0, ratio_to_torchvision=None, images=8, cores=len(cs), workers=len(cs),
                    core_set=cs)
    one = [row("memstrata", 4000.0, [0]), row("ffcv", 1000.0, [0])]
    two = [row("memstrata", 6000.0, [0, 1]), row("ffcv", 3000.0, [0, 1])]
    annotate_loader_rows(one)
    annotate_loader_rows(two)
    assert one[0]["memstrata_vs_fastest_peer"] == pytest.approx(4.0)
    assert two[0]["memstrata_vs_fastest_peer"] == pytest.approx(2.0)  # compared within its core set only
    rows = one + two
    assert loader_groups(rows) == [one, two]
    cfg = dict(scenario="loader", batch=8, res=32, workers=2, cores=2, epochs=3, repeats=1, device="cpu")
    print_table(_console(), cfg, rows, 1.0)
    out = capsys.readouterr().out
    assert "4.00x images/s per core at the same 1 core(s)" in out and "2.00x" in out and "pinned: 0,1" in out
    import matplotlib.pyplot as plt

    write_plot(str(tmp_path / "l.png"), cfg, rows)
    assert (tmp_path / "l.png").stat().st_size > 0
    plt.close("all")


def test_loader_run_goes_on_until_its_timed_window_is_long_enough(tmp_path):
    # [Note: equal timed windows]: epochs 2.. last at least min_timed_s, whatever --epochs says
    from memstrata.bench.data_scenarios import worker_loader
    from memstrata.data import synth_imagefolder

    synth_imagefolder(tmp_path / "d", 6, 2, seed=0, progress=False, size=(48, 40))
    spec = dict(scenario="loader", device="cpu", batch=4, res=16, epochs=2, seed=0, workers=0, threads=1,
                max_side=32, classes=2, contender="torchvision", root=str(tmp_path / "d"), min_timed_s=0.3)
    r = worker_loader(spec)
    assert r["timed_s"] >= 0.3 and len(r["epochs"]) > 2
    assert r["steal"] is None or r["samples_per_s_per_core_unstolen"] >= r["samples_per_s_per_core"] * 0.999
    assert all(ep["images"] == 6 for ep in r["epochs"]) and r["timed_images"] == 6 * (len(r["epochs"]) - 1)
    r0 = worker_loader(dict(spec, min_timed_s=0))
    assert len(r0["epochs"]) == 2


def test_run_queue_wait_is_per_thread_so_ended_workers_cannot_make_it_negative():
    """The wait was a difference of two sums over the threads alive at each reading: a worker thread that ended
    in between took its whole wait out of the second sum (CI saw run_queue_wait = -8.4)."""
    from memstrata.bench.data_scenarios import _run_delay_between

    before = {(1, "1"): 2.0, (1, "7"): 9.0}          # thread 7 ends before the second reading
    after = {(1, "1"): 2.5, (1, "9"): 0.25}          # thread 9 started in between
    assert _run_delay_between(before, after) == 0.75
    assert _run_delay_between(None, after) is None
