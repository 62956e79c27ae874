"""Simulator semantics: exact numbers on hand-built traces, invariants on random ones."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstrata.hardware import GB, Hierarchy, Tier, profile
from memstrata.decisions import Plan, StorageDecision, UnitDecision
from memstrata.simulate import InfeasiblePlanError, Timeline, simulate
from memstrata.trace.schema import Trace

from tracegen import Builder, random_trace, resnet_like, small_hierarchy

MB = 1_000_000


def hier(bw: float = 1 * GB, dram_cap: int = 1 << 40, nvme_bw: float | None = None) -> Hierarchy:
    tiers = [Tier("hbm", "hbm", capacity=1 << 40),
             Tier("dram", "pinned_dram", capacity=dram_cap, read_bandwidth=bw, write_bandwidth=bw)]
    if nvme_bw is not None:
        tiers.append(Tier("nvme", "nvme", capacity=1 << 40, read_bandwidth=nvme_bw, write_bandwidth=nvme_bw))
    return Hierarchy("t", "cuda", tuple(tiers), peak_flops=1e12, fast_bandwidth=1e11)


def toy() -> Trace:
    """6 forward ops (two units of 2 ops + 2 ops), 1 loss, 6 backward ops; every op takes 1 ms.

    storages: 0 input (saved by op 0); 1 = op0 out (saved, read back at 11); 2 = op1 out (saved, read at 10,
    it is unit 0's output, saved by op 2 outside the unit); 3 = op2 out (saved inside unit 1 only, read at 9);
    4 = op3 out (unit 1 output); 5 = op4 out; 6 = loss; temporaries for gradients.
    """
    b = Builder()
    x = b.storage(1 * MB, "input")
    b.begin_unit("u0", (x,))
    i0, (a1,) = b.op("aten.convolution.default", (x,), [(10 * MB, "activation")], duration=1e-3); b.save(x)
    i1, (a2,) = b.op("aten.relu.default", (a1,), [(10 * MB, "activation")], duration=1e-3); b.save(a1)
    b.end_unit()
    b.begin_unit("u1", (a2,))
    i2, (a3,) = b.op("aten.convolution.default", (a2,), [(20 * MB, "activation")], duration=1e-3); b.save(a2)
    i3, (a4,) = b.op("aten.gelu.default", (a3,), [(5 * MB, "activation")], duration=1e-3); b.save(a3)
    b.end_unit()
    i4, (a5,) = b.op("aten.mm.default", (a4,), [(1 * MB, "activation")], duration=1e-3); b.save(a4)
    i5, (loss,) = b.op("aten.sum.default", (a5,), [(4, "activation")], duration=1e-3)
    b.phase = "backward"
    j6, (g6,) = b.op("aten.ones_like.default", (loss,), [(1 * MB, "temporary")], duration=1e-3)
    j7, (g7,) = b.op("aten.mm_backward.default", (g6, a4), [(5 * MB, "temporary")], duration=1e-3)
    j8, (g8,) = b.op("aten.gelu_backward.default", (g7, a3), [(20 * MB, "temporary")], duration=1e-3)
    b.units[1]["bwd_ops"] = [j7, j8]
    j9, (g9,) = b.op("aten.convolution_backward.default", (g8, a2), [(10 * MB, "temporary")], duration=1e-3)
    j10, (g10,) = b.op("aten.relu_backward.default", (g9, a1), [(10 * MB, "temporary")], duration=1e-3)
    j11, (g11,) = b.op("aten.convolution_backward.default", (g10, x), [(1 * MB, "temporary")], duration=1e-3)
    b.units[0]["bwd_ops"] = [j10, j11]
    return b.build()


def flat(pairs) -> list[float]:
    return [float(v) for p in pairs for v in p]


def keep(trace: Trace, budget: int | None = None) -> Plan:
    return Plan("test", "t", budget if budget is not None else trace.observed_peak)


def test_toy_shapes():
    tr = toy()
    assert [s.backward_reads for s in tr.storages[:6]] == [(11,), (10,), (9,), (8,), (7,), ()]
    assert tr.units[1].first_backward_op == 7 and tr.units[0].first_backward_op == 10


def test_all_keep_matches_trace_exactly():
    tr = toy()
    tl = simulate(tr, keep(tr), hier())
    assert tl.peaks["hbm"] == tr.observed_peak
    assert tl.step_time == tr.step_time
    assert tl.stall_time == 0 and tl.recompute_time == 0 and tl.traffic == 0
    assert isinstance(tl, Timeline)
    assert list(tl.event_start) == pytest.approx([i * 1e-3 for i in range(len(tr.ops))])


def test_offload_timing_and_occupancy():
    """Offload storage 1 (10 MB) at 1 GB/s: 10 ms down after op 1, prefetch at event 6, needed at 10."""
    tr = toy()
    h = hier(bw=1 * GB)
    d = StorageDecision(1, "offload", "dram", evict_after=1, prefetch_at=6)
    tl = simulate(tr, Plan("t", "t", tr.observed_peak, storages=(d,)), h)
    # down: enqueued at end of op 1 (2 ms), lands at 12 ms; up: starts at max(6 ms, 12 ms), lands at 22 ms;
    # op 10 would start at 10 ms: it stalls 12 ms
    assert flat(tl.busy["dram:write"]) == pytest.approx([2e-3, 12e-3])
    assert flat(tl.busy["dram:read"]) == pytest.approx([12e-3, 22e-3])
    assert flat(tl.stalls) == pytest.approx([10, 12e-3])
    assert tl.step_time == pytest.approx(tr.step_time + 12e-3)
    assert tl.bytes_moved == {"dram:read": 10 * MB, "dram:write": 10 * MB}
    # the down-copy lands during event... 12 ms is the start of event... events 0..9 run 0..10 ms: never freed
    # before the prefetch starts at event 6, so tier 0 is unchanged
    base = simulate(tr, keep(tr), h).occupancy["hbm"][1]
    assert np.array_equal(tl.occupancy["hbm"][1], base)
    # with a fast link the copy lands during event 2 (2.1 ms): storage 1 is gone from tier 0 in events 3..5
    tl2 = simulate(tr, Plan("t", "t", tr.observed_peak, storages=(d,)), hier(bw=100 * GB))
    diff = base - tl2.occupancy["hbm"][1]
    assert [int(x) for x in diff] == [0, 0, 0, 10 * MB, 10 * MB, 10 * MB] + [0] * (len(tr.ops) - 6)
    assert tl2.stall_time == 0
    dram = tl2.occupancy["dram"][1]
    assert dram[1] == 0 and dram[2] == 10 * MB and dram[6] == 10 * MB and dram[7] == 0


def test_nvme_staging_goes_through_dram():
    tr = toy()
    h = hier(bw=100 * GB, nvme_bw=10 * GB)
    d = StorageDecision(1, "offload", "nvme", evict_after=1, prefetch_at=6)
    tl = simulate(tr, Plan("t", "t", tr.observed_peak, storages=(d,)), h)
    assert set(tl.bytes_moved) == {"dram:write", "nvme:write", "dram:read", "nvme:read"}
    assert all(v == 10 * MB for v in tl.bytes_moved.values())
    (dw,), (nw,) = tl.busy["dram:write"], tl.busy["nvme:write"]
    assert nw[0] == pytest.approx(dw[1])  # hop 2 starts when hop 1 lands
    (nr,), (dr,) = tl.busy["nvme:read"], tl.busy["dram:read"]
    assert dr[0] == pytest.approx(nr[1])
    assert tl.peaks["nvme"] == 10 * MB and tl.peaks["dram"] == 10 * MB  # staging copy in dram


def test_recompute_drops_and_rematerializes():
    tr = toy()
    h = hier()
    base = simulate(tr, keep(tr), h)
    tl = simulate(tr, Plan("t", "t", tr.observed_peak, units=(UnitDecision(1),)), h)
    # unit 1 = ops 2..3; storage 3 (20 MB, saved inside only) is dropped after op 3 and back at fb=7;
    # storage 4 (unit output, saved by op 4 outside) is kept; recompute time = 2 ms inserted before op 7
    assert tl.recompute_time == pytest.approx(2e-3)
    assert tl.recomputes == ((1, 7, pytest.approx(2e-3)),)
    assert tl.step_time == pytest.approx(tr.step_time + 2e-3)
    diff = base.occupancy["hbm"][1] - tl.occupancy["hbm"][1]
    assert [int(x) for x in diff[4:7]] == [20 * MB] * 3
    assert diff[3] == 0
    # at fb the re-run's transient (its non-dropped output, 5 MB) is counted
    assert diff[7] == -5 * MB
    assert tl.event_start[8] == pytest.approx(10e-3)


def test_selective_recompute_keeps_saved_op_outputs():
    tr = toy()
    tl = simulate(tr, Plan("t", "t", tr.observed_peak, units=(UnitDecision(1, save_ops=(2,)),)), hier())
    assert tl.recompute_time == pytest.approx(1e-3)  # only op 3 re-runs; storage 3 (op 2's output) is kept
    assert tl.peaks["hbm"] >= simulate(tr, keep(tr), hier()).peaks["hbm"] - 0  # nothing dropped


def test_selective_holds_cached_outputs_the_unmanaged_step_did_not_save():
    """SAC keeps a save op's output until the unit's re-run even when nothing saved it (a linear feeding an add)."""
    b = Builder()
    x = b.storage(MB, "input")
    b.begin_unit("u", (x,))
    i0, (h,) = b.op("aten.addmm.default", (x,), [(8 * MB, "activation")], duration=1e-3); b.save(x)
    i1, (y,) = b.op("aten.add.Tensor", (h, x), [(MB, "activation")], duration=1e-3)  # saves nothing
    b.end_unit()
    _, (z,) = b.op("aten.relu.default", (y,), [(MB, "activation")], duration=1e-3); b.save(z)
    _, (loss,) = b.op("aten.sum.default", (z,), [(4, "activation")], duration=1e-3)
    b.phase = "backward"
    jr, (gz,) = b.op("aten.threshold_backward.default", (loss, z), [(MB, "temporary")], duration=1e-3)
    j, _ = b.op("aten.addmm_backward.default", (gz, x), [(MB, "temporary")], duration=1e-3)
    b.units[0]["bwd_ops"] = [j]
    tr = b.build()
    assert not tr.storages[h].saved
    plain = simulate(tr, Plan("t", "t", 1 << 40, units=(UnitDecision(0),)), hier())
    sel = simulate(tr, Plan("t", "t", 1 << 40, units=(UnitDecision(0, save_ops=(i0,)),)), hier())
    occ_plain, occ_sel = plain.occupancy["hbm"][1], sel.occupancy["hbm"][1]
    # from the add to the unit's first backward op, the cached 8 MB output is held; full recompute holds nothing
    for ev in range(i1 + 1, j):
        assert occ_sel[ev] - occ_plain[ev] == 8 * MB, ev


def test_recompute_extends_inputs():
    """A unit's inputs live until its first backward op even if eager freed them earlier."""
    b = Builder()
    x = b.storage(MB, "input")
    b.begin_unit("u", (x,))
    _, (y,) = b.op("aten.relu.default", (x,), [(MB, "activation")], duration=1e-3); b.save(y)
    b.end_unit()
    _, (z,) = b.op("aten.sum.default", (y,), [(4, "activation")], duration=1e-3)
    b.phase = "backward"
    j, _ = b.op("aten.threshold_backward.default", (z, y), [(MB, "temporary")], duration=1e-3)
    b.units[0]["bwd_ops"] = [j]
    tr = b.build()
    assert tr.storages[0].freed_after == 0
    tl = simulate(tr, Plan("t", "t", 1 << 40, units=(UnitDecision(0),)), hier())
    occ = tl.occupancy["hbm"][1]
    assert occ[1] >= MB  # x still held at event 1


def test_offload_inside_recomputed_unit_rejected():
    tr = toy()
    p = Plan("t", "t", tr.observed_peak, storages=(StorageDecision(3, "offload", "dram", 2, 6),),
             units=(UnitDecision(1),))
    with pytest.raises(ValueError, match="recomputed unit"):
        simulate(tr, p, hier())


@pytest.mark.parametrize("d, match", [
    (StorageDecision(1, "offload", "dram", 1, 11), "prefetch_at"),  # past the need (10)
    (StorageDecision(8, "offload", "dram", 6, 7), "saved activations"),
    (StorageDecision(1, "offload", "hbm", 1, 6), "lower tier"),
    (StorageDecision(1, "offload", "ssd", 1, 6), "lower tier"),
])
def test_malformed_plans(d, match):
    tr = toy()
    with pytest.raises(ValueError, match=match):
        simulate(tr, Plan("t", "t", tr.observed_peak, storages=(d,)), hier())


def test_infeasible_plan_error_names_event_and_storages():
    tr = toy()
    budget = tr.observed_peak - 1
    with pytest.raises(InfeasiblePlanError) as ei:
        simulate(tr, keep(tr, budget), hier())
    e = ei.value
    occ = simulate(tr, keep(tr), hier()).occupancy["hbm"][1]
    first = int(np.nonzero(occ > budget)[0][0])
    assert e.event == first and e.tier == "hbm" and e.op == tr.ops[first].name
    assert e.occupancy == tr.observed_peak and e.capacity == budget
    assert f"event {first}" in str(e) and tr.ops[first].name in str(e) and "storage" in str(e)
    assert e.live and e.live[0][1] == max(s.nbytes for s in tr.storages
                                           if (s.producer or 0) <= first <= (s.freed_after if s.freed_after is not None else 99))
    tl = simulate(tr, keep(tr, budget), hier(), check=False)
    assert not tl.feasible and tl.overflow[0][:2] == ("hbm", first)


def test_lower_tier_capacity_is_checked():
    tr = toy()
    d = StorageDecision(1, "offload", "dram", evict_after=1, prefetch_at=6)
    with pytest.raises(InfeasiblePlanError, match="dram"):
        simulate(tr, Plan("t", "t", tr.observed_peak, storages=(d,)), hier(dram_cap=MB))


def test_timeline_busy_and_json_free():
    tr = toy()
    d = StorageDecision(1, "offload", "dram", evict_after=1, prefetch_at=6)
    tl = simulate(tr, Plan("t", "t", tr.observed_peak, storages=(d,)), hier())
    busy = sum(b - a for a, b in tl.busy["compute"])
    assert busy == pytest.approx(tl.step_time - tl.stall_time)
    assert "step" in tl.summary()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_all_keep_exact_on_random_traces(seed):
    rng = random.Random(seed)
    tr = random_trace(rng, filler=rng.choice([0, 2]))
    h = small_hierarchy(rng)
    tl = simulate(tr, keep(tr), h)
    assert tl.peaks["hbm"] == tr.observed_peak
    assert tl.step_time == tr.step_time


def test_resnet_like_all_keep_and_speed():
    h = profile("h200")
    tr = resnet_like(256, hierarchy=h)
    assert len(tr.ops) > 2500 and len(tr.storages) > 1500
    tl = simulate(tr, keep(tr), h)
    assert tl.peaks["hbm"] == tr.observed_peak and tl.step_time == tr.step_time
    from memstrata.plan import plan

    p = plan(tr, h, tr.observed_peak * 6 // 10, planner="greedy")
    t0 = time.perf_counter()
    for _ in range(5):
        tl = simulate(tr, p, h)
    dt = (time.perf_counter() - t0) / 5
    assert dt < 0.1, dt
    assert tl.peaks["hbm"] <= p.budget
