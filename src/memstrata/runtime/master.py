"""Mixed precision with fp32 master weights: `MasterWeights`, a torch optimizer over low-precision parameters.

The model's parameters stay in bf16 (or fp16); each one's fp32 master copy is a
per-parameter optimizer state (key ``"master"``) beside the wrapped algorithm's
own fp32 states (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...).  A step
runs the real `torch.optim` algorithm on the masters, then rounds each master
into its parameter.

>>> import torch
>>> from memstrata import MasterWeights
>>> model = torch.nn.Linear(8, 2).to(torch.bfloat16)
>>> opt = MasterWeights(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
>>> model(torch.randn(4, 8, dtype=torch.bfloat16)).sum().backward()
>>> opt.step(); opt.zero_grad()
>>> st = opt.state[model.weight]
>>> sorted(st), st["master"].dtype, st["exp_avg"].dtype, model.weight.dtype
(['exp_avg', 'exp_avg_sq', 'master', 'step'], torch.float32, torch.float32, torch.bfloat16)
>>> torch.equal(model.weight, st["master"].to(torch.bfloat16))
True

Because the master is a per-parameter state tensor, `TieredOptimizer(
MasterWeights(...), ...)` (states.py) tiers it with the moments, bucket by
bucket, on host or NVMe: the master weights are the largest part of a
mixed-precision optimizer's memory (4 of AdamW's 12 state bytes per element).

[Note: master weights, exactly]
The arithmetic is, per parameter ``p`` (low precision) of the groups being
stepped, that of the usual hand-written loop over fp32 master leaf tensors in a
plain torch optimizer:
``master.grad = p.grad.float(); opt.step(); p.copy_(master)``.  Here: the
gradient is converted to the master's dtype (a new fp32 tensor: exact, every
bf16/fp16 value is an fp32 value); a private instance of the wrapped class (the
engine) gets, for this one call, one param group per group of ours (every
hyper-parameter copied from ours, so LR schedulers, `load_state_dict` and
``foreach`` / ``fused`` flags reach it) over the masters, and its ``state``
holds the masters' states (taken from ours, written back after); its own
`step()` runs the algorithm; then ``p.copy_(master)`` rounds to nearest even,
as the reference does.  The master is created lazily, at a parameter's first
step with a gradient, from the parameter's value then (``p.float()``), as torch
creates its states; a parameter without a gradient is skipped (no state).  The
engine's step over a restricted group list is the same arithmetic for every
per-parameter algorithm ([Note: per-bucket steps are the full step] in
states.py), which is why `TieredOptimizer` may step us bucket by bucket.

Decisions (each a one-line error where it is a mistake):
* fp32 / fp64 parameters are stepped directly: the parameter is its own master
  (no ``"master"`` state), so a bf16 model that keeps e.g. its norms in fp32
  works as it is; a model with *no* low-precision parameter is refused (master
  weights would be a plain optimizer plus overhead: use the optimizer itself).
* Masters are fp32 (`MASTER_DTYPE`).  fp16 parameters work, but loss scaling
  is not built: `torch.amp.GradScaler` refuses fp16 gradients (bf16 needs none).
* The master is the truth: writing a parameter directly (``model.load_state_dict``
  mid-run) is overwritten by the next step; restore training through this
  optimizer's `load_state_dict` (the master round-trips exactly), or call
  `reset_masters()` after changing the weights.
* LBFGS (one state for all parameters, a closure per step) is refused; a
  closure given to `step()` is evaluated once before the update, as by torch.
* `state_dict()` is torch's standard format (the masters are states);
  `load_state_dict` keeps the masters and the states of low-precision
  parameters in fp32 (torch's loader would cast every floating state to the
  parameter's dtype, rounding the master to bf16).
* Transient memory: the step goes through each group in chunks of about
  `master_chunk_bytes` (64 MiB) of fp32 gradients: converted, stepped by the
  engine, rounded back, freed; so a full step of a 1.5B model does not hold
  6 GB of fp32 gradients at once.  A chunk's step is the full step's
  arithmetic for the same reason a bucket's is.
* The engine's step is a torch optimizer step: global optimizer-step hooks
  (``torch.optim.optimizer.register_optimizer_step_pre_hook``) see it inside
  ours.  memstrata's own (the tracer's state numbering, runtime/params.py's
  fetch) are idempotent for it; our step's hooks (``register_step_pre_hook``
  on this object, LR schedulers' counters) see one step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from .states import expected_state_tensors  # states.py asks us through getattr (expected_state_bytes), never imports us

__all__ = ["MasterWeights", "MASTER_DTYPE", "LOW_PRECISION"]

MASTER_DTYPE = torch.float32
LOW_PRECISION = (torch.bfloat16, torch.float16)
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024  # fp32 gradients alive at once inside step()


def _has_master(p: torch.Tensor) -> bool:
    return p.dtype in LOW_PRECISION


class MasterWeights(torch.optim.Optimizer):
    """`optimizer_class` over fp32 master copies of low-precision `params` ([Note: master weights, exactly]).

    * `params`: the model's parameters or param groups (bf16 / fp16; fp32 ones are stepped directly).
    * `optimizer_class`: a `torch.optim.Optimizer` subclass with per-parameter state (AdamW, Adam, SGD,
      Adagrad, ...), or a callable ``factory(params, **defaults)`` returning one (e.g. a `functools.partial`).
    * `defaults`: its hyper-parameters (``lr``, ``betas``, ``weight_decay``, ``foreach``, ``fused``, ...).
    * `master_chunk_bytes`: the step converts and steps the gradients in chunks of about this many fp32 bytes
      (at least one parameter each), so at most that much transient fp32 gradient exists at once.

    The signature follows torch's `ZeroRedundancyOptimizer(params, optimizer_class, **defaults)`.  Our
    `param_groups` are the model's parameters with the wrapped class's full set of hyper-parameters (LR
    schedulers write them); ``state[p]`` holds ``"master"`` and the algorithm's states.
    """

    def __init__(self, params: Iterable[Any], optimizer_class: Callable[..., torch.optim.Optimizer], *,
                 master_chunk_bytes: int = DEFAULT_CHUNK_BYTES, **defaults: Any) -> None:
        if torch.is_tensor(params):
            raise ValueError("MasterWeights: params must be an iterable of tensors or param groups, got one tensor "
                             "(pass [tensor] or model.parameters())")
        if isinstance(params, torch.optim.Optimizer):
            raise ValueError("MasterWeights: pass the model's parameters and the optimizer class "
                             "(MasterWeights(model.parameters(), torch.optim.AdamW, lr=...)), not a built optimizer")
        if isinstance(optimizer_class, type) and issubclass(optimizer_class, MasterWeights):
            raise ValueError("MasterWeights: optimizer_class is MasterWeights itself; give the algorithm "
                             "(torch.optim.AdamW, torch.optim.SGD, ...)")
        if isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.LBFGS):
            raise ValueError("MasterWeights: LBFGS keeps one state for all parameters and needs a closure per step; "
                             "use a per-parameter optimizer (AdamW, SGD, ...)")
        if not callable(optimizer_class):
            raise ValueError(f"MasterWeights: optimizer_class must be a torch.optim.Optimizer class or a factory, "
                             f"got {optimizer_class!r}")
        params = [_listed(x) for x in params]
        first = _first_param(params)
        # The engine: a private instance of the algorithm over a placeholder; each step hands it the masters.
        probe = torch.zeros(1, dtype=MASTER_DTYPE, device=first.device if first is not None else "cpu",
                            requires_grad=True)
        try:
            engine = optimizer_class([probe], **defaults)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"MasterWeights: {_name(optimizer_class)}(params, **{sorted(defaults)}) failed: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(engine, torch.optim.Optimizer):
            raise ValueError(f"MasterWeights: optimizer_class must build a torch.optim.Optimizer, got "
                             f"{type(engine).__name__}")
        if isinstance(engine, (torch.optim.LBFGS, MasterWeights)) or type(engine).__name__ in (
                "TieredOptimizer", "GradTieredOptimizer"):
            raise ValueError(f"MasterWeights: {type(engine).__name__} cannot be the algorithm over master weights; "
                             f"use a per-parameter torch.optim optimizer (AdamW, SGD, ...)")
        if int(master_chunk_bytes) <= 0:
            raise ValueError(f"MasterWeights: master_chunk_bytes must be > 0, got {master_chunk_bytes}")
        self.master_chunk_bytes = int(master_chunk_bytes)
        self._engine = engine
        self._factory = optimizer_class
        self._hyper = dict(defaults)
        super().__init__(params, dict(engine.defaults))
        ps = [p for g in self.param_groups for p in g["params"]]
        if ps and not any(_has_master(p) for p in ps):
            raise ValueError(f"MasterWeights: every parameter is {ps[0].dtype} already (no bf16/fp16 one): master "
                             f"weights add nothing; use {_name(optimizer_class)} directly (or cast the model first)")

    # ------------------------------------------------------------------ what it keeps
    @property
    def algorithm(self) -> torch.optim.Optimizer:
        """The engine: an instance of the wrapped class (its type and `defaults` describe the algorithm)."""
        return self._engine

    def state_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of `p`'s tensor states: the master's for a low-precision parameter, `p`'s otherwise."""
        return MASTER_DTYPE if _has_master(p) else p.dtype

    def expected_state_bytes(self, p: torch.Tensor) -> list[int]:
        """Bytes of each tensor state `p` will have: the algorithm's (the table of runtime/states.py) at the state
        dtype, plus the master for a low-precision parameter.  The planner asks this, not ``n x p.nbytes``."""
        item = torch.empty((), dtype=self.state_dtype(p)).element_size()
        n = expected_state_tensors(self._engine) + int(_has_master(p))
        return [p.numel() * item] * n

    def new_like(self, param_groups: list[dict[str, Any]]) -> "MasterWeights":
        """An empty `MasterWeights` of the same algorithm over other parameters (the host step's shadow,
        runtime/host_step.py); `param_groups` carry every hyper-parameter."""
        return MasterWeights(param_groups, self._factory, master_chunk_bytes=self.master_chunk_bytes, **self._hyper)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One step of the algorithm on the masters of our groups' parameters that have a gradient, in chunks of
        about `master_chunk_bytes` of fp32 gradients ([Note: master weights, exactly])."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, g in enumerate(self.param_groups):
            chunk: list[torch.Tensor] = []
            acc = 0
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MasterWeights: sparse gradients are not supported")
                n = p.numel() * 4
                if chunk and acc + n > self.master_chunk_bytes:
                    self._step_chunk(gi, chunk)
                    chunk, acc = [], 0
                chunk.append(p)
                acc += n
            if chunk:
                self._step_chunk(gi, chunk)
        return loss

    def _step_chunk(self, gi: int, params: list[torch.Tensor]) -> None:
        """The engine's step over the masters of `params` (of our group `gi`), then each rounded into its parameter."""
        g = self.param_groups[gi]
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        stepped: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = []
        for p in params:
            st = self.state[p]
            if _has_master(p):
                if "master" not in st:
                    st["master"] = p.detach().to(MASTER_DTYPE)
                m = st["master"].detach()  # an alias: the engine updates the master's storage in place
                m.grad = p.grad.to(m.dtype)
            else:
                m = p  # its own master
            state[m] = {k: v for k, v in st.items() if k != "master"}
            stepped.append((p, m, st))
        engine = self._engine
        engine.param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [m for _, m, _ in stepped]}]
        engine.state = state
        try:
            engine.step()
        finally:
            for p, m, st in stepped:
                st.update(state.get(m, {}))  # states the algorithm created or replaced (SGD's first momentum)
                if m is not p:
                    m.grad = None
                    p.copy_(st["master"])
            engine.param_groups = []
            engine.state = defaultdict(dict)

    def reset_masters(self) -> None:
        """Set every master to its parameter's current value (after changing the weights outside the optimizer)."""
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state.get(p)
                    if st and "master" in st:
                        st["master"].copy_(p)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Torch's loader, with the states of low-precision parameters kept at the master dtype (torch would cast
        every floating state to the parameter's dtype: a master rounded to bf16)."""
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i not in saved or not _has_master(p):
                continue
            st = self.state[p]
            for k, v in saved[i].items():
                if torch.is_tensor(v) and k != "step" and v.is_floating_point():
                    st[k] = v.to(device=p.device, dtype=MASTER_DTYPE)

    def __repr__(self) -> str:
        return f"MasterWeights({_name(self._factory)}, {len(self.param_groups)} groups, masters {MASTER_DTYPE})"


def _listed(x: Any) -> Any:
    """A param group with its parameters in a list (a generator read once here would be empty for torch)."""
    if not isinstance(x, dict) or "params" not in x:
        return x
    ps = x["params"]
    return {**x, "params": [ps] if torch.is_tensor(ps) else list(ps)}


def _first_param(params: list[Any]) -> torch.Tensor | None:
    for x in params:
        if isinstance(x, dict):
            ps = x.get("params") or []
            if ps:
                return ps[0]
        elif torch.is_tensor(x):
            return x
    return None


def _name(f: Any) -> str:
    return getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__", None) or repr(f)
