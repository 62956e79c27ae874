"""Epoch-aligned concurrent pairs: contenders of one bench repeat start each epoch >= 2 together.

[Note: epoch-aligned pairs]
`memstrata bench --scenario recipe --concurrent` runs a repeat's contenders at the same time so that
the load of other jobs takes from both alike.  It did not, quite: memstrata's first epoch (store build
included) and its validations are shorter than the baseline's, so after a few minutes the two runs are
no longer in step, and one's epoch 3 runs under another load than the other's (2026-12-02, seed 3: the
box emptied from load 8 to 1 during the run; memstrata's epoch 2 was as fast as the baseline's, its
epoch 3, started earlier, 0.91x: the 0.966 pair).  With a rendezvous directory in the environment
(set by the bench), each run marks the start of epoch e >= 2 with a file and waits until every
contender has marked it, so each measured epoch of a pair runs over the same seconds.  The time spent
waiting is not the run's work: `train` subtracts it from the run's wall time and reports it
(`pair_wait_s`).  While one waits the other runs alone for a moment (the tail of the slower one's
validation or previous epoch): that only shortens a measured epoch of the slower contender, never the
faster one's.  A contender that died is waited for at most `timeout_s` once; later epochs do not wait.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EpochRendezvous", "ENV_DIR", "ENV_NAME", "ENV_SIZE"]

ENV_DIR = "MEMSTRATA_RECIPE_PAIR_DIR"
ENV_NAME = "MEMSTRATA_RECIPE_PAIR_NAME"
ENV_SIZE = "MEMSTRATA_RECIPE_PAIR_SIZE"


@dataclass
class EpochRendezvous:
    directory: Path
    name: str
    size: int
    timeout_s: float = 600.0
    poll_s: float = 0.05
    gave_up: bool = False

    @classmethod
    def from_env(cls, env=None) -> "EpochRendezvous | None":
        env = os.environ if env is None else env
        d, name, size = env.get(ENV_DIR), env.get(ENV_NAME), env.get(ENV_SIZE)
        if not d or not name or not size:
            return None
        return cls(Path(d), name, int(size))

    def wait(self, epoch: int) -> float:
        """Mark `epoch` as reached by this contender; wait for the others; returns the seconds waited."""
        if self.gave_up or self.size <= 1:
            return 0.0
        t0 = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"e{epoch}.{self.name}").touch()
        while len(list(self.directory.glob(f"e{epoch}.*"))) < self.size:
            if time.perf_counter() - t0 > self.timeout_s:
                self.gave_up = True  # the other contender is gone: do not wait again
                break
            time.sleep(self.poll_s)
        return time.perf_counter() - t0
