"""The `memstrata_compile` bench contender: the Manager over `torch.compile(model)` (bench/contenders.py).

One short CPU bench (inductor): two size budgets, one the compiled step fits as compiled and one that needs a
smaller partitioner activation budget (on the Manager's basis); the arm keeps each budget, runs in the
compiled group, and says what the Manager did (graphs, misaligned steps, its plan, that the ladder settled).
"""

from __future__ import annotations

import json

import pytest

from memstrata.bench import contenders, harness
from memstrata.bench.report import best_per_budget


def test_memstrata_compile_is_a_compiled_contender_with_a_budget_knob():
    assert "memstrata_compile" in contenders.CONTENDERS
    assert "memstrata_compile" in contenders.COMPILED and "memstrata_compile" in contenders.BUDGET_KNOBS
    assert contenders.skip_reason("memstrata_compile", "cpu") is None


def test_best_per_budget_sets_memstrata_compile_against_the_compile_peers():
    def row(name, setting, sps, peak, budget_text=None):
        return dict(name=name, setting=setting, samples_per_s=sps, peak_bytes=peak, status="ok",
                    budget_text=budget_text, compiled="compile" in name, reported_apart=False)

    rows = [row("unmanaged", "eager", 100, 1000), row("compile", "inductor", 120, 800),
            row("compile_memory_budget", "amb=0.5", 90, 480),
            row("memstrata_compile", "budget 50%", 99, 470, "50%")]
    (p,) = best_per_budget(rows, [{"text": "50%", "bytes": 500}])
    assert p["best_compiled"] == "compile_memory_budget (amb=0.5)"  # not memstrata_compile itself
    assert p["memstrata_compile_fits"] is True and p["memstrata_compile_samples_per_s"] == 99
    assert p["memstrata_compile_vs_best_compiled"] == pytest.approx(99 / 90)


@pytest.mark.slow
def test_memstrata_compile_bench_run_keeps_its_budgets_in_the_compiled_group(tmp_path, capsys):
    """Two budgets the compiled step fits (a smaller activation budget: tests/test_compiled.py; a run through
    the whole ladder takes minutes): each arm fits, in the compiled group, settled before its timed steps, and
    its Manager budget is the bench budget on the Manager's basis ([Note: memstrata under compile in the bench])."""
    out = tmp_path / "b.json"
    rc = harness.main([
        "--model", "resnet18", "--batch", "4", "--res", "32", "--num-classes", "10", "--device", "cpu",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--quiet",
        "--contenders", "memstrata_compile", "--budgets", "150MiB,200MiB",
        "--json", str(out), "--log-dir", str(tmp_path / "logs"),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(out.read_text())
    assert [(r["name"], r["setting"]) for r in rows] == [
        ("memstrata_compile", "budget 150MiB"), ("memstrata_compile", "budget 200MiB")]
    for r in rows:
        assert r["status"] == "ok", (r["name"], r["reason"])
        assert r["compiled"] is True and r["samples_per_s"] > 0
        n = r["notes"]
        assert r["within_budget"] is True and r["peak_bytes"] <= r["budget_bytes"], (r["setting"], n)
        assert n["settled"] is True and n["misaligned_steps"] == 0 and n["graphs"] == 1, n
        assert n["setting"]["fraction"] == 1.0 and n["plan"]["feasible"], n  # fits as compiled: nothing to do
        assert n["step_modes"][:2] == ["warmup", "trace"] and set(n["step_modes"][2:]) == {"managed"}
        assert r["per_repeat"][0]["steps_done"] == 2 and n["setup_steps"] == 4  # warm-up, trace, one watch
        # the basis: the bench's reading of the trace step, less the bench budget, off the Manager's reading
        want = (n["observed_peak"] - (n["trace_bench_peak_bytes"] - r["budget_bytes"])) / 1.05
        assert n["manager_budget_bytes"] == max(1, int(want)) and n["trace_bench_peak_bytes"] > 0
    assert rows[1]["notes"]["manager_budget_bytes"] > rows[0]["notes"]["manager_budget_bytes"]
    assert "within each budget" in printed and "memstrata_compile" in printed
