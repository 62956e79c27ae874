"""Gradients as trace records: when each is final, and tier 0 without the tiered ones.

Plain data in, plain data out, like trace/states.py.

[Note: gradients in the plan]
* A gradient record is a storage of kind "gradient" with `param_index` set
  (the tracer numbers it like the optimizer: its post-accumulate-grad hook
  gives the model's order, the traced optimizer step renumbers it in the
  optimizer's).  It is *final* at its ready event: the last backward op that
  writes or reads it (`grad_ready`), where the runtime's post-accumulate-grad
  hook fires (runtime/grads.py).
* A bucket whose gradients are tiered (`StateDecision.grads`): each gradient
  leaves tier 0 at its ready event (`tier_grads`: freed there, no longer
  persistent), instead of living to the optimizer step.
* Where the bucket's update runs: on a CPU hierarchy tier 0 *is* the host, so
  the gradients come back into tier 0 with the bucket's states and count in
  the state window (trace/states.py `tier_states`, one more term per bucket).
  On a device hierarchy a bucket with both gradients and states in host DRAM
  steps on the host (`host_step`, runtime/host_step.py): its gradient, states
  and a host copy of its parameters never enter tier 0 during the step (the
  updated parameters are copied up in place), so it adds nothing to the
  window; any other tiered bucket brings its gradients back with its states.  Gradients tiered
  while the states are kept come back to tier 0 for the kept step: one record
  of their bytes over the optimizer phase.
* Under DDP (`Trace.grads_at_backward_end`) a tiered gradient leaves at the
  end of the backward, once DDP has reduced it ([Note: tiered gradients
  under DDP] in runtime/ddp_grads.py): freed there, its copy down exposed.
* Time (`grad_stall_seconds`): the copies down overlap the rest of backward
  (exposed: what exceeds the backward compute); a host step costs the host's
  optimizer arithmetic (3x the gradient bytes + 2x the state bytes touched, at
  `HOST_STEP_BANDWIDTH`) and the parameters' upload, serial after backward (a
  global-norm clip needs every gradient first); on a CPU hierarchy the read
  back before each bucket's step, unhidden.  Estimates, like trace/states.py's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..hardware import GB, HOST_KINDS, Hierarchy
from .schema import StorageRecord, Trace

if TYPE_CHECKING:  # pragma: no cover
    from ..decisions import StateDecision

__all__ = ["renumber_grads", "grad_groups", "grad_ready", "tier_grads", "host_step", "grad_stall_seconds",
           "all_keep_peak", "HOST_STEP_BANDWIDTH", "GRAD_WINDOW_MODULE"]

# Bytes per second torch's CPU optimizer kernels touch on a GPU server's host (parameter, gradient and state
# reads plus parameter and state writes; ~3.5 bytes per state byte for AdamW).  An estimate, not measured on
# GPU: DeepSpeed reports its CPU Adam as ~5x torch's, torchao calls the CPU step its bottleneck.
HOST_STEP_BANDWIDTH = 10 * GB
GRAD_WINDOW_MODULE = "<tiered gradients at the step>"


def _live(s: StorageRecord) -> bool:
    return s.nbytes > 0 and not (s.freed_after is not None and s.freed_after < (s.producer or 0))


def grad_groups(trace: Trace) -> dict[int, tuple[int, ...]]:
    """Gradient storage ids per parameter index (the optimizer's), parameters in order."""
    out: dict[int, list[int]] = {}
    for s in trace.storages:
        if s.kind == "gradient" and s.param_index is not None and _live(s):
            out.setdefault(s.param_index, []).append(s.id)
    return {p: tuple(v) for p, v in sorted(out.items())}


def renumber_grads(trace: Trace, mapping: dict[int, int | None]) -> Trace:
    """Gradient records renumbered from the model's parameter order (a trace without the optimizer step) to the
    optimizer's (`mapping[model position] -> optimizer index`, None for a parameter the optimizer lacks)."""
    sts = tuple(replace(s, param_index=mapping.get(s.param_index)) if s.kind == "gradient" and s.param_index
                is not None else s for s in trace.storages)
    return replace(trace, storages=sts)


def grad_ready(trace: Trace) -> dict[int, int]:
    """Storage id -> the event after which that gradient is final (its last backward op; else its producer)."""
    grads = {s.id for s in trace.storages if s.kind == "gradient"}
    out: dict[int, int] = {}
    for op in trace.ops:
        if op.phase != "backward":
            continue
        for sid in op.inputs + op.outputs:
            if sid in grads:
                out[sid] = op.index
    for s in trace.storages:
        if s.id in grads and s.id not in out:
            out[s.id] = s.producer if s.producer is not None else 0
    return out


def tier_grads(trace: Trace, storages: Iterable[int]) -> Trace:
    """`trace` with the gradient records `storages` leaving tier 0 at their ready event."""
    ids = list(storages)
    if not ids:
        return trace
    ready = grad_ready(trace)
    sts = list(trace.storages)
    for sid in ids:
        s = sts[sid]
        if s.kind != "gradient":
            raise ValueError(f"tier_grads: storage {sid} is a {s.kind}, not a gradient")
        end = max(ready[sid], s.producer if s.producer is not None else 0)
        if trace.grads_at_backward_end:  # under DDP: sent down once reduced, at the end of the backward
            end = max(end, trace.backward_end)
        sts[sid] = replace(s, freed_after=end, last_use=end, persistent=False)
    out = replace(trace, storages=tuple(sts))
    return replace(out, observed_peak=all_keep_peak(out))


def all_keep_peak(trace: Trace) -> int:
    """Tier-0 bytes at the worst event with every storage kept (as `Trace.observed_peak` is computed)."""
    n = len(trace.ops)
    diff = np.zeros(n + 1, dtype=np.int64)
    for s in trace.storages:
        start = 0 if s.producer is None else s.producer
        end = n - 1 if s.freed_after is None else s.freed_after
        if end >= start:
            diff[start] += s.nbytes
            diff[end + 1] -= s.nbytes
    return int(np.cumsum(diff[:n]).max()) if n else 0


def host_step(hierarchy: Hierarchy, d: "StateDecision") -> bool:
    """True when bucket `d` steps on the host, outside tier 0: its gradients and states both in host memory
    below a device tier 0 (runtime/host_step.py)."""
    return (d.grads is not None and d.tier is not None and not hierarchy.host_is_tier0
            and hierarchy.tier(d.tier).kind in HOST_KINDS and hierarchy.tier(d.grads).kind in HOST_KINDS)


def grad_stall_seconds(trace: Trace, hierarchy: Hierarchy,
                       decisions: Sequence["StateDecision"]) -> tuple[float, float, float]:
    """(exposed seconds, copy seconds, host-step seconds) of the tiered gradients of `decisions`."""
    backward = float(sum(op.duration for op in trace.ops if op.phase == "backward"))
    down = back = host = upload = 0.0
    for d in decisions:
        if d.grads is None:
            continue
        t = hierarchy.tier(d.grads)
        down += d.grad_nbytes / t.write_bandwidth + t.latency if t.write_bandwidth > 0 else 0.0
        down += d.grad_nbytes * t.host_cost_per_byte
        if hierarchy.host_is_tier0:  # read back into tier 0 for the bucket's step (not hidden: a bound)
            back += d.grad_nbytes / t.read_bandwidth + t.latency if t.read_bandwidth > 0 else 0.0
            back += d.grad_nbytes * t.host_cost_per_byte
        if host_step(hierarchy, d):
            # read parameter, gradient and states; write parameter and states
            host += (3 * d.grad_nbytes + 2 * d.nbytes) / HOST_STEP_BANDWIDTH
            up = hierarchy.host_tier() or t
            upload += d.grad_nbytes / up.read_bandwidth + up.latency if up.read_bandwidth > 0 else 0.0
    # the copies down overlap the rest of backward, unless they start at its end (under DDP)
    exposed = (down if trace.grads_at_backward_end else max(0.0, down - backward)) + back + host + upload
    return exposed, down + back, host

