"""Trace stage: recording a step at op level, on CPU and on meta."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from memstrata.trace import (
    Trace,
    find_units,
    live_bytes_per_event,
    op_cost,
    record_step,
    sac_op_indices,
    trace_model,
    trace_step,
)
from memstrata.trace.schema import KINDS, PHASES

# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        return torch.relu_(self.lin(x))  # in-place on the linear's output


class Wrap(nn.Module):
    """Calls a module that is also a unit of its own: a nested unit call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Block(8)
        self.shared = Block(8)
        self.wrap = Wrap(self.shared)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = x.view(x.shape[0], -1)  # a view of the input
        x = self.shared(self.a(x))
        x = self.shared(x)  # the shared module, called a second time
        x = self.wrap(x)  # ... and a third time, nested in another unit
        x = x.unsqueeze(1).squeeze(1)
        return self.head(x)


def _tiny_inputs():
    return torch.randn(3, 2, 4), torch.randint(0, 4, (3,))


def _resnet18(device="cpu"):
    with torch.device(device):
        return torchvision.models.resnet18(num_classes=10)


def _mobilenet(device="cpu"):
    with torch.device(device):
        return torchvision.models.mobilenet_v3_small(num_classes=10)


def _cpu_trace(model, x, y, optimizer=None):
    return trace_step(model, x, y, optimizer=optimizer, mode="measured")


def _meta_twin(model_fn, x, y, optimizer_kwargs=None):
    m = model_fn("meta")
    opt = torch.optim.SGD(m.parameters(), **optimizer_kwargs) if optimizer_kwargs else None
    return trace_step(m, x.to("meta"), y.to("meta"), optimizer=opt, mode="meta", profile="h200")


SGD = dict(lr=0.1, momentum=0.9, foreach=False)


@pytest.fixture(scope="module")
def r18_cpu():
    torch.manual_seed(0)
    m = _resnet18()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    return m, x, y, _cpu_trace(m, x, y, torch.optim.SGD(m.parameters(), **SGD))


@pytest.fixture(scope="module")
def tiny_cpu():
    torch.manual_seed(0)
    m = Tiny()
    x, y = _tiny_inputs()
    return m, x, y, _cpu_trace(m, x, y, torch.optim.SGD(m.parameters(), **SGD))


@pytest.fixture(scope="module")
def mnv3_cpu():
    torch.manual_seed(0)
    m = _mobilenet()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    return m, x, y, _cpu_trace(m, x, y)


ALL = ["r18_cpu", "tiny_cpu", "mnv3_cpu"]


