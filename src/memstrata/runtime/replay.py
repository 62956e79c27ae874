"""Op-level recompute: what the runtime does for a `ReplayDecision`.

[Note: replay recipes]
A replayed storage is not kept for backward; a *recipe* is, and backward runs
it when it first unpacks the storage.  While a unit whose forward contains
replay chains runs, a `ReplayCapture` dispatch mode (below autograd) numbers
its ops from `unit.first_op` exactly as the tracer did and records, for every
op of a chain, the op (the aten overload itself) and its arguments: a tensor
argument made by an earlier op of the chain is recorded as a reference to that
op's output (a view of it as its geometry); one that is a replay target
recorded earlier in the step as a reference to that recipe (chains of replays
regenerate what they read on demand); an argument the op writes (BatchNorm's
running statistics) as a snapshot taken just before the op ran, so the replay
updates the snapshot and never the buffer; anything else (a saved convolution
output, the block input, parameters) by reference: it is held, which the plan
prices.  The pack hook, seeing a storage the plan replays, stores
`(recipe, dtype, size, stride, byte offset)` instead of the tensor; the
forward's tensor is freed as soon as the model drops it.  Unpack runs the
recipe once under `no_grad` (the same kernels on the same inputs: the same
bits), caches the result for the other saves of the storage and drops its
references to the inputs.  Any mismatch between the ops seen and the trace's
(a name differs, an argument cannot be resolved) stops recording in that unit
call: the storages it would have replayed are kept, which is always exact.
Ops that draw random numbers are never in a chain (trace/space.py).

[Note: what a recipe holds]
A recipe holds exactly what the simulator's replay model counts
(`DecisionSpace.replay_inputs`, live until the replay event; the replayed
storage absent from its last forward access to that event):
* a tensor argument made by an earlier op of the unit is never held when it is
  a replayed storage or written by the op: the replay resolves it through that
  op's fresh output (or through the storage's own recipe).  An in-place op of
  the chain (`relu_`, `add_`, `hardswish_`) therefore writes the replay's own
  fresh output, as the forward wrote its own, never a held input; nothing is
  copied.  Only arguments from outside the unit that an op writes are
  snapshotted (BatchNorm's running statistics: a few bytes per channel).
  Before this rule, the written argument of every in-place chain op was
  cloned and the replayed storage itself held as an argument, so a forced
  replay plan measured *more* heap than keeping everything
  (mobilenet_v3_small -1.35 MB against 3.25 MB predicted; resnet18 -5.49 MB
  against 0.46 MB; `test_replay_frees_what_the_simulator_predicts`);
* the step's table (`RecipeEntry`, by forward storage) holds a recipe strongly
  only until the storage's last pack; from then on the packs (`Replayed`, freed
  with their autograd nodes) and the recipes that read it keep it, so a
  materialised value lives from its replay event to its last backward read,
  not to the end of the step.  A replay read by a later replay is cached on its
  recipe from the earlier replay event on: the simulator moves its replay event
  there (`replay_effects`).
"""

from __future__ import annotations

import time

import weakref
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from ..trace.schema import Trace, UnitRecord
from ..trace.space import SAC_HIDDEN_OPS


class _Arg:
    """A tensor argument of a recorded op, resolved when the recipe runs: output `leaf` of an earlier step of
    the same recipe (seen through `geometry`), else the target of another recipe, else the held tensor."""

    __slots__ = ("step", "leaf", "recipe", "held", "geometry")

    def __init__(self, step, leaf, recipe, held, geometry) -> None:
        self.step, self.leaf, self.recipe, self.held, self.geometry = step, leaf, recipe, held, geometry


class _Step:
    __slots__ = ("func", "args", "kwargs")

    def __init__(self, func, args, kwargs) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs


def _geometry(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), t.storage_offset() * t.element_size(), t.dtype)


