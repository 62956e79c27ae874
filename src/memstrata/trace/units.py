"""Which modules are recompute units.

A recompute unit is a module whose forward the runtime can re-run on its own
(through non-reentrant `torch.utils.checkpoint`).  The tracer and the runtime
must agree on the set exactly, so both call `find_units`, a pure function of
the model's structure and code (no inputs, no step).

Rule: start at the root and walk down.  The root, containers
(`nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict`) and *chain modules* (see
[Note: chain modules]) are split into their children; any other module is a
unit, and we do not look inside it.  For torchvision models this yields the
blocks (ResNet `Bottleneck`, EfficientNet `MBConv`, ViT `EncoderBlock`, Swin
and ConvNeXt blocks) plus the stem and head layers and the glue-free pieces
around them (ViT's encoder dropout and final LayerNorm).

Units can be called more than once per forward (a shared module); every call
is a separate unit in the trace, numbered in call order.

[Note: chain modules]
A module that is not a container is split when its forward, read by
`torch.fx` with every submodule opaque, calls at least two submodules, each
exactly once, at least one of them with submodules of its own, as a straight
chain: the first call reads (through any glue
ops) only the module's inputs, parameters, buffers and constants; every
later call reads only the previous call's output (plus parameters, buffers,
constants, and the *shapes* of anything); the module returns a function of the
last call's output only.  ViT's `Encoder` (pos_embedding add, dropout, layers,
ln) is one; a residual block (`x + f(x)`), a dense block, a branchy Inception
block are not, and stay whole units, so recomputing a block frees everything
inside it while holding only its input.  A chain of leaf modules (DenseNet's
`_DenseLayer`: cat, norm, relu, conv, ...; Swin's `PatchMerging`) stays whole
too: split into single ops, each unit would hold its own input, which is
what the op saves anyway, and recomputing it would free nothing.  Glue between the calls runs outside
every unit (kept, never recomputed), as the root's glue always has.
Conservative by construction: a forward that `torch.fx` cannot trace (data
dependent control flow, `*args`), glue that writes in place (`add_`,
`x += ...`, `inplace=True`, `setitem`: aliasing the data-flow check cannot
see), a submodule called twice, or a call that reaches into a submodule of a
non-container child makes the module a unit, as before.  The forward is read
in both training modes (only the module's own `training` flag is flipped, and
restored) and split only if both agree, so the set does not depend on
`model.train()`/`eval()`; splitting never affects what is computed, only which
module calls the runtime may re-run, so the check is about usefulness, not
safety.
"""

from __future__ import annotations

import operator
import warnings
import weakref

from torch import nn

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_units(model: nn.Module, max_depth: int = 8) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every recompute unit, in registration order.

    >>> import torchvision
    >>> names = [n for n, _ in find_units(torchvision.models.resnet18())]
    >>> names[:5]
    ['conv1', 'bn1', 'relu', 'maxpool', 'layer1.0']
    >>> [n for n, _ in find_units(torchvision.models.vit_b_16())][1:4]
    ['encoder.dropout', 'encoder.layers.encoder_layer_0', 'encoder.layers.encoder_layer_1']
    """
    units: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module, depth: int, is_root: bool) -> None:
        if depth < max_depth and len(module._modules) > 0 and (
                is_root or isinstance(module, _CONTAINERS) or is_chain_module(module)):
            for name, child in module.named_children():
                walk(f"{prefix}.{name}" if prefix else name, child, depth + 1, False)
            return
        if is_root or id(module) in seen:
            return
        seen.add(id(module))
        units.append((prefix, module))

    walk("", model, 0, True)
    return units


def sequential_children(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Qualified name -> (parent name, position) for every direct child of a plain `nn.Sequential`.

    Plain: its class does not override `Sequential.forward`, so it calls its
    children in order and nothing else (no glue).  A run of consecutive such
    children that are recompute units is a *segment* candidate; the runtime
    re-runs a segment by calling those children in order under one checkpoint.
    """
    out: dict[str, tuple[str, int]] = {}
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            for i, cname in enumerate(parent._modules):
                out[f"{pname}.{cname}" if pname else cname] = (pname, i)
    return out


def is_chain_module(module: nn.Module) -> bool:
    """True if `module`'s forward calls >= 2 submodules as a straight chain; see [Note: chain modules]."""
    if isinstance(module, _CONTAINERS) or not any(c._modules for c in module.children()):
        return False  # a container, or only leaf children: splitting cannot expose a block
    key = (type(module), tuple((n, id(c)) for n, c in module.named_children()))
    hit = _CHAIN_CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    was = module.training
    try:
        out = all(_chain_once(module, mode) for mode in (True, False))
    finally:
        module.training = was
    _CHAIN_CACHE[module] = (key, out)
    return out


# module -> ((its class, its children), is_chain): the tracer and the runtime ask about the same
# modules, and reading a forward with torch.fx takes milliseconds per block.
_CHAIN_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# Method / attribute reads that carry a tensor's metadata, not its values.
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "type", "is_contiguous", "get_device"})
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"})
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                                operator.ixor, operator.ilshift, operator.irshift, operator.setitem,
                                operator.delitem})


def _is_inplace(node) -> bool:
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    t = node.target
    if node.op == "call_method":
        return isinstance(t, str) and t.endswith("_") and not t.startswith("__")
    if node.op == "call_function":
        if t in _INPLACE_OPERATORS:
            return True
        name = getattr(t, "__name__", "")
        return name.endswith("_") and not name.startswith("__")
    return False


def _chain_once(module: nn.Module, training: bool) -> bool:
    from torch import fx

    class _Opaque(fx.Tracer):  # every submodule is a leaf: we read `module`'s own forward only
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return m is not module

    module.training = training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Opaque().trace(module)
    except Exception:  # not traceable symbolically: stay a unit
        return False
    children = dict(module.named_children())
    sources: dict = {}  # node -> the placeholders / submodule calls its value depends on
    calls: list = []
    called: set[str] = set()
    for node in graph.nodes:
        deps: set = set()
        for a in node.all_input_nodes:
            deps |= sources[a]
        if node.op == "placeholder":
            sources[node] = {node}
        elif node.op == "get_attr":
            sources[node] = set()
        elif node.op == "call_module":
            if _resolve(children, str(node.target)) is None or node.target in called:
                return False
            called.add(node.target)
            want = {calls[-1]} if calls else None
            if want is None:
                if any(d.op != "placeholder" for d in deps):
                    return False
            elif deps != want:
                return False
            calls.append(node)
            sources[node] = {node}
        elif node.op in ("call_function", "call_method"):
            if _is_inplace(node):
                return False
            meta = (node.op == "call_method" and node.target in _META_METHODS) or (
                node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS)
            sources[node] = set() if meta else deps
        elif node.op == "output":
            composite = any(_resolve(children, str(c.target))._modules for c in calls)
            return len(calls) >= 2 and deps == {calls[-1]} and composite
        else:  # pragma: no cover - fx has no other node kinds today
            return False
    return False


def _resolve(children: dict[str, nn.Module], target: str) -> nn.Module | None:
    """A direct child, or an element of container children (`layers.0`, `blocks.a.1`); else None."""
    head, *rest = target.split(".")
    m = children.get(head)
    for part in rest:
        if not isinstance(m, _CONTAINERS):
            return None
        m = m._modules.get(part)
    return m


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
