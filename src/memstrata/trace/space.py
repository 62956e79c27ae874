"""The decision space: what may be decided for one trace, derived once, read by everyone.

Planners choose from it, the simulator validates plans against it, forced plans
are built from it and the runtime asserts that the plan it is given stays
inside it.  Nothing else in the package decides what is offloadable,
recomputable or heavy.

>>> from memstrata.trace.space import decision_space, is_heavy_op
>>> is_heavy_op("aten.convolution.default"), is_heavy_op("aten.relu.default")
(True, False)
>>> space = decision_space(trace)                                    # doctest: +SKIP
>>> space.recomputable[0], space.why_not(3)                           # doctest: +SKIP
(True, 'aten.relu_.default (event 41) writes an input of the unit in place')

[Note: the legal menu]
* offload: a storage that autograd saves for backward (`saved`, kind
  "activation"), that the runtime can find again (it has pack positions), that
  some backward op reads and that is live at some event.  Destinations: the
  lower tiers of the hierarchy.  On a CPU hierarchy (host RAM *is* tier 0) an
  offload to tier 0's own name is legal too: it exercises the host buffer pool
  (a copy in the same RAM) and frees nothing, which is what the simulator
  predicts for it.
* recompute a unit: the unit has a backward, saves something inside itself,
  and none of its forward ops writes one of its inputs in place (re-running it
  would read the overwritten input).  Selective recompute may keep the outputs
  of `cacheable_ops(u)` only (trace/sac.py: what torch's SAC can cache).
* segments: a run of >= 2 consecutive units that are consecutive children of
  one plain `nn.Sequential`, called back to back (`index.segment_spans`), up to
  `MAX_SEGMENT_UNITS` long; legal under the same rules as a unit, applied to
  the whole run (its inputs are the first unit's).  Spans (units, then
  segments) share one index space: span u >= `len(trace.units)` is a segment.
  Two chosen spans may not share a unit.
* replay (op-level recompute) of a saved storage: `replay_chain(sid)`, the
  forward ops that recompute it from inputs that stay in tier 0 anyway (saved
  storages, parameters, buffers; or storages replayed themselves): walking back
  from its last writer, a read storage that is not saved and was written
  earlier in the same unit (or in a unit just before it: [Note: replays across
  units]) is recomputed through its last writer too.  Legal when every op of
  the chain is in `REPLAYABLE_OP_PREFIXES` (cheap and deterministic: the same
  kernel on the same inputs gives the same bits) or is a heavy op that reads
  only the batch and parameters ([Note: replays from the batch]), or the chain
  is one heavy op whose inputs are saved storages, parameters or the batch
  ([Note: heavy replays]), none draws
  random numbers, all run in one unit or consecutive ones with no op outside
  every unit between them, no later forward op writes the
  storage or a held input (buffers the chain updates, BatchNorm's running
  statistics, are snapshotted when the op runs and the replay updates the
  snapshot, never the buffer), and the chain has at most `MAX_REPLAY_OPS`
  ops.  In a plan: the storage is not offloaded, not dropped by a recompute,
  none of its units is recomputed, and its held inputs are neither offloaded nor
  dropped (the replay recipe pins them).
* heavy ops: one taxonomy (`is_heavy_op`) for planners ("keep the outputs of
  convolutions and matrix products") and forced plans; the roofline may add
  ops that are flop-bound for a given hierarchy (`heavy_ops`).
A decision outside the menu raises `PlanError` in the simulator and the
runtime; planners ask `problem()` (or `simulate.try_run`) instead of catching.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Mapping

import numpy as np

from ..decisions import Offload, Plan, PlanError
from ..hardware import Hierarchy
from .index import TraceIndex, UnitEffect, trace_index
from .sac import is_inplace_op, sac_cacheable_ops
from .schema import Trace, UnitRecord

__all__ = ["DecisionSpace", "SIGN_READERS", "SIGN_WRITERS", "SIGN_DTYPES", "decision_space", "is_heavy_op",
           "op_base_name", "HEAVY_OP_PREFIXES", "SAC_HIDDEN_OPS",
           "REPLAYABLE_OP_PREFIXES", "is_replayable_op", "draws_random_numbers", "MAX_REPLAY_OPS"]

# Compute-bound op families: convolutions, matrix products, attention.  Matched on the aten base name with
# leading underscores removed ("_convolution", "mkldnn_convolution", "_scaled_dot_product_flash_attention").
HEAVY_OP_PREFIXES = ("convolution", "conv1d", "conv2d", "conv3d", "mm", "addmm", "bmm", "baddbmm", "matmul", "linear",
                     "scaled_dot_product", "einsum")
_HEAVY_INFIXES = ("_convolution",)  # mkldnn_convolution, cudnn_convolution, miopen_convolution, ...


def op_base_name(name: str) -> str:
    """'aten.convolution.default' -> 'convolution'; plain names pass through."""
    parts = name.split(".")
    return parts[1] if name.startswith("aten.") and len(parts) > 1 else parts[0]


def is_heavy_op(name: str) -> bool:
    """Convolutions, matrix products and attention: the ops whose outputs selective recompute keeps."""
    base = op_base_name(name)
    if base.endswith("_backward") or "_backward_" in base:
        return False
    stripped = base.lstrip("_")
    return stripped.startswith(HEAVY_OP_PREFIXES) or any(i in base for i in _HEAVY_INFIXES)


# Cheap, deterministic forward ops a replay may re-run (matched on the aten base name, exactly or as a prefix
# followed by "_": "relu" matches relu and relu_).  Normalisation (its batch statistics are recomputed by the same
# kernel from the same input), elementwise ops, pooling.
REPLAYABLE_OP_PREFIXES = ("native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm", "miopen_batch_norm",
                          "native_layer_norm", "native_group_norm", "relu", "threshold", "add", "sub", "mul", "div",
                          "sigmoid", "silu", "hardswish", "hardsigmoid", "hardtanh", "clamp", "gelu", "tanh",
                          "leaky_relu", "elu", "neg", "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d",
                          "mean")
MAX_REPLAY_OPS = 8
# [Note: sign replays] (runtime/signs.py): the forward writer and the backward readers of a storage that a sign
# replay may keep as one bit per element
SIGN_WRITERS = frozenset({"aten.relu.default"})
SIGN_READERS = frozenset({"aten.threshold_backward.default", "aten.max_pool2d_with_indices_backward.default"})
SIGN_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
HEAVY_REPLAYS = True  # [Note: heavy replays]
_RANDOM_MARKERS = ("dropout", "bernoulli", "rand", "normal", "uniform", "multinomial", "poisson", "exponential")


def draws_random_numbers(name: str) -> bool:
    base = op_base_name(name)
    return any(m in base for m in _RANDOM_MARKERS)


def is_replayable_op(name: str) -> bool:
    """Ops a replay may re-run: cheap, deterministic, in `REPLAYABLE_OP_PREFIXES`, no random numbers."""
    base = op_base_name(name)
    if draws_random_numbers(name) or base.endswith("_backward") or "_backward_" in base:
        return False
    return any(base == p or base == p + "_" or base.startswith(p + ".") or
               (p.endswith("_legit") and base.startswith(p)) for p in REPLAYABLE_OP_PREFIXES)


def _sac_hidden_ops() -> frozenset[str]:
    """Ops torch's selective checkpointing never shows its policy (one list for tracer and runtime)."""
    try:
        from torch.utils.checkpoint import SAC_IGNORED_OPS
    except ImportError:  # pragma: no cover - older torch
        return frozenset({"aten.detach.default", "prim.device.default"})
    return frozenset(str(op) for op in SAC_IGNORED_OPS)


