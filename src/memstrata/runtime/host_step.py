"""The optimizer step of some parameters on the host, with torch's CPU kernels, where their gradients and states live.

A device (CUDA) tier 0 whose plan sends a bucket's gradients *and* optimizer
states to host DRAM steps that bucket on the host ([Note: gradients in the
plan] in trace/grads.py): nothing of it enters tier 0 during the step but the
updated parameters, copied up in place.  `HostStepper` holds, for those
parameters, a host copy of each parameter and a shadow optimizer of the same
class over the copies, whose `state` holds the bucket's states (host tensors,
between steps and during them).

[Note: the shadow optimizer]
* Hyperparameters: before every step each shadow group takes every key but
  ``params`` from its wrapped optimizer's group, so LR schedulers (which write
  the wrapped optimizer's groups) and `load_state_dict` reach it.
* The step: the parameter's current value is copied down (the user may have
  changed it since the last step: a model `load_state_dict`), its gradient is
  the host bytes the gradient hook sent down (runtime/grads.py), the shadow
  optimizer steps the bucket (per-bucket steps are the full step: [Note:
  per-bucket steps are the full step] in runtime/states.py), and the result is
  copied up into the parameter (in place: same storage, so modules, hooks and
  the wrapped optimizer keep seeing the same tensor).
* States: the wrapped optimizer's `state` has no entry for a host-stepped
  parameter; `state_dict()` inserts the shadow's (standard format, host
  tensors), `load_state_dict` gives them back to the shadow.
* Exactness: on a CPU tier 0 the arithmetic is the same kernels on the same
  values as the unmanaged step (tested).  On CUDA the host kernels round like
  the CPU kernels, not like the device's fused/foreach kernels: results match a
  CPU step of the same optimizer, not bit for bit the device step (not measured
  on GPU), as for torchao's CPUOffloadOptimizer and DeepSpeed's CPU Adam.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

__all__ = ["HostStepper"]


def _to_host(v: Any, pin: bool) -> Any:
    if not torch.is_tensor(v):
        return v
    out = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=pin)
    out.copy_(v)
    return out


class HostStepper:
    """The host step of `indices` (the wrapped optimizer's parameter numbering) of `inner`."""

    def __init__(self, inner: torch.optim.Optimizer, indices: Iterable[int], *, pin: bool) -> None:
        self.inner = inner
        self.pin = pin
        params = [p for g in inner.param_groups for p in g["params"]]
        owner = [gi for gi, g in enumerate(inner.param_groups) for _ in g["params"]]
        self.indices = tuple(sorted(set(indices)))
        self.params = {i: params[i] for i in self.indices}
        self.host = {i: _to_host(params[i].detach(), pin) for i in self.indices}
        self._group_of: dict[int, int] = {}  # parameter index -> shadow group
        groups: list[dict[str, Any]] = []
        self._inner_group: list[int] = []  # shadow group -> wrapped optimizer's group
        for gi, g in enumerate(inner.param_groups):
            mine = [i for i in self.indices if owner[i] == gi]
            if not mine:
                continue
            for i in mine:
                self._group_of[i] = len(groups)
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [self.host[i] for i in mine]})
            self._inner_group.append(gi)
        # every hyperparameter is in the groups; MasterWeights (master.py) also needs its algorithm: `new_like`
        like = getattr(inner, "new_like", None)
        self.shadow = like(groups) if callable(like) else type(inner)(groups)
        self.take_states()

    # ------------------------------------------------------------------ states
    def take_states(self) -> None:
        """The wrapped optimizer's states of our parameters move into the shadow (host tensors)."""
        for i in self.indices:
            st = self.inner.state.pop(self.params[i], None)
            if st:
                self.shadow.state[self.host[i]] = {k: _to_host(v, self.pin) for k, v in st.items()}

    def give_back_states(self) -> None:
        """The shadow's states back into the wrapped optimizer, on their parameters' device."""
        for i in self.indices:
            st = self.shadow.state.pop(self.host[i], None)
            if st:
                dev = self.params[i].device
                self.inner.state[self.params[i]] = {
                    k: (v.to(dev) if torch.is_tensor(v) and v.dim() > 0 else (v.clone() if torch.is_tensor(v) else v))
                    for k, v in st.items()}

    def state_entries(self) -> dict[int, dict[str, Any]]:
        """Snapshots of the shadow's states by parameter index (for `state_dict()`)."""
        out = {}
        for i in self.indices:
            st = self.shadow.state.get(self.host[i])
            if st:
                out[i] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        return out

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for st in self.shadow.state.values() for v in st.values()
                   if torch.is_tensor(v))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, grads: dict[int, torch.Tensor]) -> None:
        """Step the parameters in `grads` (index -> host gradient) on the host; copy them up in place."""
        if not grads:
            return
        for sg, gi in zip(self.shadow.param_groups, self._inner_group):  # [Note: the shadow optimizer]
            for k, v in self.inner.param_groups[gi].items():
                if k != "params":
                    sg[k] = v
        full = [g["params"] for g in self.shadow.param_groups]
        sub: list[list[torch.Tensor]] = [[] for _ in full]
        for i, g in grads.items():
            h = self.host[i]
            h.copy_(self.params[i].detach())  # its value now (a blocking copy down on CUDA)
            h.grad = g
            sub[self._group_of[i]].append(h)
        try:
            for sg, ps in zip(self.shadow.param_groups, sub):
                sg["params"] = ps
            self.shadow.step()
        finally:
            for sg, ps in zip(self.shadow.param_groups, full):
                sg["params"] = ps
            for i in grads:
                self.host[i].grad = None
        for i in grads:
            self.params[i].copy_(self.host[i], non_blocking=self.pin)

    def covers(self, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if i in self.params]
