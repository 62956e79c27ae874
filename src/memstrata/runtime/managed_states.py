"""The Manager's optimizer: one `TieredOptimizer` whose placement follows the plan's state decisions.

The Manager plans optimizer states together with activations (plan/joint.py,
[Note: states in the plan]); this module is its runtime half: it wraps the
user's optimizer once (every state kept until a plan says otherwise), times
its steps (the trace's optimizer phase), tells the trace what states there
are, and moves states between tiers when a plan is installed
(`TieredOptimizer.set_placement`, between steps; values never change).
Given the model (the Manager passes its root), the plan's NVMe buckets on a
CPU tier 0 go through the arena ring and their updates, and the kept and
host buckets' (on CUDA: host RAM below HBM, read ahead and written behind on
the copy streams, [Note: deferred host buckets]), are deferred to the next
forward, as with
`TieredOptimizer(model=...)` ([Note: deferred updates] in deferred.py),
unless gradients are tiered (`tier_grads=True`: `GradTieredOptimizer`
steps inside `step()` then).  The ring has ``prefetch_depth + 2 = 3``
arenas: the state window the joint planner prices (plan/joint.py).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from ..decisions import StateDecision
from ..hardware import Hierarchy
from .mover import Placement, TierMover
from .nvme import NVMeStore
from .pool import HostBufferPool
from .grads import GradTieredOptimizer
from .states import StatePlacement, expected_state_bytes
from .streams import CopyContext

__all__ = ["ManagedStates", "placement_of", "grad_placement_of"]

TOUCH_FACTOR = 3.5  # bytes of memory traffic per state byte of an AdamW-like step (plan/states.py)


def grad_placement_of(decisions: Sequence[StateDecision], hierarchy: Hierarchy) -> StatePlacement:
    """The runtime placement of a plan's gradient decisions (`StateDecision.grads`; kept ones left out)."""
    buckets, tiers = [], []
    for d in decisions:
        if d.grads is None or not d.params:
            continue
        p = Placement.for_tier(hierarchy, d.grads)
        if p != Placement.KEEP:
            buckets.append(tuple(d.params))
            tiers.append(p)
    return StatePlacement(tuple(buckets), tuple(tiers))


def placement_of(decisions: Sequence[StateDecision], hierarchy: Hierarchy) -> StatePlacement:
    """The runtime placement of a plan's state decisions (kept buckets are left out: kept is the default)."""
    buckets, tiers = [], []
    for d in decisions:
        if d.tier is None or not d.params:
            continue
        p = Placement.for_tier(hierarchy, d.tier)
        if p != Placement.KEEP:
            buckets.append(tuple(d.params))
            tiers.append(p)
    return StatePlacement(tuple(buckets), tuple(tiers))


