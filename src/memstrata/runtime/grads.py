"""Gradients off tier 0: sent down as soon as they are final, brought back for their bucket's optimizer step.

`TieredGradients` tiers the gradients of chosen parameters (a `StatePlacement`
over parameter indices, as for optimizer states: 'keep', 'host' or 'nvme').  A
post-accumulate-grad hook sees each gradient once autograd has finished it for
this backward, sends its bytes down through the tier mover and sets
``p.grad = None``, so tier 0 holds a tiered gradient only from the op that
finishes it to its hook.  `GradTieredOptimizer` (a `TieredOptimizer`) brings a
bucket's gradients back right before that bucket's update and drops them right
after it, so at the optimizer step tier 0 holds the gradients of the bucket
being stepped (and the one read ahead), not all of them.

>>> import tempfile, torch
>>> from memstrata.runtime.grads import GradTieredOptimizer
>>> from memstrata.runtime.states import StatePlacement
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
>>> inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
>>> with tempfile.TemporaryDirectory() as d:
...     # the second Linear's gradients and states live in NVMe files between backward and the step
...     opt = GradTieredOptimizer(inner, StatePlacement(((2, 3),), ("nvme",)),
...                               grads=StatePlacement(((2, 3),), ("nvme",)), nvme_dir=d)
...     model(torch.randn(4, 8)).sum().backward()
...     model[1].weight.grad is None, model[0].weight.grad is None   # tiered: gone from tier 0; kept: there
...     norm = opt.clip_grad_norm_(model.parameters(), 1.0)        # torch.nn.utils.clip_grad_norm_'s result
...     opt.step(); opt.zero_grad()
...     opt.close()
(True, False)

[Note: tiered gradients are exact]
* Accumulation.  A second backward before the step finds ``p.grad`` None
  (the hook took the first one away), so autograd stores the new gradient
  as it is; the hook then brings the earlier one back and adds in place,
  ``old.add_(new)``: the same IEEE sum, element by element, that autograd's
  own accumulation (``grad += new``) computes.  Bit-identical.
* Clipping.  `torch.nn.utils.clip_grad_norm_` cannot see a gradient that is
  not in ``p.grad`` (the failure FSDP2 and torchao users hit), so
  `GradTieredOptimizer.clip_grad_norm_` replaces it with the same
  arithmetic: the hook records each final gradient's norm (the kernel
  torch picks: ``_foreach_norm`` on one tensor, whose per-tensor result does
  not depend on the other tensors of the list; ``linalg.vector_norm`` with
  ``foreach=False``); the kept gradients' norms are computed as torch does;
  all norms are put in torch's order (its grouping by device and dtype, over
  the parameters in the order given) and reduced with the same
  ``vector_norm(stack(norms))``.  The clip coefficient is applied to kept
  gradients at once and to a tiered gradient when it comes back (before an
  accumulation adds to it, or before its step): the same multiply.
* The step.  Per-bucket steps are the full step ([Note: per-bucket steps are
  the full step] in runtime/states.py); the gradient a bucket's step reads
  is the restored one, equal bit for bit.
* After `step()` a tiered gradient is consumed: ``p.grad`` stays None, as
  after ``zero_grad()`` (the usual next call).  A training loop that lets
  gradients accumulate across optimizer steps without zeroing them must not
  tier gradients (the hook cannot tell `model.zero_grad()` from no zeroing).
  ``zero_grad(set_to_none=False)`` leaves a tiered gradient None, not zeros.
* Where the step runs.  On a CPU box tier 0 is host RAM, so the step runs on
  the host with torch's CPU kernels over the restored gradient and states.
  On CUDA the restored gradient is copied up and the bucket steps on the
  device (not measured on GPU); a host step over pinned copies is not built.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch

from .ddp_grads import DDPReduction
from .mover import Placement, Resident, TierMover
from .nvme import NVMeStore
from .pool import HostBufferPool
from .host_step import HostStepper
from .states import DEFAULT_BUCKET_BYTES, StatePlacement, TieredOptimizer, _Slot
from .streams import CopyContext

__all__ = ["TieredGradients", "GradTieredOptimizer", "GradStats"]


class GradStats:
    """What the gradient tier did (cumulative)."""

    __slots__ = ("bytes_down", "bytes_up", "accumulations", "peak_resident_bytes", "resident_bytes", "hooks",
                 "read_ahead")

    def __init__(self) -> None:
        self.bytes_down = 0  # gradient bytes sent down by the hooks
        self.bytes_up = 0  # gradient bytes brought back for steps (and accumulations)
        self.accumulations = 0  # hooks that added into an offloaded gradient
        self.resident_bytes = 0  # restored tiered gradients on tier 0 now (between gather and consume)
        self.peak_resident_bytes = 0
        self.hooks = 0
        self.read_ahead = 0  # gradients whose read back started while an earlier bucket stepped

    def __repr__(self) -> str:
        return "GradStats(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


class _Grad:
    """One tiered parameter's gradient: below (`rec` + `slot` for its layout), its norm, a pending clip scale."""

    __slots__ = ("param", "index", "placement", "rec", "slot", "norms", "scale", "consumed", "nbytes")

    def __init__(self, param: torch.Tensor, index: int, placement: Placement) -> None:
        self.param = param
        self.index = index
        self.placement = placement
        self.rec: Resident | None = None
        self.slot: _Slot | None = None
        self.norms: dict[tuple[float, bool], torch.Tensor] = {}  # (norm_type, foreach) -> norm of the final grad
        self.scale: list[tuple[torch.Tensor, bool]] = []  # clip coefficients still to apply, and their kernel
        self.consumed = False  # stepped on and dropped; a hook before zero_grad() would lose it
        self.nbytes = 0


