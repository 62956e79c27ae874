"""Planners: feasibility, quality against the exact planner, budgets, scaling."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstrata.hardware import profile
from memstrata.plan import InfeasibleBudgetError, Plan, minimum_budget, plan
from memstrata.simulate import simulate

from tracegen import random_trace, resnet_like, small_hierarchy

FRACTIONS = (0.0, 0.05, 0.2, 0.5, 0.9)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def case(seed: int, frac: float, roomy: bool = False):
    rng = random.Random(seed)
    tr = random_trace(rng)
    h = small_hierarchy(rng, roomy=roomy)
    m = minimum_budget(tr, h)
    return tr, h, m, int(m + frac * (tr.observed_peak - m))


def check_plan(tr, h, p: Plan) -> None:
    tl = simulate(tr, p, h)  # raises InfeasiblePlanError if any tier overflows
    assert tl.peaks["hbm"] <= p.budget
    assert tl.step_time == pytest.approx(p.predicted_step_time, rel=1e-12)
    assert dict(p.predicted_peaks) == dict(tl.peaks)
    assert tl.step_time >= tr.step_time - 1e-15


@SETTINGS
@given(st.integers(0, 10**9), st.sampled_from(FRACTIONS), st.sampled_from(["greedy", "milp", "auto"]))
def test_every_plan_fits(seed, frac, planner):
    tr, h, m, budget = case(seed, frac)
    p = plan(tr, h, budget, planner=planner)
    check_plan(tr, h, p)
    assert Plan.from_json(p.to_json()) == p


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9), st.sampled_from(FRACTIONS))
def test_greedy_within_5_percent_of_exact(seed, frac):
    """Lower tiers with room for the activations (the realistic case: host RAM / NVMe >> one activation)."""
    tr, h, m, budget = case(seed, frac, roomy=True)
    g = plan(tr, h, budget, planner="greedy")
    x = plan(tr, h, budget, planner="milp")
    check_plan(tr, h, g)
    check_plan(tr, h, x)
    assert g.predicted_step_time <= 1.05 * x.predicted_step_time


@SETTINGS
@given(st.integers(0, 10**9), st.sampled_from(FRACTIONS))
def test_greedy_near_exact_with_cramped_lower_tiers(seed, frac):
    """A dram tier that holds one or two activations must be time-shared (and staged through for nvme);
    greedy has no look-ahead for that packing; in a sweep of 900 cases the worst was 3.4% off the exact
    plan (before the clean-up swaps, up to ~15%).  Bound the damage loosely."""
    tr, h, m, budget = case(seed, frac)
    g = plan(tr, h, budget, planner="greedy")
    x = plan(tr, h, budget, planner="milp")
    check_plan(tr, h, g)
    assert g.predicted_step_time <= 1.20 * x.predicted_step_time


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_minimum_budget_is_tight_for_the_api(seed):
    tr, h, m, _ = case(seed, 0.0)
    assert m <= tr.observed_peak
    with pytest.raises(InfeasibleBudgetError) as ei:
        plan(tr, h, m - 1)
    assert ei.value.minimum_budget == m and ei.value.budget == m - 1
    p = plan(tr, h, ei.value.minimum_budget, planner="greedy")
    check_plan(tr, h, p)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_budget_monotonicity(seed):
    """Exact planner: more budget never predicts a slower step (its feasible set only grows).  Greedy: not
    guaranteed (a heuristic); we check the weaker property that it never needs more than 5% over the exact
    plan of any smaller budget, and that at/above the unmanaged peak it changes nothing."""
    rng = random.Random(seed)
    tr = random_trace(rng)
    h = small_hierarchy(rng, roomy=True)
    m = minimum_budget(tr, h)
    budgets = sorted({int(m + f * (tr.observed_peak - m)) for f in (0.0, 0.1, 0.3, 0.6, 1.0)})
    exact = [plan(tr, h, b, planner="milp").predicted_step_time for b in budgets]
    from memstrata.plan import milp
    from memstrata.trace.index import trace_index

    modes, opts = milp._menu(trace_index(tr), h, (1, 2))
    if milp._menu_size(modes, opts) <= milp.ENUMERATE_MAX:  # enumerated: exact over the menu
        for a, b in zip(exact, exact[1:]):
            assert b <= a * (1 + 1e-9)
    for i, b in enumerate(budgets):
        g = plan(tr, h, b, planner="greedy").predicted_step_time
        assert g <= 1.05 * min(exact[: i + 1])
    top = plan(tr, h, tr.observed_peak, planner="greedy")
    assert top.predicted_step_time == tr.step_time and not top.storages and not top.units


def test_auto_picks_by_size():
    rng = random.Random(3)
    tr = random_trace(rng)
    h = small_hierarchy(rng)
    m = minimum_budget(tr, h)
    assert plan(tr, h, m, planner="auto").planner == "milp"
    big = resnet_like(32, hierarchy=profile("h200"))
    assert plan(big, profile("h200"), big.observed_peak * 3 // 4).planner == "greedy"


def test_tiers_restriction_and_bad_arguments():
    rng = random.Random(5)
    tr = random_trace(rng, units=(3, 4))
    h = small_hierarchy(rng)
    m = minimum_budget(tr, h, tiers=["nvme"])
    p = plan(tr, h, m, planner="greedy", tiers=["nvme"])
    assert all(d.tier == "nvme" for d in p.storages)
    check_plan(tr, h, p)
    with pytest.raises(ValueError, match="planner"):
        plan(tr, h, m, planner="magic")
    with pytest.raises(ValueError, match="tier"):
        plan(tr, h, m, tiers=["hbm"])


def test_resnet50_half_peak_scales():
    """Acceptance shape: ResNet-50-like (b256, 224px, h200 roofline; ~3k ops, ~2k storages) at half the
    unmanaged peak plans in < 5 s (a generous bound; planning time is reported by `memstrata plan`).
    The synthetic blocks have no cheap-to-recompute expansion convs, so the slowdown bound here is looser
    than the 1.15x target, which `test_real_resnet50_half_peak_within_115` pins on the real trace."""
    h = profile("h200")
    tr = resnet_like(256, hierarchy=h)
    t0 = time.perf_counter()
    p = plan(tr, h, tr.observed_peak // 2)
    dt = time.perf_counter() - t0
    assert p.planner == "greedy"
    check_plan(tr, h, p)
    assert dt < 5.0, dt
    assert p.predicted_step_time <= 1.25 * tr.step_time


def _real_resnet50_ratio(dtype: str, fused: bool = False) -> float:
    import torch
    from dataclasses import replace as _replace

    from memstrata.trace import trace_model

    h = profile("h200")
    if fused:
        h = _replace(h, fused_replay=True)
    tr = trace_model("resnet50", 256, 224, "h200", dtype=getattr(torch, dtype))
    p = plan(tr, h, tr.observed_peak // 2, time_limit=30.0)  # plans that the box's load does not change
    check_plan(tr, h, p)
    return p.predicted_step_time / tr.step_time


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_resnet50_half_peak_quality(dtype):
    """The real meta trace of ResNet-50 (batch 256, 224x224, h200) at half its unmanaged peak: the plan
    passes the simulator and predicts at most 1.19x (measured 1.18x on 2026-11-28; a guard against
    regressions, with plans restricted to what selective checkpointing can really keep)."""
    assert _real_resnet50_ratio(dtype) <= 1.19


def test_real_resnet50_half_peak_within_115():
    """Issue 2's target (<= 1.15x), eager replays: 1.090x since heavy replays (2026-12-05b; 1.155x before)."""
    assert _real_resnet50_ratio("float32") <= 1.15


