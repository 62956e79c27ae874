"""The timed part of one bench run: the same loop for every worker (activation and optimizer-state benches)."""

from __future__ import annotations

import time
from typing import Any, Callable


def timed_steps(step: Callable[[], Any], sync: Callable[[], None], steps: int,
                max_seconds: float | None) -> tuple[list[float], list[float], list[float], float]:
    """Up to `steps` calls of `step()` (at least one; stops once `max_seconds` have passed).

    Returns (losses, wall seconds per step, process CPU seconds per step, total wall seconds).  CPU time is
    a check on a shared, noisy machine; `sync()` (a CUDA synchronize, or nothing) ends each step.
    """
    losses: list[float] = []
    step_times: list[float] = []
    cpu_times: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        step_times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        losses.append(float(loss))
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    return losses, step_times, cpu_times, time.perf_counter() - start
