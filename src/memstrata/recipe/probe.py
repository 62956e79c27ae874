"""Per-epoch process measurements of the recipe: step times, CPU time, threads, machine load.

[Note: why these numbers]
On a shared CPU box a throughput ratio between two pipelines mixes three things:
the pipelines, the training process's own thread budget, and whatever else the
machine ran meanwhile.  `EpochProbe` records, per training epoch, what tells
them apart: the per-step *compute* time (batch in hand -> optimizer step done,
so the data wait is not in it; median and spread), the CPU seconds the training
process used (all its threads: the step's intra-op threads and, for memstrata,
the loader's threads) and those of its finished child processes (the baseline's
DataLoader workers, which end with the epoch), torch's intra-op thread count as
seen by the training thread, the number of OS threads of the process, and the
1-minute load average at the start and the end.  A step that took longer while
the process used no more CPU waited for a core: contention from outside.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

import torch

__all__ = ["EpochProbe", "os_threads", "load_average"]


def os_threads() -> int | None:
    """OS threads of this process (Linux: /proc/self/task), None where unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class EpochProbe:
    """Collects one epoch's step times; `finish()` returns the record's measurement fields."""

    def __init__(self):
        self.steps: list[float] = []
        self.step_cpu = 0.0
        self.threads_seen = 0
        self._cpu0 = time.process_time()
        self._child0 = _children_cpu()
        self._load0 = load_average()

    def step(self, seconds: float, thread_cpu_s: float = 0.0) -> None:
        """One step's wall time, and the CPU time the training thread itself spent in it (time.thread_time)."""
        self.steps.append(seconds)
        self.step_cpu += thread_cpu_s
        if len(self.steps) == 2:  # the loader's threads are up by the second step
            self.threads_seen = os_threads() or 0

    def finish(self) -> dict[str, Any]:
        s = sorted(self.steps)
        q = (lambda f: s[min(len(s) - 1, int(f * len(s)))]) if s else (lambda f: None)
        return {
            "compute_s": sum(s),
            "compute_thread_cpu_s": self.step_cpu,
            "step_s_median": statistics.median(s) if s else None,
            "step_s_p10": q(0.1), "step_s_p90": q(0.9),
            "cpu_s": time.process_time() - self._cpu0,
            "children_cpu_s": _children_cpu() - self._child0,
            "torch_threads": torch.get_num_threads(),
            "os_threads": self.threads_seen or os_threads(),
            "load_start": self._load0, "load_end": load_average(),
        }
