"""Tiered gradients under torch.distributed: reduced first, then sent down (DDP here; FSDP2 needs nothing more).

`DDPReduction` is what `TieredGradients` hands a tiered gradient to when the
model is wrapped in `DistributedDataParallel`: it lets DDP reduce the
gradient exactly as without memstrata, sends the reduced value down after
DDP has finished the backward, and frees the bucket storage that held it
until DDP writes that bucket again ([Note: tiered gradients under DDP]).

[Note: tiered gradients under DDP]
Why not send a gradient down in its post-accumulate-grad hook (as on one
process): DDP's reducer runs *after* that hook (its own hook is a post hook
of the same AccumulateGrad node), copies ``p.grad`` (scaled by 1/world)
into a flat bucket buffer, all-reduces the bucket, and at the end of
backward (`finalize_backward`, an autograd callback queued when the last
bucket was ready) writes the reduced values back into ``p.grad``.  A
gradient sent down in the hook would leave unreduced, and DDP would read a
None gradient (zeros, or an error with `find_unused_parameters`).

What we do instead, per synced backward:

1. The hook leaves ``p.grad`` to DDP (after bringing back and adding a
   gradient an earlier backward left below, when no `zero_grad()` came in
   between: autograd's ``old += new``) and queues a callback that queues a
   second one: autograd runs callbacks in the order queued, including those
   queued by a running callback, so the second runs after DDP's
   `finalize_backward` (queued later in the backward than our first).
2. That second callback finds ``p.grad`` reduced (DDP's own arithmetic,
   untouched: `torch.equal` to unmanaged DDP by construction), sends a
   compact copy down through the tier mover (the norm for
   `clip_grad_norm_` recorded first, as on one process), sets ``p.grad =
   None``, and, bucket by bucket (so tier 0 holds at most one bucket and its
   copies at once, plus copies whose NVMe write has not landed), frees
   (`untyped_storage().resize_(0)`) every bucket storage that holds only
   tiered gradients: with ``gradient_as_bucket_view=True``
   ``p.grad`` is a view of DDP's bucket, which is where the memory is (a
   bucket of kept gradients stays: its views are the user's ``p.grad``).
3. The next synced backward (a backward under `no_sync()` writes no
   bucket: freed ones stay freed): the hook of each tiered parameter (it runs
   before DDP's hook for that parameter) gives the parameter's bucket
   storage its bytes back before DDP copies the new gradient into it, so a
   bucket is on tier 0 from its first gradient of the backward to the end
   of that backward, as the reducer needs.  Only tiered parameters' hooks
   do this, which is enough: a freed storage held tiered gradients only.
   With `find_unused_parameters=True` DDP also writes the bucket views of
   unused parameters (zeros) inside its forward, so there the storages come
   back in a forward pre-hook instead (they are freed between a backward and
   the next forward only).
4. DDP rebuilds its buckets once, in the forward of its second iteration
   (without `find_unused_parameters`): fresh buffers, the old ones dropped.
   A storage freed before the rebuild is then forgotten, not grown back.

A backward under `ddp.no_sync()` reduces nothing: its gradients stay in
``p.grad`` on tier 0 (autograd accumulates them as without memstrata) and
leave after the synced backward that reduces their sum.  So gradients
leave tier 0 only once reduced, at the end of the backward that reduced
them (not one by one as they become final, as on one process); the freed
buckets are what the plan saves between backward and the next backward.

Not supported (one-line errors from `check_ddp`): ``gradient_as_bucket_view=
False`` (DDP then keeps a private bucket copy of every gradient that could
only be freed from inside a communication hook) and ``static_graph=True``
(its first iteration delays every all-reduce to a callback).  Why not a
communication hook instead: its continuation runs on the process group's
thread, DDP's finalize writes every reduced bucket back into ``p.grad``
anyway (cloning one that was set to None), and DDP accepts one hook only, so
a user's compression hook would be refused; reducing tiered gradients
ourselves would need them excluded from DDP before it is built.
Exactness across ranks: the reduction is DDP's; a gradient brought back and
accumulated before a synced backward is scaled by DDP with ``mul(1/world)``
where unmanaged DDP divides a bucket view in place (``div_(world)``): equal
for a power-of-two world size (tested with 2).

[Note: tiered gradients under FSDP2]
FSDP2 (`fully_shard`) needs nothing of this module: its post-backward
reduce-scatters a group's unsharded gradients, assigns each sharded
parameter its reduced shard (a view of the group's reduce-scatter output;
``grad._local_tensor += shard`` when a gradient is already there) and only
then calls that parameter's post-accumulate-grad hooks (`foreach_reduce`
in torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, torch 2.11 and
2.14).  So `TieredGradients`' ordinary hook (runtime/grads.py) sees the
reduced sharded DTensor gradient, sends this rank's shard down (`_Slot`
keeps the DTensor's mesh and placements) and sets ``p.grad = None``; once
every gradient of a group is gone, the group's reduce-scatter output is
freed with its last view.  A backward under
``set_requires_gradient_sync(False)`` reduces nothing and calls no hook: the
unsharded gradients accumulate in FSDP2's own buffers as without memstrata.
A gradient already below when a reduced one arrives (no `zero_grad()` in
between) is brought back and added in place, the same add FSDP2 does.
`clip_grad_norm_` runs torch's arithmetic over DTensor norms as torch does.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DDPReduction", "check_ddp", "is_ddp"]


def is_ddp(model: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def check_ddp(ddp: torch.nn.Module) -> None:
    """A one-line error for a DDP wrapping that tiered gradients cannot run under."""
    if not getattr(ddp, "gradient_as_bucket_view", False):
        raise ValueError("memstrata: tier_grads=True under DDP needs DistributedDataParallel(..., "
                         "gradient_as_bucket_view=True) (the reduced gradients leave from DDP's buckets, whose "
                         "memory is freed until the next backward)")
    if getattr(ddp, "_use_python_reducer", False):
        raise ValueError("memstrata: tier_grads=True is not supported with DDP's python reducer (compiled DDP, "
                         "torch._dynamo.config.optimize_ddp='python_reducer'); use DDP's default reducer")
    if getattr(ddp, "static_graph", False):
        raise ValueError("memstrata: tier_grads=True is not supported with DistributedDataParallel(static_graph="
                         "True); pass static_graph=False")


class DDPReduction:
    """Sends `grads`' tiered gradients down once `ddp` has reduced them; frees DDP's buckets meanwhile."""

    def __init__(self, ddp: torch.nn.Module, grads: Any) -> None:
        # `grads`: the `TieredGradients` (runtime/grads.py) that owns this; its records are `_Grad`s
        check_ddp(ddp)
        self.ddp = ddp
        self.grads = grads
        self._queued = -1  # the autograd graph task whose end is queued
        # freed bucket storages by identity (`_cdata`, the StorageImpl: unchanged by resize_, unlike the data
        # address, which the allocator may hand to another bucket) -> (storage, bytes); each tiered parameter's (by id)
        self._freed: dict[int, tuple[torch.UntypedStorage, int]] = {}
        self._bucket_of: dict[int, int] = {}
        self._rebuilt = bool(getattr(ddp, "_has_rebuilt_buckets", False))
        self.freed_bytes = 0  # bucket bytes freed now (between a backward and the next)
        self.peak_freed_bytes = 0
        self._handle = (ddp.register_forward_pre_hook(self._before_forward)
                        if getattr(ddp, "find_unused_parameters", False) else None)

    # ------------------------------------------------------------------ the hook (before DDP's for that gradient)
    @torch.no_grad()
    def on_ready(self, g: Any, p: torch.Tensor) -> None:
        synced = getattr(self.ddp, "require_forward_param_sync", True)  # this backward's forward asked DDP to reduce
        if synced:
            self._grow(id(p))  # (a no_sync() backward writes no bucket: a freed one stays freed)
        if g.rec is not None:  # a gradient of an earlier backward is below (no zero_grad since): accumulate
            acc = self.grads._bring(g)
            acc.add_(p.grad)  # autograd's own accumulation: old += new
            self.grads.stats.accumulations += 1
            self.grads.stats.resident_bytes -= g.nbytes
            p.grad = acc
        if not synced:
            return  # a no_sync() backward: nothing is reduced, the gradient stays in p.grad
        task = torch._C._current_graph_task_id()  # once per backward (a backward that raised queued nothing)
        if task != self._queued:
            self._queued = task
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_after_finalize)

    def _queue_after_finalize(self) -> None:
        # runs before DDP's finalize_backward (queued later in this backward); queue behind it
        torch.autograd.Variable._execution_engine.queue_callback(self._after_reduce)

    # ------------------------------------------------------------------ after DDP's finalize_backward
    @torch.no_grad()
    def _after_reduce(self) -> None:
        # every tiered gradient DDP left in p.grad: those whose hook ran in this backward, and those of parameters
        # this rank did not use that another rank did (find_unused_parameters: DDP sets the reduced bucket view)
        pending = [g for g in self.grads._grads.values() if g.param.grad is not None and g.rec is None]
        if not pending:
            return
        mine = {id(g.param) for g in pending}
        kept = {p.grad.untyped_storage()._cdata for p in self.ddp.parameters()
                if p.grad is not None and id(p) not in mine}
        by_bucket: dict[int, list] = {}  # storage identity -> its tiered gradients (read before any is freed)
        storages: dict[int, tuple[torch.UntypedStorage, int]] = {}
        for g in pending:
            st = g.param.grad.untyped_storage()
            by_bucket.setdefault(st._cdata, []).append(g)
            storages[st._cdata] = (st, st.nbytes())
        self._note_rebuild()
        # bucket by bucket, so tier 0 holds at most one bucket and its compact copies at a time (plus copies whose
        # NVMe write has not landed yet)
        for ptr, gs in by_bucket.items():
            for g in gs:
                # a compact copy goes down: the bucket's storage is freed below while an NVMe write may still run
                self.grads._send_down(g, g.param.grad.clone(memory_format=torch.contiguous_format))
                g.param.grad = None
            st, n = storages[ptr]
            if ptr in kept or n == 0:
                continue  # a bucket that also holds kept gradients stays
            if ptr not in self._freed:
                self._freed[ptr] = (st, n)
                st.resize_(0)
                self.freed_bytes += n
            for g in gs:
                self._bucket_of[id(g.param)] = ptr
        self.peak_freed_bytes = max(self.peak_freed_bytes, self.freed_bytes)

    # ------------------------------------------------------------------ buckets back
    def _note_rebuild(self) -> None:
        """DDP rebuilt its buckets since we freed some: those storages are no longer DDP's; forget them."""
        now = bool(getattr(self.ddp, "_has_rebuilt_buckets", False))
        if now != self._rebuilt:
            self._rebuilt = now
            self._freed.clear()
            self._bucket_of.clear()
            self.freed_bytes = 0

    def _grow(self, pid: int) -> None:
        ptr = self._bucket_of.pop(pid, None)
        if ptr is None:
            return
        self._note_rebuild()
        got = self._freed.pop(ptr, None)
        if got is not None:
            st, n = got
            st.resize_(n)  # DDP overwrites every byte of the bucket view it writes next
            self.freed_bytes -= n

    def grow_all(self) -> None:
        """Every freed bucket storage back (before a forward that may write unused parameters' views; at close)."""
        self._note_rebuild()
        for st, n in self._freed.values():
            st.resize_(n)
        self._freed.clear()
        self._bucket_of.clear()
        self.freed_bytes = 0

    def _before_forward(self, *_args: Any) -> None:
        self.grow_all()

    def close(self) -> None:
        self.grow_all()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
