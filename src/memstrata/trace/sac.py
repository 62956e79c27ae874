"""Which forward ops of a unit selective checkpointing can keep.

SAC caches an op's output by reference and refuses, at backward, a cached
tensor that was mutated after it was cached.  So an op's output can be kept
(MUST_SAVE) only when the op is not in place (its output is its input), its
outputs are not persistent state (a BatchNorm buffer's `add_`, a parameter
view: the optimizer and the next step update them), and no later forward op
writes one of its outputs in place (`relu_` on a batch-norm output).  The
planner plans with exactly this set and the runtime enforces it, so what the
simulator predicts is what runs.
"""

from __future__ import annotations

from .schema import Trace, UnitRecord


def is_inplace_op(name: str) -> bool:
    """'aten.relu_.default' -> True; 'aten.relu.default' -> False."""
    parts = name.split(".")
    base = parts[1] if len(parts) > 1 else parts[0]
    return base.endswith("_") and not base.endswith("__")


def sac_cacheable_ops(trace: Trace, unit: UnitRecord) -> frozenset[int]:
    """Op indices of `unit`'s forward whose outputs SAC can keep (see module doc)."""
    ops, storages = trace.ops, trace.storages
    written_later: dict[int, int] = {}
    for op in ops[unit.first_op : trace.forward_end + 1]:
        if is_inplace_op(op.name):
            for s in op.outputs:
                written_later[s] = max(written_later.get(s, -1), op.index)
    out = set()
    for op in ops[unit.first_op : unit.last_op + 1]:
        if (
            not is_inplace_op(op.name)
            and bool(op.outputs)
            and not any(storages[s].persistent or storages[s].kind in ("parameter", "buffer") for s in op.outputs)
            and not any(written_later.get(s, -1) > op.index for s in op.outputs)
        ):
            out.add(op.index)
    return frozenset(out)
