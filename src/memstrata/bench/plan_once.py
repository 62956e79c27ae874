"""The bench's planning run: one memstrata plan per budget, made once and run by every repeat.

[Note: one plan for every repeat]
Before, each memstrata repeat traced and planned in its own worker, so a repeat
measured whatever plan the load of its own trace step produced: on the shared
2-core box a loaded trace step made NVMe offloads look cheap (op times slowed
~9x, the disk not), and repeats of one table ran different plans (9 replays in
one, 5 offloads and 3 units in another, 2026-12-05b-cpu-activations r4/r5).
The Manager's budget watch could also re-time and re-plan inside the timed
steps.  Now (``--memstrata-plan once``, the default on CPU) the harness runs
this planning worker once per budget, untimed, before the first memstrata
repeat, and hands the plan it writes to every repeat, which runs it through
`Manager(planner=<that plan>)` (a given plan: no re-planning, no tuning).  The
planning itself has no wall-clock limit here (`PLAN_TIME_LIMIT`: the greedy's
iteration and round counts end it), so the plan is a function of the trace
alone.  The trace is still one measured step of this process; a plan can also
be given as a file (``--memstrata-plan FILE``, the JSON this run writes), to
run the very same plan in another session.

[Note: planning on a shared box]
The trace's op times are wall times of one step, and on the shared box a
loaded step is slowed several-fold while the disk is not, so a loaded trace
made NVMe copies look cheap (2026-12-05: unmanaged 10 samples/s under load
against 37 quiet; the plan became 7 NVMe offloads and 2 units instead of 9
replays).  With OMP_WAIT_POLICY=PASSIVE a step's process CPU time barely moves
with load (3.1-3.6 s per ResNet-18 step at b64 on 2 threads, loaded or not),
so the planning run scales the trace's op times to its warm-up step's CPU time
per thread when that is shorter than the trace's step (on a quiet box it is
~0.92 of the wall time: the threads' efficiency), and plans that.  What the
repeats then measure is the plan for this box unloaded, whatever the load at
planning time; the scale is in the JSON (`trace_scale_to_cpu`).

Measured fit.  The bench budget counts bytes above the baseline as the bench
measures them; the Manager plans against its trace ([Note: bench budget ->
Manager budget] in contenders.py), whose rule leaves some of the budget unused
(2026-12-05: 198.8-204.2 MiB measured against 219.9 MiB).  On CUDA the Manager
tunes a plan against its measured peak ([Note: measured plan tuning] in
plan/tuning.py); here the bench's own meter does it, once: the planning run
measures plan A's peak with the bench meter (two managed steps, exact host
allocator); if A leaves more than `margin` unused, it plans B on the same trace
with the Manager's budget raised by (unused - margin), runs B in a fresh
Manager, measures it the same way, and keeps B only if B is predicted faster
and its measured peak fits the bench budget.  Every repeat's own peak is
measured and reported as before (the table's "fits" column).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

PLAN_TIME_LIMIT = 600.0  # s: never reached on the bench's models; the greedy's iteration counts end the search
MARGIN_BYTES = 8 << 20  # unused budget kept back when the fit is tuned (the measured peak's spread between runs)
MARGIN_FRACTION = 0.04
METERED_STEPS = 2  # managed steps measured per candidate (the largest peak counts)


def load_plan(path: str):
    """The plan a planning run wrote (`write_plan`), as a `memstrata.decisions.Plan`."""
    from memstrata.decisions import Plan

    with open(path) as f:
        d = json.load(f)
    return Plan.from_dict(d["plan"] if "plan" in d else d)


def write_plan(path: str, plan, info: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"plan": plan.to_dict(), **info}, f, default=str)
    os.replace(tmp, path)


def margin(budget_bytes: int) -> int:
    return max(MARGIN_BYTES, int(MARGIN_FRACTION * budget_bytes))


def _measure(contender, ctx, sync: Callable[[], None], peak_meter: Callable[[], Any],
             clock: dict[str, Any] | None = None) -> dict[str, Any]:
    """Setup steps, then `METERED_STEPS` managed steps each under the bench's peak meter.  `clock` gets the
    first (plain warm-up) step's wall and process CPU seconds before the trace step plans."""
    for i in range(contender.setup_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        contender.step(ctx)
        sync()
        if i == 0 and clock is not None:
            clock.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
    sync()
    peaks = []
    for _ in range(METERED_STEPS):
        meter = peak_meter()
        meter.start()
        contender.step(ctx)
        sync()
        peaks.append(int(meter.stop().peak_bytes))
    mgr = contender._mgr
    report = mgr.report()
    steps = report["steps"]
    shape = next(iter(report["shapes"].values()), {})
    mis = [(s.get("stats") or {}).get("misaligned") for s in steps if (s.get("stats") or {}).get("misaligned")]
    return {"peaks": peaks, "peak_bytes": max(peaks), "misaligned": mis[:3], "plan": mgr.plan,
            "trace": mgr.trace, "manager_budget": shape.get("budget_bytes"),
            "predicted_seconds": mgr.plan.predicted_step_time if mgr.plan else None,
            "counts": mgr.plan.counts() if mgr.plan else None}


def plan_once(ctx, make_contender: Callable[[], Any], sync: Callable[[], None], peak_meter: Callable[[], Any],
              budget_bytes: int, tune_fit: bool = True) -> tuple[Any, dict[str, Any]]:
    """Plan A at the bench's budget rule; B at the measured slack (see the note).  Returns (plan, info)."""
    from memstrata.plan.api import plan as make_plan

    import torch

    from memstrata.trace.calibrate import calibrate_durations

    clock: dict[str, Any] = {}

    def planner(trace, hierarchy, budget):
        # [Note: planning on a shared box]: op times of an unloaded step (process CPU time / threads)
        quiet = clock.get("cpu", 0.0) / max(1, torch.get_num_threads()) if ctx.device.type == "cpu" else None
        trace, k = calibrate_durations(trace, quiet)
        clock.update(trace=trace, scale=k, trace_step_s=trace.step_time)
        return make_plan(trace, hierarchy, budget, time_limit=PLAN_TIME_LIMIT)

    c = make_contender()
    ctx.plan = planner  # a callable planner: the Manager plans through it (no watch, no tuning)
    c.prepare(ctx)
    try:
        a = _measure(c, ctx, sync, peak_meter, clock)
        hierarchy = c._mgr.hierarchy
    finally:
        c.close()
        ctx.plan = None
    cand = [{"name": "A (bench budget rule)", "manager_budget": a["manager_budget"], "peak_bytes": a["peak_bytes"],
             "peaks": a["peaks"], "predicted_seconds": a["predicted_seconds"], "counts": a["counts"],
             "misaligned": a["misaligned"]}]
    chosen, why = a["plan"], "A: the bench budget rule"
    unused = budget_bytes - a["peak_bytes"]
    m = margin(budget_bytes)
    if tune_fit and a["plan"] is not None and a["manager_budget"] and unused > m and not a["misaligned"]:
        target = int(a["manager_budget"]) + unused - m
        try:
            pb = make_plan(clock.get("trace") or a["trace"], hierarchy, target, time_limit=PLAN_TIME_LIMIT)
        except Exception as e:  # noqa: BLE001 -- B is optional
            pb, why = None, f"A (B not planned: {type(e).__name__}: {e})"
        if pb is not None and (pb.predicted_step_time or 0) < (a["predicted_seconds"] or 0) * 0.999:
            c = make_contender()
            ctx.plan = pb
            c.prepare(ctx)
            try:
                b = _measure(c, ctx, sync, peak_meter)
            finally:
                c.close()
                ctx.plan = None
            cand.append({"name": "B (measured slack)", "manager_budget": target, "peak_bytes": b["peak_bytes"],
                         "peaks": b["peaks"], "predicted_seconds": pb.predicted_step_time, "counts": pb.counts(),
                         "misaligned": b["misaligned"]})
            if b["peak_bytes"] <= budget_bytes and not b["misaligned"]:
                chosen, why = pb, f"B: A left {unused / 2**20:.1f} MiB unused; B planned with {(unused - m) / 2**20:.1f} MiB more"
            else:
                why = "A: B measured over the budget" if b["peak_bytes"] > budget_bytes else "A: B misaligned"
        elif pb is not None:
            why = "A: B is not predicted faster"
    elif tune_fit:
        why = f"A: {unused / 2**20:.1f} MiB unused (margin {m / 2**20:.1f} MiB)"
    info = {"candidates": cand, "chosen": why, "budget_bytes": budget_bytes, "margin_bytes": m,
            "plan_time_limit_s": PLAN_TIME_LIMIT,
            "warmup_step": {k: clock.get(k) for k in ("wall", "cpu")}, "threads": torch.get_num_threads(),
            "trace_scale_to_cpu": clock.get("scale"), "planned_trace_step_s": clock.get("trace_step_s")}
    return chosen, info
