"""Calibrate a measured trace's op times to the steady-state step they stand for.

[Note: traced vs untraced time]
Timing every op (a dispatch mode, a clock read and, on CUDA, a sync per op)
makes the traced step slower than a plain one: 1.9 s against 1.15 s for
ResNet-18 (batch 64, 112 px) on the 2-core CPU box.  The relative cost of
ops survives, the absolute time does not, and the planner times prefetches
and weighs recompute against copies in absolute seconds: too-long op times
make it prefetch too late.  So when a plain step of the same shape was timed
(the warm-up), op durations are scaled by plain / traced (never up).
"""

from __future__ import annotations

from dataclasses import replace

from .schema import Trace

__all__ = ["calibrate_durations"]


def calibrate_durations(trace: Trace, untraced_seconds: float | None, *, allow_slower: bool = False
                        ) -> tuple[Trace, float]:
    """(trace with op and unit times scaled to `untraced_seconds`, the scale).

    The trace comes back as is when the plain step was not faster, unless `allow_slower` (a measured
    steady state that is slower than the trace predicted: the Manager's budget watch).

    >>> calibrate_durations(trace, None)[1]    # doctest: +SKIP
    1.0
    """
    traced = trace.step_time
    if not untraced_seconds or traced <= 0 or (untraced_seconds >= traced and not allow_slower):
        return trace, 1.0
    k = untraced_seconds / traced
    ops = tuple(replace(op, duration=op.duration * k) for op in trace.ops)
    units = tuple(replace(u, recompute_time=u.recompute_time * k) for u in trace.units)
    return replace(trace, ops=ops, units=units), k
