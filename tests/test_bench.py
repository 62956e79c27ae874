"""`memstrata bench`: the harness, the peak meter, input errors (CPU, < 60 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from memstrata.bench import harness
from memstrata.bench.peak import PeakMeter

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
REQUIRED = ("name", "status", "reason", "samples_per_s", "peak_bytes", "ratio_to_unmanaged", "repeats", "per_repeat")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_harness_tiny_run_writes_json_list(tmp_path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    rc = harness.main([
        "--model", "resnet18", "--batch", "4", "--res", "32", "--num-classes", "10", "--device", "cpu",
        "--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1", "--quiet",
        "--contenders", "unmanaged,checkpoint,disk_offload_hooks",
        "--json", str(out), "--plot", str(png), "--log-dir", str(tmp_path / "logs"),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    assert [r["name"] for r in rows] == ["unmanaged", "checkpoint", "disk_offload_hooks"]
    for r in rows:
        for k in REQUIRED:
            assert k in r, (r["name"], k)
        assert r["status"] == "ok", (r["name"], r["reason"], open(r["per_repeat"][0].get("log") or os.devnull).read()
                                     if r["per_repeat"] else "")
        assert r["samples_per_s"] > 0 and r["peak_bytes"] > 0 and r["ratio_to_unmanaged"] > 0
        assert r["repeats"] == 1 and len(r["per_repeat"]) == 1
        assert r["per_repeat"][0]["peak_bytes"] > 0
        assert r["budget_bytes"] > 0
        # identical math: the peers' losses equal unmanaged's step for step
        assert r["losses_match_unmanaged"] is True, r["name"]
    assert rows[0]["ratio_to_unmanaged"] == pytest.approx(1.0)
    assert rows[1]["ratio_to_checkpoint"] == pytest.approx(1.0)
    assert png.stat().st_size > 1000
    assert "unmanaged" in printed and "checkpoint" in printed


def test_cpu_peak_sees_a_200mb_allocation():
    meter = PeakMeter(torch.device("cpu"))
    meter.start()
    x = torch.ones(50_000_000)  # 200 MB, every page touched
    del x
    r = meter.stop()
    assert r.method == "VmHWM"
    assert r.peak_bytes >= 190e6, r


def test_cpu_peak_polling_fallback_sees_a_200mb_allocation():
    import time

    meter = PeakMeter(torch.device("cpu"), force_poll=True)
    meter.start()
    x = torch.ones(50_000_000)
    time.sleep(0.05)
    del x
    r = meter.stop()
    assert r.method == "psutil-poll"
    assert r.peak_bytes >= 190e6, r


@pytest.mark.parametrize("argv, needle", [
    (["--model", "resnet9000"], "unknown torchvision classification model"),
    (["--model", "gpt2-9b"], "did you mean gpt2-124m"),  # the state bench's models were not suggested
    (["--budget", "lots"], "malformed budget"),
    (["--budget", "0%"], "budget percentage"),
    (["--budget", "2000%"], "budget percentage"),
    (["--budget"], "expected one argument"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--batch", "ten"], "--batch must be an integer"),
    (["--contenders", "unmanaged,magic"], "unknown contender 'magic'"),
    (["--device", "tpu"], "--device must be"),
    (["--amp", "fp8"], "--amp must be"),
    (["--nvme", "/nonexistent/dir"], "is not an existing directory"),
    (["--batch", "6", "--microbatches", "4"], "does not divide"),
    (["--plot", "chart.svg"], "--plot must name a .png file"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    rc = harness.main(argv + ["--device", "cpu"] if "--device" not in argv else argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0] and lines[0].startswith("memstrata bench: error:"), lines[0]


def test_bad_input_from_the_command_line_has_no_traceback():
    p = subprocess.run([sys.executable, "-m", "memstrata.bench", "--model", "nosuchnet", "--device", "cpu"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_cli_bench_when_registered():
    from memstrata import cli

    if "bench" not in getattr(cli, "SUBCOMMANDS", {}):
        pytest.skip("memstrata bench not registered in cli.py yet")
    p = subprocess.run([sys.executable, "-m", "memstrata.cli", "bench", "--budget", "12 parsecs", "--device", "cpu"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_budget_and_microbatch_sizing():
    assert (harness.parse_budget("50%").kind, harness.parse_budget("50%").value) == ("peak", 0.5)
    assert harness.parse_budget("1GiB").resolve_peaks(0) == 1 << 30
    assert harness.parse_budget("50%act").resolve_peaks(1000, 400) == 800
    # peak 1000 = activations 800 + 2 x params 100; budget 400 -> need 800/k <= 200 -> k = 4 (divides 64)
    assert harness.choose_microbatches(64, 1000, 100, 400) == (4, True)
    assert harness.choose_microbatches(6, 1000, 100, 400) == (3, False)  # 4 does not divide 6; 6 leaves 1 sample
    assert harness.choose_microbatches(12, 1000, 100, 400) == (4, True)
    assert harness.choose_microbatches(12, 1000, 100, 350) == (6, True)
    assert harness.choose_microbatches(64, 1000, 100, 150) == (32, False)


def test_worker_reports_skip_for_save_on_cpu_on_cpu(tmp_path):
    from memstrata.bench.spec import RunSpec

    spec = RunSpec(contender="save_on_cpu", model="resnet18", batch=2, res=32, device="cpu", steps=1, warmup=0,
                   num_classes=10)
    r, _ = harness.run_worker(spec, str(tmp_path), "t", timeout=120)
    assert r["status"] == "skipped" and "CPU" in r["reason"]


def test_plan_check_reports_predicted_and_measured_per_plan(tmp_path):
    """bench/gpu_check.sh's predicted-vs-measured table runs end to end (CPU, tiny model)."""
    from memstrata.bench import plan_check

    out = tmp_path / "pc.json"
    rc = plan_check.main(["--model", "resnet18", "--batch", "4", "--res", "32", "--amp", "off", "--device", "cpu",
                          "--steps", "1", "--candidates", "keep,all-recompute", "--nvme", str(tmp_path),
                          "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["keep", "all-recompute"]
    for r in rows:
        assert r["status"] == "ok" and r["measured_step_s"] > 0 and r["unmanaged_step_s"] > 0 and not r["misaligned"]
    assert rows[0]["recomputed_units"] == 0 and rows[1]["recomputed_units"] > 0
    with pytest.raises(SystemExit):
        plan_check.main(["--candidates", "nonsense"])


def test_memstrata_line_says_plan_prediction_and_tuning():
    from memstrata.bench.report import memstrata_line

    notes = {"plan": {"counts": {"offload:dram": 0, "recompute_units": 9}},
             "last_step": {"seconds": 0.0712, "predicted_seconds": 0.0688},
             "tuning": {"chosen": "recompute-only", "trials": [{"name": "planned"}, {"name": "recompute-only"}]}}
    line = memstrata_line([{"name": "unmanaged", "notes": {}}, {"name": "memstrata", "notes": notes}])
    assert line == ("memstrata: plan recompute_units 9; last step predicted 68.8 ms, measured 71.2 ms; "
                    "tuning tried planned, recompute-only; kept recompute-only")
    assert memstrata_line([{"name": "unmanaged", "notes": {}}]) == ""


def test_memstrata_line_compares_a_given_plan_on_one_basis():
    """A plan made once (plan_once.py) was predicted on the planning run's CPU-scaled trace: the line gives its
    predicted slowdown next to the measured one, not its milliseconds next to this repeat's wall time."""
    from memstrata.bench.report import memstrata_line

    notes = {"plan_source": "given (planned once for every repeat)",
             "plan": {"counts": {"replays": 9}, "notes": ["greedy: 9 replays",
                                                           "predicted step 2430.185 ms vs unmanaged 2201.532 ms "
                                                           "(1.104x); peak 1 <= budget 2"]},
             "last_step": {"seconds": 1.863, "predicted_seconds": 2.6776}}
    rows = [{"name": "unmanaged", "notes": {}, "samples_per_s": 41.69},
            {"name": "memstrata", "notes": notes, "samples_per_s": 33.68}]
    line = memstrata_line(rows)
    assert line == ("memstrata: plan replays 9; the given plan predicted 1.104x the unmanaged step (planning "
                    "trace), measured 1.238x (unmanaged / memstrata samples/s)")
    assert "2677" not in line


def test_memstrata_plans_once_and_every_repeat_runs_that_plan(tmp_path):
    """[Note: one plan for every repeat] (bench/plan_once.py): one untimed planning run per budget, no wall-clock
    limit on its planner, and each memstrata repeat runs the plan it wrote (a given plan: no re-planning), bit-exact."""
    from memstrata.bench import plan_once

    out = tmp_path / "bench.json"
    rc = harness.main([
        "--model", "resnet18", "--batch", "4", "--res", "32", "--num-classes", "10", "--device", "cpu",
        "--steps", "1", "--warmup", "1", "--repeats", "2", "--threads", "1", "--quiet", "--budget", "30%act",
        "--contenders", "unmanaged,memstrata", "--json", str(out), "--log-dir", str(tmp_path / "logs"),
    ])
    assert rc == 0
    row = {r["name"]: r for r in json.loads(out.read_text())}["memstrata"]
    po = row["plan_once"]
    assert po["status"] == "ok" and po["plan"] and po["plan_info"]["plan_time_limit_s"] == plan_once.PLAN_TIME_LIMIT
    assert [r["plan_path"] for r in row["per_repeat"]] == [po["plan_path"]] * 2
    assert row["notes"]["plan_source"] == "given (planned once for every repeat)"
    assert row["notes"]["plan"]["counts"] == plan_once.load_plan(po["plan_path"]).counts()
    assert row["losses_match_unmanaged"] is True
    # a plan file runs as given (another session's plan), and --memstrata-plan each is the old behaviour
    assert harness.config_from_args(_args(["--device", "cpu"])).memstrata_plan == "once"
    assert harness.config_from_args(_args(["--device", "cpu", "--memstrata-plan", po["plan_path"]])).memstrata_plan \
        == po["plan_path"]
    with pytest.raises(harness.BenchInputError):
        harness.config_from_args(_args(["--device", "cpu", "--memstrata-plan", str(tmp_path / "nope.json")]))


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    harness.add_bench_arguments(p)
    return p.parse_args(argv)
