"""Which modules are recompute units.

A recompute unit is a module whose forward the runtime can re-run on its own
(through non-reentrant `torch.utils.checkpoint`).  The tracer and the runtime
must agree on the set exactly, so both call `find_units`.

Rule: start at the root and walk down.  Containers (`nn.Sequential`,
`nn.ModuleList`, `nn.ModuleDict`) and the root itself are split into their
children; any other module is a unit, and we do not look inside it.  For
torchvision models this yields the blocks (ResNet `Bottleneck`, EfficientNet
`MBConv`, DenseNet `_DenseBlock`) plus the stem and head layers.

Units can be called more than once per forward (a shared module); every call
is a separate unit in the trace, numbered in call order.
"""

from __future__ import annotations

from torch import nn

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_units(model: nn.Module, max_depth: int = 8) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every recompute unit, in registration order.

    >>> import torchvision
    >>> names = [n for n, _ in find_units(torchvision.models.resnet18())]
    >>> names[:5]
    ['conv1', 'bn1', 'relu', 'maxpool', 'layer1.0']
    """
    units: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module, depth: int, is_root: bool) -> None:
        splittable = is_root or isinstance(module, _CONTAINERS)
        if splittable and depth < max_depth and len(module._modules) > 0:
            for name, child in module.named_children():
                walk(f"{prefix}.{name}" if prefix else name, child, depth + 1, False)
            return
        if is_root or id(module) in seen:
            return
        seen.add(id(module))
        units.append((prefix, module))

    walk("", model, 0, True)
    return units


# Activation modules whose `inplace` flag only chooses between writing into the
# input or into a new tensor: the values are identical either way.
_INPLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
                        nn.Mish, nn.Hardtanh, nn.CELU, nn.SELU, nn.Threshold)


def out_of_place_activations(model: nn.Module) -> list[nn.Module]:
    """Turn in-place activation modules into out-of-place ones; return those changed.

    [Note: why memstrata runs activations out of place]
    Selective recomputation keeps the outputs of chosen ops by reference, and
    refuses (rightly) an output that a later op overwrote in place.  With
    `ReLU(inplace=True)` after every BatchNorm, no BatchNorm output could be
    kept, so keeping it would force re-running the BatchNorm, and the cheap
    "keep the convolution, re-run the normalisation" plans would not exist.
    Out of place, the activation writes a new tensor and the BatchNorm output
    dies right after it (nothing else saves it), so memory stays the same and
    values are bit-identical.  The tracer and the runtime apply the same change,
    so the trace describes the model exactly as it runs; `restore_inplace`
    undoes it.
    """
    changed = []
    for m in model.modules():
        if isinstance(m, _INPLACE_ACTIVATIONS) and getattr(m, "inplace", False):
            m.inplace = False
            changed.append(m)
    return changed


def restore_inplace(modules: list[nn.Module]) -> None:
    for m in modules:
        m.inplace = True