class ManagedStates:
    """`optimizer` tiered by the plan; `optimizer` (a `TieredOptimizer`) is what the training loop steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, device: torch.device, copy: CopyContext,
                 pool: HostBufferPool, nvme_dir: str | os.PathLike | None = None,
                 io_workers: int | None = None, model: torch.nn.Module | None = None,
                 defer: bool | None = None, ddp: torch.nn.Module | None = None) -> None:
        self.device = device
        self.nvme_dir = nvme_dir
        self.io_workers = io_workers
        self._copy = copy
        self.mover = TierMover(device, copy, pool, None)
        # With the model, NVMe buckets on a CPU tier 0 go through the arena ring and their updates (and the kept
        # buckets') are deferred to the next forward, as for TieredOptimizer(model=...) ([Note: deferred updates]).
        self.optimizer = GradTieredOptimizer(optimizer, placement=StatePlacement((), ()), mover=self.mover,
                                             model=model, defer=defer, ddp=ddp)
        self.step_seconds: list[float] = []
        self._t0: float | None = None
        self._stepping = False
        self._handles = [self.optimizer.register_step_pre_hook(self._pre),
                         self.optimizer.register_step_post_hook(self._post),
                         optimizer.register_step_pre_hook(self._guard)]

    def _guard(self, *_args) -> None:
        """The wrapped optimizer stepped by the user: its states are the TieredOptimizer's (KeyError deep in torch)."""
        if not self._stepping and not self.optimizer._stepping_inner:  # a deferred update runs in a forward hook
            raise RuntimeError("memstrata: step mgr.optimizer, not the optimizer passed to Manager(optimizer=...): "
                               "the Manager holds its states until close()")

    # ------------------------------------------------------------------ timing
    def _sync(self) -> None:
        if self._copy.cuda:
            torch.cuda.synchronize(self.device)

    def _pre(self, *_args) -> None:
        self._stepping = True
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_args) -> None:
        self._stepping = False
        if self._t0 is not None:
            self._sync()
            if not self.optimizer.placement.buckets:  # every state kept: the step's own compute
                self.step_seconds.append(time.perf_counter() - self._t0)
            self._t0 = None

    # ------------------------------------------------------------------ for the trace
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_bytes(self) -> list[list[int]]:
        """Bytes of each parameter's tensor states (`expected_state_bytes`: the optimizer's per-parameter state
        count x its size; `MasterWeights` counts fp32 states and the fp32 master of a bf16 parameter)."""
        inner = self.optimizer.inner
        # a DTensor (FSDP2) parameter's states are as large as this rank's shard ([Note: sharded states])
        local = [p.to_local() if type(p).__name__ == "DTensor" else p for p in self.params()]
        return [expected_state_bytes(inner, p) for p in local]

    def model_to_optimizer(self, model: torch.nn.Module) -> dict[int, int | None]:
        """The optimizer's index of each of `model`'s parameters (by position in `model.parameters()`)."""
        index = {id(p): i for i, p in enumerate(self.params())}
        return {j: index.get(id(p)) for j, p in enumerate(model.parameters())}

    def dtypes(self) -> list[str]:
        """Each parameter's state dtype (`MasterWeights.state_dtype`: fp32 for a bf16 parameter), else its own."""
        of = getattr(self.optimizer.inner, "state_dtype", lambda p: p.dtype)
        return [str(of(p)).replace("torch.", "") for p in self.params()]

    def trace_step_seconds(self, hierarchy: Hierarchy) -> float:
        """The fastest measured step with every state kept (the first one, which also allocates the states, only
        when it is the only one), or a roofline estimate before any step ran."""
        if self.step_seconds:
            return min(self.step_seconds[1:] or self.step_seconds)
        total = sum(sum(b) for b in self.state_bytes())
        return total * TOUCH_FACTOR / hierarchy.fast_bandwidth

    # ------------------------------------------------------------------ carrying a plan out
    def apply(self, decisions: Sequence[StateDecision], hierarchy: Hierarchy) -> None:
        """Put the states and gradients where `decisions` say (between steps)."""
        placement = placement_of(decisions, hierarchy)
        grads = grad_placement_of(decisions, hierarchy)
        if any(t == Placement.NVME for t in placement.tiers + grads.tiers) and self.mover.store is None:
            if self.nvme_dir is None:
                raise ValueError("the plan puts optimizer states or gradients on NVMe but the Manager has no nvme_dir")
            need = sum(d.nbytes for d in decisions if d.tier is not None
                       and Placement.for_tier(hierarchy, d.tier) == Placement.NVME)
            need += sum(d.grad_nbytes for d in decisions if d.grads is not None
                        and Placement.for_tier(hierarchy, d.grads) == Placement.NVME)
            self.mover.store = NVMeStore(self.nvme_dir, required_bytes=need, workers=self.io_workers,
                                         pool=self.mover.pool if self._copy.asynchronous else None)
        self.optimizer.set_placement(placement)
        self.optimizer.set_grad_placement(grads)

    def describe(self) -> str:
        st = self.optimizer.stats
        last = f"; last step {st.step_seconds[-1] * 1e3:.2f} ms" if st.step_seconds else ""
        return (f"{self.optimizer.describe()}{last}; moved {st.bytes_written} B down, {st.bytes_read} B up; "
                f"waited {st.reads_waited_s * 1e3:.2f} ms on reads, {st.writes_waited_s * 1e3:.2f} ms on writes")

    def close(self) -> None:
        """Every state back in the wrapped optimizer; NVMe files removed."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.optimizer.close(keep_states=True)
        self.mover.close(own_store=True)


# [Note: sharded states]
# Under FSDP2 (`torch.distributed.fsdp.fully_shard`) parameters and their
# optimizer states are DTensors sharded across ranks; each rank's optimizer
# updates its own shard.  `TieredOptimizer` tiers what this rank holds: a
# DTensor state's local shard is what is evicted, read back and rebuilt into
# a DTensor with the same mesh, placements, global shape and stride
# (runtime/states.py `_Slot`), so the wrapped optimizer and `state_dict()`
# see DTensors as without memstrata.  Under DDP every rank holds full
# states; gradients are all-reduced inside backward, before the optimizer
# step that reads them, so nothing of the reduction changes.  Budgets, plans
# and NVMe files are per rank (rank 0's plan is broadcast: Manager._agreed).
