"""Execute stage, CPU tier: the runtime carries out every decision as planned, and the tier mover's
stream hand-offs happen in the order [Note: stream hand-offs] (runtime/streams.py) requires.

The hand-off order is checked with `RecordingStreams`: the CUDA path (pinned buffers, copy streams, events)
run on CPU tensors with every primitive logged, so a missing wait shows up here without a GPU.
"""

from __future__ import annotations

import copy
import re
from collections import Counter

import pytest

from memstrata.plan.api import minimum_budget, plan as make_plan
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.runtime.mover import Placement
from memstrata.runtime.pool import HostBufferPool
from memstrata.runtime.streams import COMPUTE, D2H, H2D, CopyContext, RecordingStreams

from test_runtime_equivalence import STEPS, cpu_hierarchy, setup_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def executed_vs_planned(rt: ActivationRuntime, plan, h) -> tuple[Counter, Counter]:
    """(decisions the last step executed, decisions the plan has), by kind."""
    planned: Counter = Counter()
    for d in plan.storages:
        if d.action == "offload":
            planned[f"offload:{Placement.for_tier(h, d.tier).label}"] += 1
    units = [u for u in plan.units if not u.is_segment]
    planned["recompute"] = len(units)
    planned["selective"] = sum(1 for u in units if u.save_ops)
    planned["segment"] = sum(1 for u in plan.units if u.is_segment)
    planned["replay"] = len(plan.replays)
    s = rt.last_stats
    done: Counter = Counter({f"offload:{k}": v for k, v in s.offloaded.items() if v})
    done["recompute"] = s.recomputed_units
    done["selective"] = rt.describe()["selective_units"]
    done["segment"] = s.recomputed_segments
    done["replay"] = rt.describe()["replays"]
    return +done, +planned


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v3_small", "densenet", "rng_net"])
def test_runtime_executes_every_decision_as_planned(model_name, tmp_path):
    """Forced plans of every kind and a planner plan: counts of executed decisions equal the plan's."""
    base, x, y, ref, trace = setup_model(model_name)
    h = cpu_hierarchy(tmp_path)
    lo, hi = minimum_budget(trace, h), trace.observed_peak
    plans = [forced_plan(trace, k, h) for k in ("host", "nvme", "recompute", "selective", "segment", "replay", "mixed")]
    plans.append(make_plan(trace, h, (lo + hi) // 2))
    assert plans[-1].units or plans[-1].storages or plans[-1].replays  # the planner plan decides something
    for p in plans:
        model = copy.deepcopy(base)
        rt = ActivationRuntime(model, trace, p, h)
        try:
            train_steps(model, x, y, steps=2, step_ctx=rt.step)
            assert rt.last_stats.misaligned is None
            done, planned = executed_vs_planned(rt, p, h)
            assert done == planned, (p.planner, done, planned, rt.notes)
            assert not [n for n in rt.notes if "not recomputed" in n or "recomputed instead" in n], rt.notes
        finally:
            rt.close()


def _check_handoffs(log: list[tuple]) -> dict[str, int]:
    """Assert the invariants of [Note: stream hand-offs] on a RecordingStreams log; counts of what was seen.

    Ordering is tracked per stream, transitively: `after[s]` holds the events stream s is ordered after
    (its own waits, what it inherited by waiting for another stream, and host synchronizations).
    """
    seen = Counter()
    after: dict[str, set[int]] = {COMPUTE: set(), D2H: set(), H2D: set()}
    host_synced: set[int] = set()
    d2h_ready = False  # d2h has waited for compute since its last copy
    last_reader_event: dict[int, int] = {}  # host buffer -> event of the last H2D copy that read it
    pending_record_stream: int | None = None  # source of the last D2H copy, until record_stream(src, d2h)
    restored_event: dict[int, int] = {}  # tier-0 buffer allocated on h2d -> the event of its copy up
    pending_h2d_copy: tuple[int, int] | None = None
    for i, (op, stream, a, b) in enumerate(log):
        if op == "synchronize":
            host_synced.add(a)
        if op == "wait_event":
            after[stream].add(a)
        if op == "wait_stream":
            after[stream] |= after[a]
            if stream == D2H and a == COMPUTE:
                d2h_ready = True
        if op == "copy" and stream == D2H:
            assert d2h_ready, f"entry {i}: d2h copy without d2h waiting for compute first (1)"
            ev = last_reader_event.get(a)
            assert ev is None or ev in after[D2H] | host_synced, \
                f"entry {i}: pinned buffer reused before its H2D finished (2)"
            assert pending_record_stream is None, f"entry {i}: previous source not record_stream'ed on d2h (3)"
            d2h_ready = False
            pending_record_stream = b
            seen["d2h_copy"] += 1
        if op == "record_stream" and stream == D2H:
            assert a == pending_record_stream, f"entry {i}: record_stream on d2h for the wrong tensor"
            pending_record_stream = None
        if op == "copy" and stream == H2D:
            pending_h2d_copy = (a, b)
            seen["h2d_copy"] += 1
        if op == "record_event" and stream == H2D and pending_h2d_copy is not None:
            dst, src = pending_h2d_copy
            last_reader_event[src] = a
            restored_event[dst] = a
            pending_h2d_copy = None
        if op == "record_stream" and stream == COMPUTE:
            ev = restored_event.get(a)
            assert ev is not None, f"entry {i}: compute took a tensor that no H2D copy produced"
            assert ev in after[COMPUTE], f"entry {i}: compute reads a restored tensor before waiting for its H2D (6)"
            seen["handed_to_compute"] += 1
    assert pending_record_stream is None
    return dict(seen)


@pytest.mark.parametrize("kind", ["host", "nvme", "mixed"])
def test_stream_handoff_order_recorded_on_cpu(kind, tmp_path):
    """The CUDA hand-off path, run on CPU through RecordingStreams: bit-exact, and every invariant holds."""
    base, x, y, ref, trace = setup_model("resnet18")
    h = cpu_hierarchy(tmp_path)
    log = RecordingStreams()
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, forced_plan(trace, kind, h), h,
                           copy=CopyContext("cpu", streams=log), pool=HostBufferPool(pin=False))
    try:
        train_steps(model, x, y, steps=STEPS, step_ctx=rt.step)
        assert state_mismatches(ref, model) == []
    finally:
        rt.close()
    seen = _check_handoffs(log.entries)
    offloads = sum(rt.last_stats.offloaded.values())
    assert offloads > 0
    assert seen["d2h_copy"] == STEPS * offloads
    assert seen["handed_to_compute"] >= STEPS * offloads  # every restore, at least once per storage
    if kind != "host":  # NVMe writes wait for the D2H event on the host before touching the pinned buffer
        assert any(e[0] == "synchronize" for e in log.entries)


@pytest.mark.parametrize("drop, invariant", [("wait_stream", "(1)"), ("wait_event", "(6)")])
def test_handoff_check_catches_a_missing_wait(drop, invariant, tmp_path, monkeypatch):
    """The checker is not vacuous: drop d2h's wait for compute, or compute's wait for an H2D, and it fails."""
    base, x, y, _, trace = setup_model("resnet18")
    h = cpu_hierarchy(tmp_path)
    log = RecordingStreams()
    real = getattr(RecordingStreams, drop)

    def skip_one(self, stream, other):
        if stream != (D2H if drop == "wait_stream" else COMPUTE):
            real(self, stream, other)

    monkeypatch.setattr(RecordingStreams, drop, skip_one)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, forced_plan(trace, "host", h), h,
                           copy=CopyContext("cpu", streams=log), pool=HostBufferPool(pin=False))
    try:
        train_steps(model, x, y, steps=2, step_ctx=rt.step)
    finally:
        rt.close()
    with pytest.raises(AssertionError, match=re.escape(invariant)):
        _check_handoffs(log.entries)