def _view(base: torch.Tensor, geometry: tuple | None) -> torch.Tensor:
    if geometry is None:
        return base
    size, stride, offset, dtype = geometry
    out = torch.empty(0, dtype=dtype, device=base.device)
    out.set_(base.untyped_storage(), offset // out.element_size(), size, stride)
    return out


class Recipe:
    """How to regenerate one output of an op of a chain ([Note: replay recipes]); a recipe shared with a host
    takes its value from the host's run ([Note: shared replays] in trace/space.py)."""

    __slots__ = ("steps", "final", "leaf", "value", "host", "guests", "__weakref__")

    def __init__(self, steps: list[_Step], final: _Step, leaf: int) -> None:
        self.steps = steps
        self.final = final
        self.leaf = leaf
        self.value: torch.Tensor | None = None
        self.host: Recipe | None = None
        self.guests: list[tuple[weakref.ref, _Step, int]] = []

    def share(self, guest: "Recipe") -> None:
        """`guest` (an output of one of this recipe's steps) is regenerated by this recipe's run: one run of
        the chain for both.  The guest keeps its own steps as well, which are exact on their own: they run
        only if this recipe never does (it cannot, once linked) and are dropped when it does."""
        if guest is self or self.value is not None:
            return
        guest.host = self
        self.guests.append((weakref.ref(guest), guest.final, guest.leaf))

    def materialize(self) -> torch.Tensor:
        if self.value is None and self.host is not None:
            self.host.materialize()  # sets our value
        self.host = None
        if self.value is None:
            outs: dict[int, list] = {}

            def resolve(a):
                if not isinstance(a, _Arg):
                    return a
                if a.step is not None and id(a.step) in outs:
                    return _view(outs[id(a.step)][a.leaf], a.geometry)
                if a.recipe is not None:
                    return _view(a.recipe.materialize(), a.geometry)
                if a.held is None:
                    raise RuntimeError("replay recipe: an argument was neither recorded nor held")
                return a.held

            # a step's outputs are dropped after the last step that reads them, unless this recipe or one
            # that shares its run returns them (what `simulate.run_transient` counts)
            keep = {id(self.final)} | {id(st) for _, st, _ in self.guests}
            last: dict[int, int] = {}
            for k, st in enumerate(self.steps):
                for a in tree_flatten((st.args, st.kwargs))[0]:
                    if isinstance(a, _Arg) and a.step is not None:
                        last[id(a.step)] = k
            with torch.no_grad():
                for k, st in enumerate(self.steps):
                    args = tree_map(resolve, st.args)
                    kwargs = tree_map(resolve, st.kwargs)
                    outs[id(st)] = tree_flatten(st.func(*args, **kwargs))[0]
                    del args, kwargs
                    for key in [key for key, k2 in last.items() if k2 == k and key not in keep and key in outs]:
                        del outs[key]
                    if id(st) not in last and id(st) not in keep:
                        del outs[id(st)]
            self.value = outs[id(self.final)][self.leaf]
            self.steps = []  # the inputs are no longer needed
            for ref, step, leaf in self.guests:
                g = ref()
                if g is not None and g.value is None and id(step) in outs:
                    g.value, g.steps, g.host = outs[id(step)][leaf], [], None
            self.guests = []
        return self.value


class Replayed:
    """What the pack hook stores for a replayed saved tensor."""

    __slots__ = ("recipe", "geometry", "anchor")

    def __init__(self, recipe: Recipe, t: torch.Tensor, anchor: int | None) -> None:
        self.recipe = recipe
        self.geometry = _geometry(t)
        self.anchor = anchor

    def unpack(self) -> torch.Tensor:
        return _view(self.recipe.materialize(), self.geometry)


class RecipeEntry:
    """The step's record of one recipe, by the forward storage it regenerates: a strong reference to the recipe
    until the storage's last pack (`release`), a weak one after ([Note: what a recipe holds])."""

    __slots__ = ("ref", "strong", "recipe", "sid")

    def __init__(self, ref: StorageWeakRef, recipe: Recipe, sid: int) -> None:
        self.ref, self.strong, self.recipe, self.sid = ref, recipe, weakref.ref(recipe), sid

    def release(self) -> None:
        self.strong = None


class ChainTable:
    """The recorded steps of one training step's chains, shared by the unit calls a chain spans
    ([Note: replays across units] in trace/space.py); `prune` keeps only what chains still open need."""

    __slots__ = ("steps", "step_out", "pending")

    def __init__(self) -> None:
        self.steps: dict[int, _Step] = {}
        self.step_out: dict[int, tuple] = {}
        self.pending: dict[tuple[int, ...], list[Recipe]] = {}  # chain -> recipes its run will also make

    def prune(self, chains: dict[int, tuple[int, ...]], done_through: int) -> None:
        """Forget the steps of every chain that ended at or before op `done_through` (their recipes exist)."""
        keep = {j for last, c in chains.items() if last > done_through for j in c}
        for j in [j for j in self.steps if j not in keep]:
            del self.steps[j]
        for c in [c for c in self.pending if c[-1] <= done_through]:
            del self.pending[c]
        kept = set(map(id, self.steps.values()))
        for k in [k for k, v in self.step_out.items() if id(v[1]) not in kept]:
            del self.step_out[k]


def _written_args(func) -> set[int]:
    """Positions of the schema arguments that `func` writes (`Tensor(a!)`)."""
    out = set()
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.add(i)
    return out


class ReplayCapture(TorchDispatchMode):
    """Records the chains of one unit call ([Note: replay recipes]); `recipes`: storage key -> RecipeEntry."""

    def __init__(self, trace: Trace, unit: UnitRecord, chains: dict[int, tuple[int, ...]],
                 recipes: dict[int, RecipeEntry], targets: dict[int, tuple[int, ...]],
                 buffers: frozenset[int] = frozenset(), shared: "ChainTable | None" = None,
                 held_at: dict[int, frozenset[int]] | None = None) -> None:
        super().__init__()
        self.trace = trace
        self.next = unit.first_op
        self.last = unit.last_op
        self.wanted = {j for c in chains.values() for j in c}
        self.chain_of_last = dict(chains)  # last op -> chain
        self.recipes = recipes
        self.targets = targets  # storage id -> its chain, for every storage the plan replays
        self.buffers = buffers  # storage keys of the model's buffers
        table = shared if shared is not None else ChainTable()
        self.table = table
        self.step_out = table.step_out  # storage key -> (StorageWeakRef, step, leaf, geometry)
        self.steps = table.steps  # op index -> step
        self.broken: str | None = None
        self.held_at = held_at if held_at is not None else {}  # op -> storages a chain through it holds
        self.op_seconds = 0.0  # time in the unit's ops themselves
        self.overhead_seconds = 0.0  # time the capture adds around them
        # shared replays ([Note: shared replays] in trace/space.py): storages regenerated by another replay's
        # run, by the op that last writes them (not the last op of the chain they share)
        self.guest_at: dict[int, list[int]] = {}
        for sid, c in targets.items():
            for j in c[:-1]:
                if sid in trace.ops[j].outputs and unit.first_op <= j <= unit.last_op and j in self.wanted:
                    self.guest_at.setdefault(j, []).append(sid)

    def _arg(self, a: Any, write: bool, sid_of: dict[int, int], op: int):
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x, write, sid_of, op) for x in a)
        if not isinstance(a, torch.Tensor):
            return a
        key = a.untyped_storage()._cdata
        g = _geometry(a)
        sid = sid_of.get(key)
        s = self.trace.storages[sid] if sid is not None else None
        step = leaf = recipe = held = None
        geometry = g
        hit = self.step_out.get(key)
        if hit is not None and not hit[0].expired():
            _, step, leaf, geo = hit
            geometry = None if g == geo else g
        if (key in self.buffers or (s is not None and s.kind == "buffer")
                or (write and (step is None or sid is None or sid in self.held_at.get(op, ())))):
            # a buffer the op may update (BatchNorm's running statistics, which native_batch_norm's schema
            # does not even mark as written): the replay updates a snapshot, never the buffer.  (A written
            # argument made by an earlier op of the unit is not copied: the replay writes that op's fresh
            # output, as the forward did; [Note: what a recipe holds].  One the chain holds is copied, which
            # is exact.)
            with _disable_current_modes():
                return a.detach().clone()
        rec = self.recipes.get(key)
        recipe = rec.recipe() if rec is not None and not rec.ref.expired() else None
        if recipe is None and (step is None or s is None or s.kind in ("parameter", "input") or s.persistent
                               or sid in self.held_at.get(op, ())):
            # held: what the replay model counts (`DecisionSpace.replay_inputs` of the chains through this op),
            # parameters and the step's inputs (persistent: the reference costs nothing), and anything no
            # earlier step of a chain made (exact).  A storage an earlier op of the chain made is resolved
            # through that op's fresh output, never held ([Note: what a recipe holds]).
            with _disable_current_modes():
                held = a.detach()
        return _Arg(step, leaf, recipe, held, geometry)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # [Note: the runtime's own time] (activations.py): the capture's Python around each op, not the op
        t0 = time.perf_counter()
        before = self.op_seconds
        try:
            return self._dispatch(func, args, kwargs or {})
        finally:
            self.overhead_seconds += time.perf_counter() - t0 - (self.op_seconds - before)

    def _run(self, func, args, kwargs):
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            self.op_seconds += time.perf_counter() - t0

    def _dispatch(self, func, args, kwargs):
        name = str(func)
        ops = self.trace.ops
        if self.broken is None and self.next <= self.last and ops[self.next].name != name:
            # autograd detaches some tensors it saves (where the tracer's hooks may see none, or more): ops
            # without values (SAC_HIDDEN_OPS) are not matched against the trace
            if name in SAC_HIDDEN_OPS:
                return self._run(func, args, kwargs)
            while self.next <= self.last and ops[self.next].name in SAC_HIDDEN_OPS and self.next not in self.wanted:
                self.next += 1
        j = self.next
        self.next += 1
        if self.broken is None and (j > self.last or str(func) != self.trace.ops[j].name):
            self.broken = f"op {j}: saw {func}, the trace has {self.trace.ops[j].name if j <= self.last else 'none'}"
        if self.broken is not None or j not in self.wanted:
            return self._run(func, args, kwargs)
        written = _written_args(func)  # the snapshot and detach below run with this mode disabled
        names = [a.name for a in func._schema.arguments]
        # arg storage -> trace storage: the tracer lists an op's distinct input storages in argument order
        flat, _ = tree_flatten((args, kwargs))
        keys: list[int] = []
        for t in flat:
            if isinstance(t, torch.Tensor):
                k = t.untyped_storage()._cdata
                if k not in keys:
                    keys.append(k)
        if len(keys) != len(self.trace.ops[j].inputs):
            self.broken = f"op {j}: {len(keys)} input storages, the trace has {len(self.trace.ops[j].inputs)}"
            return self._run(func, args, kwargs)
        sid_of = dict(zip(keys, self.trace.ops[j].inputs))
        rec_args = tuple(self._arg(a, i in written, sid_of, j) for i, a in enumerate(args))
        rec_kwargs = {k: self._arg(v, names.index(k) in written if k in names else False, sid_of, j)
                      for k, v in kwargs.items()}
        step = _Step(func, rec_args, rec_kwargs)
        self.steps[j] = step
        out = self._run(func, args, kwargs)
        leaves, _ = tree_flatten(out)
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                ust = t.untyped_storage()
                self.step_out[ust._cdata] = (StorageWeakRef(ust), step, i, _geometry(t))
        chain = self.chain_of_last.get(j)
        guests = self.guest_at.get(j)
        if chain is not None or guests:
            # leaf -> trace storage: the tracer lists an op's distinct output storages in leaf order
            seen: list[int] = []
            first_leaf: dict[int, int] = {}
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor):
                    key = t.untyped_storage()._cdata
                    if key not in first_leaf:
                        first_leaf[key] = i
                        seen.append(key)
            sids = self.trace.ops[j].outputs
            if len(sids) != len(seen):
                self.broken = f"op {j}: cannot match its outputs to the trace's"
                return out
            made: dict[tuple[int, ...], list[Recipe]] = {}
            for key, sid in zip(seen, sids):
                c = self.targets.get(sid)
                if c is None or j not in c or (c[-1] != j and sid not in (guests or ())):
                    continue
                # sid's value is this op's output: its own chain ends here, or it shares the run of a chain
                # that goes on ([Note: shared replays]; its own steps are that chain's so far: exact alone)
                steps = [self.steps[k] for k in c if k <= j and k in self.steps]
                if len(steps) != sum(1 for k in c if k <= j):
                    self.broken = f"op {j}: a step of the chain of storage {sid} was not recorded"
                    return out
                i = first_leaf[key]
                ust = leaves[i].untyped_storage()
                recipe = Recipe(steps, step, i)
                self.recipes[key] = RecipeEntry(StorageWeakRef(ust), recipe, sid)
                made.setdefault(tuple(c), []).append(recipe)
            for c, recipes in made.items():
                self.table.pending.setdefault(c, []).extend(recipes)
            if chain is not None:  # the run ends here: its first recipe is the host of the others
                pending = self.table.pending.pop(tuple(chain), [])
                hosts = [r for r in pending if r.final is step]
                if hosts:
                    for r in pending:
                        hosts[0].share(r)
        return out


def held_inputs(space, replays: dict[int, tuple[int, ...]]) -> dict[int, frozenset[int]]:
    """op -> the storages that the replays whose chains run it hold (`DecisionSpace.replay_inputs`)."""
    out: dict[int, set[int]] = {}
    for sid, chain in replays.items():
        host = space.replay_host(tuple(chain), replays)  # a shared run holds what its host's chain holds
        for j in chain:
            out.setdefault(j, set()).update(space.replay_inputs(sid if host is None else host))
    return {j: frozenset(v) for j, v in out.items()}


def unit_chains(trace: Trace, replays: dict[int, tuple[int, ...]]) -> dict[int, dict[int, tuple[int, ...]]]:
    """unit index -> {last op of a chain: chain} for the plan's replays, for every unit that runs an op of
    the chain (a chain may span consecutive units: [Note: replays across units] in trace/space.py)."""
    out: dict[int, dict[int, tuple[int, ...]]] = {}
    for chain in replays.values():
        for u in {trace.ops[j].unit for j in chain}:
            if u is not None:
                out.setdefault(u, {})[chain[-1]] = chain
    return out


__all__ = ["ChainTable", "Recipe", "RecipeEntry", "Replayed", "ReplayCapture", "held_inputs", "unit_chains"]
