"""plan/tuning.py: the Manager's measured-tuning and budget-watch policies, as pure functions."""

from memstrata.plan.tuning import watch_verdict

KW = dict(predicted_seconds=1.0, budget=1000, plan_budget=1000, minimum_budget=None, recalibrated=False,
          corrections=0, max_corrections=2, slack=0.05, recalibrate_above=0.15)


def test_watch_leaves_a_good_step_alone():
    v = watch_verdict(1.1, 1040, **KW)  # 10% slower, 4% over: both within bounds
    assert not v.replan and v.notes == ()


def test_watch_retimes_a_slow_or_fast_trace_once():
    v = watch_verdict(0.5, 900, **KW)
    assert v.time_scale == 0.5 and v.target == 1000 and "re-timed" in v.notes[0]
    assert not watch_verdict(0.5, 900, **{**KW, "recalibrated": True}).replan


def test_watch_retimes_only_what_is_left_of_the_runtimes_own_time():
    """[Note: the runtime's own time]: 0.2 s of each step is the runtime's; the ops are scaled by 1.0 / 0.8."""
    v = watch_verdict(1.2, 900, **{**KW, "overhead_seconds": 0.2})
    assert v.replan and abs(v.time_scale - 1.25) < 1e-12
    assert watch_verdict(1.2, 900, **{**KW, "overhead_seconds": 5.0}).time_scale == 1.2  # nonsense: ignored


def test_watch_corrects_an_overshoot_but_not_below_the_minimum():
    v = watch_verdict(1.0, 1100, **KW)
    assert v.target == int(1000 - 100 - 20) and v.time_scale is None
    v = watch_verdict(1.0, 1500, **{**KW, "minimum_budget": 800})
    assert v.target == 800  # would be 480: the minimum instead
    v = watch_verdict(1.0, 1500, **{**KW, "minimum_budget": 1000})
    assert v.stop and not v.replan and "most frugal" in v.notes[0]
    assert not watch_verdict(1.0, 1500, **{**KW, "corrections": 2}).replan
