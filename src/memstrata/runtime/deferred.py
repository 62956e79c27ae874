"""Deferred updates of state buckets: what a step records, and the model hooks that apply it.

`TieredOptimizer(..., model=model)` (states.py) steps its NVMe buckets (the
arena ring on a CPU tier 0), its host buckets (and NVMe buckets outside the
ring: on CUDA), and its kept ones, not inside `step()` but just before their
parameters are next used: `step()` records, per pending bucket, the gradients
and every param group's hyper-parameters as they are at `step()` time
(`PendingUpdate`), and a forward pre-hook on each module that owns one of the
bucket's parameters applies it (`ModelHooks`).

[Note: deferred updates]
Why: inside `step()` the disk must move every state byte that is not on the
fast tier in, and out again, at least 2 x (all states - budget) per step
([Note: what the state planner models] in plan/states.py), while the step's
own compute is only ~1.3 s for gpt2-350m on the CPU box: at the disk's
0.6-1.0 GB/s the step was disk-bound at 0.61-0.64x of unmanaged
(bench/results/2026-12-05-cpu-states/README.md).  A bucket's update only has
to be done before its parameters are next read, which is when the module that
owns them runs in the next forward.  Deferring it there widens the window the
state I/O may use from the optimizer step to the optimizer step *plus* the
next forward (and the ring reads the next step's first buckets during
backward: `TieredOptimizer._pump_idle`).  The kept buckets (states on the
fast tier) whose parameters are all the model's are deferred too: stepped in
`step()` they would run while every arena holds a bucket waiting for the
forward, with the disk idle; in the forward their compute sits between the
NVMe buckets' and the ring reads under it.  So `step()` itself only records;
parameters no module of the model owns are stepped in it (host buckets:
[Note: deferred host buckets]).

Why it is exact: the deferred update is the wrapped optimizer's own step on
that bucket, on the same values: the gradients recorded at `step()` (after the
user's clipping and accumulation), the hyper-parameters recorded at `step()`
(an LR scheduler's `step()` in between changes only the live param groups),
the states and parameters as they were left (nothing else writes them in
between).  Per-parameter optimizers make that the same arithmetic as the step
in `step()` ([Note: per-bucket steps are the full step] in states.py).

What must see the update first (each forces every pending update:
`TieredOptimizer.flush()`): the optimizer's `state_dict()`,
`load_state_dict()`, `set_placement()`, `close()`, a second `step()` before a
forward; the model's `state_dict()` and `load_state_dict()` (hooks here); a
forward (the pre-hook, also under `no_grad`/`eval()`).  `zero_grad(
set_to_none=False)` of the `TieredOptimizer` hands pending parameters a fresh
zero gradient and keeps the recorded one.  Not seen by any hook, so call
`flush()` first: reading or writing parameters directly between `step()` and
the next forward (an EMA, `torch.save(model)` of the whole module,
`model.zero_grad(set_to_none=False)`: an in-place change of a recorded
gradient is caught at apply time by its version counter and raises), and a
parameter used in a forward by a module that does not own it (the hook is on
the owner).  `defer=False` turns it off.

[Note: deferred host buckets]
On CUDA the tier below HBM is host DRAM: a host bucket's states cross PCIe
twice per step (up for the update, down after it).  Stepped inside `step()`
those copies are exposed: the step waits for each bucket's copy up, and only
the neighbouring buckets' compute hides it.  Deferred like the ring's
buckets, a host bucket (and an NVMe bucket outside the ring: NVMe below a
device, or any `RecordingStreams` mover) is read ahead, updated and written
behind around the forward:
* read ahead: `step()` starts copying up the first `prefetch_depth` pending
  host buckets (in the last forward's order; on the h2d side stream, pinned
  buffers: [Note: stream hand-offs] in streams.py), and applying bucket k
  starts the next `prefetch_depth` after it, so bucket k+1's copy runs under
  module k's forward;
* applied in the forward pre-hook of its module: `restore` makes compute
  wait on the copy's event only there (usually long landed), then the
  wrapped optimizer's own step on the recorded gradients and hyper-
  parameters (so exact, as above);
* written behind: the copy down is queued on the d2h stream after the
  update (it waits for compute only up to that point) and the tier-0 states
  are dropped at once (`record_stream` keeps their block until the copy
  ran); the next modules' forward runs under it.  NVMe slots keep their
  tier-0 copy until the write lands: at most two such buckets are behind
  (the write window of [Note: the state window]); failures are raised by the
  next `step()` / `flush()`, as for the ring.
So tier 0 holds at most ``prefetch_depth + 1`` host buckets' states at once
(plus copies in flight), and the copies overlap the forward instead of the
optimizer step.  Why not step each bucket in backward, as its gradients
become final (torchao's `CPUOffloadOptimizer`)?  Global-norm clipping and
gradient accumulation need every gradient final before any update: a step
in backward changes the result; the forward after `step()` has the same
compute to hide the copies behind and keeps the update the same arithmetic
on the same values.  The update's own compute is not hidden (it runs on the
compute stream, as inside `step()`).  Without CUDA (`HostStreams`), the same
path runs with synchronous copies into a separate host buffer: the CPU tests
cover it.  FSDP2's DTensor parameters are not deferred (FSDP's pre-forward
hook gathers them before ours could update them).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def capture_hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every param group's hyper-parameters now (tensors cloned: a scheduler may `fill_` a tensor lr)."""
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"} for g in groups]


