"""What one worker run is asked to do (plain data, JSON between processes)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class RunSpec:
    contender: str
    model: str
    batch: int
    res: int
    device: str  # "cpu" or "cuda"
    steps: int
    warmup: int
    num_classes: int = 1000
    amp: str = "off"  # off | bf16 | fp16
    channels_last: bool = False
    seed: int = 0
    budget_bytes: int | None = None
    unmanaged_peak_bytes: int | None = None  # measured by the unmanaged contender, when it ran first
    microbatches: int = 1
    nvme_dir: str | None = None
    max_seconds: float | None = None  # stop the timed steps once this much time has passed (>= 1 step)
    threads: int | None = None
    lr: float = 0.01
    cpu_peak: str = "exact"  # see [Note: allocator-held memory] in peak.py; "rss": the timed steps' RSS
    setting: str = ""  # the contender's setting in this run, as the table and JSON name it ("k=4", ...)
    memory_budget_fraction: float | None = None  # compile_memory_budget: torch._functorch activation_memory_budget
    seq: int = 0  # tokens per sample (GPT-2 models of the state bench)
    precision: str = "fp32"  # state bench: fp32, or bf16 parameters with fp32 master weights (MasterWeights)
    nvme_read_bw: float | None = None  # `memstrata probe` of the NVMe directory (state bench planning)
    nvme_write_bw: float | None = None
    plan_path: str | None = None  # memstrata: run this plan (JSON from a planning run); with plan_only, write it there
    plan_only: bool = False  # memstrata: the planning run ([Note: one plan for every repeat] in plan_once.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