def _norm(g: torch.Tensor, norm_type: float, foreach: bool) -> torch.Tensor:
    if foreach:
        return torch._foreach_norm([g], norm_type)[0]
    return torch.linalg.vector_norm(g, norm_type)


def _mul(g: torch.Tensor, coef: torch.Tensor, foreach: bool) -> None:
    if foreach:
        torch._foreach_mul_([g], coef)
    else:
        g.mul_(coef)


class TieredGradients:
    """The gradients of `placement`'s tiered parameters, off tier 0 between their hook and their step.

    `params`: the optimizer's parameters in its order; `norm_types`: the norms the hooks record for
    `clip_grad_norm_` (2.0 by default; others need listing here).
    """

    def __init__(self, params: Sequence[torch.Tensor], placement: StatePlacement, mover: TierMover, *,
                 norm_types: Sequence[float] = (2.0,), ddp: torch.nn.Module | None = None) -> None:
        self.mover = mover
        self.placement = placement
        self.norm_types = tuple(float(n) for n in norm_types)
        self.stats = GradStats()
        self._serial = 0
        self._grads: dict[int, _Grad] = {}
        self._by_param: dict[int, _Grad] = {}
        self._handles: list[Any] = []
        for i, p in enumerate(params):
            t = placement.tier_of(i)
            if t == Placement.KEEP:
                continue
            if t == Placement.NVME and mover.store is None:
                raise ValueError("gradients on NVMe need a mover with an NVMe store (nvme_dir=)")
            if not p.requires_grad:
                continue
            g = _Grad(p, i, t)
            self._grads[i] = g
            self._by_param[id(p)] = g
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        # under DDP a gradient leaves once reduced ([Note: tiered gradients under DDP] in ddp_grads.py)
        self.reduction = DDPReduction(ddp, self) if ddp is not None and self._grads else None

    # ------------------------------------------------------------------ queries
    def tiered(self, index: int) -> bool:
        return index in self._grads

    def holds(self, p: torch.Tensor) -> bool:
        """True when `p`'s gradient is tiered and below (so `p.grad` reads None)."""
        g = self._by_param.get(id(p))
        return g is not None and g.rec is not None

    # ------------------------------------------------------------------ backward: the hook
    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        g = self._by_param[id(p)]
        new = p.grad
        if new is None:  # pragma: no cover - autograd calls the hook with the gradient set
            return
        self.stats.hooks += 1
        g.consumed = False
        if self.reduction is not None:
            self.reduction.on_ready(g, p)
            return
        if g.rec is not None:  # an earlier micro-step's gradient is below: bring it back and accumulate
            acc = self._bring(g)
            acc.add_(new)  # autograd's own accumulation: old += new ([Note: tiered gradients are exact])
            self.stats.accumulations += 1
            self.stats.resident_bytes -= g.nbytes
        else:
            acc = new
        self._send_down(g, acc)
        p.grad = None

    def _send_down(self, g: _Grad, acc: torch.Tensor) -> None:
        """`acc` (the final gradient on tier 0) below; its norms recorded first."""
        g.norms = self._norms(acc)
        g.slot = _Slot("grad", acc, self._serial)
        self._serial += 1
        g.nbytes = g.slot.nbytes
        g.rec = self.mover.evict(f"g{g.index}", g.placement, g.slot.storage())
        g.slot.tensor = None
        self.stats.bytes_down += g.nbytes

    @torch.no_grad()
    def _refresh(self, g: _Grad) -> None:
        """A gradient clipped before and not stepped yet: brought back, scaled, its norms taken again, sent down
        (a second clip reads the norms of the clipped values, as torch's does)."""
        acc = self._bring(g)
        self.stats.resident_bytes -= g.nbytes
        self._send_down(g, acc)

    def _norms(self, t: torch.Tensor) -> dict[tuple[float, bool], torch.Tensor]:
        """The final gradient's norms, by both kernels torch may pick (one tensor on CPU: the same values)."""
        out = {}
        for nt in self.norm_types:
            fe = _norm(t, nt, True)
            out[(nt, True)] = fe
            out[(nt, False)] = fe if t.device.type == "cpu" else _norm(t, nt, False)
        return out

    def _bring(self, g: _Grad) -> torch.Tensor:
        """`g`'s gradient on tier 0 (its pending clip scales applied); its record below released."""
        assert g.rec is not None and g.slot is not None
        got = self.mover.restore(g.rec)
        t = g.slot.rebuild(got.tensor, got.base)
        self.mover.release(g.rec)
        g.rec = None
        for coef, foreach in g.scale:
            _mul(t, coef, foreach)
        g.scale = []
        self.stats.bytes_up += g.nbytes
        self.stats.resident_bytes += g.nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)
        return t

    # ------------------------------------------------------------------ the step
    def prefetch(self, indices: Iterable[int]) -> None:
        """Start bringing the gradients of `indices` back (NVMe reads run while another bucket steps)."""
        for i in indices:
            g = self._grads.get(i)
            if g is not None and g.rec is not None and g.rec.read is None and g.rec.restored is None:
                self.mover.prefetch(g.rec)
                self.stats.read_ahead += 1

    @torch.no_grad()
    def gather(self, indices: Iterable[int]) -> None:
        """``p.grad`` set again for the tiered parameters of `indices` (before their bucket's update)."""
        for i in indices:
            g = self._grads.get(i)
            if g is not None and g.rec is not None:
                g.param.grad = self._bring(g)

    @torch.no_grad()
    def host_view(self, index: int) -> torch.Tensor | None:
        """A host-buffered gradient as a host tensor, its pending clip scales applied (for a host step); None
        when the parameter got no gradient.  The record stays until `release`."""
        g = self._grads.get(index)
        if g is None or g.rec is None:
            return None
        if g.rec.host is None:
            raise ValueError(f"parameter {index}: a host step needs its gradient in host memory, not {g.placement.label}")
        if g.rec.ready is not None:
            g.rec.ready.synchronize()  # the copy down has landed
        buf = g.rec.host.tensor
        t = g.slot.rebuild(buf, buf.storage_offset())  # a pooled buffer may start inside an aligned block
        for coef, foreach in g.scale:
            _mul(t, coef.to(t.device), foreach)
        g.scale = []
        self.stats.bytes_up += g.nbytes
        return t

    def release(self, indices: Iterable[int]) -> None:
        """After a host step: the host gradients of `indices` are given back (consumed)."""
        for i in indices:
            g = self._grads.get(i)
            if g is not None and g.rec is not None:
                self.mover.release(g.rec)
                g.rec = None
                g.consumed = True
                g.norms = {}

    def consume(self, indices: Iterable[int]) -> None:
        """After the bucket's update: its tiered gradients leave tier 0 (``p.grad = None``)."""
        for i in indices:
            g = self._grads.get(i)
            if g is not None and g.param.grad is not None and g.rec is None:
                g.param.grad = None
                g.consumed = True
                g.norms = {}
                self.stats.resident_bytes -= g.nbytes

    def zero(self) -> None:
        """`zero_grad()`: every tiered gradient below is dropped (files removed, buffers back)."""
        for g in self._grads.values():
            if g.rec is not None:
                self.mover.release(g.rec)
                g.rec = None
            g.scale, g.norms, g.consumed = [], {}, False

    def bring_all_back(self) -> None:
        """Every tiered gradient into ``p.grad`` (for `close()`): the parameters look unmanaged again."""
        self.gather(list(self._grads))
        self.stats.resident_bytes = 0

    # ------------------------------------------------------------------ clipping
    @torch.no_grad()
    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                        norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over kept and tiered gradients alike ([Note: tiered gradients are exact])."""
        from torch.utils._foreach_utils import (_device_has_foreach_support, _group_tensors_by_device_and_dtype,
                                                _has_foreach_support)

        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        norm_type = float(norm_type)
        if norm_type not in self.norm_types:
            raise ValueError(f"clip_grad_norm_: tiered gradients record the norms {list(self.norm_types)}; "
                             f"pass norm_types=({norm_type},) to the optimizer to clip by norm {norm_type}")
        # (tensor or None, tiered record) per gradient, in the order torch lists them
        items: list[tuple[torch.Tensor | None, _Grad | None]] = []
        for p in params:
            g = self._by_param.get(id(p))
            if g is not None and g.rec is not None:
                if g.scale:
                    self._refresh(g)
                items.append((None, g))
            elif p.grad is not None:
                items.append((p.grad, None))
        if not items:
            return torch.tensor(0.0)
        # stand-ins with each gradient's device and dtype, so the grouping is torch's own
        proxies = [t if t is not None else torch.empty(0, dtype=g.param.dtype, device=g.param.device)
                   for t, g in items]
        first_device = proxies[0].device
        grouped = _group_tensors_by_device_and_dtype([proxies], with_indices=True)
        norms: list[torch.Tensor] = []
        kernels: dict[tuple, bool] = {}
        for key, ([group], idx) in grouped.items():
            device = key[0]
            kept = [k for k, j in enumerate(idx) if items[j][0] is not None]
            use_foreach = bool((foreach is None and _has_foreach_support([proxies[j] for j in idx], device))
                               or (foreach and _device_has_foreach_support(device)))
            if foreach and not use_foreach:
                raise ValueError(f"clip_grad_norm_: foreach=True was passed, but can't use the foreach API on "
                                 f"{device.type} tensors")
            kernels[key] = use_foreach
            kept_tensors = [group[k] for k in kept]
            if use_foreach:
                kept_norms = list(torch._foreach_norm(kept_tensors, norm_type)) if kept_tensors else []
            else:
                kept_norms = [torch.linalg.vector_norm(t, norm_type) for t in kept_tensors]
            at = dict(zip(kept, kept_norms))
            for k, j in enumerate(idx):
                norms.append(at[k] if k in at else items[j][1].norms[(norm_type, use_foreach)])
        total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
                "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
                "`error_if_nonfinite=False`")
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for key, ([group], idx) in grouped.items():
            device, use_foreach = key[0], kernels[key]
            c = coef.to(device)
            kept_tensors = [items[j][0] for j in idx if items[j][0] is not None]
            if kept_tensors:
                if use_foreach:
                    torch._foreach_mul_(kept_tensors, c)
                else:
                    for t in kept_tensors:
                        t.mul_(c)
            for j in idx:
                g = items[j][1]
                if g is not None:
                    g.scale.append((c, use_foreach))
        return total

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.reduction is not None:
            self.reduction.close()


class GradTieredOptimizer(TieredOptimizer):
    """A `TieredOptimizer` whose parameters' gradients may be tiered too (`grads`, a `StatePlacement`).

    Use it where the optimizer was used; clip with its `clip_grad_norm_(parameters, max_norm, ...)`
    (same arguments and result as `torch.nn.utils.clip_grad_norm_`), which sees tiered gradients.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, placement: StatePlacement | Placement | str = "keep", *,
                 grads: StatePlacement | None = None, nvme_dir: str | os.PathLike | None = None,
                 mover: TierMover | None = None, norm_types: Sequence[float] = (2.0,),
                 host_step: bool | None = None, ddp: torch.nn.Module | None = None, **kw: Any) -> None:
        grads = grads if grads is not None else StatePlacement((), ())
        self._ddp = ddp  # gradients reduced by this DistributedDataParallel before they leave (ddp_grads.py)
        if not isinstance(placement, StatePlacement) and isinstance(optimizer, torch.optim.Optimizer):
            placement = StatePlacement.uniform(
                [p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]], placement,
                kw.get("bucket_bytes", DEFAULT_BUCKET_BYTES))
        self._want = placement  # the states' placement as asked (host-stepped parameters included)
        own = None
        if mover is None and any(t == Placement.NVME for t in grads.tiers):
            if nvme_dir is None:
                raise ValueError("GradTieredOptimizer: gradients on NVMe need nvme_dir=")
            params = [p for g in optimizer.param_groups for p in g["params"]]
            device = params[0].device if params else torch.device("cpu")
            copy = CopyContext(device)
            pool = HostBufferPool(pin=copy.cuda)
            mover = own = TierMover(device, copy, pool, NVMeStore(nvme_dir, pool=pool if copy.asynchronous else None))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        plain = all(type(p.data) is torch.Tensor for p in params)  # not DTensor (FSDP2): no host step
        device = params[0].device if params else torch.device("cpu")
        self._host_enabled = plain and (device.type == "cuda" if host_step is None else bool(host_step))
        host = self._host_set(placement, grads)
        self._grads_tiered = any(t != Placement.KEEP for t in grads.tiers)  # then no deferred updates (_may_defer)
        super().__init__(optimizer, _without(placement, host), nvme_dir=nvme_dir, mover=mover, **kw)
        if own is not None:
            self._own_mover = True
        self._norm_types = tuple(norm_types)
        self._seqs: dict[int, list[tuple[int, ...]]] = {}  # bucket order of the last step of each parity
        self.grads = TieredGradients(self._param_list(), grads, self.mover, norm_types=norm_types, ddp=ddp)
        self.host: HostStepper | None = HostStepper(self.inner, host, pin=device.type == "cuda") if host else None

    # ------------------------------------------------------------------ host steps
    def _host_set(self, placement: StatePlacement, grads: StatePlacement) -> set[int]:
        """Parameters stepped on the host: gradients and states both in host memory (when host steps are on)."""
        if not self._host_enabled:
            return set()
        return {i for b, t in zip(grads.buckets, grads.tiers) if t == Placement.HOST for i in b
                if placement.tier_of(i) == Placement.HOST}

    def _rehost(self, placement: StatePlacement, grads: StatePlacement) -> None:
        """Move to a new placement of states and gradients (between steps)."""
        new = self._host_set(placement, grads)
        old = set(self.host.indices) if self.host is not None else set()
        if new != old and self.host is not None:
            self.host.give_back_states()
            self.host = None
        super().set_placement(_without(placement, new))
        if new != old and new:
            self.host = HostStepper(self.inner, new, pin=self.mover.copy.cuda)

    def _may_defer(self) -> bool:
        """Deferred updates ([Note: deferred updates] in deferred.py) only with every gradient kept: a tiered
        gradient is below until its bucket's step, and `zero_grad()` drops it before the next forward."""
        return not getattr(self, "_grads_tiered", False) and getattr(self, "host", None) is None

    def _param_list(self) -> list[torch.Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"]]

    def set_grad_placement(self, grads: StatePlacement) -> None:
        """Tier gradients as `grads` says from the next backward on (between steps; nothing below is lost)."""
        self._check_open()
        if grads == self.grads.placement:
            return
        if any(t == Placement.NVME for t in grads.tiers) and self.mover.store is None:
            raise ValueError("GradTieredOptimizer: gradients on NVMe need a mover with an NVMe store")
        self._apply_all_pending()  # deferred updates read the gradients as they were at step()
        self._grads_tiered = any(t != Placement.KEEP for t in grads.tiers)
        self.grads.bring_all_back()
        self.grads.close()
        self.grads = TieredGradients(self._param_list(), grads, self.mover, norm_types=self._norm_types,
                                     ddp=self._ddp)
        self._rehost(self._want, grads)

    def set_placement(self, placement: StatePlacement) -> None:
        """As `TieredOptimizer.set_placement`; buckets whose gradients are in host memory too step on the host."""
        self._check_open()
        if not isinstance(placement, StatePlacement):
            raise ValueError(f"TieredOptimizer: placement must be a StatePlacement, got {placement!r}")
        self._want = placement
        if not hasattr(self, "grads"):  # during construction
            super().set_placement(placement)
            return
        self._rehost(placement, self.grads.placement)

    def step(self, closure=None):  # type: ignore[override]
        """`TieredOptimizer.step`; each bucket's tiered gradients are read ahead while the one before steps."""
        parity = self.stats.steps % 2  # the step order may alternate (the arena ring): learn it per parity
        self._seq: list[tuple[int, ...]] = []
        try:
            return super().step(closure)
        finally:
            self._seqs[parity] = self._seq

    def _read_ahead(self, bucket: Sequence[int]) -> None:
        """Start reading the gradients of the bucket that stepped after this one two steps ago (a guess: a
        wrong one costs a read, never a value)."""
        seq = getattr(self, "_seq", None)
        if seq is None:
            return
        seq.append(tuple(bucket))
        prev = self._seqs.get(self.stats.steps % 2)
        k = len(seq)
        if prev and k < len(prev) and prev[k - 1] == seq[-1]:
            host = self.host.params if self.host is not None else {}
            self.grads.prefetch([i for i in prev[k] if i not in host])  # a host step reads the host buffer itself

    def _step_bucket(self, bucket: Sequence[int]) -> None:
        self._read_ahead(bucket)
        on_host = self.host.covers(bucket) if self.host is not None else []
        if on_host:
            grads = {i: g for i in on_host if (g := self.grads.host_view(i)) is not None}
            try:
                self.host.step(grads)
            finally:
                self.grads.release(on_host)
            bucket = [i for i in bucket if i not in set(on_host)]
            if not bucket:
                return
        self.grads.gather(bucket)
        try:
            super()._step_bucket(bucket)
        finally:
            self.grads.consume(bucket)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()
        if self.host is not None:
            sd["state"].update(self.host.state_entries())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if self.host is not None:
            self.host.shadow.state.clear()
        super().load_state_dict(state_dict)
        if self.host is not None:
            self.host.take_states()

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
        self._check_open()
        return self.grads.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads.zero()
        super().zero_grad(set_to_none=set_to_none)

    def describe(self) -> str:
        out = super().describe()
        if self.host is not None:
            out += f"; {len(self.host.indices)} parameters stepped on the host ({self.host.state_bytes()} B of states)"
        return out

    def close(self, *, keep_states: bool = True, apply_pending: bool = True) -> None:
        if not self.closed:
            if apply_pending:
                self._apply_all_pending()  # deferred updates read the gradients as they were at step()
            if keep_states:
                self.grads.bring_all_back()
                if self.host is not None:
                    self.host.give_back_states()
            else:
                self.grads.zero()
            self.grads.close()
        super().close(keep_states=keep_states, apply_pending=apply_pending)


def _without(placement: StatePlacement, indices: set[int]) -> StatePlacement:
    """`placement` less the parameters `indices` (their states are the host stepper's)."""
    if not indices:
        return placement
    kept = [(tuple(i for i in b if i not in indices), t) for b, t in zip(placement.buckets, placement.tiers)]
    kept = [(b, t) for b, t in kept if b]
    return StatePlacement(tuple(b for b, _ in kept), tuple(t for _, t in kept), placement.prefetch_depth)