# ----------------------------------------------------------------------------- helpers


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _independent_saved_bytes(model, x, y):
    """Bytes of the storages autograd saves, seen by a plain pack hook (params/buffers excluded)."""
    excluded = {p.untyped_storage()._cdata for p in model.parameters()}
    excluded |= {b.untyped_storage()._cdata for b in model.buffers()}
    seen: dict[int, torch.Tensor] = {}  # holding the tensors keeps the addresses unique
    packs = 0

    def pack(t):
        nonlocal packs
        packs += 1
        seen.setdefault(t.untyped_storage()._cdata, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    total = sum(t.untyped_storage().nbytes() for k, t in seen.items() if k not in excluded)
    loss.backward()
    return total, packs


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fixture", ALL)
def test_saved_bytes_match_independent_pack_hook(fixture, request):
    m, x, y, t = request.getfixturevalue(fixture)
    expected, packs = _independent_saved_bytes(m, x, y)
    got = sum(s.nbytes for s in t.storages if s.saved and s.kind not in ("parameter", "buffer"))
    assert got == expected
    assert t.num_packs == packs
    assert all(s.kind in ("activation", "input") for s in t.storages if s.saved and s.kind not in ("parameter", "buffer"))


@pytest.mark.parametrize("fixture", ALL)
def test_records_are_consistent(fixture, request):
    m, x, y, t = request.getfixturevalue(fixture)
    assert [o.index for o in t.ops] == list(range(len(t.ops)))
    assert [s.id for s in t.storages] == list(range(len(t.storages)))
    # phases are forward -> backward -> optimizer, in that order
    order = [PHASES.index(o.phase) for o in t.ops]
    assert order == sorted(order)
    assert t.ops[t.forward_end].phase == "forward" and t.ops[t.forward_end + 1].phase == "backward"
    assert t.ops[t.backward_end].phase == "backward"
    assert all(o.phase != "backward" for o in t.ops[t.backward_end + 1:])
    for s in t.storages:
        assert s.kind in KINDS
        if s.last_use is not None and s.freed_after is not None:
            assert s.last_use <= s.freed_after
        if s.producer is not None and s.freed_after is not None:
            assert s.producer <= s.freed_after
        if s.kind == "activation":
            assert s.saved and t.ops[s.producer].phase == "forward"
            assert s.backward_reads and all(t.ops[i].phase == "backward" for i in s.backward_reads)
            assert s.freed_after is not None and s.freed_after <= t.backward_end  # released by the backward
    # every parameter and buffer is a storage, of its kind
    params = {p.untyped_storage().nbytes() for p in m.parameters()}
    assert sum(s.kind == "parameter" for s in t.storages) == len(list(m.parameters()))
    assert {s.nbytes for s in t.storages if s.kind == "parameter"} == params
    assert sum(s.kind == "buffer" for s in t.storages) == len(list(m.buffers()))
    assert sum(s.kind == "gradient" for s in t.storages) == len(list(m.parameters()))
    assert t.input_shape == tuple(x.shape) and t.batch_size == x.shape[0]


@pytest.mark.parametrize("fixture", ALL)
def test_observed_peak_reproduced_from_records(fixture, request):
    *_, t = request.getfixturevalue(fixture)
    n = len(t.ops)
    best = 0
    for e in range(n):
        live = 0
        for s in t.storages:
            start = 0 if s.producer is None else s.producer
            end = n - 1 if s.freed_after is None else s.freed_after
            if start <= e <= end:
                live += s.nbytes
        best = max(best, live)
    assert t.observed_peak == best == max(live_bytes_per_event(t))
    assert t.observed_peak > sum(s.nbytes for s in t.storages if s.kind == "parameter")


@pytest.mark.parametrize("fixture", ALL)
def test_json_round_trip(fixture, request):
    *_, t = request.getfixturevalue(fixture)
    assert Trace.from_json(t.to_json()) == t


@pytest.mark.parametrize(
    "fixture,model_fn,opt",
    [("r18_cpu", _resnet18, SGD), ("tiny_cpu", lambda d="cpu": _tiny_on(d), SGD), ("mnv3_cpu", _mobilenet, None)],
)
def test_meta_trace_matches_cpu_trace(fixture, model_fn, opt, request):
    _, x, y, tc = request.getfixturevalue(fixture)
    tm = _meta_twin(model_fn, x, y, opt)
    assert [o.name for o in tm.ops] == [o.name for o in tc.ops]
    assert [o.phase for o in tm.ops] == [o.phase for o in tc.ops]
    assert [(o.module, o.unit, o.inputs, o.outputs) for o in tm.ops] == [
        (o.module, o.unit, o.inputs, o.outputs) for o in tc.ops
    ]
    assert tm.num_packs == tc.num_packs
    assert (tm.forward_end, tm.backward_end) == (tc.forward_end, tc.backward_end)
    strip = lambda s: (s.kind, s.nbytes, s.dtype, s.shape, s.producer, s.saved, s.pack_indices, s.freed_after)
    assert [strip(s) for s in tm.storages] == [strip(s) for s in tc.storages]
    ustrip = lambda u: (u.module, u.first_op, u.last_op, u.pack_start, u.pack_end, u.inputs, u.first_backward_op)
    assert [ustrip(u) for u in tm.units] == [ustrip(u) for u in tc.units]
    assert tm.observed_peak == tc.observed_peak
    assert tm.mode == "meta" and tm.profile == "h200" and tm.device == "cuda"
    assert all(o.duration >= 0 for o in tm.ops) and tm.step_time > 0


def _tiny_on(device):
    with torch.device(device):
        torch.manual_seed(0)
        return Tiny()


def test_aliasing_view_and_inplace_share_one_storage(tiny_cpu):
    m, x, y, t = tiny_cpu
    ops = t.ops
    # the input's view shares the input storage
    view = next(o for o in ops if o.name == "aten.view.default")
    inp = t.storages[view.inputs[0]]
    assert inp.kind == "input" and inp.nbytes == x.numel() * 4 and view.outputs == ()
    # relu_ writes into the storage addmm allocated: one storage, counted once
    relus = [o for o in ops if o.name == "aten.relu_.default"]
    assert len(relus) == 4  # a, shared, shared, wrap.inner(=shared)
    for r in relus:
        (sid,) = r.outputs
        producer = ops[t.storages[sid].producer]
        assert producer.name == "aten.addmm.default" and producer.outputs == (sid,)
        assert r.inputs == (sid,)
        assert sum(1 for o in ops[: r.index + 1] if sid in o.outputs) == 2
    # unsqueeze/squeeze are views: no new storage
    for name in ("aten.unsqueeze.default", "aten.squeeze.dim"):
        o = next(o for o in ops if o.name == name)
        assert o.outputs == () and o.flops == 0 and o.bytes_accessed == 0 and o.duration >= 0
    # counted once: the in-place result adds no bytes to the live set
    sid = relus[0].outputs[0]
    live = live_bytes_per_event(t)
    assert live[relus[0].index] == live[relus[0].index - 1]


def test_units_shared_and_nested(tiny_cpu):
    m, x, y, t = tiny_cpu
    assert [n for n, _ in find_units(m)] == ["a", "shared", "wrap", "head"]
    # every call is a unit record, in call order; the shared module appears 3 times
    assert [u.module for u in t.units] == ["a", "shared", "shared", "wrap", "shared", "head"]
    wrap, inner = t.units[3], t.units[4]
    assert wrap.first_op <= inner.first_op <= inner.last_op < wrap.last_op
    assert t.ops[wrap.last_op].name == "aten.mul.Tensor" and t.ops[wrap.last_op].unit == wrap.index
    assert all(t.ops[i].unit == inner.index for i in range(inner.first_op, inner.last_op + 1))
    # each call's backward starts at its own nodes, in reverse call order, even
    # though all three calls saved the same weight storage
    shared = [u for u in t.units if u.module == "shared"]
    fb = [u.first_backward_op for u in shared]
    assert fb[2] < fb[1] < fb[0]
    for u in shared:
        assert t.ops[u.first_backward_op].phase == "backward"
    # a unit's inputs are the storages of its tensor arguments
    assert t.units[0].inputs == (t.storages[t.ops[0].inputs[0]].id,)


@pytest.mark.parametrize("fixture", ALL)
def test_unit_ranges_and_packs(fixture, request):
    m, x, y, t = request.getfixturevalue(fixture)
    # each pack position belongs to exactly one storage
    owners = sorted(p for s in t.storages for p in s.pack_indices)
    assert owners == list(range(t.num_packs))
    pack_of = {p: s for s in t.storages for p in s.pack_indices}
    for u in t.units:
        assert 0 <= u.first_op <= u.last_op + 1 and u.last_op <= t.forward_end
        assert 0 <= u.pack_start <= u.pack_end <= t.num_packs
        # ranges are nested or disjoint
        for v in t.units:
            if v.index <= u.index:
                continue
            disjoint = v.first_op > u.last_op
            nested = u.first_op <= v.first_op and v.last_op <= u.last_op
            assert disjoint or nested, (u, v)
            if nested:
                assert u.pack_start <= v.pack_start and v.pack_end <= u.pack_end
        # op.unit is the innermost unit call
        for i in range(u.first_op, u.last_op + 1):
            inner = [v for v in t.units if v.first_op <= i <= v.last_op]
            assert t.ops[i].unit == max(inner, key=lambda v: (v.first_op, v.index)).index
        # first backward op: set iff something packed inside is read by the backward
        reads = [min(pack_of[p].backward_reads) for p in range(u.pack_start, u.pack_end) if pack_of[p].backward_reads]
        assert (u.first_backward_op is None) == (not reads)
        if u.first_backward_op is not None:
            assert t.forward_end < u.first_backward_op <= t.backward_end
            assert min(reads) <= max(v for p in range(u.pack_start, u.pack_end) for v in pack_of[p].backward_reads)
        assert u.recompute_time == pytest.approx(sum(t.ops[i].duration for i in range(u.first_op, u.last_op + 1)))
    # the storages produced inside a unit carry its index
    for s in t.storages:
        if s.producer is not None and t.ops[s.producer].phase == "forward":
            assert s.unit == t.ops[s.producer].unit
            assert s.module == t.ops[s.producer].module


@pytest.mark.parametrize("model_fn,shape", [(_resnet18, (2, 3, 32, 32)), (lambda: _tiny_on("cpu"), (3, 2, 4)),
                                            (_mobilenet, (2, 3, 32, 32))])
def test_unit_op_count_when_run_alone(model_fn, shape):
    """The selective-checkpoint contract: a unit's forward re-run alone dispatches
    exactly last_op - first_op + 1 ops, the same ones in the same order, and a SAC
    policy sees the ones at `sac_op_indices`.

    Saved-tensor hooks are active, as under checkpoint (which installs its own):
    without any hooks, autograd dispatches an extra `detach` per saved output.
    """
    torch.manual_seed(0)
    m = model_fn()
    units = {id(mod) for _, mod in find_units(m)}
    calls: list[tuple[nn.Module, tuple]] = []

    def capture(mod, args):
        with _disable_current_modes():  # the copies are not part of the traced step
            calls.append((mod, tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)))

    handles = [mod.register_forward_pre_hook(capture) for mod in m.modules() if id(mod) in units]
    x = torch.randn(*shape)
    y = torch.randint(0, 4, (shape[0],))
    t = trace_step(m, x, y)
    for h in handles:
        h.remove()
    assert len(calls) == len(t.units)
    for (mod, args), u in zip(calls, t.units):
        expected = [t.ops[i].name for i in range(u.first_op, u.last_op + 1)]
        args = tuple(a.clone() if a.requires_grad else a for a in args)  # non-leaf, like in the step
        with torch.autograd.graph.saved_tensors_hooks(lambda v: v, lambda v: v), _Count() as c:
            mod(*args)
        assert len(c.names) == u.last_op - u.first_op + 1, u.module
        assert c.names == expected
        seen: list[str] = []

        def policy(ctx, func, *a, **k):
            if not ctx.is_recompute:
                seen.append(str(func))
            return CheckpointPolicy.PREFER_RECOMPUTE

        checkpoint(mod, *args, use_reentrant=False,
                   context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
        assert seen == [t.ops[i].name for i in sac_op_indices(t, u)], u.module


def test_optimizer_phase_and_states(r18_cpu):
    m, x, y, t = r18_cpu
    opt_ops = [o for o in t.ops if o.phase == "optimizer"]
    assert opt_ops and opt_ops[0].index == t.backward_end + 1
    states = [s for s in t.storages if s.kind == "optimizer_state"]
    assert len(states) == len(list(m.parameters()))  # one momentum buffer per parameter
    assert all(s.persistent and s.freed_after is None and t.ops[s.producer].phase == "optimizer" for s in states)
    grads = [s for s in t.storages if s.kind == "gradient"]
    assert all(t.ops[s.producer].phase == "backward" and s.persistent for s in grads)


def test_second_step_sees_existing_grads_and_states():
    m = _tiny_on("cpu")
    x, y = _tiny_inputs()
    opt = torch.optim.SGD(m.parameters(), **SGD)
    t1 = _cpu_trace(m, x, y, opt)
    t2 = _cpu_trace(m, x, y, opt)  # gradients accumulate into last step's, momentum exists
    n = len(list(m.parameters()))
    for t, producer_phase in ((t1, {"backward", "optimizer"}), (t2, {None})):
        kinds = [s for s in t.storages if s.kind in ("gradient", "optimizer_state")]
        assert len(kinds) == 2 * n
        assert {t.ops[s.producer].phase if s.producer is not None else None for s in kinds} == producer_phase


def test_record_step_context_manager_and_errors():
    m = Tiny()
    x, y = _tiny_inputs()
    with record_step(m, model_name="tiny") as rec:
        nn.functional.cross_entropy(m(x), y).backward()
    t = rec.trace()
    assert t.model == "tiny" and t.mode == "measured" and t.device == "cpu" and t.profile is None
    assert all(o.phase in ("forward", "backward") for o in t.ops)
    assert sum(o.duration for o in t.ops) > 0
    with pytest.raises(ValueError, match="profile"):
        record_step(m, mode="meta")
    with pytest.raises(ValueError, match="mode"):
        record_step(m, mode="fast")
    with pytest.raises(ValueError, match="resnet50"):
        trace_model("resnet5O", 2, 32)
    with pytest.raises(ValueError, match="dtype"):
        trace_model("resnet18", 2, 32, dtype="int8")
    with pytest.raises(ValueError, match="batch"):
        trace_model("resnet18", 0, 32)
    with pytest.raises(ValueError, match="res"):
        trace_model("resnet18", 2, "32")
    with pytest.raises(RuntimeError):
        rec.trace.__self__.__enter__()  # one recorder, one step


def test_trace_model_meta_small():
    t = trace_model("resnet18", 4, 32, "h200")
    assert t.mode == "meta" and t.batch_size == 4 and t.input_shape == (4, 3, 32, 32)
    assert [u.module for u in t.units][:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert sum(s.kind == "optimizer_state" for s in t.storages) == 62
    assert trace_model("resnet18", 4, 32, "h200", dtype="bf16").storages[0].dtype == "bfloat16"
    conv = t.ops[0]
    assert conv.name == "aten.convolution.default"
    assert conv.flops == 2 * 4 * 64 * 16 * 16 * 3 * 7 * 7  # 2 * out.numel * C_in * k * k
    assert conv.duration > 0


def test_roofline_formulas():
    meta = dict(device="meta")
    a, b = torch.empty(64, 128, **meta), torch.empty(128, 32, **meta)
    c = op_cost(torch.ops.aten.mm.default, (a, b), {}, torch.ops.aten.mm.default(a, b))
    assert c.flops == 2 * 64 * 128 * 32 and c.bytes_accessed == 4 * (64 * 128 + 128 * 32 + 64 * 32)
    x, w = torch.empty(2, 8, 10, 10, **meta), torch.empty(16, 4, 3, 3, **meta)  # groups=2
    f = torch.ops.aten.convolution.default
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2)
    y = f(*args)
    fwd = op_cost(f, args, {}, y).flops
    assert fwd == 2 * y.numel() * 4 * 9
    bw = torch.ops.aten.convolution_backward.default
    bargs = (y, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2, [True, True, False])
    assert op_cost(bw, bargs, {}, bw(*bargs)).flops == 2 * fwd
    v = torch.ops.aten.view.default
    assert op_cost(v, (x, [2, 800]), {}, v(x, [2, 800])) == (0.0, 0.0, False)
