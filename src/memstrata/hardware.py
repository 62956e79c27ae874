"""measure — the memory hierarchy memstrata plans against.

A `Hierarchy` is an ordered list of `Tier`s, fastest first.  Tier 0 is where
compute happens (GPU HBM on CUDA machines, host DRAM on a CPU-only box); every
tier below it is reached through a copy lane whose bandwidth and latency are
stored on the *lower* tier ("how fast can I move bytes between me and the tier
above").  Recomputation is not a storage tier: its cost is compute time, which
the trace carries per op, so the hierarchy only names the compute roofline
(`peak_flops`, `fast_bandwidth`) used to estimate op times on `meta` traces.

Named profiles describe machines we are not on; `probe()` (in `probe.py`)
measures the machine we are on.  Every figure in a profile cites its source.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

GiB = 1024**3
GB = 1000**3
TB = 1000**4

TIER_KINDS = ("hbm", "dram", "pinned_dram", "nvme")
HOST_KINDS = frozenset({"dram", "pinned_dram"})  # tiers in host RAM (pinned or not)


@dataclass(frozen=True)
class Tier:
    """One level of the hierarchy.

    `read_bandwidth` is bytes/s moving data from this tier *up* to the tier
    above (a prefetch); `write_bandwidth` is bytes/s moving data *down* into
    this tier (an eviction).  Both are 0 for tier 0, which has no tier above.
    """

    name: str
    kind: str  # one of TIER_KINDS
    capacity: int  # bytes usable by memstrata
    read_bandwidth: float = 0.0  # bytes/s, this tier -> tier above
    write_bandwidth: float = 0.0  # bytes/s, tier above -> this tier
    latency: float = 0.0  # seconds per transfer, either direction
    path: str | None = None  # directory for file-backed tiers
    # Seconds of *compute* time each byte moved through this tier's lanes costs.
    # 0 where a DMA engine moves the bytes (GPU copy engines); > 0 where the same
    # CPU cores that compute also copy (staging memcpy, kernel I/O path on a CPU box).
    host_cost_per_byte: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TIER_KINDS:
            raise ValueError(f"tier {self.name!r}: kind must be one of {TIER_KINDS}, got {self.kind!r}")
        if self.capacity < 0:
            raise ValueError(f"tier {self.name!r}: capacity must be >= 0, got {self.capacity}")
        if self.read_bandwidth < 0 or self.write_bandwidth < 0 or self.latency < 0 or self.host_cost_per_byte < 0:
            raise ValueError(f"tier {self.name!r}: bandwidths and latency must be >= 0")

    def transfer_time(self, nbytes: int, direction: str) -> float:
        """Seconds to move `nbytes` between this tier and the one above.

        direction: "read" (up, prefetch) or "write" (down, eviction).
        """
        bw = self.read_bandwidth if direction == "read" else self.write_bandwidth
        if bw <= 0:
            return float("inf") if nbytes > 0 else 0.0
        return self.latency + nbytes / bw


@dataclass(frozen=True)
class Hierarchy:
    """Ordered tiers, fastest first, plus the compute roofline of tier 0's device.

    >>> h = profile("h200")
    >>> [t.name for t in h.tiers]
    ['hbm', 'dram', 'nvme']
    """

    name: str
    device: str  # "cuda" or "cpu": where compute runs
    tiers: tuple[Tier, ...]
    peak_flops: float  # achievable dense FLOP/s for the training dtype
    fast_bandwidth: float  # tier-0 memory bandwidth, bytes/s (roofline)
    kernel_overhead: float = 0.0  # seconds per op launch (roofline floor)
    source: str = ""  # where the figures come from
    # float32 matmul/conv rate as a fraction of `peak_flops` (which is the bf16
    # rate on GPUs): PyTorch runs fp32 convolutions as TF32 on Ampere and Hopper,
    # at half the bf16 tensor-core rate.  1.0 on CPUs, where fp32 is the native rate.
    fp32_flops_fraction: float = 1.0
    # Price op-level replays as one fused (compiled) kernel: one pass over their inputs and output at
    # `fast_bandwidth` plus one launch, instead of the sum of the eager ops (simulate.py, replay).
    fused_replay: bool = False

    def compute_rate(self, dtype: str | None) -> float:
        """Achievable FLOP/s for matmul/conv work in `dtype` ("float32", "bfloat16", ...)."""
        if dtype in ("float32", "torch.float32", "float64", "torch.float64"):
            return self.peak_flops * self.fp32_flops_fraction
        return self.peak_flops

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("a hierarchy needs at least one tier")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if self.peak_flops <= 0 or self.fast_bandwidth <= 0:
            raise ValueError("peak_flops and fast_bandwidth must be > 0")

    @property
    def fast(self) -> Tier:
        return self.tiers[0]

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r} in hierarchy {self.name!r} (tiers: {[t.name for t in self.tiers]})")

    def index(self, name: str) -> int:
        return [t.name for t in self.tiers].index(self.tier(name).name)

    @property
    def lower_tiers(self) -> tuple[Tier, ...]:
        """Every tier below tier 0 (the offload destinations)."""
        return self.tiers[1:]

    def host_tier(self) -> Tier | None:
        """The first host-DRAM tier below tier 0, or None (a CPU box: host RAM *is* tier 0)."""
        return next((t for t in self.lower_tiers if t.kind in HOST_KINDS), None)

    def nvme_tier(self) -> Tier | None:
        """The first NVMe (file-backed) tier below tier 0, or None."""
        return next((t for t in self.lower_tiers if t.kind == "nvme"), None)

    @property
    def host_is_tier0(self) -> bool:
        """True on a CPU-only hierarchy, where compute runs in host RAM."""
        return self.fast.kind in HOST_KINDS

    def with_fast_capacity(self, capacity: int) -> "Hierarchy":
        """The same hierarchy with tier 0 limited to `capacity` bytes (a budget)."""
        return replace(self, tiers=(replace(self.tiers[0], capacity=int(capacity)),) + self.tiers[1:])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hierarchy":
        d = dict(d)
        d["tiers"] = tuple(Tier(**t) for t in d["tiers"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> "Hierarchy":
        return cls.from_dict(json.loads(s))


# --------------------------------------------------------------------------------------
# Named profiles.  [Note: profile figures]
# Achievable figures, not datasheet peaks, where we have them: a planner that
# believes the datasheet under-predicts stalls.  Compute rooflines are for the
# dtype the profile is meant for (bf16 autocast on GPUs, fp32 on the CPU box);
# `peak_flops` is discounted to what dense convolution/matmul kernels reach.
# --------------------------------------------------------------------------------------


# [Note: compute efficiency calibration]
# Dense-peak tensor-core figures overstate what eager convolutions reach.  We
# calibrate one efficiency factor against a measured anchor: ResNet-50 training
# with AMP on one A100 runs at 2,470 img/s (NVIDIA DALI's published figure,
# shared/ANCHORS.md).  Tracing ResNet-50 (batch 256, 224x224, bf16) on `meta`
# with the a100-80gb profile predicts that figure when matmul/conv work runs at
# 35% of the dense bf16 peak (memory-bound ops at the achieved HBM rate).  The
# same factor is applied to every GPU profile; a measured trace on the real
# device replaces these estimates wherever memstrata actually runs.
GPU_CONV_EFFICIENCY = 0.35
TF32_FRACTION = 0.5  # TF32 dense rate / bf16 dense rate on A100, H100, H200 (datasheets)


def _h200() -> Hierarchy:
    return Hierarchy(
        name="h200",
        device="cuda",
        tiers=(
            # 141 GB HBM3e (datasheet); ~139 GiB visible to CUDA on a lent card.
            Tier("hbm", "hbm", capacity=int(139 * GiB)),
            # PCIe Gen5 x16: 64 GB/s nominal per direction; ~50-55 GB/s achieved
            # with pinned memory (shared/ANCHORS.md).  We plan with 50 GB/s.
            Tier("dram", "pinned_dram", capacity=int(512 * GiB), read_bandwidth=50 * GB,
                 write_bandwidth=50 * GB, latency=10e-6),
            # One datacenter Gen4/Gen5 NVMe drive: 3-7 GB/s (ANCHORS.md); we take
            # 6 GB/s read, 4 GB/s write.
            Tier("nvme", "nvme", capacity=int(3.5 * 1000 * GB), read_bandwidth=6 * GB,
                 write_bandwidth=4 * GB, latency=100e-6),
        ),
        # ~790 TFLOP/s bf16 dense measured on a lent card (ANCHORS.md), times the
        # calibrated conv efficiency.  HBM3e copy rate measured 4.3 TB/s
        # (ANCHORS.md; 4.8 TB/s datasheet).
        peak_flops=GPU_CONV_EFFICIENCY * 790e12,
        fp32_flops_fraction=TF32_FRACTION,
        fast_bandwidth=4.3 * TB,
        kernel_overhead=5e-6,
        source="ANCHORS.md measured H200 figures; NVIDIA H200 datasheet",
    )


def _h100() -> Hierarchy:
    return Hierarchy(
        name="h100",
        device="cuda",
        tiers=(
            # H100 SXM5 80 GB HBM3 (datasheet).
            Tier("hbm", "hbm", capacity=int(79 * GiB)),
            # PCIe Gen5 x16, same host link as the H200 (datasheet).
            Tier("dram", "pinned_dram", capacity=int(512 * GiB), read_bandwidth=50 * GB,
                 write_bandwidth=50 * GB, latency=10e-6),
            Tier("nvme", "nvme", capacity=int(3.5 * 1000 * GB), read_bandwidth=6 * GB,
                 write_bandwidth=4 * GB, latency=100e-6),
        ),
        # 989 TFLOP/s bf16 dense (H100 SXM datasheet) at boost clock; sustained
        # clocks give ~80% of it (the H200, same die, measured 790), times the
        # calibrated conv efficiency.  3.35 TB/s HBM3 (datasheet), ~90% achieved.
        peak_flops=GPU_CONV_EFFICIENCY * 989e12 * 0.8,
        fp32_flops_fraction=TF32_FRACTION,
        fast_bandwidth=3.0 * TB,
        kernel_overhead=5e-6,
        source="NVIDIA H100 SXM5 datasheet",
    )


def _a100_80gb() -> Hierarchy:
    return Hierarchy(
        name="a100-80gb",
        device="cuda",
        tiers=(
            Tier("hbm", "hbm", capacity=int(79 * GiB)),  # 80 GB HBM2e (datasheet)
            # PCIe Gen4 x16: 32 GB/s nominal, ~25 GB/s achieved pinned.
            Tier("dram", "pinned_dram", capacity=int(512 * GiB), read_bandwidth=25 * GB,
                 write_bandwidth=25 * GB, latency=10e-6),
            Tier("nvme", "nvme", capacity=int(3.5 * 1000 * GB), read_bandwidth=5 * GB,
                 write_bandwidth=3 * GB, latency=100e-6),
        ),
        # 312 TFLOP/s bf16 dense (datasheet) times the calibrated conv efficiency;
        # 2.0 TB/s HBM2e (datasheet), ~1.8 TB/s achieved.
        peak_flops=GPU_CONV_EFFICIENCY * 312e12,
        fp32_flops_fraction=TF32_FRACTION,
        fast_bandwidth=1.8 * TB,
        kernel_overhead=5e-6,
        source="NVIDIA A100 80GB datasheet",
    )


def _rtx4090() -> Hierarchy:
    return Hierarchy(
        name="rtx4090",
        device="cuda",
        tiers=(
            Tier("hbm", "hbm", capacity=int(23.5 * GiB)),  # 24 GB GDDR6X (datasheet)
            # PCIe Gen4 x16, ~25 GB/s achieved pinned.
            Tier("dram", "pinned_dram", capacity=int(64 * GiB), read_bandwidth=25 * GB,
                 write_bandwidth=25 * GB, latency=10e-6),
            Tier("nvme", "nvme", capacity=int(2 * 1000 * GB), read_bandwidth=5 * GB,
                 write_bandwidth=3 * GB, latency=100e-6),
        ),
        # 165 TFLOP/s bf16 dense with fp32 accumulate (Ada whitepaper) times the
        # calibrated conv efficiency; TF32 runs at half that (whitepaper).
        # 1.0 TB/s GDDR6X (datasheet), ~0.9 achieved.
        peak_flops=GPU_CONV_EFFICIENCY * 165e12,
        fp32_flops_fraction=TF32_FRACTION,
        fast_bandwidth=0.9 * TB,
        kernel_overhead=5e-6,
        source="NVIDIA Ada Lovelace architecture whitepaper",
    )


def _cpu() -> Hierarchy:
    return Hierarchy(
        name="cpu",
        device="cpu",
        tiers=(
            # This class of box: 24 GiB RAM, 2 cores (shared/ANCHORS.md).
            Tier("dram", "dram", capacity=int(20 * GiB)),
            # Disk with O_DIRECT measured here: ~2.3 GiB/s write, ~1.6 GiB/s read
            # (shared/ANCHORS.md).
            # `memstrata probe` on this box (2026-11-28) measured O_DIRECT writes at
            # 1.6-2.0 GB/s and reads at 1.0 GB/s, below the 2.3 / 1.6 GiB/s in
            # ANCHORS.md; we plan with the lower, repeated measurement.  On 2 cores the
            # disk path also competes with compute: in ResNet-18 training (batch 64,
            # 112 px) offloads cost 0.7-2 ns of step time per byte moved (measured
            # here); we charge 1 ns.
            Tier("nvme", "nvme", capacity=int(50 * GiB), read_bandwidth=1.0 * GB,
                 write_bandwidth=1.6 * GB, latency=100e-6, host_cost_per_byte=1e-9),
        ),
        # 2 cores with AVX-512 fp32: 2 x 2 FMA units x 16 lanes x 2 flops x ~2.5 GHz
        # = 320 GFLOP/s peak; oneDNN convs reach roughly 40% of it.
        peak_flops=130e9,
        fast_bandwidth=12 * GB,
        kernel_overhead=20e-6,
        source="shared/ANCHORS.md CPU box figures; AVX-512 arithmetic",
    )


PROFILES = {
    "h200": _h200,
    "h100": _h100,
    "a100-80gb": _a100_80gb,
    "rtx4090": _rtx4090,
    "cpu": _cpu,
}


def profile(name: str) -> Hierarchy:
    """A named hierarchy for a machine we may not be on."""
    try:
        return PROFILES[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}") from None


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Parse '12GiB', '1.5 GB', '4096' into bytes.  ValueError on anything else."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"malformed size {text!r}: expected a number with an optional unit such as 512MiB, 12GiB or 1.5GB")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    return int(value)


def parse_budget_text(text: str, max_percent: float = 100.0) -> tuple[float | None, int | None]:
    """A budget as written by a user: '50%' -> (0.5, None); '12GiB' -> (None, bytes).

    Kept for callers of the 0.1 API; new code uses `Budget.parse`.
    """
    b = Budget.parse(str(text), max_percent=max_percent)
    if b.kind == "activations":
        raise BudgetError(f"malformed budget {text!r}: '%act' budgets are not accepted here")
    return (b.value, None) if b.kind == "peak" else (None, int(b.value))


class BudgetError(ValueError):
    """A budget the user wrote that memstrata cannot read (one line, no traceback)."""


BUDGET_KINDS = ("bytes", "peak", "activations", "slowdown", "callable")
MAX_BUDGET_PERCENT = 1000.0  # a fraction above 100% plans nothing but is not an error


@dataclass(frozen=True)
class Budget:
    """How much tier-0 memory a step may use: the one budget type of the CLI, the Manager and the bench.

    Spellings (`Budget.parse`):

    * ``12884901888`` or ``"12GiB"`` — an absolute size (``kind="bytes"``);
    * ``"50%"`` — a fraction of the unmanaged step's peak (``kind="peak"``);
    * ``"50%act"`` — the unmanaged peak less half of its *activation* peak, i.e.
      "keep half of the saved activations" (``kind="activations"``): the part of
      the peak memstrata can move;
    * ``"1.10x"`` — the least memory whose predicted step is at most 1.10x the
      unmanaged one (``kind="slowdown"``; resolved by planning, `plan.least_budget_within`);
    * a callable ``fn(trace) -> bytes`` (``kind="callable"``), evaluated per trace.

    `resolve(trace)` turns it into bytes against one trace (anything with
    ``observed_peak`` and ``activation_peak``), in this one place.

    >>> Budget.parse("50%").resolve_peaks(1000, 400)
    500
    >>> Budget.parse("50%act").resolve_peaks(1000, 400)
    800
    >>> str(Budget.parse("12GiB"))
    '12.00 GiB'
    """

    kind: str
    value: float = 0.0  # bytes ("bytes") or a fraction ("peak", "activations")
    fn: Any = field(default=None, compare=False, repr=False)
    text: str = ""  # as the user wrote it

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if self.kind == "callable":
            if not callable(self.fn):
                raise BudgetError("a callable budget needs fn(trace) -> bytes")
        elif not (self.value > 0 and self.value != float("inf")):
            raise BudgetError(f"budget must be a finite number > 0, got {self.text or self.value!r}")
        elif self.kind == "slowdown" and self.value < 1.0:
            raise BudgetError(f"a slowdown budget is at least 1.0x (the unmanaged step), got {self.text or self.value!r}")

    @classmethod
    def parse(cls, spec: "Budget | int | str | Any", *, max_percent: float = MAX_BUDGET_PERCENT) -> "Budget":
        """A `Budget` from what a user passes; `BudgetError` (a ValueError) with one message otherwise."""
        import math

        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, bool) or isinstance(spec, float):
            raise BudgetError(f"malformed budget {spec!r}: {_BUDGET_HELP}")
        if isinstance(spec, int):
            if spec <= 0:
                raise BudgetError(f"budget must be > 0 bytes, got {spec}")
            return cls("bytes", float(spec), text=str(spec))
        if callable(spec):
            return cls("callable", fn=spec, text=getattr(spec, "__name__", "callable"))
        if not isinstance(spec, str):
            raise BudgetError(f"malformed budget {spec!r}: {_BUDGET_HELP}")
        t = spec.strip()
        low = t.lower()
        if low.endswith("x") and low[:-1].replace(".", "", 1).isdigit():
            return cls("slowdown", float(low[:-1]), text=t)
        for suffix, kind in (("%act", "activations"), ("%", "peak")):
            if low.endswith(suffix):
                try:
                    pct = float(t[: -len(suffix)])
                except ValueError:
                    raise BudgetError(f"malformed budget {spec!r}: {_BUDGET_HELP}") from None
                limit = 100.0 if kind == "activations" else max_percent
                if not (math.isfinite(pct) and 0 < pct <= limit):
                    raise BudgetError(f"budget percentage must be a number in (0, {limit:g}], got {spec!r}")
                return cls(kind, pct / 100.0, text=t)
        try:
            n = parse_size(t)
        except ValueError as e:
            raise BudgetError(f"malformed budget {spec!r}: {_BUDGET_HELP}") from e
        if n <= 0:
            raise BudgetError(f"budget must be > 0 bytes, got {spec!r}")
        return cls("bytes", float(n), text=t)

    @property
    def relative(self) -> bool:
        """True when the bytes depend on the trace (a fraction or a callable)."""
        return self.kind != "bytes"

    def resolve_peaks(self, unmanaged_peak: int, activation_peak: int = 0) -> int:
        """Bytes for a step with these peaks (not for callable budgets: use `resolve`)."""
        if self.kind == "bytes":
            return int(self.value)
        if self.kind == "peak":
            return max(1, int(unmanaged_peak * self.value))
        if self.kind == "activations":
            return max(1, int(unmanaged_peak - (1.0 - self.value) * activation_peak))
        raise BudgetError(f"a {self.kind} budget needs a trace: use Budget.resolve(trace)")

    def resolve(self, trace: Any) -> int:
        """Bytes for one trace (`trace.observed_peak`, `trace.activation_peak`)."""
        if self.kind == "callable":
            n = self.fn(trace)
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not n > 0 or n == float("inf"):
                raise BudgetError(f"budget callable returned {n!r} for a step whose unmanaged peak is "
                                  f"{format_size(trace.observed_peak)}; it must be > 0 bytes")
            return int(n)
        if self.kind == "slowdown":
            raise BudgetError("a slowdown budget is resolved by planning: memstrata.plan.least_budget_within")
        act = trace.activation_peak if self.kind == "activations" else 0
        return self.resolve_peaks(int(trace.observed_peak), int(act))

    def __str__(self) -> str:
        if self.kind == "bytes":
            return format_size(self.value)
        if self.kind == "callable":
            return f"callable {self.text}"
        if self.kind == "slowdown":
            return self.text or f"{self.value:g}x"
        return self.text or f"{self.value * 100:g}%{'act' if self.kind == 'activations' else ''}"


_BUDGET_HELP = ("expected a size such as 12GiB, a percentage of the unmanaged peak such as 50%, 50%act "
                "(half of the activations), or a slowdown such as 1.1x")


def format_size(nbytes: float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
