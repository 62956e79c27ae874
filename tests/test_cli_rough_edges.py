"""Issue 13's command-line and output items: bad input ends in one line and exit status 2 before any
work, output paths are checked first, charts are readable, and output is whole off a terminal."""

from __future__ import annotations

import ast
import json
import statistics
import types
from pathlib import Path

import pytest

import memstrata
from memstrata.cli import main

SRC = Path(memstrata.__file__).resolve().parent
SMALL = ["--model", "resnet18", "--batch", "16", "--res", "128", "--profile", "h200"]


def _one_line(rc, out, err, *, stdout_empty=True):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {err!r}"
    if stdout_empty:
        assert out == ""
    return lines[0]


def _run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _no_work(monkeypatch):
    """Make tracing and benchmarking fail the test: an input error must come before them."""
    import memstrata.bench.harness as harness
    import memstrata.trace.record as record

    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(record, "trace_model", boom)
    monkeypatch.setattr(harness, "run_all", boom)


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved during the test, drawn (so text extents are known)."""
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def savefig(self, *a, **k):
        real(self, *a, **k)
        saved.append(self)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


# ----------------------------------------------------------------------------- item 5: --scenario


@pytest.mark.parametrize("scenario", ["foo", "Loader"])
def test_unknown_scenario_is_one_line_before_any_bench(capsys, monkeypatch, scenario):
    import memstrata.bench as bench
    import memstrata.bench.data_scenarios as ds

    def ran(*a, **k):
        raise AssertionError("a benchmark ran for an unknown --scenario")

    monkeypatch.setattr(bench, "run_bench", ran)
    monkeypatch.setattr(ds, "run_data_scenario", ran)
    line = _one_line(*_run(capsys, ["bench", "--scenario", scenario]))
    assert "--scenario" in line and "invalid choice" in line and repr(scenario) in line


# ----------------------------------------------------------------------------- items 11, 12: output paths


@pytest.mark.parametrize("plot, needle", [
    ("out.txt", "must name a .png file"),
    ("/proc/x.png", "cannot write there"),
    ("DIR", "is a directory"),
])
def test_plan_plot_path_checked_before_work(capsys, monkeypatch, tmp_path, plot, needle):
    _no_work(monkeypatch)
    if plot == "DIR":
        plot = str(tmp_path / "adir")
        Path(plot).mkdir()
    line = _one_line(*_run(capsys, ["plan", *SMALL, "--budget", "90%", "--plot", plot]))
    assert needle in line and "--plot" in line
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "adir"])  # no DIR.png, no scratch file left


@pytest.mark.parametrize("kind", ["dir", "proc"])
def test_bench_json_path_checked_before_the_bench(capsys, monkeypatch, tmp_path, kind):
    from memstrata.bench import harness
    from memstrata.bench.data_scenarios import main as data_bench_main

    _no_work(monkeypatch)
    path = str(tmp_path) if kind == "dir" else "/proc/x.json"
    needle = "is a directory" if kind == "dir" else "cannot write there"
    for run in (lambda: harness.main(["--device", "cpu", "--json", path]),
                lambda: main(["bench", "--device", "cpu", "--json", path]),
                lambda: data_bench_main(["--scenario", "cache-policy", "--json", path])):
        rc = run()
        out, err = capsys.readouterr()
        assert needle in _one_line(rc, out, err)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- item 14: --max-side


def test_data_build_max_side_below_the_store_minimum(capsys, tmp_path):
    line = _one_line(*_run(capsys, ["data", "build", str(tmp_path), "--max-side", "4"]))  # the store needs >= 8
    assert "--max-side" in line and "must be >= 8, got 4" in line


# ----------------------------------------------------------------------------- item 10: model input size


@pytest.mark.parametrize("model, batch, smallest", [("vit_b_16", 2, 224), ("inception_v3", 2, 299)])
def test_plan_input_smaller_than_the_model_takes(capsys, model, batch, smallest):
    line = _one_line(*_run(capsys, ["plan", "--model", model, "--batch", str(batch), "--res", "64",
                                    "--budget", "50%"]))
    assert f"{model} cannot take a batch of {batch} at 64x64" in line
    assert f"{smallest}x{smallest}" in line


def test_bench_checks_the_model_input_before_running(capsys, monkeypatch):
    from memstrata.bench import harness

    _no_work(monkeypatch)
    rc = harness.main(["--device", "cpu", "--model", "vit_b_16", "--res", "64", "--batch", "4"])
    out, err = capsys.readouterr()
    assert "vit_b_16 cannot take a batch of 4 at 64x64" in _one_line(rc, out, err) and "224x224" in err


def test_model_input_hint_is_what_the_model_takes():
    """The size the hint names is really accepted, and the next smaller one is not (found by trying)."""
    import torchvision

    from memstrata.trace.record import _build_on_meta, _input_hint, _input_problem

    m = _build_on_meta(lambda: torchvision.models.get_model("resnet18", weights=None)).train()
    assert _input_problem(m, 1, 1) is not None  # BatchNorm: one value per channel at batch 1
    hint = _input_hint("resnet18", m, 1, 1)
    side = int(hint.rsplit(" ", 1)[1].split("x")[0])
    assert _input_problem(m, 1, side) is None and _input_problem(m, 1, side - 1) is not None


# ----------------------------------------------------------------------------- item 8: output


def test_json_errors_are_json_on_stdout(capsys):
    for argv in (["plan", *SMALL, "--budget", "1GiB", "--json", "--batch", "x"],  # argparse error
                 ["plan", *SMALL, "--budget", "1GiB", "--json", "--plot", "t.txt"],  # error in the handler
                 ["probe", "--json", "--max-seconds", "0"]):
        rc, out, err = _run(capsys, argv)
        line = _one_line(rc, out, err, stdout_empty=False)
        assert json.loads(out) == {"error": line, "exit_status": 2}
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", "1GiB", "--plot", "t.txt"])  # no --json: stdout empty
    _one_line(rc, out, err)


def test_data_synth_help_has_no_doubled_percent(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "i % C" in out


def test_probe_output_is_whole_off_a_terminal_and_tier0_bandwidth_not_shown_as_zero(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-cache-directory-with-a-long-name" / ("x" * 30)))
    monkeypatch.delenv("COLUMNS", raising=False)
    rc, out, err = _run(capsys, ["probe", "--max-seconds", "1"])
    assert rc == 0, err
    # one line, not wrapped at 80 columns although stdout is not a terminal
    line = next(ln for ln in out.splitlines() if "cached at" in ln)
    assert len(line) > 80 and line.endswith("no disk tier (pass --nvme DIR to measure one)")
    top = next(ln for ln in out.splitlines() if ln.strip("│ ").startswith("dram"))
    assert "top tier" in top and "0.00 GB/s" not in top
    rc, out, err = _run(capsys, ["probe", "--json"])
    d = json.loads(out)
    assert d["hierarchy"]["tiers"][0]["read_bandwidth"] == 0.0  # the hierarchy itself is unchanged ...
    assert "top tier" in d["not_measured"][d["hierarchy"]["tiers"][0]["name"]]  # ... and says why


def test_bench_lines_are_whole_off_a_terminal(capsys, monkeypatch):
    from memstrata.bench.contenders import CONTENDERS
    from memstrata.bench.report import make_console, print_header

    monkeypatch.delenv("COLUMNS", raising=False)
    cfg = types.SimpleNamespace(model="resnet18", batch=64, res=112, device="cpu", amp="off", channels_last=False,
                                budget_text="50%act", budget_bytes=None, repeats=3, warmup=1, steps=3,
                                contenders=list(CONTENDERS))
    print_header(make_console(), cfg)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].endswith(CONTENDERS[-1]) and len(lines[0]) > 140


def test_data_build_verify_says_whether_it_passed(capsys, tmp_path):
    d, s = tmp_path / "d", tmp_path / "s"
    assert main(["data", "synth", str(d), "--images", "4", "--classes", "2", "--size", "64x48"]) == 0
    assert main(["data", "build", str(d), "--out", str(s), "--max-side", "32"]) == 0
    out = capsys.readouterr().out
    assert "verify:" not in out  # not asked
    assert main(["data", "build", str(d), "--out", str(s), "--max-side", "32", "--verify"]) == 0
    assert "verify: passed: all 4 stored samples" in capsys.readouterr().out
    data = next(s.glob("data-*.bin"))
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF  # damage the first stored sample
    data.write_bytes(bytes(raw))
    assert main(["data", "build", str(d), "--out", str(s), "--max-side", "32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: FAILED for 1 of 4 stored samples (indices [0])" in out and "4/4 samples complete" in out
    assert main(["data", "build", str(d), "--out", str(s), "--max-side", "32", "--verify"]) == 0
    assert "verify: passed" in capsys.readouterr().out  # rebuilt


# ----------------------------------------------------------------------------- item 7: charts


def test_timeline_draws_no_panel_for_a_tier_that_holds_nothing(tmp_path, figures):
    from memstrata.hardware import profile
    from memstrata.plan.api import minimum_budget, plan
    from memstrata.report import plot_timeline
    from memstrata.simulate import simulate
    from memstrata.trace.record import trace_model

    h = profile("h200")
    trace = trace_model("resnet18", 16, 128, profile=h)
    budget = int((minimum_budget(trace, h) + trace.observed_peak) / 2)
    timeline = simulate(trace, plan(trace, h, budget, replays=False), h)
    assert max(timeline.occupancy["nvme"][1], default=0) == 0, "the test wants a plan that leaves nvme empty"
    assert max(timeline.occupancy["dram"][1], default=0) > 0
    plot_timeline(timeline, h, str(tmp_path / "t.png"), budget=budget, trace=trace)
    labels = [ax.get_ylabel() for ax in figures[-1].axes]
    assert any(lb.startswith("hbm") for lb in labels) and any(lb.startswith("dram") for lb in labels)
    assert not any(lb.startswith("nvme") for lb in labels)
    legend = [t.get_text() for ax in figures[-1].axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("nvme" in t and "holds nothing" in t for t in legend)


def _bench_rows():
    rows = []
    for name, sps, peak, apart, status in (("unmanaged", 57.6, 409e6, False, "ok"), ("memstrata", 40.1, 210e6, False, "ok"),
                                           ("checkpoint", 41.6, 321e6, False, "ok"),
                                           ("selective_checkpoint", 42.5, 370e6, False, "ok"),
                                           ("save_on_cpu", None, None, False, "skipped"),
                                           ("disk_offload_hooks", 34.1, 230e6, False, "ok"),
                                           ("microbatch", 49.9, 183e6, True, "ok")):
        rows.append(dict(name=name, samples_per_s=sps, peak_bytes=peak, reported_apart=apart, status=status,
                         ratio_to_unmanaged=None if sps is None else sps / 57.6))
    return rows


def test_bench_chart_is_readable_with_a_legend(tmp_path, figures):
    from memstrata.bench.report import write_plot

    cfg = types.SimpleNamespace(model="resnet18", batch=64, res=112, device="cpu", amp="off")
    write_plot(str(tmp_path / "b.png"), _bench_rows(), cfg, {"budget_bytes": 234e6})
    fig = figures[-1]
    w, h = fig.get_size_inches()
    assert w / h <= 2.5, f"aspect {w / h:.1f}:1"
    sizes = [t.get_fontsize() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert sizes and min(sizes) >= 9
    legend = [t.get_text() for lg in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
              for t in lg.get_texts()]
    assert "memstrata" in legend and "peers" in legend and any("apart" in t for t in legend)
    assert any(t.startswith("budget") for t in legend)


def test_loader_chart_labels_do_not_cover_the_dots(tmp_path, figures):
    from memstrata.bench.data_scenarios import write_plot

    cfg = dict(scenario="loader", batch=128, res=224, workers=2, cores=2, epochs=4)
    rows = [dict(name=n, samples_per_s=statistics.median(v), samples_per_s_values=v, ratio_to_torchvision=r,
                 samples_per_s_per_core=statistics.median(v) / cfg["cores"], memstrata_vs_this=3.0 / r,
                 status="ok", reason="") for n, v, r in (("memstrata", [1210.0, 1265.0, 1180.0], 3.0),
                                                         ("torchvision", [402.0, 421.0, 396.0], 1.0))]
    write_plot(str(tmp_path / "l.png"), cfg, rows)
    fig = figures[-1]
    ax = fig.axes[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(rows)
    for coll in ax.collections:  # the dots
        for x, y in ax.transData.transform(coll.get_offsets()):
            for b in boxes:
                assert not (b.x0 - 3 <= x <= b.x1 + 3 and b.y0 - 3 <= y <= b.y1 + 3), "a label covers a dot"


# ----------------------------------------------------------------------------- issue 8 item 6: no import cycle


def _imports(path: Path) -> set[str]:
    """Modules a file imports, relative imports resolved against the memstrata package."""
    pkg = ["memstrata", *path.relative_to(SRC).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_cli_and_data_cli_do_not_import_each_other():
    data_cli = _imports(SRC / "data" / "cli.py")
    assert "memstrata.cli" not in data_cli, "memstrata/data/cli.py imports memstrata/cli.py"
    assert "memstrata.cli_args" in data_cli and "memstrata.cli_args" in _imports(SRC / "cli.py")
    assert not {i for i in _imports(SRC / "cli_args.py") if i.startswith("memstrata")}
