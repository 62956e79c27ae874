"""The `memstrata` command line: probe, plan (--json, --plot), and bad input."""

import json

import pytest

from memstrata.cli import SUBCOMMANDS, main
from memstrata.hardware import Budget

# Small enough to trace in well under a second, large enough that activations (which
# memstrata manages) and not parameters set the peak, so budgets below it are plannable.
SMALL = ["--model", "resnet18", "--batch", "16", "--res", "128", "--profile", "h200"]
BATCH = 16
PLAN_KEYS = {
    "predicted_step_s", "unmanaged_step_s", "peak_bytes", "budget_bytes", "decisions",
    "minimum_budget_bytes", "samples_per_s", "unmanaged_samples_per_s", "planning_s",
}


def _pipeline():
    """Skip (with the reason) while a stage of the pipeline has not landed yet."""
    pytest.importorskip("memstrata.trace.record", reason="tracer (memstrata.trace.record) not available yet")
    pytest.importorskip("memstrata.plan.api", reason="planner (memstrata.plan.api) not available yet")
    pytest.importorskip("memstrata.simulate", reason="simulator (memstrata.simulate) not available yet")


@pytest.fixture(scope="module")
def feasible_pct():
    """A budget percentage halfway between the minimum feasible budget and the unmanaged peak."""
    _pipeline()
    from memstrata.hardware import profile
    from memstrata.plan.api import minimum_budget
    from memstrata.trace.record import trace_model

    trace = trace_model("resnet18", BATCH, 128, profile="h200")
    frac = minimum_budget(trace, profile("h200")) / trace.observed_peak
    assert frac < 0.97, "the test shape should leave room below the unmanaged peak"
    return int(round(100 * (frac + 1) / 2))


def _run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_usage_error(rc, out, err):
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    assert "memstrata" in lines[0] and "error" in lines[0]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- no pipeline needed


def test_registry_has_the_subcommands():
    assert {"probe", "plan", "demo"} <= set(SUBCOMMANDS)


def test_parse_budget():
    """The CLI reads budgets with the one `Budget` type: sizes, % of the unmanaged peak, %act."""
    assert Budget.parse("12GiB").resolve_peaks(1000) == 12 * 1024**3
    assert Budget.parse("50%").resolve_peaks(1000) == 500 and Budget.parse("50%").value == 0.5
    assert Budget.parse("50%act").resolve_peaks(1000, 400) == 800
    for bad in ("0%", "0", "x%", "12XB", "-3%", "inf%", "1e400%", "nan%"):
        with pytest.raises(ValueError):
            Budget.parse(bad)


@pytest.mark.parametrize("bad", ["inf%", "1e400%"])
def test_plan_rejects_infinite_budget_percentages(capsys, bad):
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", bad])
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", *SMALL[:-2], "--profile", "tpu-v9", "--budget", "1GiB"],  # unknown profile
        ["plan", *SMALL, "--budget", "12XB"],  # malformed size
        ["plan", *SMALL, "--budget", "0%"],  # non-positive budget
        ["plan", *SMALL, "--budget=-5%"],  # negative budget
        ["plan", "--model", "resnet18", "--batch", "0", "--budget", "1GiB"],  # non-positive batch
        ["plan", "--model", "resnet18", "--batch", "-4", "--budget", "1GiB"],
        ["plan", "--model", "resnet18", "--batch", "8", "--res", "0", "--budget", "1GiB"],  # non-positive res
        ["plan", "--model", "resnet18", "--batch", "eight", "--budget", "1GiB"],
        ["plan", "--model", "resnet18"],  # missing arguments
        ["plan", *SMALL, "--budget", "1GiB", "--planner", "magic"],
        ["plan", *SMALL, "--budget", "1GiB", "--plot", "/nonexistent-dir/x.png"],
        ["frobnicate"],
        ["probe", "--nvme", "/nonexistent-dir-for-memstrata"],
        ["probe", "--max-seconds", "0"],
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv):
    _assert_usage_error(*_run(capsys, argv))


def test_no_command_prints_help_and_exits_2(capsys):
    rc, out, err = _run(capsys, [])
    assert rc == 2 and "usage" in err and "Traceback" not in err


def test_probe_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "disk").mkdir()
    argv = ["probe", "--nvme", str(tmp_path / "disk"), "--json", "--max-seconds", "2"]
    rc, out, err = _run(capsys, argv)
    assert rc == 0, err
    d = json.loads(out)
    assert d["cached"] is False
    assert [t["name"] for t in d["hierarchy"]["tiers"]][-1] == "nvme"
    assert d["details"]["disk"]["io"] in ("O_DIRECT", "buffered+fsync+fadvise")
    assert list((tmp_path / "disk").iterdir()) == []
    rc, out, err = _run(capsys, ["probe", "--nvme", str(tmp_path / "disk")])  # the table view, from the cache
    assert rc == 0 and "nvme" in out and "from cache" in out


# ----------------------------------------------------------------------------- the pipeline


def test_plan_json(capsys, feasible_pct):
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", f"{feasible_pct}%", "--json"])
    assert rc == 0, err
    d = json.loads(out)  # exactly one JSON object on stdout
    assert PLAN_KEYS <= set(d)
    assert isinstance(d["peak_bytes"], dict) and d["peak_bytes"]
    assert isinstance(d["decisions"], dict)
    assert d["budget_bytes"] == int(feasible_pct / 100 * d["unmanaged_peak_bytes"])
    assert d["budget_bytes"] < d["unmanaged_peak_bytes"]
    assert d["peak_bytes"]["hbm"] <= d["budget_bytes"]
    assert d["minimum_budget_bytes"] <= d["budget_bytes"]
    assert d["predicted_step_s"] >= d["unmanaged_step_s"] * 0.999 > 0
    assert d["samples_per_s"] == pytest.approx(BATCH / d["predicted_step_s"])
    assert d["unmanaged_samples_per_s"] == pytest.approx(BATCH / d["unmanaged_step_s"])
    assert sum(v for k, v in d["decisions"].items() if k != "keep") > 0, "a budget below the peak needs decisions"
    assert d["planning_s"] >= 0


def test_plan_absolute_budget_and_table(capsys, feasible_pct):
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", f"{feasible_pct}%", "--json"])
    assert rc == 0, err
    budget = json.loads(out)["budget_bytes"]
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", f"{budget / 1024**2:.3f}MiB"])
    assert rc == 0, err
    for word in ("Step time", "Peak per tier", "Decisions", "Copy lanes", "samples/s", "minimum feasible budget"):
        assert word in out


def test_plan_plot_writes_a_png(capsys, tmp_path, feasible_pct):
    png = tmp_path / "timeline.png"
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", f"{feasible_pct}%", "--json", "--plot", str(png)])
    assert rc == 0, err
    assert json.loads(out)["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_plan_unknown_model_exits_2(capsys):
    _pipeline()
    _assert_usage_error(*_run(capsys, ["plan", "--model", "no_such_net", "--batch", "8", "--res", "64",
                                       "--budget", "50%"]))


def test_plan_budget_below_minimum_exits_2(capsys):
    _pipeline()
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", "1KiB"])
    _assert_usage_error(rc, out, err)
    assert "smallest feasible budget" in err
    # issue 9, item 5: the same line says what the smallest plan could not free
    assert "the smallest plan still holds" in err and "not moved by memstrata" in err


def test_plan_budget_above_capacity_exits_2(capsys):
    _pipeline()
    rc, out, err = _run(capsys, ["plan", *SMALL, "--budget", "10TiB"])
    _assert_usage_error(rc, out, err)
    assert "capacity" in err
