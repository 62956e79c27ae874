"""trace — the plain-data record of one training step.

A `Trace` is what the planner and the simulator read.  It holds no torch
objects, so it can be written to JSON, diffed, and built by hand in tests.

Vocabulary
----------
* **op**: one aten call dispatched during the step, in execution order.  Its
  index in `Trace.ops` is its *event* number: plans and timelines speak in
  events ("evict after event 17", "prefetch starts at event 301").
* **storage**: one allocation.  Views and in-place ops share a storage and are
  counted once; `StorageRecord.nbytes` is the allocation size.  Everything the
  planner manages is a storage.
* **saved storage**: a storage that autograd keeps for backward (seen by
  saved-tensor pack hooks).  `pack_indices` are the positions, in the forward's
  sequence of pack-hook calls, at which it was packed: the runtime's key for
  finding a storage again in a later step of the same shape.
* **unit**: a module whose forward can be re-run on its own (a recompute
  unit).  Recomputing a unit drops the storages saved inside it and re-runs its
  forward ops during backward, just before its first backward op.

[Note: what "live" means]
A storage is live in tier 0 from the start of its producer op (or from the
start of the step, for parameters, optimizer states and inputs that exist
before it) until the end of event `freed_after`, the op after which eager
PyTorch really released it (observed while tracing with storage weak
references), or to the end of the step if it survived.  `last_use` (the last
op reading it: its last consumer, or last backward read for saved storages) is
never later than `freed_after`; the gap between them is what a planner can win
by freeing early.  Storages with `persistent=True` outlive the step
(parameters, gradients after the step, optimizer states, BatchNorm buffers).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("activation", "parameter", "gradient", "optimizer_state", "buffer", "input", "temporary")
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class OpRecord:
    index: int  # event number = position in Trace.ops
    name: str  # aten overload, e.g. "aten.convolution.default"
    phase: str  # one of PHASES
    module: str  # qualified name of the innermost module running it ("" = top level)
    unit: int | None  # recompute unit this (forward) op belongs to, if any
    flops: float  # floating point operations
    bytes_accessed: float  # bytes read + written (roofline)
    duration: float  # seconds: measured, or estimated by the roofline
    inputs: tuple[int, ...] = ()  # storage ids read
    outputs: tuple[int, ...] = ()  # storage ids written (new or in place)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"op {self.index}: phase must be one of {PHASES}, got {self.phase!r}")


@dataclass(frozen=True)
class StorageRecord:
    id: int  # dense, 0..n-1; position in Trace.storages
    nbytes: int
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]  # shape of the first tensor seen on it
    kind: str  # one of KINDS
    producer: int | None  # op index that allocated it; None = exists before the step
    last_use: int | None  # op index of the last op reading or writing it; None = never used
    persistent: bool = False  # outlives the step (params, grads, optimizer states, buffers)
    saved: bool = False  # kept by autograd for backward
    pack_indices: tuple[int, ...] = ()  # positions in the forward pack-hook sequence
    backward_reads: tuple[int, ...] = ()  # backward op indices that read it (saved storages)
    module: str = ""  # module of the producer op
    unit: int | None = None  # recompute unit of the producer op
    freed_after: int | None = None  # event after which eager PyTorch really freed it; None = alive at step end
    param_index: int | None = None  # optimizer states and gradients: the optimizer's index of their parameter (state_dict order)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"storage {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.nbytes < 0:
            raise ValueError(f"storage {self.id}: nbytes must be >= 0")


@dataclass(frozen=True)
class UnitRecord:
    """A recompute unit: a module whose forward the runtime can checkpoint."""

    index: int
    module: str  # qualified module name
    first_op: int  # first forward op of the unit
    last_op: int  # last forward op of the unit (inclusive)
    pack_start: int  # first pack-hook position inside the unit
    pack_end: int  # one past the last pack-hook position inside the unit
    inputs: tuple[int, ...]  # storage ids of the unit's tensor inputs (held while recomputable)
    first_backward_op: int | None  # op index where the unit's backward starts
    recompute_time: float  # seconds to re-run the unit's forward ops
    parent: str = ""  # qualified name of the plain `nn.Sequential` calling this unit as a direct child ("" = root)
    position: int = -1  # the unit's index among that Sequential's children; -1 = not such a child (no segments)


@dataclass(frozen=True)
class Trace:
    model: str
    mode: str  # "meta" (estimated) or "measured"
    device: str  # device the step ran (or would run) on
    profile: str | None  # hierarchy profile used for estimates (meta mode)
    batch_size: int
    input_shape: tuple[int, ...]
    ops: tuple[OpRecord, ...]
    storages: tuple[StorageRecord, ...]
    units: tuple[UnitRecord, ...]
    forward_end: int  # index of the last forward op
    backward_end: int  # index of the last backward op
    num_packs: int  # number of pack-hook calls in one forward
    observed_peak: int = 0  # tier-0 bytes at the worst event, as observed (all storages, deduplicated)
    # Modules whose own parameters the runtime can move off tier 0 between uses (runtime/params.py decides
    # which qualify: [Note: parameters in the plan] in trace/params.py); () = none, or a trace from before.
    param_modules: tuple[str, ...] = ()
    # Tiered gradients leave tier 0 at the end of the backward, not at their ready event: under DDP they are
    # sent down once DDP has reduced them ([Note: tiered gradients under DDP] in runtime/ddp_grads.py).
    grads_at_backward_end: bool = False

    # ------------------------------------------------------------------ derived
    @property
    def step_time(self) -> float:
        """Unmanaged compute time of one step (sum of op durations)."""
        return float(sum(op.duration for op in self.ops))

    def saved_storages(self) -> list[StorageRecord]:
        return [s for s in self.storages if s.saved and s.kind == "activation"]

    @functools.cached_property
    def bytes_at_start(self) -> int:
        """Tier-0 bytes that exist before the step's first op (parameters, states, gradients, the batch).

        The base that a CPU heap reading above the step's start is added to, so that measured and
        predicted peaks are compared on one basis (the Manager's report).
        """
        return int(sum(s.nbytes for s in self.storages
                       if s.producer is None and (s.freed_after is None or s.freed_after >= 0)))

    @functools.cached_property
    def activation_peak(self) -> int:
        """Bytes of saved-for-backward activations live at the worst event: what memstrata can move.

        The base of "P%act" budgets (`hardware.Budget`); live as in [Note: what "live" means].
        """
        n = len(self.ops)
        if n == 0:
            return 0
        diff = [0] * (n + 1)
        for s in self.saved_storages():
            start = 0 if s.producer is None else s.producer
            end = n - 1 if s.freed_after is None else s.freed_after
            if end >= start:
                diff[start] += s.nbytes
                diff[end + 1] -= s.nbytes
        best = acc = 0
        for d in diff[:n]:
            acc += d
            best = max(best, acc)
        return best

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trace":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        d["ops"] = tuple(
            OpRecord(**{**o, "inputs": tuple(o["inputs"]), "outputs": tuple(o["outputs"])}) for o in d["ops"]
        )
        d["storages"] = tuple(
            StorageRecord(
                **{
                    **s,
                    "shape": tuple(s["shape"]),
                    "pack_indices": tuple(s["pack_indices"]),
                    "backward_reads": tuple(s["backward_reads"]),
                }
            )
            for s in d["storages"]
        )
        d["units"] = tuple(UnitRecord(**{**u, "inputs": tuple(u["inputs"])}) for u in d["units"])
        d["param_modules"] = tuple(d.get("param_modules", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Trace":
        return cls.from_dict(json.loads(s))