class PendingUpdate:
    """One bucket's update recorded at `step()`: the step's hyper-parameters and the bucket's gradients."""

    __slots__ = ("hyper", "grads", "versions")

    def __init__(self, hyper: list[dict[str, Any]], params: Iterable[torch.Tensor]) -> None:
        self.hyper = hyper
        self.grads = [p.grad for p in params]
        self.versions = [g._version if g is not None else 0 for g in self.grads]

    def changed(self) -> int | None:
        """Position of a recorded gradient modified in place since `step()` (None: all intact)."""
        for k, (g, v) in enumerate(zip(self.grads, self.versions)):
            if g is not None and g._version != v:
                return k
        return None


class ModelHooks:
    """Forward pre-hooks (apply a module's pending buckets), state-dict hooks (apply all) and
    post-accumulate-grad hooks (read the next step's first buckets during backward) on `model`."""

    def __init__(self, model: torch.nn.Module, owner_of: dict[int, Any], *,
                 apply: Callable[[Any], None], flush: Callable[[], None],
                 idle: Callable[[], None] | None) -> None:
        self.handles: list[Any] = []
        covered: set[int] = set()
        for m in model.modules():
            owned: list[Any] = []
            for p in m.parameters(recurse=False):
                e = owner_of.get(id(p))
                if e is not None and all(e is not o for o in owned):
                    owned.append(e)
                covered.add(id(p))
            if not owned:
                continue
            self.handles.append(m.register_forward_pre_hook(_Apply(tuple(owned), apply)))
            self.handles.append(m.register_state_dict_pre_hook(lambda *_a: flush()))
            self.handles.append(m.register_load_state_dict_pre_hook(lambda *_a: flush()))
        missing = [pid for pid in owner_of if pid not in covered]
        if missing:
            raise ValueError(f"TieredOptimizer: {len(missing)} parameter(s) of deferred state buckets are not "
                             f"parameters of the model given for deferred updates: pass the model they belong to, "
                             f"or defer=False")
        seen: set[int] = set()
        for p in (model.parameters() if idle is not None else ()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.handles.append(p.register_post_accumulate_grad_hook(lambda _p: idle()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _Apply:
    __slots__ = ("entries", "apply")

    def __init__(self, entries: tuple[Any, ...], apply: Callable[[Any], None]) -> None:
        self.entries = entries
        self.apply = apply

    def __call__(self, _module: torch.nn.Module, _args: Any) -> None:
        for e in self.entries:
            if e.pending is not None:
                self.apply(e)


__all__ = ["PendingUpdate", "ModelHooks", "capture_hyper"]
