"""Random and synthetic `Trace`s for planner/simulator tests (no torch, no tracer).

* `random_trace(rng)` — small chain-of-units graphs with random layer kinds,
  sizes, durations, residuals and late frees.
* `resnet_like(batch)` — a ResNet-50-shaped trace of realistic size (stem,
  16 bottleneck units, head, SGD-momentum optimizer; ~3k ops, ~1.5k storages)
  with roofline durations for a hierarchy profile.  The peak is at the
  forward/backward boundary.

Both go through `Builder`, which records ops and storages the way the tracer
does and computes `freed_after`, `last_use`, backward reads, units and
`observed_peak` with the interval rule of trace/schema.py [Note: what "live"
means].
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from memstrata.hardware import Hierarchy, profile
from memstrata.trace.schema import OpRecord, StorageRecord, Trace, UnitRecord


@dataclass
class _S:
    nbytes: int
    kind: str
    producer: int | None
    module: str = ""
    unit: int | None = None
    persistent: bool = False
    saved: bool = False
    packs: list = field(default_factory=list)
    bwd: list = field(default_factory=list)
    access: list = field(default_factory=list)
    free_delay: int = 0
    shape: tuple = ()


class Builder:
    def __init__(self, hierarchy: Hierarchy | None = None, dtype_bytes: int = 4, rng: random.Random | None = None):
        self.h = hierarchy
        self.dtype_bytes = dtype_bytes
        self.rng = rng
        self.ops: list[dict] = []
        self.st: list[_S] = []
        self.units: list[dict] = []
        self.cur_unit: int | None = None
        self.npack = 0
        self.phase = "forward"

    # ---------------------------------------------------------------- storages / ops
    def storage(self, nbytes: int, kind: str, *, persistent: bool = False, shape: tuple = ()) -> int:
        """A storage that exists before the step (params, states, input)."""
        self.st.append(_S(int(nbytes), kind, None, persistent=persistent, shape=shape))
        return len(self.st) - 1

    def duration(self, flops: float, nbytes: float) -> float:
        if self.h is None:
            return max(1e-6, flops / 1e12 + nbytes / 1e11)
        return max(flops / self.h.peak_flops, nbytes / self.h.fast_bandwidth) + self.h.kernel_overhead

    def op(self, name: str, inputs=(), new=(), inplace=(), *, flops: float = 0.0, duration: float | None = None,
           module: str = "", extra_bytes: float = 0.0) -> tuple[int, list[int]]:
        """Record an op; `new` = (nbytes, kind) of storages it allocates.  Returns (op index, new ids)."""
        i = len(self.ops)
        ids = []
        for nb, kind in new:
            self.st.append(_S(int(nb), kind, i, module=module, unit=self.cur_unit if self.phase == "forward" else None,
                              persistent=kind == "gradient"))
            ids.append(len(self.st) - 1)
        outs = tuple(ids) + tuple(inplace)
        ins = tuple(inputs) + tuple(x for x in inplace if x not in inputs)
        byt = float(sum(self.st[s].nbytes for s in set(ins) | set(outs))) + extra_bytes
        if duration is None:
            duration = self.duration(flops, byt)
        for s in set(ins) | set(outs):
            self.st[s].access.append(i)
            if self.phase == "backward" and self.st[s].saved and s in ins:
                self.st[s].bwd.append(i)
        self.ops.append(dict(index=i, name=name, phase=self.phase, module=module,
                             unit=self.cur_unit if self.phase == "forward" else None, flops=float(flops),
                             bytes_accessed=byt, duration=float(duration), inputs=tuple(ins), outputs=outs))
        return i, ids

    def save(self, sid: int) -> None:
        s = self.st[sid]
        s.saved = True
        s.packs.append(self.npack)
        self.npack += 1

    def begin_unit(self, module: str, inputs: tuple[int, ...]) -> None:
        self.units.append(dict(module=module, first_op=len(self.ops), pack_start=self.npack, inputs=tuple(inputs)))
        self.cur_unit = len(self.units) - 1

    def end_unit(self) -> None:
        u = self.units[self.cur_unit]
        u["last_op"] = len(self.ops) - 1
        u["pack_end"] = self.npack
        self.cur_unit = None

    # ---------------------------------------------------------------- finalize
    def build(self, model: str = "synthetic", batch_size: int = 1, forward_end: int | None = None,
              backward_end: int | None = None) -> Trace:
        n = len(self.ops)
        ops = tuple(OpRecord(**o) for o in self.ops)
        storages = []
        for sid, s in enumerate(self.st):
            last = max(s.access) if s.access else None
            if s.persistent or s.kind in ("parameter", "optimizer_state", "buffer"):
                freed = None
            elif last is None:
                freed = s.producer if s.producer is not None else 0
            else:
                freed = min(n - 1, last + s.free_delay)
            storages.append(StorageRecord(
                id=sid, nbytes=s.nbytes, dtype="float32", shape=s.shape or (s.nbytes // 4,), kind=s.kind,
                producer=s.producer, last_use=last, persistent=s.persistent, saved=s.saved,
                pack_indices=tuple(s.packs), backward_reads=tuple(sorted(set(s.bwd))), module=s.module,
                unit=s.unit, freed_after=freed))
        units = []
        for k, u in enumerate(self.units):
            fb = [i for i in u.get("bwd_ops", [])]
            dur = sum(self.ops[j]["duration"] for j in range(u["first_op"], u["last_op"] + 1))
            units.append(UnitRecord(index=k, module=u["module"], first_op=u["first_op"], last_op=u["last_op"],
                                    pack_start=u["pack_start"], pack_end=u["pack_end"], inputs=u["inputs"],
                                    first_backward_op=min(fb) if fb else None, recompute_time=dur))
        # observed peak with the interval rule
        diff = np.zeros(n + 1, dtype=np.int64)
        for s in storages:
            a = 0 if s.producer is None else s.producer
            b = n - 1 if s.freed_after is None else s.freed_after
            diff[a] += s.nbytes
            diff[b + 1] -= s.nbytes
        peak = int(np.cumsum(diff)[:n].max())
        fe = forward_end if forward_end is not None else max(i for i, o in enumerate(self.ops) if o["phase"] == "forward")
        be = backward_end if backward_end is not None else max(
            [i for i, o in enumerate(self.ops) if o["phase"] == "backward"] or [fe])
        return Trace(model=model, mode="meta", device="cuda", profile=self.h.name if self.h else None,
                     batch_size=batch_size, input_shape=(batch_size,), ops=ops, storages=tuple(storages),
                     units=tuple(units), forward_end=fe, backward_end=be, num_packs=self.npack, observed_peak=peak)


# --------------------------------------------------------------------------------------
# Layer-level model description shared by both generators
# --------------------------------------------------------------------------------------


@dataclass
class Layer:
    kind: str  # conv | bn | relu | mm | gelu | add (residual, reads block input) | pool
    out_bytes: int
    flops: float = 0.0
    param_bytes: int = 0
    duration: float | None = None


def _forward_layer(b: Builder, L: Layer, x: int, block_in: int, module: str, records: list) -> int:
    """Emit the forward op(s) of one layer on activation x; returns the output storage."""
    if L.kind in ("conv", "mm"):
        w = b.storage(L.param_bytes, "parameter", persistent=True)
        name = "aten.convolution.default" if L.kind == "conv" else "aten.mm.default"
        i, (y,) = b.op(name, (x, w), [(L.out_bytes, "activation")], flops=L.flops, duration=L.duration, module=module)
        b.save(x); b.save(w)
        records.append(("conv", i, x, y, w, []))
        return y
    if L.kind == "bn":
        w = b.storage(L.param_bytes or 256, "parameter", persistent=True)
        small = max(16, L.param_bytes // 2)
        i, (y, m, v) = b.op("aten.native_batch_norm.default", (x, w),
                             [(L.out_bytes, "activation"), (small, "activation"), (small, "activation")],
                             flops=L.flops, duration=L.duration, module=module)
        b.save(x); b.save(w); b.save(m); b.save(v)
        records.append(("bn", i, x, y, w, [m, v]))
        return y
    if L.kind in ("relu", "gelu"):
        if L.kind == "relu":  # in place, saves its output
            i, _ = b.op("aten.relu_.default", (), (), inplace=(x,), duration=L.duration, module=module)
            b.save(x)
            records.append(("relu", i, x, x, None, []))
            return x
        i, (y,) = b.op("aten.gelu.default", (x,), [(L.out_bytes, "activation")], duration=L.duration, module=module)
        b.save(x)
        records.append(("gelu", i, x, y, None, []))
        return y
    if L.kind == "add":  # residual, in place on x
        i, _ = b.op("aten.add_.Tensor", (block_in,), (), inplace=(x,), duration=L.duration, module=module)
        records.append(("add", i, x, x, None, []))
        return x
    if L.kind == "pool":
        i, (y, idx) = b.op("aten.max_pool2d_with_indices.default", (x,),
                           [(L.out_bytes, "activation"), (L.out_bytes, "activation")],
                           duration=L.duration, module=module)
        b.save(x); b.save(idx)
        records.append(("pool", i, x, y, None, [idx]))
        return y
    raise ValueError(L.kind)


def build_model(blocks: list[tuple[str, list[Layer], bool]], input_bytes: int, *, hierarchy: Hierarchy | None = None,
                rng: random.Random | None = None, late_free: float = 0.0, filler: int = 0,
                optimizer: bool = True, model: str = "synthetic", batch_size: int = 1) -> Trace:
    """blocks: (module name, layers, is_unit).  Forward, loss, backward (reverse), SGD-momentum optimizer."""
    b = Builder(hierarchy, rng=rng)
    overhead = hierarchy.kernel_overhead if hierarchy else 1e-6

    def fill(module=""):
        for k in range(filler):
            if k % 2:  # a small scratch allocation (workspace, scalar), freed right away
                b.op("aten.empty.memory_format", (), [(512, "temporary")], duration=0.0, module=module)
            else:
                b.op("aten.view.default", (), (), duration=0.0, module=module)

    x = b.storage(input_bytes, "input")
    per_block = []
    for module, layers, is_unit in blocks:
        block_in = x
        if is_unit:
            b.begin_unit(module, (x,))
        recs: list = []
        for L in layers:
            x = _forward_layer(b, L, x, block_in, module, recs)
            fill(module)
        unit = b.cur_unit
        if is_unit:
            b.end_unit()
        per_block.append((module, recs, unit, block_in, any(L.kind == "add" for L in layers)))
    # loss
    _, (loss,) = b.op("aten.mse_loss.default", (x,), [(4, "activation")], duration=overhead, module="loss")
    b.save(x)
    forward_end = len(b.ops) - 1
    b.phase = "backward"
    _, (g,) = b.op("aten.mse_loss_backward.default", (loss, x), [(b.st[x].nbytes, "temporary")], duration=overhead)
    params = []
    for module, recs, unit, block_in, residual in reversed(per_block):
        g_out = g
        for kind, i, xin, y, w, extra in reversed(recs):
            reads = [g]
            if kind in ("conv", "mm", "bn"):
                reads += [xin, w] + extra
            elif kind in ("relu", "gelu"):
                reads += [y if kind == "relu" else xin]
            elif kind == "pool":
                reads += [xin] + extra
            if kind == "add":
                continue  # gradient passes through; summed at the block input below
            new = [(b.st[xin].nbytes, "temporary")]
            if w is not None:
                new.append((b.st[w].nbytes, "gradient"))
            fwd = b.ops[i]
            name = fwd["name"].replace(".default", "_backward.default").replace("relu_", "threshold").replace(
                ".Tensor", "_backward")
            j, ids = b.op(name, tuple(reads), new, flops=2 * fwd["flops"], duration=None if fwd["flops"] else
                          (2 * fwd["duration"] if fwd["duration"] else None), module=module)
            if unit is not None:
                b.units[unit].setdefault("bwd_ops", []).append(j)
            g = ids[0]
            if w is not None:
                params.append((w, ids[1]))
            fill(module)
        if residual:
            j, (g2,) = b.op("aten.add.Tensor", (g, g_out), [(b.st[block_in].nbytes, "temporary")], module=module)
            g = g2
    backward_end = len(b.ops) - 1
    if optimizer:
        b.phase = "optimizer"
        for w, gw in params:
            mom = b.storage(b.st[w].nbytes, "optimizer_state", persistent=True)
            b.op("aten._fused_sgd_.default", (gw,), (), inplace=(w, mom), module="optim")
            fill("optim")
    if late_free and rng is not None:
        for s in b.st:
            if s.producer is not None and rng.random() < late_free:
                s.free_delay = rng.randint(1, 3)
    return b.build(model=model, batch_size=batch_size, forward_end=forward_end, backward_end=backward_end)


# --------------------------------------------------------------------------------------
# Random small graphs
# --------------------------------------------------------------------------------------


def random_trace(rng: random.Random, *, units: tuple[int, int] = (2, 4), layers: tuple[int, int] = (1, 3),
                 filler: int = 0) -> Trace:
    """A small random trace: a chain of recompute units of conv/bn/relu/mm/gelu layers."""
    nblocks = rng.randint(*units)
    size = rng.choice([1, 2, 4, 8]) * 1_000_000
    blocks = []
    if rng.random() < 0.5:
        blocks.append(("stem", [Layer("conv", size, flops=rng.uniform(1, 8) * 1e9, param_bytes=10_000)], False))
    for k in range(nblocks):
        ls = []
        nl = rng.randint(*layers)
        for _ in range(nl):
            kind = rng.choice(["conv", "conv", "bn", "relu", "mm", "gelu"])
            out = int(size * rng.choice([0.5, 1, 1, 2]))
            if kind in ("conv", "mm"):
                ls.append(Layer(kind, out, flops=rng.uniform(0.5, 20) * 1e9, param_bytes=rng.choice([4, 40, 400]) * 1000))
            elif kind == "bn":
                ls.append(Layer(kind, out, flops=out / 2, param_bytes=512))
            else:
                ls.append(Layer(kind, out))
        if rng.random() < 0.3:
            ls.append(Layer("add", ls[-1].out_bytes))
        blocks.append((f"block{k}", ls, rng.random() < 0.9))
    return build_model(blocks, size, rng=rng, late_free=0.3, filler=filler, model="random")


# --------------------------------------------------------------------------------------
# ResNet-50-shaped trace
# --------------------------------------------------------------------------------------


def resnet_like(batch: int = 256, image: int = 224, hierarchy: Hierarchy | None = None, filler: int = 6,
                dtype_bytes: int = 4) -> Trace:
    """A ResNet-50-shaped trace (bottleneck units, stage sizes of torchvision's resnet50)."""
    h = hierarchy or profile("h200")
    e = dtype_bytes

    def act(c, s):
        return batch * c * s * s * e

    def conv(cin, cout, k, s_out):
        return Layer("conv", act(cout, s_out), flops=2.0 * batch * cout * s_out * s_out * cin * k * k,
                     param_bytes=cout * cin * k * k * e)

    def bn(c, s):
        return Layer("bn", act(c, s), flops=8.0 * batch * c * s * s, param_bytes=2 * c * e)

    def relu(c, s):
        return Layer("relu", act(c, s))

    s1 = image // 2
    blocks = [("conv1", [conv(3, 64, 7, s1)], True), ("bn1", [bn(64, s1)], True), ("relu", [relu(64, s1)], True),
              ("maxpool", [Layer("pool", act(64, s1 // 2))], True)]
    cin, s = 64, s1 // 2
    for stage, (nb, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for k in range(nb):
            s_out = s // 2 if (k == 0 and stage > 0) else s
            ls = [conv(cin, width, 1, s), bn(width, s), relu(width, s),
                  conv(width, width, 3, s_out), bn(width, s_out), relu(width, s_out),
                  conv(width, 4 * width, 1, s_out), bn(4 * width, s_out)]
            if k == 0:  # downsample branch, modelled inline on the main path's memory
                ls.insert(0, conv(cin, 4 * width, 1, s_out))
                ls.insert(1, bn(4 * width, s_out))
            ls += [Layer("add", act(4 * width, s_out)), relu(4 * width, s_out)]
            blocks.append((f"layer{stage + 1}.{k}", ls, True))
            cin, s = 4 * width, s_out
    blocks.append(("fc", [Layer("mm", batch * 1000 * e, flops=2.0 * batch * 2048 * 1000, param_bytes=2048 * 1000 * e)],
                   True))
    return build_model(blocks, batch * 3 * image * image * e, hierarchy=h, filler=filler, model="resnet_like",
                       batch_size=batch)


def small_hierarchy(rng: random.Random, roomy: bool = False) -> Hierarchy:
    """A test hierarchy whose copy lanes are slow enough that offloading is a real trade-off.

    Unless `roomy`, dram sometimes holds only one or two activations (2-8 MB), which forces
    time-sharing of the lower tier and nvme staging through it."""
    from memstrata.hardware import GB, Tier

    dram_bw = rng.choice([0.5, 1, 2, 5, 20]) * GB
    dram_caps = [64, 1 << 10] if roomy else [2, 4, 8, 1 << 10]
    return Hierarchy(
        name="test",
        device="cuda",
        tiers=(
            Tier("hbm", "hbm", capacity=1 << 40),
            Tier("dram", "pinned_dram", capacity=rng.choice(dram_caps) * 1_000_000,
                 read_bandwidth=dram_bw, write_bandwidth=dram_bw, latency=10e-6),
            Tier("nvme", "nvme", capacity=1 << 40, read_bandwidth=dram_bw / 4, write_bandwidth=dram_bw / 6,
                 latency=50e-6),
        ),
        peak_flops=1e12,
        fast_bandwidth=1e11,
        kernel_overhead=1e-6,
    )
