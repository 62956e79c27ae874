"""The optimizer-state bench (`memstrata bench --model gpt2-*`) and the arena ring of runtime/state_arenas.py."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from torch import nn

from memstrata.bench import gpt2
from memstrata.bench.harness import BenchInputError, add_bench_arguments, config_from_args
from memstrata.bench.spec import RunSpec
from memstrata.bench.states_contenders import run_states, state_bytes
from memstrata.runtime.states import StatePlacement, TieredOptimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


def test_gpt2_sizes_and_tied_head():
    assert [round(gpt2.param_count(n) / 1e6, 1) for n in ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b")] == [
        124.4, 354.8, 774.0, 1557.6]
    m = gpt2.build("gpt2-tiny")
    assert m.lm_head.weight is m.wte.weight
    assert sum(p.numel() for p in m.parameters()) == gpt2.param_count("gpt2-tiny")


def test_state_bench_options(tmp_path):
    cfg = config_from_args(args("--model", "gpt2-tiny", "--budget", "50%", "--contenders", "memstrata,unmanaged",
                                "--nvme", str(tmp_path), "--device", "cpu"))
    assert cfg.contenders == ["unmanaged", "memstrata"] and cfg.budget_bytes == state_bytes("gpt2-tiny") // 2
    assert cfg.seq == 128 and cfg.batch == 1  # the CPU default (256 tokens) within gpt2-tiny's context (128)
    assert config_from_args(args("--model", "gpt2-124m", "--budget", "50%", "--contenders", "unmanaged",
                                 "--device", "cpu")).seq == 256
    assert cfg.nvme_bw is None or min(cfg.nvme_bw) > 0  # probed (cached) for the planner
    assert config_from_args(args("--model", "gpt2-tiny", "--budget", "2MiB", "--contenders", "unmanaged",
                                 "--device", "cpu")).budget_bytes == 2 << 20
    for bad, msg in ((["--contenders", "checkpoint"], "unknown contender 'checkpoint'"),
                     (["--budget", "150%"], "must be in"), (["--seq", "4096"], "exceeds the context")):
        with pytest.raises(BenchInputError, match=msg):
            config_from_args(args("--model", "gpt2-tiny", "--device", "cpu", *bad))


def spec(name: str, tmp_path, budget: int) -> RunSpec:
    return RunSpec(contender=name, model="gpt2-tiny", batch=2, res=0, device="cpu", steps=2, warmup=1,
                   budget_bytes=budget, nvme_dir=str(tmp_path), seq=16, nvme_read_bw=1e9, nvme_write_bw=1e9)


def test_state_bench_worker_memstrata_is_exact_and_within_budget(tmp_path):
    budget = int(state_bytes("gpt2-tiny") * 0.75)
    ref = run_states(spec("unmanaged", tmp_path, budget))
    got = run_states(spec("memstrata", tmp_path, budget))
    assert ref["status"] == got["status"] == "ok", (ref.get("reason"), got.get("reason"))
    assert got["losses"] == ref["losses"] and len(got["losses"]) == 3  # bitwise, step for step
    assert ref["state_peak_bytes"] == state_bytes("gpt2-tiny")  # AdamW: 8 bytes per parameter
    assert got["state_peak_bytes"] <= budget
    n = got["notes"]
    assert "NVMe" in n["plan"] and n["nvme_bytes_per_step"] > 0 and n["arena_bytes"] > 0
    # what the README's floor is computed from: per timed step, the step's own compute, the disk's busy time
    med = n["timed_step_medians"]
    assert 0 < med["compute_s"] <= med["opt_step_s"] and med["disk_busy_s"] > 0
    assert med["bytes_read"] > 0 and med["bytes_written"] > 0 and n["ring"] >= 3
    assert n["measured_stall_s"] == pytest.approx(med["opt_step_s"] - med["compute_s"])
    assert n["planned_step_compute_s"] > 0 and n["predicted_stall_s"] >= 0
    assert os.listdir(tmp_path) == []  # the store is gone with the run
    for r in (ref, got):  # [Note: steal while the disk is busy]: recorded for every arm (None off Linux)
        assert r["steal_share"] is None or 0.0 <= r["steal_share"] <= 1.0


def test_state_bench_bf16_master_weights_worker_is_exact_and_within_budget(tmp_path):
    """--precision bf16: bf16 parameters, MasterWeights (fp32 masters + moments: 12 bytes per parameter) on both
    arms; memstrata's plan counts the masters and tiers them with the moments, losses bitwise equal."""
    cfg = config_from_args(args("--model", "gpt2-tiny", "--budget", "50%", "--precision", "bf16", "--device", "cpu",
                                "--nvme", str(tmp_path)))
    assert cfg.precision == "bf16" and cfg.contenders == ["unmanaged", "memstrata", "memstrata_lowpeak",
                                                          "memstrata_lowpeak_grads"]
    assert cfg.budget_bytes == state_bytes("gpt2-tiny", "bf16") // 2 == 12 * gpt2.param_count("gpt2-tiny") // 2
    with pytest.raises(BenchInputError, match="--precision"):
        config_from_args(args("--model", "gpt2-tiny", "--precision", "fp8", "--device", "cpu"))
    budget = int(state_bytes("gpt2-tiny", "bf16") * 0.75)
    specs = [spec(n, tmp_path, budget) for n in ("unmanaged", "memstrata", "fsdp2_cpu_offload", "memstrata_lowpeak")]
    for s in specs:
        s.precision = "bf16"
    ref, got, peer, low = (run_states(s) for s in specs)
    assert ref["status"] == got["status"] == low["status"] == "ok", (ref.get("reason"), got.get("reason"))
    assert peer["status"] == "skipped" and "--precision bf16" in peer["reason"]
    assert got["losses"] == ref["losses"] == low["losses"] and len(got["losses"]) == 3  # bitwise, step for step
    assert ref["state_peak_bytes"] == state_bytes("gpt2-tiny", "bf16") == ref["state_bytes_total"]
    assert got["state_peak_bytes"] <= budget and got["notes"]["nvme_bytes_per_step"] > 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["memstrata_lowpeak", "memstrata_lowpeak_grads"])
