"""roofline — FLOPs, bytes and an estimated duration for one aten op.

Used by the tracer in two ways: in "meta" mode every op's duration comes from
here; in "measured" mode the duration is timed for real, but flops and bytes
are still stored so reports can show arithmetic intensity.

Model
-----
    duration = max(flops / peak_flops, bytes_accessed / fast_bandwidth) + kernel_overhead

for ops that launch a kernel; pure view / metadata / allocation ops (view,
detach, expand, empty, ...) cost nothing: 0 flops, 0 bytes, 0 seconds.

`bytes_accessed` is the bytes of every input tensor read plus every output
tensor written (tensor extents, not storage sizes; an in-place op reads and
writes its target).  FLOPs follow the usual conventions (a multiply-add is 2):

* convolution: 2 * out.numel * (C_in / groups) * prod(kernel) (+ bias);
  convolution_backward: the forward's flops for grad_input and again for
  grad_weight, as requested by its output mask, plus grad_out.numel for grad_bias;
* mm / addmm / bmm / baddbmm: 2 * M * N * K (per batch);
* scaled-dot-product attention: 4 * B * H * L * S * E (backward 2.5x);
* normalisation (batch / layer / group norm): ~7 flops per element forward, ~10 backward;
* pooling: out.numel * prod(kernel) (adaptive pooling: input.numel);
* softmax-like: ~5 per element; reductions: input.numel;
* everything else: elementwise, 1 flop per output element (copies: 0 flops).

>>> import torch
>>> from memstrata.hardware import profile
>>> a, b = torch.empty(64, 128, device="meta"), torch.empty(128, 32, device="meta")
>>> out = torch.ops.aten.mm.default(a, b)
>>> cost = op_cost(torch.ops.aten.mm.default, (a, b), {}, out)
>>> cost.flops, cost.bytes_accessed
(524288.0, 57344.0)
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ..hardware import Hierarchy
from ..hardware import profile as _named_profile

__all__ = ["OpCost", "op_cost", "roofline_time", "estimate", "is_metadata_op", "resolve_hierarchy"]


class OpCost(NamedTuple):
    flops: float
    bytes_accessed: float
    is_compute: bool  # launches a kernel (False for views, metadata and bare allocations)


def resolve_hierarchy(h: Hierarchy | str | None) -> Hierarchy | None:
    if h is None or isinstance(h, Hierarchy):
        return h
    return _named_profile(h)


# ----------------------------------------------------------------------------- classification

# Ops that move no data: aliases, metadata queries, allocations without initialisation.
_METADATA = {
    "detach", "alias", "lift_fresh", "lift", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "size", "stride", "numel", "dim", "is_same_size", "is_contiguous", "_reshape_alias", "resize_",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "set_", "_unsafe_view", "view", "as_strided", "expand", "t", "transpose", "permute", "squeeze",
    "unsqueeze", "slice", "select", "split", "split_with_sizes", "unbind", "narrow", "diagonal",
    "unfold", "view_as_real", "view_as_complex", "_conj", "_neg_view", "real", "imag",
    "record_stream", "_version", "device", "dtype", "layout", "prim",
}

_CONV = {
    "convolution", "_convolution", "convolution_overrideable", "cudnn_convolution", "mkldnn_convolution",
    "_slow_conv2d_forward", "slow_conv3d_forward", "miopen_convolution", "cudnn_convolution_transpose",
    "miopen_convolution_transpose", "slow_conv_transpose2d", "slow_conv_transpose3d", "_nnpack_spatial_convolution",
    "_mps_convolution", "slow_conv_dilated2d", "slow_conv_dilated3d", "conv2d", "conv1d", "conv3d",
}
_CONV_TRANSPOSED = {
    "cudnn_convolution_transpose", "miopen_convolution_transpose", "slow_conv_transpose2d", "slow_conv_transpose3d",
}
_CONV_BACKWARD = {"convolution_backward", "convolution_backward_overrideable"}

_NORM_FWD = {
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_with_update",
    "_batch_norm_with_update_functional", "_batch_norm_no_update", "native_layer_norm", "native_group_norm",
    "_fused_rms_norm", "batch_norm", "layer_norm", "group_norm",
}
_NORM_BWD = {
    "native_batch_norm_backward", "cudnn_batch_norm_backward", "miopen_batch_norm_backward", "batch_norm_backward",
    "native_layer_norm_backward", "native_group_norm_backward", "_fused_rms_norm_backward",
}
_POOL = {
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool2d", "avg_pool3d", "max_pool2d", "max_pool1d",
    "_low_memory_max_pool_with_offsets", "_low_memory_max_pool2d_with_offsets",
}
_POOL_BWD = {
    "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward", "avg_pool2d_backward", "avg_pool3d_backward",
    "_low_memory_max_pool_offsets_to_indices",
}
_ADAPTIVE_POOL = {
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "adaptive_max_pool3d_backward", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
}
_SOFTMAX = {"_softmax", "_log_softmax", "softmax", "log_softmax", "_safe_softmax"}
_SOFTMAX_BWD = {"_softmax_backward_data", "_log_softmax_backward_data"}
_REDUCE = {
    "sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "linalg_vector_norm", "var", "std", "var_mean",
    "std_mean", "argmax", "argmin", "logsumexp", "any", "all", "nll_loss_forward", "nll_loss2d_forward",
    "_foreach_norm", "count_nonzero",
}
_COPY = {
    "copy_", "clone", "_to_copy", "contiguous", "cat", "stack", "index", "index_select", "gather", "scatter",
    "constant_pad_nd", "_copy_from", "_copy_from_and_resize", "repeat", "_foreach_copy_", "copy", "fill_", "zero_",
    "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "scalar_tensor", "_local_scalar_dense",
    "masked_fill", "masked_fill_", "where", "flip", "roll", "slice_scatter", "select_scatter", "as_strided_scatter",
    "_unsafe_index", "index_put_", "index_put", "embedding", "embedding_dense_backward", "_pin_memory",
}
_ATTN = {
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
    "_efficient_attention_forward", "_scaled_dot_product_fused_attention_overrideable",
}
_ATTN_BWD = {
    "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_flash_attention_backward", "_efficient_attention_backward",
    "_scaled_dot_product_fused_attention_overrideable_backward",
}


def _op_name(func: Any) -> str:
    """'convolution' for aten.convolution.default; works for OpOverload and plain strings."""
    if isinstance(func, str):
        parts = func.split(".")
        return parts[1] if len(parts) >= 2 else parts[0]
    packet = getattr(func, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(func, "__name__", str(func))


def is_metadata_op(func: Any) -> bool:
    """True for ops that launch no kernel: views, aliases, metadata queries, bare allocations."""
    if getattr(func, "is_view", False):
        return True
    if getattr(func, "namespace", "aten") in ("prim", "profiler"):
        return True
    return _op_name(func) in _METADATA


# ----------------------------------------------------------------------------- helpers


def _tensors(x: Any, out: list[torch.Tensor]) -> None:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            if isinstance(y, torch.Tensor):
                out.append(y)
            elif isinstance(y, (list, tuple)):
                _tensors(y, out)


def _nbytes(ts: list[torch.Tensor]) -> float:
    total = 0
    for t in ts:
        try:
            total += t.numel() * t.element_size()
        except Exception:  # tensors without a size (undefined, opaque subclasses)
            pass
    return float(total)


def _numel(ts: list[torch.Tensor]) -> float:
    return float(sum(t.numel() for t in ts))


def _prod(xs: Any) -> int:
    return int(math.prod(int(v) for v in xs)) if xs is not None else 1


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _first(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for y in x:
            t = _first(y)
            if t is not None:
                return t
    return None


# ----------------------------------------------------------------------------- flop formulas


def _conv_flops(args: tuple, kwargs: dict, out: Any, name: str) -> float:
    x = _arg(args, kwargs, 0, "input")
    w = _arg(args, kwargs, 1, "weight")
    y = _first(out)
    if not isinstance(w, torch.Tensor) or y is None:
        return 0.0
    transposed = name in _CONV_TRANSPOSED or (name in ("convolution", "_convolution", "convolution_overrideable")
                                              and bool(_arg(args, kwargs, 6, "transposed", False)))
    per_out = int(w.shape[1]) * _prod(w.shape[2:])
    # Transposed conv: every *input* element is scattered through the kernel.
    base = (x.numel() if transposed and isinstance(x, torch.Tensor) else y.numel()) * per_out
    bias = _arg(args, kwargs, 2, "bias")
    return 2.0 * base + (y.numel() if isinstance(bias, torch.Tensor) else 0)


def _conv_backward_flops(args: tuple, kwargs: dict) -> float:
    grad_out = _arg(args, kwargs, 0, "grad_output")
    x = _arg(args, kwargs, 1, "input")
    w = _arg(args, kwargs, 2, "weight")
    if not isinstance(w, torch.Tensor) or not isinstance(grad_out, torch.Tensor):
        return 0.0
    transposed = bool(_arg(args, kwargs, 7, "transposed", False))
    mask = _arg(args, kwargs, 10, "output_mask", (True, True, True))
    per_out = int(w.shape[1]) * _prod(w.shape[2:])
    fwd = 2.0 * (x.numel() if transposed and isinstance(x, torch.Tensor) else grad_out.numel()) * per_out
    flops = 0.0
    if mask[0]:
        flops += fwd  # grad_input: a transposed convolution of grad_out
    if mask[1]:
        flops += fwd  # grad_weight: correlation of input and grad_out
    if len(mask) > 2 and mask[2]:
        flops += grad_out.numel()
    return flops


def _matmul_flops(name: str, args: tuple, kwargs: dict, out: Any) -> float:
    y = _first(out)
    if name in ("mm", "_int_mm"):
        a, b = args[0], args[1]
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "addmm":
        a, b = args[1], args[2]
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] + (y.numel() if y is not None else 0)
    if name == "bmm":
        a, b = args[0], args[1]
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "baddbmm":
        a, b = args[1], args[2]
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] + (y.numel() if y is not None else 0)
    if name in ("mv", "addmv"):
        m = args[0] if name == "mv" else args[1]
        return 2.0 * m.numel()
    if name in ("dot", "vdot"):
        return 2.0 * args[0].numel()
    # matmul / linear are composite and decompose before dispatch; keep a sane fallback.
    a, b = args[0], args[1]
    k = a.shape[-1] if a.dim() > 0 else 1
    return 2.0 * (y.numel() if y is not None else 0) * k + (0 if name != "linear" or len(args) < 3 else y.numel())


def _attn_flops(name: str, args: tuple) -> float:
    q, k = args[0], args[1]
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
        return 0.0
    batch = _prod(q.shape[:-2])
    l, e = q.shape[-2], q.shape[-1]
    s = k.shape[-2]
    fwd = 4.0 * batch * l * s * e
    return 2.5 * fwd if name in _ATTN_BWD else fwd


_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear", "_int_mm"}


def op_cost(func: Any, args: tuple = (), kwargs: dict | None = None, out: Any = None) -> OpCost:
    """FLOPs and bytes of one op call, from the shapes of its arguments and results."""
    kwargs = kwargs or {}
    if is_metadata_op(func):
        return OpCost(0.0, 0.0, False)
    name = _op_name(func)
    ins: list[torch.Tensor] = []
    _tensors(args, ins)
    _tensors(tuple(kwargs.values()), ins)
    outs: list[torch.Tensor] = []
    _tensors(out, outs)
    nbytes = _nbytes(ins) + _nbytes(outs)
    try:
        if name in _CONV:
            flops = _conv_flops(args, kwargs, out, name)
        elif name in _CONV_BACKWARD:
            flops = _conv_backward_flops(args, kwargs)
        elif name in _MATMUL:
            flops = _matmul_flops(name, args, kwargs, out)
        elif name in _ATTN or name in _ATTN_BWD:
            flops = _attn_flops(name, args)
        elif name in _NORM_FWD:
            flops = 7.0 * (ins[0].numel() if ins else 0)
        elif name in _NORM_BWD:
            flops = 10.0 * (ins[0].numel() if ins else 0)
        elif name in _POOL:
            k = _arg(args, kwargs, 1, "kernel_size", (1,))
            k = (k,) if isinstance(k, int) else k
            y = _first(out)
            flops = float((y.numel() if y is not None else 0) * _prod(k))
        elif name in _POOL_BWD:
            k = _arg(args, kwargs, 2, "kernel_size", (1,))
            k = (k,) if isinstance(k, int) else k
            flops = float(ins[0].numel() * _prod(k)) if ins else 0.0
        elif name in _ADAPTIVE_POOL:
            flops = float(max((t.numel() for t in ins), default=0))
        elif name in _SOFTMAX:
            flops = 5.0 * _numel(outs)
        elif name in _SOFTMAX_BWD:
            flops = 3.0 * _numel(outs)
        elif name in _REDUCE:
            flops = float(ins[0].numel()) if ins else 0.0
            if name in ("var", "std", "var_mean", "std_mean"):
                flops *= 2
        elif name in _COPY:
            flops = 0.0
        else:
            # Elementwise: one flop per element written (in-place foreach ops return
            # nothing: count the elements of their first tensor list instead).
            flops = _numel(outs) if outs else float(sum(t.numel() for t in _first_list(args)))
    except Exception:  # unusual overloads: never let a cost formula break a trace
        flops = _numel(outs)
    return OpCost(float(flops), float(nbytes), True)


def _first_list(args: tuple) -> list[torch.Tensor]:
    if not args:
        return []
    a = args[0]
    if isinstance(a, torch.Tensor):
        return [a]
    if isinstance(a, (list, tuple)):
        return [t for t in a if isinstance(t, torch.Tensor)]
    return []


def roofline_time(flops: float, bytes_accessed: float, hierarchy: Hierarchy, is_compute: bool = True,
                  dtype: str | None = None) -> float:
    """Seconds for one op under `hierarchy`'s roofline (0 for non-compute ops).

    `dtype` (of the op's first tensor input) selects the compute rate: fp32
    convolutions run as TF32 on GPU profiles (`Hierarchy.compute_rate`).
    """
    if not is_compute:
        return 0.0
    rate = hierarchy.compute_rate(dtype)
    return max(flops / rate, bytes_accessed / hierarchy.fast_bandwidth) + hierarchy.kernel_overhead


def op_dtype(args: tuple) -> str | None:
    """Dtype name of the first tensor argument (the op's compute dtype), if any."""
    for a in args:
        t = _first(a)
        if isinstance(t, torch.Tensor):
            return str(t.dtype).replace("torch.", "")
    return None


def estimate(func: Any, args: tuple, kwargs: dict | None, out: Any, hierarchy: Hierarchy | str) -> tuple[float, float, float]:
    """(flops, bytes_accessed, estimated seconds) of one op call."""
    h = resolve_hierarchy(hierarchy)
    assert h is not None
    c = op_cost(func, args, kwargs, out)
    return c.flops, c.bytes_accessed, roofline_time(c.flops, c.bytes_accessed, h, c.is_compute, op_dtype(args))


CostFn = Callable[[Any, tuple, dict, Any], OpCost]
