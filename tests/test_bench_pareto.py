"""`memstrata bench --budgets`: the budget list, the arms, the JSON rows, the Pareto chart; the compile and TRL peers."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

from memstrata.bench import harness
from memstrata.bench.harness import Arm, BenchInputError, memory_budget_fraction, parse_budget_list, settle_arms

# what the issue asks of every (contender, setting) object, plus what tests/test_bench.py reads
PARETO_FIELDS = ("name", "setting", "budget_bytes", "samples_per_s", "peak_bytes", "ratio_to_unmanaged", "repeats",
                 "status", "reason", "per_repeat", "fits_budgets", "budget_text", "within_budget",
                 "losses_match_unmanaged", "compiled", "reported_apart")


# ------------------------------------------------------------------ parsing
def test_budget_list_parses_and_keeps_the_order():
    assert parse_budget_list("30%act,50%act,70%act") == ["30%act", "50%act", "70%act"]
    assert parse_budget_list(" 70% , 512MiB") == ["70%", "512MiB"]
    assert parse_budget_list("50%act") == ["50%act"]


@pytest.mark.parametrize("text, needle", [
    ("", "--budgets is empty"),
    (" , ", "--budgets is empty"),
    ("30%,,50%", "has an empty item"),
    ("30%,lots", "malformed budget"),
    ("50%act,50%act", "repeats '50%act'"),
    ("0.5GiB,512MiB", "repeats '0.5GiB'"),
    ("30%,1.10x", "one memory budget"),
])
def test_bad_budget_lists_are_one_line_errors(text, needle):
    with pytest.raises(BenchInputError, match=None) as e:
        parse_budget_list(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--budgets", "30%,nope"], "malformed budget"),
    (["--budget", "50%", "--budgets", "30%,70%"], "give --budget or --budgets, not both"),
    (["--budgets", "30%,30%"], "repeats"),
])
def test_bad_budgets_on_the_command_line_exit_2_in_one_line(argv, needle, capsys):
    rc = harness.main(argv + ["--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def _cfg(**kw):
    args = types.SimpleNamespace(device="cpu", model="resnet18", batch="8", res="32", num_classes="10", **kw)
    return harness.config_from_args(args)


def test_one_budget_is_todays_bench_several_are_the_pareto_bench():
    assert not _cfg().pareto and _cfg().budget_texts == ["50%act"]
    assert not _cfg(budgets="40%").pareto and _cfg(budgets="40%").budget_text == "40%"
    cfg = _cfg(budgets="30%act,70%act")
    assert cfg.pareto and cfg.budget_texts == ["30%act", "70%act"] and cfg.budget_text == "30%act"


# ------------------------------------------------------------------ arms
def test_knobbed_contenders_get_one_arm_per_budget_and_repeats_collapse():
    cfg = _cfg(budgets="30%,50%,90%", contenders="unmanaged,memstrata,checkpoint,microbatch,compile_memory_budget")
    cfg.batch = 64
    arms = harness.initial_arms(cfg)
    assert [(a.name, a.budget_index) for a in arms] == [
        ("unmanaged", None), ("memstrata", 0), ("memstrata", 1), ("memstrata", 2), ("checkpoint", None),
        ("microbatch", 0), ("microbatch", 1), ("microbatch", 2),
        ("compile_memory_budget", 0), ("compile_memory_budget", 1), ("compile_memory_budget", 2)]
    # peak 1000 = 800 activations + 2 x 100 params: 30% -> k=8, 50% -> k=4, 90% -> k=2 ... 90% of 1000 = 900
    # needs 800/k + 200 <= 900 -> k=2
    settled = settle_arms(arms, cfg, [300, 500, 900], unmanaged_peak=1000, param_bytes=100)
    mb = [a for a in settled if a.name == "microbatch"]
    assert [a.setting for a in mb] == ["k=8", "k=4", "k=2"]
    amb = [a for a in settled if a.name == "compile_memory_budget"]
    assert [a.fraction for a in amb] == [0.3, 0.5, 0.9]
    assert [a.setting for a in amb] == ["activation_memory_budget=0.3", "activation_memory_budget=0.5",
                                        "activation_memory_budget=0.9"]
    # two budgets that give the same k share one arm, labelled with the smaller budget
    arms = harness.initial_arms(cfg)
    settled = settle_arms(arms, cfg, [880, 500, 900], unmanaged_peak=1000, param_bytes=100)
    mb = [a for a in settled if a.name == "microbatch"]
    assert [(a.budget_index, a.setting) for a in mb] == [(0, "k=2"), (1, "k=4")]
    assert len([a for a in settled if a.name == "memstrata"]) == 3  # memstrata is planned per budget, never merged


def test_memory_budget_fraction_follows_the_budget():
    assert memory_budget_fraction("50%act", 123, None) == 0.5
    assert memory_budget_fraction("30%", 123, 1000) == 0.3
    assert memory_budget_fraction("150%", 1500, 1000) == 1.0
    assert memory_budget_fraction("250MiB", 250 << 20, 1000 << 20) == 0.25
    assert memory_budget_fraction("250MiB", 250 << 20, None) is None


def test_size_budget_without_unmanaged_peak_skips_what_needs_it():
    cfg = _cfg(budgets="100MiB,200MiB", contenders="memstrata,microbatch,compile_memory_budget")
    arms = settle_arms(harness.initial_arms(cfg), cfg, [100 << 20, 200 << 20], unmanaged_peak=None, param_bytes=None)
    assert [a.skip is None for a in arms if a.name == "memstrata"] == [True, True]
    assert all("unmanaged" in (a.skip or "") for a in arms if a.name != "memstrata")


def test_best_per_budget_picks_the_fastest_fitting_peer_of_each_kind():
    from memstrata.bench.report import best_per_budget

    def row(name, setting, sps, peak, budget_text=None, **kw):
        return dict(name=name, setting=setting, samples_per_s=sps, peak_bytes=peak, status="ok",
                    budget_text=budget_text, compiled=name.startswith("compile"),
                    reported_apart=name == "microbatch", **kw)

    rows = [row("unmanaged", "eager", 100, 1000), row("memstrata", "budget 50%", 80, 480, "50%"),
            row("memstrata", "budget 30%", 60, 290, "30%"), row("checkpoint", "every block", 70, 450),
            row("selective_checkpoint", "x", 75, 520), row("microbatch", "k=4", 95, 300),
            row("compile_memory_budget", "amb=0.5", 90, 495), row("compile", "inductor", 110, 990)]
    got = {p["budget_text"]: p for p in best_per_budget(rows, [{"text": "30%", "bytes": 300},
                                                               {"text": "50%", "bytes": 500}])}
    assert got["50%"]["best_identical_peer"] == "checkpoint (every block)"  # selective does not fit 500
    assert got["50%"]["memstrata_vs_best_identical_peer"] == pytest.approx(80 / 70)
    assert got["50%"]["best_compiled"] == "compile_memory_budget (amb=0.5)"
    assert got["50%"]["memstrata_vs_best_compiled"] == pytest.approx(80 / 90)
    assert got["30%"]["best_identical_peer"] is None and got["30%"]["memstrata_fits"] is True  # microbatch: other math


def test_pareto_chart_has_one_line_per_contender_and_the_budgets(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memstrata.bench.report import write_pareto_plot

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    rows = [dict(name="unmanaged", setting="eager", samples_per_s=100, peak_bytes=1000 << 20, status="ok"),
            dict(name="memstrata", setting="budget 30%", budget_text="30%", samples_per_s=60, peak_bytes=290 << 20,
                 status="ok"),
            dict(name="memstrata", setting="budget 50%", budget_text="50%", samples_per_s=80, peak_bytes=480 << 20,
                 status="ok"),
            dict(name="checkpoint", setting="every block", samples_per_s=70, peak_bytes=450 << 20, status="ok"),
            dict(name="trl_offload", setting="streams", samples_per_s=None, peak_bytes=None, status="skipped")]
    cfg = types.SimpleNamespace(model="resnet18", batch=64, res=112, device="cpu", amp="off")
    out = tmp_path / "p.png"
    write_pareto_plot(str(out), rows, cfg, {"budgets": [{"text": "30%", "bytes": 300 << 20},
                                                        {"text": "50%", "bytes": 500 << 20}]})
    assert out.stat().st_size > 1000
    ax = figs[-1].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["unmanaged (ceiling)", "memstrata", "checkpoint"]
    memstrata = next(ln for ln in ax.get_lines() if ln.get_label() == "memstrata")
    assert list(memstrata.get_xdata()) == [290, 480] and list(memstrata.get_ydata()) == [60, 80]
    vertical = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1
                      and ln.get_linestyle() == ":")
    assert vertical == [300, 500]
    assert any("trl_offload" in t.get_text() and "skipped" in t.get_text() for t in ax.texts)


# ------------------------------------------------------------------ TRL
def test_trl_offload_says_needs_cuda_on_cpu_and_not_installed_without_trl():
    from memstrata.bench import contenders

    assert "needs CUDA" in contenders.skip_reason("trl_offload", "cpu")
    assert contenders.skip_reason("trl_offload", "cuda") is None
    c = contenders.make("trl_offload")
    cpu_ctx = types.SimpleNamespace(device=torch.device("cpu"), model=torch.nn.Linear(2, 2))
    with pytest.raises(contenders.SkipContender, match="needs CUDA"):
        c.prepare(cpu_ctx)
    try:
        import trl.models.activation_offloading  # noqa: F401
    except ImportError:
        cuda_ctx = types.SimpleNamespace(device=torch.device("cuda"), model=torch.nn.Linear(2, 2))
        with pytest.raises(contenders.SkipContender, match="not installed: trl"):
            c.prepare(cuda_ctx)


# ------------------------------------------------------------------ end to end
def _run(tmp_path, contenders: str, budgets: str, steps: str = "1"):
    out, png = tmp_path / "pareto.json", tmp_path / "pareto.png"
    rc = harness.main([
        "--model", "resnet18", "--batch", "4", "--res", "32", "--num-classes", "10", "--device", "cpu",
        "--steps", steps, "--warmup", "1", "--repeats", "1", "--threads", "1", "--quiet",
        "--contenders", contenders, "--budgets", budgets,
        "--json", str(out), "--plot", str(png), "--log-dir", str(tmp_path / "logs"),
    ])
    rows = json.loads(out.read_text())
    return rc, rows, png


def _log(r):
    logs = [p.get("log") for p in r["per_repeat"]]
    return open(logs[0]).read()[-3000:] if logs and logs[0] and os.path.exists(logs[0]) else ""


def test_pareto_tiny_run_one_object_per_contender_and_setting(tmp_path, capsys):
    rc, rows, png = _run(tmp_path, "unmanaged,memstrata,trl_offload", "50%act,90%act")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [(r["name"], r["setting"]) for r in rows] == [
        ("unmanaged", "eager"), ("memstrata", "budget 50%act"), ("memstrata", "budget 90%act"),
        ("trl_offload", "streams, pinned host")]
    for r in rows:
        for k in PARETO_FIELDS:
            assert k in r, (r["name"], k)
    ok = [r for r in rows if r["name"] != "trl_offload"]
    for r in ok:
        assert r["status"] == "ok", (r["name"], r["reason"], _log(r))
        assert r["samples_per_s"] > 0 and r["peak_bytes"] > 0 and r["repeats"] == 1
        assert set(r["fits_budgets"]) == {"50%act", "90%act"}
        assert [b["text"] for b in r["budgets"]] == ["50%act", "90%act"]
        assert r["losses_match_unmanaged"] is True, r["name"]
    m50, m90 = rows[1], rows[2]
    assert m50["budget_text"] == "50%act" and m90["budget_text"] == "90%act"
    assert 0 < m50["budget_bytes"] < m90["budget_bytes"]
    assert m50["fits_budgets"]["50%act"] == (m50["peak_bytes"] <= m50["budget_bytes"]) == m50["within_budget"]
    assert rows[0]["budget_bytes"] is None and rows[3]["budget_bytes"] is None  # no knob: no budget of their own
    assert rows[0]["ratio_to_unmanaged"] == pytest.approx(1.0)
    assert rows[3]["status"] == "skipped" and "needs CUDA" in rows[3]["reason"]
    assert png.stat().st_size > 1000
    assert "within each budget" in printed and "budget 90%act" in printed


@pytest.mark.slow
def test_pareto_tiny_run_with_the_compile_peers(tmp_path):
    """torch.compile (inductor, CPU) and its activation_memory_budget at two fractions: real compiled steps."""
    rc, rows, _ = _run(tmp_path, "unmanaged,compile,compile_memory_budget", "50%act,80%act", steps="2")
    assert rc == 0
    assert [(r["name"], r["setting"]) for r in rows] == [
        ("unmanaged", "eager"), ("compile", "inductor"),
        ("compile_memory_budget", "activation_memory_budget=0.5"),
        ("compile_memory_budget", "activation_memory_budget=0.8")]
    ref = rows[0]["per_repeat"][0]["losses"]
    for r in rows[1:]:
        assert r["status"] == "ok", (r["name"], r["reason"], _log(r))
        assert r["compiled"] is True and r["samples_per_s"] > 0 and r["peak_bytes"] > 0
        rep = r["per_repeat"][0]
        assert rep["setup_s"] > 0 and rep["steps_done"] == 2  # compile in the untimed setup steps
        # same model, generated kernels: the first losses track eager's closely (later ones drift apart:
        # batch 4 is overfitted within a few steps, which amplifies rounding differences)
        losses = rep["losses"]
        assert len(losses) == 2 + 1 + 2 and losses[:2] == pytest.approx(ref[:2], rel=1e-3)
        assert all(0 <= v < 10 for v in losses)
    assert rows[2]["notes"]["activation_memory_budget"] == 0.5