def test_state_bench_worker_lowpeak_is_exact_with_a_window_of_buckets(name, tmp_path):
    """[Note: the low-peak arm]: every bucket below (NVMe files on a CPU), deferred: losses equal unmanaged's bit
    for bit, the state peak a window of buckets whatever the budget; memstrata_lowpeak_grads sends the gradients
    below too (stepped inside step(), no deferral; on a CPU the same kernels: still exact)."""
    total = state_bytes("gpt2-tiny")
    ref = run_states(spec("unmanaged", tmp_path, total))
    got = run_states(spec(name, tmp_path, total))
    assert ref["status"] == got["status"] == "ok", (ref.get("reason"), got.get("reason"))
    assert got["losses"] == ref["losses"] and len(got["losses"]) == 3
    largest = max(p.numel() for p in gpt2.build("gpt2-tiny", torch.device("cpu")).parameters()) * 8
    assert largest < total // 4 and 0 < got["state_peak_bytes"] <= 3 * largest  # the ring: 3 arenas, the
    # largest bucket (the tied embedding's states) each, of 32 buckets
    n = got["notes"]
    assert "every bucket" in n["plan"] and n["nvme_bytes_per_step"] > 0 and n["deferred"] == (name == "memstrata_lowpeak")
    assert os.listdir(tmp_path) == []


