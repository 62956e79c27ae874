"""Which modules' parameters the runtime can move off tier 0 between uses (the tracer records the answer).

[Note: which modules' parameters may be tiered]
runtime/params.py fetches a module's parameters in its forward pre-hook,
releases them in its forward hook, and in backward brackets the *one*
autograd node that produced the module's output (a pre-hook fetches, a hook
releases).  That is exact only for modules whose backward reading of their
parameters happens inside that node: the leaf modules whose forward is one
differentiable op on their weight (`nn.Linear`: addmm/matmul through a
transpose view; `nn.Conv1d/2d/3d`: convolution), of exactly these types (a
subclass may override `forward`).  Their parameters must be plain
`nn.Parameter`s that require grad and own their whole storage (released by
resizing the storage to 0 bytes, so every alias autograd saved sees the
fetched bytes again: [Note: release by storage resize] in runtime/params.py),
and belong to this module only (tied weights are not tiered).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

__all__ = ["tierable_param_modules", "TIERABLE_TYPES"]

TIERABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _owns_storage(p: torch.Tensor) -> bool:
    try:
        return (type(p) is nn.Parameter and p.layout == torch.strided and p.is_contiguous()
                and p.storage_offset() == 0 and p.requires_grad and p.numel() > 0
                and p.untyped_storage().nbytes() == p.numel() * p.element_size())
    except (RuntimeError, NotImplementedError):  # pragma: no cover - a tensor subclass without a storage
        return False


def tierable_param_modules(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of `model`'s modules whose own parameters may be tiered, in module order."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    storages = Counter()
    for p in model.parameters():
        try:
            storages[p.untyped_storage()._cdata] += 1
        except (RuntimeError, NotImplementedError):  # pragma: no cover
            pass
    out = []
    for name, m in model.named_modules():
        if type(m) not in TIERABLE_TYPES:
            continue
        ps = list(m.parameters(recurse=False))
        if ps and all(_owns_storage(p) and counts[id(p)] == 1 and storages[p.untyped_storage()._cdata] == 1
                      for p in ps):
            out.append(name)
    return tuple(out)
