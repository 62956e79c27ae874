"""Model, optimizer and learning-rate schedule of the recipe (torchvision reference hyperparameters)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RecipeConfig

__all__ = ["build_model", "param_groups", "build_optimizer", "build_scheduler", "lr_factor", "known_models"]

# Modules whose weights are normalisation scales (the reference's `_NORM_TYPES` in utils.set_weight_decay).
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LocalResponseNorm)


def known_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int, seed: int) -> nn.Module:
    """A torchvision classification model with `num_classes` outputs, initialised from `seed`."""
    import torchvision

    known = known_models()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision classification model {name!r}{hint}")
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, num_classes=num_classes)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Two groups: normalisation weights and all biases (`norm_weight_decay`), everything else (`weight_decay`).

    Each parameter appears once, in module order (shared parameters by their first owner).
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(mod, _NORMS) or pname == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": norm_weight_decay})
    return groups


def build_optimizer(model: nn.Module, cfg: RecipeConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.norm_weight_decay), lr=cfg.peak_lr,
                           momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_decay: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_decay + (1.0 - warmup_decay) * step / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / rest)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, cfg: RecipeConfig, steps_per_epoch: int):
    """Per-iteration LambdaLR (its state_dict holds the step count, so a resumed run continues the curve)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.warmup_decay))