def test_steal_share_from_two_readings():
    from memstrata.bench.states_contenders import cpu_steal_jiffies, steal_share

    assert steal_share((10, 1000), (40, 1100)) == pytest.approx(0.3)
    assert steal_share(None, (40, 1100)) is None and steal_share((10, 1000), (10, 1000)) is None
    now = cpu_steal_jiffies()
    assert now is None or 0 <= now[0] <= now[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_state_bench_worker_memstrata_is_exact_and_within_budget(tmp_path):
    """[Note: the state bench on CUDA]: the bench's own arms (model built on the GPU, fused AdamW, host buckets
    streamed through HBM): memstrata's losses equal unmanaged's bit for bit, its states on HBM within budget."""
    import dataclasses

    budget = int(state_bytes("gpt2-tiny") * 0.75)
    ref = run_states(dataclasses.replace(spec("unmanaged", tmp_path, budget), device="cuda"))
    got = run_states(dataclasses.replace(spec("memstrata", tmp_path, budget), device="cuda"))
    assert ref["status"] == got["status"] == "ok", (ref.get("reason"), got.get("reason"))
    assert got["losses"] == ref["losses"] and len(got["losses"]) == 3
    assert 0 < got["state_peak_bytes"] <= budget < ref["state_peak_bytes"]
    assert got["notes"]["nvme_bytes_per_step"] > 0 and got["notes"]["arena_bytes"] == 0  # host buffers, no ring


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_state_bench_worker_lowpeak_is_exact_on_a_window_of_host_buckets(tmp_path):
    """[Note: the low-peak arm] on CUDA: every bucket in pinned host RAM, deferred to the forward; losses equal
    unmanaged's bit for bit; at most a few buckets' states on HBM."""
    import dataclasses

    total = state_bytes("gpt2-tiny")
    ref = run_states(dataclasses.replace(spec("unmanaged", tmp_path, total), device="cuda"))
    got = run_states(dataclasses.replace(spec("memstrata_lowpeak", tmp_path, total), device="cuda"))
    assert ref["status"] == got["status"] == "ok", (ref.get("reason"), got.get("reason"))
    assert got["losses"] == ref["losses"] and len(got["losses"]) == 3
    largest = max(p.numel() for p in gpt2.build("gpt2-tiny", torch.device("cpu")).parameters()) * 8
    assert 0 < got["state_peak_bytes"] <= 4 * largest < total  # the bucket applied + 3 read ahead, none larger
    assert "host RAM" in got["notes"]["plan"] and got["notes"]["arena_bytes"] == 0


def test_state_bench_peer_that_cannot_run_says_why(tmp_path):
    r = run_states(spec("torchao_cpu_offload", tmp_path, 1 << 20))
    from memstrata.bench.states_contenders import states_skip_reason

    why = states_skip_reason("torchao_cpu_offload", "cpu")
    if why:  # torchao missing: the harness never starts the worker
        assert why.startswith("not installed")
    else:
        assert r["status"] == "skipped" and r["reason"].startswith("needs CUDA"), r


def test_deepspeed_is_not_started_on_a_cpu_box():
    """DeepSpeed does not refuse a CPU box: it JIT-builds its CPU ops for minutes (a run-timeout, not a row)."""
    from memstrata.bench.states_contenders import states_skip_reason
    from memstrata.bench.states_prebuild import start_peer_builds

    why = states_skip_reason("deepspeed_zero_offload", "cpu")
    assert why.startswith("not installed") or why.startswith("needs CUDA"), why
    assert start_peer_builds(["deepspeed_zero_offload"], "cpu", "/nonexistent", 75.0) is None


def test_deepspeed_worker_waits_for_the_background_build(tmp_path, monkeypatch):
    """[Note: the DeepSpeed build]: the worker reads the build's status file; a failed or unfinished build is a
    one-line reason (a skipped row), never a hang; no background build: DeepSpeed builds it itself."""
    from memstrata.bench import states_prebuild as sp

    status = tmp_path / "status.json"
    monkeypatch.delenv(sp.STATUS_ENV, raising=False)
    assert sp.wait_for_build() is None
    monkeypatch.setenv(sp.STATUS_ENV, str(status))
    monkeypatch.setenv(sp.WAIT_ENV, "0.2")
    assert "not built after" in sp.wait_for_build(poll_s=0.05)
    status.write_text(json.dumps({"status": "failed", "reason": "CalledProcessError: ninja", "seconds": 3.0}))
    assert sp.wait_for_build().startswith("DeepSpeed's CPU Adam JIT build failed after 3.0 s: CalledProcessError")
    status.write_text(json.dumps({"status": "failed", "reason": "not installed: No module named 'hjson'"}))
    assert sp.wait_for_build() == "not installed: No module named 'hjson'"
    status.write_text(json.dumps({"status": "ok", "reason": "", "seconds": 50.0}))
    assert sp.wait_for_build() is None


def test_deepspeed_background_build_reports_a_missing_package(tmp_path, monkeypatch):
    """The build process itself: without deepspeed importable its status says so (and the process exits)."""
    from memstrata.bench import states_prebuild as sp

    def missing():
        raise ModuleNotFoundError("No module named 'deepspeed'")

    monkeypatch.setattr(sp, "build_deepspeed_cpu_adam", missing)
    status = tmp_path / "s.json"
    assert sp.main(["--status", str(status)]) == 1
    got = json.loads(status.read_text())
    assert got["status"] == "failed" and got["reason"].startswith("not installed: ModuleNotFoundError")


def test_gpt2_built_on_a_device_and_states_counted_on_the_fast_tier_only():
    """[Note: building on the device]: the parameters are made where asked (meta here: no CUDA on this box), the
    CPU build is unchanged; a state on another kind of memory is not on the fast tier."""
    from memstrata.bench.states_contenders import on_device_state_bytes

    m = gpt2.build("gpt2-tiny", "meta")
    assert {p.device.type for p in m.parameters()} == {"meta"} and m.lm_head.weight is m.wte.weight
    torch.manual_seed(0)
    a = gpt2.build("gpt2-tiny")
    torch.manual_seed(0)
    b = gpt2.build("gpt2-tiny", "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    states = [{"step": torch.tensor(1.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4, device="meta")}]
    assert on_device_state_bytes(states, torch.device("cpu")) == 16
    assert on_device_state_bytes(states, torch.device("meta")) == 16


@pytest.mark.slow
def test_state_bench_end_to_end_json(tmp_path):
    from memstrata.bench.harness import main

    out = tmp_path / "out.json"
    nv = tmp_path / "nvme"
    nv.mkdir()
    rc = main(["--model", "gpt2-tiny", "--budget", "75%", "--contenders", "unmanaged,memstrata,fsdp2_cpu_offload",
               "--repeats", "1", "--steps", "1", "--warmup", "1", "--device", "cpu", "--nvme", str(nv),
               "--json", str(out), "--quiet"])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["memstrata"]["within_budget"] is True and rows["memstrata"]["losses_match_unmanaged"] is True
    assert rows["unmanaged"]["within_budget"] is False
    assert rows["fsdp2_cpu_offload"]["status"] == "ok"


# ---------------------------------------------------------------------------------------------- the arena ring
def test_arena_ring_one_file_per_bucket_hot_buckets_not_reread(tmp_path):
    """NVMe buckets: depth + 2 arenas, one file per bucket (overwritten in place), and the buckets still in
    arenas at the end of a step are stepped first next time, from memory (the order reverses each step)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(6)])
    ref = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(6)])
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                          StatePlacement(tuple((i,) for i in range(6)), ("nvme",) * 6), nvme_dir=tmp_path)
    bucket = 2 * 64 * 64 * 4
    for s in range(4):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(s))
        for m, o in ((ref, ref_opt), (model, opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
        assert len(opt.mover.store.files()) == 6  # one per bucket, no new file per step
    opt.flush()  # the last writes are counted once they landed
    assert len(opt._ring.arenas) == 3 and opt.stats.arena_bytes == 3 * bucket
    assert opt.stats.peak_resident_bytes <= 3 * bucket
    # steps 2-4 each read only the 3 buckets that were not left in arenas by the step before (18 reads if the hot
    # ones were re-read).  A read ahead that finds the least recently used arena's write still in flight takes the
    # next ready arena instead of waiting (`try_acquire`), which can cost a hot bucket one re-read: 10 reads, seen
    # once in a fresh-clone CI run on the loaded box; values are exact either way.
    assert 3 * 3 * bucket <= opt.stats.bytes_read <= (3 * 3 + 2) * bucket, opt.stats.bytes_read // bucket
    assert opt.stats.bytes_written == 4 * 6 * bucket
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    sd, rsd = opt.state_dict(), ref_opt.state_dict()
    for i in rsd["state"]:
        for k, v in rsd["state"][i].items():
            assert torch.equal(v, sd["state"][i][k]), (i, k)
    opt.close()
    assert os.listdir(tmp_path) == []
