"""Equivalence checks: managed training must be bit-identical to unmanaged training.

Used by the tests (CPU and GPU tiers) and by anyone who wants to convince
themselves on their own model::

    >>> import copy, torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    >>> a = train_steps(copy.deepcopy(m), x, y, steps=2)
    >>> b = train_steps(copy.deepcopy(m), x, y, steps=2)
    >>> state_mismatches(a, b)
    []
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn


def train_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 5,
    step_ctx: Callable[[], Any] | None = None,
    seed: int = 1234,
    lr: float = 0.05,
    momentum: float = 0.9,
) -> nn.Module:
    """`steps` SGD-momentum steps on one batch; `step_ctx()` wraps forward+loss+backward."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    torch.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.manual_seed_all(seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        with (step_ctx() if step_ctx is not None else contextlib.nullcontext()):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
    return model


def state_mismatches(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of parameters, gradients and buffers that are not torch.equal (empty = identical)."""
    out = []
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    if sa.keys() != sb.keys():
        return ["<state_dict keys differ>"]
    for k in sa:
        if not torch.equal(sa[k].detach(), sb[k].detach()):
            out.append(k)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if (pa.grad is None) != (pb.grad is None) or (pa.grad is not None and not torch.equal(pa.grad, pb.grad)):
            out.append(f"{n}.grad")
    return out