SAC_HIDDEN_OPS: frozenset[str] = _sac_hidden_ops()


class DecisionSpace:
    """The legal decisions for one trace ([Note: the legal menu])."""

    def __init__(self, ix: TraceIndex) -> None:
        self.ix = ix
        trace = ix.trace
        sts = trace.storages
        self.offloadable = np.array(
            [s.saved and s.kind == "activation" and bool(s.backward_reads) and bool(s.pack_indices) for s in sts],
            dtype=bool) & ~ix.never_live
        self._why_not: dict[int, str] = {}
        for u in ix.units:  # units, then segments (spans: [Note: the legal menu])
            why = self._unit_problem(trace, u)
            if why:
                self._why_not[u.index] = why
        self.recomputable = tuple(u.index not in self._why_not for u in ix.units)
        self._cacheable: dict[int, frozenset[int]] = {}
        self._chains: dict[int, tuple[tuple[int, ...], tuple[int, ...], str]] = {}  # sid -> (ops, held, why_not)
        self._sign_only: dict[int, bool] = {}
        self._outside: np.ndarray | None = None  # ops outside every unit, cumulated (replays across units)
        self._last_fwd_write: dict[int, int] | None = None

    @property
    def trace(self) -> Trace:
        return self.ix.trace

    # ------------------------------------------------------------------ units
    @staticmethod
    def _unit_problem(trace: Trace, unit: UnitRecord) -> str:
        if unit.first_backward_op is None:
            return "has no backward"
        if unit.pack_end <= unit.pack_start:
            return "saves nothing for backward"
        inputs = set(unit.inputs)
        for op in trace.ops[unit.first_op : unit.last_op + 1]:
            if is_inplace_op(op.name) and inputs.intersection(op.outputs):
                return f"{op.name} (event {op.index}) writes an input of the unit in place"
        return ""

    def why_not(self, u: int) -> str:
        """Why unit u may not be recomputed ('' when it may)."""
        return self._why_not.get(u, "")

    def recomputable_units(self) -> list[int]:
        """Units (not segments) that may be recomputed."""
        return [u for u, ok in enumerate(self.recomputable[: self.ix.num_units]) if ok]

    def legal_segments(self) -> list[int]:
        """Span indices of the segments that may be recomputed."""
        return [u for u in range(self.ix.num_units, len(self.ix.units)) if self.recomputable[u]]

    def segment_of(self, unit: int, end_unit: int) -> int | None:
        """The span index of segment unit..end_unit, if the trace has one (legal or not)."""
        return self.ix.span_of(unit, end_unit)

    def overlap(self, a: int, b: int) -> bool:
        """True if spans a and b share a unit."""
        a0, a1 = self.ix.span(a)
        b0, b1 = self.ix.span(b)
        return not (a1 < b0 or b1 < a0)

    def cacheable_ops(self, u: int) -> frozenset[int]:
        """Ops of span u whose outputs selective recompute may keep (trace/sac.py)."""
        c = self._cacheable.get(u)
        if c is None:
            c = self._cacheable[u] = sac_cacheable_ops(self.trace, self.ix.units[u])
        return c

    # ------------------------------------------------------------------ replays (op-level recompute)
    def _from_batch(self, op) -> bool:
        """A heavy op (`is_heavy_op`) that reads only the step's inputs and parameters: a replay may re-run it
        (the same kernel on the same persistent inputs; [Note: replays from the batch])."""
        sts = self.trace.storages
        return (is_heavy_op(op.name) and not draws_random_numbers(op.name) and bool(op.inputs)
                and all(sts[x].kind in ("input", "parameter") for x in op.inputs)
                and any(sts[x].kind == "input" for x in op.inputs))

    def _from_kept(self, op) -> bool:
        """A heavy op whose every input is a saved storage, a parameter or a step input: a replay may re-run it
        alone, holding its saved inputs ([Note: heavy replays])."""
        if not HEAVY_REPLAYS or not is_heavy_op(op.name) or draws_random_numbers(op.name) or not op.inputs:
            return False
        sts = self.trace.storages
        return all(sts[x].kind in ("input", "parameter") or sts[x].persistent or
                   (sts[x].saved and sts[x].kind == "activation") for x in op.inputs)

    def _outside_units(self) -> np.ndarray:
        """outside[j]: how many forward ops before op j run outside every unit."""
        if self._outside is None:
            flags = np.array([op.unit is None for op in self.trace.ops], dtype=np.int64)
            self._outside = np.concatenate(([0], np.cumsum(flags)))
        return self._outside

    def replay_units(self, sid: int) -> tuple[int, ...]:
        """The units whose forward runs sid's replay chain (one, or consecutive ones)."""
        return tuple(sorted({self.trace.ops[j].unit for j in self.replay_chain(sid)}))

    def replay_chain(self, sid: int) -> tuple[int, ...]:
        """The forward ops that regenerate saved storage sid, in order; () if it cannot be replayed."""
        return self._chain(sid)[0]

    def replay_inputs(self, sid: int) -> tuple[int, ...]:
        """Storages a replay of sid reads and holds until it runs (not parameters or buffers)."""
        return self._chain(sid)[1]

    def why_not_replay(self, sid: int) -> str:
        """Why storage sid may not be replayed ('' when it may)."""
        return self._chain(sid)[2]

    def sign_replays(self, replays: Mapping[int, tuple[int, ...]]) -> frozenset[int]:
        """The replays of `replays` (sid -> ops) that run as sign replays ([Note: sign replays] in
        runtime/signs.py): sign-only storages replayed on their own chain with no other storage sharing the run
        (a shared run re-runs the chain for its guests anyway, and regenerates its host on the way), and that
        no other replay of the plan reads."""
        runs: dict[tuple[int, ...], int] = {}
        for c in replays.values():
            runs[tuple(c)] = runs.get(tuple(c), 0) + 1
        cand = [s for s, c in replays.items() if runs[tuple(c)] == 1 and self.sign_only(s)
                and tuple(c) == self.replay_chain(s)]
        if not cand:
            return frozenset()
        # another replay that reads it (max-pool's outputs re-made from the ReLU's) needs its values
        read = {x for s in replays for x in self.replay_inputs(s)}
        return frozenset(s for s in cand if s not in read)

    def sign_only(self, sid: int) -> bool:
        """Storage sid is read in backward only through its sign ([Note: sign replays] in runtime/signs.py): a
        replay of it alone may keep one bit per element and re-run nothing, hold nothing (`sign_replays`)."""
        hit = self._sign_only.get(sid)
        if hit is None:
            hit = self._sign_only[sid] = self._derive_sign_only(sid)
        return hit

    def _derive_sign_only(self, sid: int) -> bool:
        trace = self.trace
        s = trace.storages[sid]
        if not (s.saved and s.kind == "activation" and s.backward_reads and s.producer is not None
                and s.dtype in SIGN_DTYPES):
            return False
        ops, fe = trace.ops, trace.forward_end
        if ops[s.producer].name not in SIGN_WRITERS:
            return False
        for op in ops[: fe + 1]:
            if sid in op.outputs and op.index != s.producer:
                return False  # written again (in place) after the ReLU
            if sid in op.inputs and op_base_name(op.name).startswith("threshold"):
                return False  # a Threshold's backward reads it with another threshold
        # detach (autograd's unpack of the saved variable) reads no values
        return all(ops[j].name in SAC_HIDDEN_OPS or (ops[j].name in SIGN_READERS and ops[j].inputs[:1] != (sid,))
                   for j in s.backward_reads)

    def why_not_shared(self, sid: int, ops: tuple[int, ...], replays: Mapping[int, tuple[int, ...]]) -> str:
        """Why saved storage sid may not be regenerated by the shared run of another replay's chain `ops`
        ('' when it may; [Note: shared replays])."""
        host = self.replay_host(ops, replays)
        if host is None:
            return "no replay in the plan has these ops as its own chain"
        if self.replay_chain(sid)[-1] not in ops:
            return f"its last forward writer (event {self.replay_chain(sid)[-1]}) is not one of them"
        return ""

    def replay_host(self, ops: tuple[int, ...], replays: Mapping[int, tuple[int, ...]]) -> int | None:
        """The replayed storage whose own chain is `ops` (the run's host), or None ([Note: shared replays])."""
        hosts = [s for s, c in replays.items() if tuple(c) == tuple(ops) and self.replay_chain(s) == tuple(ops)]
        return min(hosts) if hosts else None

    def replay_groups(self, replays: Mapping[int, tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
        """ops -> the replayed storages one run of them regenerates (host first, then by id;
        [Note: shared replays])."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for s in sorted(replays):
            groups.setdefault(tuple(replays[s]), []).append(s)
        out = {}
        for ops, members in groups.items():
            host = self.replay_host(ops, replays)
            out[ops] = tuple([host] + [m for m in members if m != host]) if host is not None else tuple(members)
        return out

    def shared_options(self, sid: int, replays: Mapping[int, tuple[int, ...]]) -> list[int]:
        """Replayed storages (hosts, with their own chain) whose run could also regenerate sid."""
        last = self.replay_chain(sid)[-1] if not self.why_not_replay(sid) else None
        return [h for h, c in replays.items() if h != sid and last is not None and last in c
                and tuple(c) == self.replay_chain(h) and tuple(c) != self.replay_chain(sid)]

    def shared_chains(self, sids) -> dict[int, tuple[int, ...]]:
        """Replays of `sids` with every run shared that can be ([Note: shared replays]): sid -> ops, where a
        storage whose last forward writer runs in another's (longer) chain takes that chain."""
        own = {s: self.replay_chain(s) for s in sids}
        out = dict(own)
        guests = set()
        for s in sorted(own, key=lambda s: own[s][-1]):
            hosts = [h for h in self.shared_options(s, own) if h not in guests]
            if hosts and s not in {g for g in out if out[g] != own[g]}:
                h = max(hosts, key=lambda h: (len(own[h]), -h))
                if not any(out[g] == own[s] and g != s for g in out):  # s hosts nobody
                    out[s] = own[h]
                    guests.add(s)
        return out

    def replayable_storages(self) -> list[int]:
        return [s.id for s in self.trace.storages if s.saved and not self.why_not_replay(s.id)]

    def _chain(self, sid: int) -> tuple[tuple[int, ...], tuple[int, ...], str]:
        hit = self._chains.get(sid)
        if hit is None:
            hit = self._chains[sid] = self._derive_chain(sid)
        return hit

    def _derive_chain(self, sid: int) -> tuple[tuple[int, ...], tuple[int, ...], str]:
        trace = self.trace
        ops, sts = trace.ops, trace.storages
        s = sts[sid]
        if not (s.saved and s.kind == "activation" and s.backward_reads and s.pack_indices) or not self.offloadable[sid]:
            return (), (), "not a saved activation read in backward"
        fe = trace.forward_end
        writes: dict[int, list[int]] = {}
        for op in ops[: fe + 1]:
            for o in op.outputs:
                writes.setdefault(o, []).append(op.index)
        w = writes.get(sid, [])
        if not w:
            return (), (), "no forward op writes it"
        last = w[-1]
        unit = ops[last].unit
        if unit is None:
            return (), (), f"{ops[last].name} (event {last}) runs outside every unit"

        def writer_before(x: int, j: int) -> int | None:
            ws = writes.get(x, [])
            k = bisect.bisect_left(ws, j) - 1
            return ws[k] if k >= 0 else None

        outside = self._outside_units()

        def joined(j: int) -> bool:
            """Op j may be in the chain ending at `last`: in the same unit, or in an earlier unit with no op
            outside every unit in between ([Note: replays across units])."""
            if ops[j].unit == unit:
                return True
            return ops[j].unit is not None and outside[last + 1] == outside[j]

        chain: set[int] = set()
        held: set[int] = set()
        todo = [last]
        while todo:
            j = todo.pop()
            if j in chain:
                continue
            op = ops[j]
            if draws_random_numbers(op.name):
                return (), (), f"{op.name} (event {j}) draws random numbers"
            if not is_replayable_op(op.name) and not self._from_batch(op) and not (j == last and self._from_kept(op)):
                return (), (), f"{op.name} (event {j}) is not a cheap deterministic op a replay may re-run"
            if not joined(j):
                return (), (), f"its ops run in more than one unit, with ops outside every unit between (event {j})"
            chain.add(j)
            if len(chain) > MAX_REPLAY_OPS:
                return (), (), f"regenerating it takes more than {MAX_REPLAY_OPS} ops"
            for x in op.inputs:
                if x == sid and j == last and writer_before(x, j) is None:
                    continue
                sx = sts[x]
                if sx.kind == "parameter" and sx.freed_after is not None and sx.freed_after < (sx.producer or 0):
                    # tiered between uses ([Note: parameters in the plan] in trace/params.py): a replay runs in
                    # another module's backward, where it is not resident
                    return (), (), f"{op.name} (event {j}) reads a parameter kept below tier 0 between uses"
                if sx.kind in ("parameter", "buffer") or sx.persistent:
                    continue
                p = writer_before(x, j)
                if x != sid and sx.saved and not (p is not None and joined(p) and self._from_batch(ops[p])):
                    held.add(x)
                elif p is not None and joined(p):
                    todo.append(p)
                elif x == sid:
                    return (), (), f"{op.name} (event {j}) updates it in place from a value made outside its unit"
                else:
                    held.add(x)
        order = tuple(sorted(chain))
        for j in w:
            if j > last:
                return (), (), f"written again in place after its last replayable writer (event {j})"
        for x in held:
            later = [j for j in writes.get(x, []) if j > order[0]]
            if later:
                return (), (), f"its input storage {x} is written in place later (event {later[0]})"
        for j in order:  # chain intermediates that are written by a non-chain op in between cannot be replayed
            for o in ops[j].outputs:
                for k in writes.get(o, []):
                    if order[0] < k < order[-1] and k not in chain:
                        return (), (), f"storage {o} of the chain is written by {ops[k].name} (event {k}) in between"
        return order, tuple(sorted(held)), ""

    def heavy_ops(self, u: int, hierarchy: Hierarchy | None = None) -> tuple[int, ...]:
        """Compute-bound ops of span u: `is_heavy_op`, or flop-bound on `hierarchy`'s roofline."""
        unit = self.ix.units[u]
        pf = hierarchy.peak_flops if hierarchy is not None else None
        bw = hierarchy.fast_bandwidth if hierarchy is not None else None
        out = []
        for j in range(unit.first_op, unit.last_op + 1):
            op = self.trace.ops[j]
            heavy = is_heavy_op(op.name)
            if not heavy and pf and bw and op.flops > 0:
                heavy = op.flops / pf > op.bytes_accessed / bw
            if heavy:
                out.append(j)
        return tuple(out)

    # ------------------------------------------------------------------ tiers
    @staticmethod
    def offload_tiers(hierarchy: Hierarchy) -> tuple[int, ...]:
        """Tier indices a planner may offload to: every lower tier."""
        return tuple(range(1, len(hierarchy.tiers)))

    @staticmethod
    def legal_tier(hierarchy: Hierarchy, ti: int) -> bool:
        return 1 <= ti < len(hierarchy.tiers) or (ti == 0 and hierarchy.host_is_tier0)

    # ------------------------------------------------------------------ validation
    def decisions_of(self, plan: Plan, hierarchy: Hierarchy) -> tuple[dict[int, Offload], dict[int, tuple[int, ...]]]:
        """A plan's decisions as (sid -> Offload, span -> save_ops), checked: `PlanError` if any is illegal.

        Replays are checked too (`replays_of` gives them to the simulator).
        """
        offloads, units = self._decisions(plan, hierarchy)
        problem = self.problem(hierarchy, offloads, units, self.replays_of(plan))
        if problem:
            raise PlanError(problem)
        return offloads, units

    def replays_of(self, plan: Plan) -> dict[int, tuple[int, ...]]:
        """A plan's replays as sid -> ops (legality: `resolve`)."""
        out: dict[int, tuple[int, ...]] = {}
        for r in plan.replays:
            if not 0 <= r.storage < len(self.trace.storages):
                raise PlanError(f"plan replays storage {r.storage}, which the trace does not have")
            if r.storage in out:
                raise PlanError(f"storage {r.storage} has more than one replay")
            out[r.storage] = tuple(r.ops)
        return out

    def _decisions(self, plan: Plan, hierarchy: Hierarchy) -> tuple[dict[int, Offload], dict[int, tuple[int, ...]]]:
        trace = self.trace
        names = [t.name for t in hierarchy.tiers]
        offloads: dict[int, Offload] = {}
        seen: set[int] = set()
        for d in plan.storages:
            if not 0 <= d.storage < len(trace.storages):
                raise PlanError(f"plan names storage {d.storage}, which the trace does not have")
            if d.storage in seen:
                raise PlanError(f"storage {d.storage} has more than one decision")
            seen.add(d.storage)
            if d.action == "keep":
                continue
            if d.tier not in names or not self.legal_tier(hierarchy, names.index(d.tier)):
                raise PlanError(f"storage {d.storage}: offload tier {d.tier!r} is not a lower tier of {names}")
            offloads[d.storage] = Offload(names.index(d.tier), int(d.evict_after), int(d.prefetch_at))
        units: dict[int, tuple[int, ...]] = {}
        for u in plan.units:
            if not 0 <= u.unit < len(trace.units) or (u.end_unit is not None and not u.end_unit < len(trace.units)):
                raise PlanError(f"plan names unit {u.unit if u.end_unit is None else u.end_unit}, "
                                "which the trace does not have")
            k = self.ix.span_of(u.unit, u.end_unit)
            if k is None:
                raise PlanError(f"units {u.unit}..{u.end_unit} are not a segment: not consecutive children of one "
                                f"plain nn.Sequential called back to back, or longer than the longest segment")
            if k in units:
                raise PlanError(f"unit {u.unit} has more than one decision")
            units[k] = tuple(sorted(u.save_ops))
        return offloads, units

    def problem(self, hierarchy: Hierarchy, offloads: Mapping[int, Offload],
                units: Mapping[int, tuple[int, ...]], replays: Mapping[int, tuple[int, ...]] | None = None) -> str:
        """The first reason these decisions are illegal, or '' (needs the effects: see `resolve`)."""
        return self.resolve(hierarchy, offloads, units, replays)[2]

    def resolve(self, hierarchy: Hierarchy, offloads: Mapping[int, Offload], units: Mapping[int, tuple[int, ...]],
                replays: Mapping[int, tuple[int, ...]] | None = None
                ) -> tuple[dict[int, UnitEffect], dict[int, int], str]:
        """(span effects, need event per offloaded storage, problem) for a set of decisions.

        `problem` is '' for legal decisions; otherwise effects/needs are partial.
        The *need* event of an offload is its first access after eviction (a
        forward or backward read/write, or the recompute of a recomputed unit
        that has it as an input); `prefetch_at <= need` is required.
        """
        ix = self.ix
        trace = ix.trace
        n = ix.n
        for u, S in units.items():
            if not 0 <= u < len(ix.units):
                return {}, {}, f"unit {u} is not in the trace"
            if not self.recomputable[u]:
                return {}, {}, f"unit {u} ({ix.units[u].module}) cannot be recomputed: {self.why_not(u)}"
            unit = ix.units[u]
            for j in S:
                if not unit.first_op <= j <= unit.last_op:
                    return {}, {}, f"unit {u}: save_op {j} is outside the unit's ops [{unit.first_op}, {unit.last_op}]"
                if j not in self.cacheable_ops(u):
                    return {}, {}, (f"unit {u}: save_op {j} ({trace.ops[j].name}) cannot be kept by selective "
                                    "recompute (in place, persistent or later mutated output)")
        if any(u >= ix.num_units for u in units):  # a segment: no two spans may share a unit
            spans = sorted(units, key=ix.span)
            for a, b in zip(spans, spans[1:]):
                if self.overlap(a, b):
                    return {}, {}, f"recompute decisions {ix.units[a].module} and {ix.units[b].module} share a unit"
        rec_inputs = frozenset(sid for u in units for sid in ix.units[u].inputs)
        effects = {u: ix.unit_effect(u, tuple(sorted(S)), rec_inputs) for u, S in units.items()}
        dropped = {sid for eff in effects.values() for sid in eff.dropped}
        ends = ix.end
        needs: dict[int, int] = {}
        if replays:
            covered = set()
            for u in units:
                a, b = ix.span(u)
                covered.update(range(a, b + 1))
            for sid, ops_ in replays.items():
                if not 0 <= sid < len(trace.storages):
                    return effects, needs, f"storage {sid} is not in the trace"
                why = self.why_not_replay(sid)
                if why:
                    return effects, needs, f"storage {sid} cannot be replayed: {why}"
                chain = self.replay_chain(sid)
                if tuple(ops_) != chain:
                    why = self.why_not_shared(sid, tuple(ops_), replays)
                    if why:
                        return effects, needs, f"storage {sid}: replay ops {tuple(ops_)} are not its chain {chain}: {why}"
                if sid in offloads or sid in dropped:
                    return effects, needs, f"storage {sid}: replayed and offloaded or recomputed; pick one"
                for u in self.replay_units(sid):
                    if u in covered:
                        return effects, needs, f"storage {sid}: replayed inside unit {u}, which is recomputed"
                for x in self.replay_inputs(sid):
                    if x in offloads or x in dropped:
                        return effects, needs, (f"storage {sid}: its replay holds storage {x}, which is offloaded "
                                                "or recomputed")
        if not offloads:
            return effects, needs, ""
        inside = np.zeros(n + 1, dtype=np.int32)  # events inside some recomputed unit's forward
        held_until: dict[int, int] = {}  # inputs of recomputed units live until the unit's first backward op
        for u, eff in effects.items():
            unit = ix.units[u]
            inside[unit.first_op] += 1
            inside[unit.last_op + 1] -= 1
            for sid in unit.inputs:
                held_until[sid] = max(held_until.get(sid, -1), eff.fb)
        inside = np.cumsum(inside[:n]) > 0
        for sid, (ti, ev, pf) in offloads.items():
            if not 0 <= sid < len(trace.storages):
                return effects, needs, f"storage {sid} is not in the trace"
            s = trace.storages[sid]
            if not self.offloadable[sid]:
                return effects, needs, (f"storage {sid}: only saved activations read in backward can be offloaded "
                                        f"(kind {s.kind}, saved {s.saved})")
            if sid in dropped or (s.producer is not None and inside[s.producer]):
                return effects, needs, f"storage {sid}: produced inside a recomputed unit and offloaded; pick one"
            if not self.legal_tier(hierarchy, ti):
                return effects, needs, f"storage {sid}: offload tier index {ti} is not a lower tier"
            start = int(ix.start[sid])
            if ev < start or ev >= n:
                return effects, needs, (f"storage {sid}: evict_after {ev} is before its producer ({start}) "
                                        "or past the step")
            acc = ix.accesses[sid]
            k = bisect.bisect_right(acc, ev)
            nd = acc[k] if k < len(acc) else None
            for u in ix.input_of.get(sid, ()):
                if u in effects and effects[u].fb > ev and (nd is None or effects[u].fb < nd):
                    nd = effects[u].fb
            if nd is None:
                return effects, needs, f"storage {sid}: never accessed after evict_after {ev}; nothing to prefetch for"
            if not ev < pf <= nd:
                return effects, needs, (f"storage {sid}: prefetch_at {pf} must be in ({ev}, {nd}] "
                                        "(first access after eviction)")
            end = max(int(ends[sid]), held_until.get(sid, -1))
            if end <= ev:
                return effects, needs, f"storage {sid}: evict_after {ev} is not before its end of life {end}"
            needs[sid] = nd
        return effects, needs, ""


_SPACE_CACHE: dict[int, tuple[weakref.ref, DecisionSpace]] = {}


def decision_space(trace: Trace) -> DecisionSpace:
    """The (cached) decision space of a trace."""
    hit = _SPACE_CACHE.get(id(trace))
    if hit is not None and hit[0]() is trace:
        return hit[1]
    space = DecisionSpace(trace_index(trace))
    if len(_SPACE_CACHE) > 32:
        for k in [k for k, (r, _) in _SPACE_CACHE.items() if r() is None] or list(_SPACE_CACHE)[:16]:
            _SPACE_CACHE.pop(k, None)
    _SPACE_CACHE[id(trace)] = (weakref.ref(trace), space)
    return space


# [Note: replays across units]
# A replay chain may span consecutive units when no forward op runs outside every unit between its ops
# (torchvision ResNet's stem: conv1, bn1, relu and maxpool are four sibling units).  The runtime records the
# chain's steps in one table shared by the unit calls (`ChainTable` in runtime/replay.py) and forgets them
# once the chain's last op has made its recipe.  Every unit a chain runs in must not be recomputed.
#
# [Note: heavy replays]
# A saved storage made by a heavy op (a convolution, a matrix product) whose every input is a saved storage, a
# parameter or a step input may be replayed by that op alone: the same kernel on the same kept inputs (its
# saved inputs are held by the recipe, or replayed themselves and regenerated on demand), the same bits; this
# is selective recompute of one op, which `UnitDecision` could only do for a whole unit with everything else in
# it.  It is priced at the op's forward time, never fused (simulate.replay_time).  ResNet-50's bottleneck conv3
# output (784 MiB at b256, 224 px, float32) is re-made from its 196 MiB input in 0.244 ms on the h200 profile
# (3.1 GiB/ms, against 0.24 GiB/ms for the selective recompute of the block it replaces, which re-runs all
# three convolutions): `memstrata plan --model resnet50 --batch 256 --res 224 --profile h200 --budget 50%
# --fused-replay` 1.103x -> 1.066x (bench/results/2026-12-05b-cpu-activations/README.md).  On a GPU it is as
# deterministic as recomputing the unit is (cuDNN's forward algorithms for one configuration).
# `HEAVY_REPLAYS = False` restores the cheap-ops-only menu.
#
# [Note: shared replays]
# One run of a chain regenerates every replayed storage it writes: a `ReplayDecision(s, ops)` whose `ops` are
# not s's own chain but another replayed storage's (the *host*, whose own chain they are) takes s's value from
# that run, at s's last forward writer (which must be one of the ops; no later op of a chain writes s, since that
# op is its last forward writer).  The replays with the same ops form a group: its run happens once, before the
# earliest replay event of its members (`simulate.replay_effects`), and every member lives from then on to its
# last backward read.  Replays of the same op's outputs (max-pool's output and indices) have the same chain, so
# they always share; the stem convolution's output shares the stem ReLU's run (conv, BatchNorm, ReLU from the
# batch) only when the planner says so (it then lives from the ReLU's replay to bn1's backward, against one
# convolution less).  The runtime links the members' recipes (`Recipe.share` in runtime/replay.py).
#
# [Note: replays from the batch]
# A heavy op (a convolution, a matrix product) may be in a chain only when it reads nothing but the step's
# inputs and parameters (the stem convolution): re-running it is the same kernel on the same persistent
# inputs, so the same bits, and it holds nothing the step would not keep anyway.  The chain walk goes through
# a saved storage made by such an op instead of holding it, so the stem's ReLU output replays from the batch
# (conv, BatchNorm, ReLU) and does not pin the convolution output, which may be replayed on its own (on this
# box, ResNet-18 b64 112 px: 49 MiB each for ~26 and ~48 ms, against an NVMe round trip that stalls the end of
# the backward).
