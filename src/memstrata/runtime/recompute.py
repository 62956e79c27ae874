"""Recompute units: what the runtime does for a `UnitDecision`.

Unit interception (routing a unit module's forward through the runtime for
one step), the checkpoint call, the selective-checkpoint policy and the buffer
guard live here; the saved-tensor hooks (activations.py) decide nothing about
recompute, they only count packs.

[Note: recompute units]
A recomputed unit call runs under non-reentrant `torch.utils.checkpoint` with
`preserve_rng_state=True` (dropout and stochastic depth draw the same numbers
again).  `context_fn` returns (forward ctx, recompute ctx): for selective units
the forward ctx is SAC's caching mode with a policy that says MUST_SAVE for the
ops in `save_ops` and PREFER_RECOMPUTE otherwise; the recompute ctx composes
SAC's replay mode with a buffer guard that snapshots the unit's buffers when
recomputation starts and restores them after, so BatchNorm running statistics
and `num_batches_tracked` are updated once per step, as without memstrata.
The k-th op SAC shows the policy inside unit u is trace op `u.first_op + k`
after dropping the ops SAC never shows (`SAC_HIDDEN_OPS`); names are checked
and the first mismatch makes the rest of the unit PREFER_RECOMPUTE (exact).
Saves of a recomputed unit go to checkpoint's own hooks, not to ours, so after
the unit the pack counter jumps to `unit.pack_end`.  Which units may be
recomputed at all (not those writing an input in place: re-running them would
read the overwritten input) and which saves SAC can keep is the decision
space's call (trace/space.py): the runtime is handed legal plans only.  A
recomputed unit receives fresh copies of list/tuple/dict arguments (same
tensors), because callers may mutate a container after the call and
checkpoint re-runs the unit on the objects it was given (torchvision's
`_DenseBlock` appends to its list).

[Note: segments]
A segment (`UnitDecision(u, save_ops, end_unit=v)`) covers consecutive
children of one plain `nn.Sequential`.  For the step, that Sequential's
forward is replaced (an instance attribute, removed again) by one that calls
its children in order and runs the children of each planned segment as one
function under the same (selective) checkpoint as a unit, with a buffer guard
over all of them; the children's own forwards still pass through the
runtime's unit interception (which counts them, so the unit numbering stays
aligned, but does not recompute them on their own).  The segment is only
checkpointed when the step is where the trace says (unit call and pack
counters equal the segment's first unit's); otherwise its children run plainly
(exact, it only costs memory).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import checkpoint as _ckpt
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..decisions import Plan
from ..trace.schema import Trace, UnitRecord
from ..trace.space import SAC_HIDDEN_OPS, DecisionSpace
from .errors import UnrecomputableUnitError

_CKPT_KW: dict[str, Any] = {}
if "respect_saved_tensors_hooks" in inspect.signature(_ckpt.checkpoint).parameters:
    # Tensors SAC keeps stay in tier 0 (legacy behaviour), as the plan assumes.
    _CKPT_KW["respect_saved_tensors_hooks"] = False


@dataclass
class UnitPlan:
    """What the runtime does with one unit call of the trace (or with one segment: `record` is its span)."""

    record: UnitRecord
    recompute: bool
    selective: bool
    op_names: tuple[str, ...] = ()  # unit ops as SAC's policy sees them
    save_positions: frozenset[int] = frozenset()
    backward_anchor: int | None = None
    first_unit: int = -1  # segments: the first and last unit of the run
    last_unit: int = -1


def build_segment_plans(trace: Trace, plan: Plan, space: DecisionSpace, modules: dict[str, nn.Module],
                        notes: list[str]) -> dict[str, dict[int, UnitPlan]]:
    """Sequential name -> {first child position: segment plan} ([Note: segments]); the plan is legal."""
    out: dict[str, dict[int, UnitPlan]] = {}
    for dec in plan.units:
        if not dec.is_segment:
            continue
        k = space.segment_of(dec.unit, dec.last_unit)
        rec = space.ix.units[k]
        first, last = trace.units[dec.unit], trace.units[dec.last_unit]
        if rec.parent not in modules or not isinstance(modules[rec.parent], nn.Sequential):
            notes.append(f"segment {rec.module}: Sequential {rec.parent!r} not found in the model; not recomputed")
            continue
        up = UnitPlan(rec, recompute=True, selective=bool(dec.save_ops), first_unit=first.index, last_unit=last.index)
        if rec.first_backward_op is not None:
            up.backward_anchor = rec.first_backward_op - 1
        if dec.save_ops:
            up.op_names, up.save_positions = sac_positions(trace, rec, dec.save_ops)
        out.setdefault(rec.parent, {})[first.position] = up
    return out


def install_segment_forwards(parents: dict[str, nn.Module], segments: dict[str, dict[int, UnitPlan]],
                             call: Callable) -> Callable[[], None]:
    """Replace each planned Sequential's forward by one that hands each segment's children to
    `call(segment plan, children, input)`; returns `restore`."""
    installed: list[nn.Module] = []
    for name, by_pos in segments.items():
        seq = parents[name]

        def forward(input, _seq=seq, _by_pos=by_pos):
            children = list(_seq._modules.values())
            i = 0
            while i < len(children):
                up = _by_pos.get(i)
                if up is None:
                    input = children[i](input)
                    i += 1
                else:
                    n = up.last_unit - up.first_unit + 1
                    input = call(up, children[i : i + n], input)
                    i += n
            return input

        seq.forward = forward
        installed.append(seq)

    def restore() -> None:
        for seq in installed:
            seq.__dict__.pop("forward", None)

    return restore


def build_unit_plans(trace: Trace, plan: Plan, space: DecisionSpace, modules: dict[str, nn.Module],
                     notes: list[str]) -> list[UnitPlan]:
    """One `UnitPlan` per trace unit; the plan is legal (checked by the caller against `space`)."""
    decisions = {u.unit: u for u in plan.units if not u.is_segment}
    out: list[UnitPlan] = []
    for u in trace.units:
        dec = decisions.get(u.index)
        up = UnitPlan(u, recompute=False, selective=False)
        if u.first_backward_op is not None:
            up.backward_anchor = u.first_backward_op - 1
        if dec is not None:
            if u.module not in modules:
                notes.append(f"unit {u.index} ({u.module}) not found in the model; not recomputed")
            else:
                up.recompute = True
                if dec.save_ops:
                    up.selective = True
                    up.op_names, up.save_positions = sac_positions(trace, u, dec.save_ops)
        out.append(up)
    return out


def sac_positions(trace: Trace, u: UnitRecord, save_ops: tuple[int, ...]) -> tuple[tuple[str, ...], frozenset[int]]:
    """(the unit's op names as SAC's policy sees them, policy positions that are MUST_SAVE)."""
    want = set(save_ops)
    names: list[str] = []
    pos: set[int] = set()
    for op in trace.ops[u.first_op : u.last_op + 1]:
        if op.name in SAC_HIDDEN_OPS:
            continue
        if op.index in want:
            pos.add(len(names))
        names.append(op.name)
    return tuple(names), frozenset(pos)


class BufferGuard:
    """Recompute context: snapshot a unit's buffers on enter, restore them on exit.

    Composed with SAC's replay context (`inner`); `on_enter` / `on_exit` tell
    the runtime that a recomputation is running.  See [Note: recompute units].
    """

    def __init__(self, module: nn.Module | list[nn.Module], inner: Any, on_enter: Callable[[], None],
                 on_exit: Callable[[], None]) -> None:
        self.modules = [module] if isinstance(module, nn.Module) else list(module)
        self.inner = inner
        self.on_enter = on_enter
        self.on_exit = on_exit
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self.on_enter()
        with torch.no_grad():
            seen: set[int] = set()
            self.saved = []
            for m in self.modules:
                for b in m.buffers():
                    if id(b) not in seen:
                        seen.add(id(b))
                        self.saved.append((b, b.clone()))
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            with torch.no_grad():
                for b, snap in self.saved:
                    b.copy_(snap)
            self.saved = []
            self.on_exit()


class UnitPolicy:
    """SAC policy for one unit call: MUST_SAVE at the planned positions, else PREFER_RECOMPUTE."""

    def __init__(self, names: tuple[str, ...], save: frozenset[int]) -> None:
        self.names = names
        self.save = save
        self.k = 0
        self.kr = 0
        self.decisions: list[Any] = []
        self.mismatch = False

    def __call__(self, ctx, op, *args, **kwargs):
        P = _ckpt.CheckpointPolicy
        if getattr(ctx, "is_recompute", False):  # torch versions that ask again during recompute: replay
            k = self.kr
            self.kr += 1
            return self.decisions[k] if k < len(self.decisions) else P.PREFER_RECOMPUTE
        k = self.k
        self.k += 1
        if self.mismatch or k >= len(self.names) or str(op) != self.names[k]:
            self.mismatch = True
            d = P.PREFER_RECOMPUTE
        else:
            d = P.MUST_SAVE if k in self.save else P.PREFER_RECOMPUTE
        self.decisions.append(d)
        return d


def checkpoint_unit(up: UnitPlan, module: nn.Module | list[nn.Module], orig: Callable, args: tuple, kwargs: dict,
                    on_enter: Callable[[], None], on_exit: Callable[[], None]):
    """Run one unit call under (selective) checkpointing ([Note: recompute units])."""
    # Checkpoint re-runs `orig` on the very argument objects it was given.  Callers may
    # mutate a container after the call (torchvision's _DenseBlock appends to the list
    # it passed), so the unit gets fresh containers holding the same tensors.
    flat, spec = tree_flatten((args, kwargs))
    args, kwargs = tree_unflatten(flat, spec)
    versions = [(a, a._version) for a in flat if isinstance(a, torch.Tensor)]
    if up.selective:
        policy = UnitPolicy(up.op_names, up.save_positions)

        def context_fn():
            fwd, rec = _ckpt.create_selective_checkpoint_contexts(policy)
            return fwd, BufferGuard(module, rec, on_enter, on_exit)
    else:

        def context_fn():
            return contextlib.nullcontext(), BufferGuard(module, contextlib.nullcontext(), on_enter, on_exit)

    out = _ckpt.checkpoint(
        orig, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **_CKPT_KW, **kwargs
    )
    for a, v in versions:
        if a._version != v:
            raise UnrecomputableUnitError(
                f"unit {up.record.index} ({up.record.module}) wrote its input in place; "
                "recomputing it would not reproduce the forward. Re-trace, or exclude the unit."
            )
    return out


def install_unit_forwards(modules: dict[str, nn.Module], call: Callable) -> Callable[[], None]:
    """Route every unit module's forward through `call(name, module, orig, *args, **kwargs)`; returns `restore`.

    Instance attributes are set and removed again; nothing stays on the modules.
    """
    _missing = object()
    installed: list[tuple[nn.Module, Any]] = []
    for name, module in modules.items():
        prev = module.__dict__.get("forward", _missing)
        orig = module.forward
        module.forward = functools.partial(call, name, module, orig)
        installed.append((module, prev))

    def restore() -> None:
        for module, prev in installed:
            if prev is _missing:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev

    return restore
