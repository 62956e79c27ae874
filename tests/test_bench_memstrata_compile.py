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
    out = tmp_path / "b.json"
    rc = harness.main([
        "--model", "resnet18", "--batch", "4", "--res", "32", "--num-classes", "10", "--device", "cpu",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--quiet",
        "--contenders", "memstrata_compile", "--budgets", "200MiB,90MiB",
        "--json", str(out), "--log-dir", str(tmp_path / "logs"),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(out.read_text())
    assert [(r["name"], r["setting"]) for r in rows] == [
        ("memstrata_compile", "budget 200MiB"), ("memstrata_compile", "budget 90MiB")]
    for r in rows:
        assert r["status"] == "ok", (r["name"], r["reason"])
        assert r["compiled"] is True and r["samples_per_s"] > 0
    for r in rows:
        n = r["notes"]
        assert r["within_budget"] is True and r["peak_bytes"] <= r["budget_bytes"], (r["setting"], n)
        assert n["settled"] is True and n["misaligned_steps"] == 0 and n["graphs"] >= 1, n
        assert n["plan"]["feasible"] and n["manager_budget_bytes"] > 0
        assert r["per_repeat"][0]["steps_done"] == 2 and n["setup_steps"] >= 4
    loose, tight = rows[0]["notes"], rows[1]["notes"]
    assert loose["setting"]["fraction"] == 1.0 and "compile (" not in " ".join(loose["step_modes"])
    # the tight budget: the Manager recompiled at a smaller activation budget during the untimed setup
    assert tight["setting"]["fraction"] < 1.0 and any(m.startswith("compile (") for m in tight["step_modes"])
    assert tight["step_modes"][-2:] == ["managed", "managed"]  # the timed steps ran at the settled setting
    assert "within each budget" in printed and "memstrata_compile" in printed