@pytest.mark.slow
def test_real_resnet50_fused_replay_within_110():
    """Issue 10's h200 target: with a fused replay priced, <= 1.10x (1.066x since shared and heavy replays,
    [Note: heavy replays] in trace/space.py; 1.116x before)."""
    assert _real_resnet50_ratio("float32", fused=True) <= 1.10


def test_prefetch_scheduling_drops_offloads_nothing_reads_later():
    """A move can take away an offload's only later reader (the recompute of a unit it stopped
    recomputing); rescheduling must drop that offload (keeping is exact), not fail."""
    from memstrata.plan.greedy import State, schedule_prefetches
    from memstrata.simulate import run
    from memstrata.trace.index import TraceIndex
    from memstrata.trace.space import decision_space

    tr, h, _, budget = case(3, 0.5, roomy=True)
    ix = TraceIndex(tr)
    space = decision_space(tr)
    sids = [s for s in range(len(tr.storages)) if space.offloadable[s] and len(ix.accesses[s]) >= 2]
    assert len(sids) >= 2
    dead, live = sids[0], sids[1]
    st_ = State()
    st_.offloads[dead] = (1, int(ix.accesses[dead][-1]), int(ix.accesses[dead][-1]))  # no reader after eviction
    st_.offloads[live] = (1, int(ix.accesses[live][0]), int(ix.accesses[live][1]))
    res = run(ix, h, budget, {live: st_.offloads[live]}, {})
    schedule_prefetches(ix, h, st_, res)
    assert dead not in st_.offloads
    ti, ev, pf = st_.offloads[live]
    assert ev < pf <= int(ix.accesses[live][1])


@pytest.mark.parametrize("planner", ["greedy", "milp"])
def test_plan_does_not_depend_on_the_clock(monkeypatch, planner):
    """[Note: deterministic planning] in plan/greedy.py: the search stops at counts of simulations, not at
    wall-clock deadlines, so a loaded box (here: a clock that runs 1000x fast) gets the very same plan for the
    same trace and budget (Swin-T at 50% on the shared box: 18 NVMe offloads and 41 replays quiet, 58 offloads
    and 5 units when the deadlines cut the search)."""
    rng = random.Random(2)
    tr = random_trace(rng, units=(10, 12), layers=(2, 3))
    h = small_hierarchy(rng, roomy=True)
    m = minimum_budget(tr, h)
    budget = int(m + 0.5 * (tr.observed_peak - m))
    quiet = plan(tr, h, budget, planner=planner)
    assert quiet.storages or quiet.units or quiet.replays
    real = time.perf_counter
    t0 = real()
    monkeypatch.setattr(time, "perf_counter", lambda: t0 + 1000.0 * (real() - t0))
    loaded = plan(tr, h, budget, planner=planner)
    monkeypatch.undo()
    assert loaded.storages == quiet.storages and loaded.units == quiet.units and loaded.replays == quiet.replays
    assert loaded.predicted_step_time == quiet.predicted_step_time
