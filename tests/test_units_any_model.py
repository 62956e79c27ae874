"""Recompute units inside any model: the chain-module rule and bit-exact training with it.

The unit rule splits the root, containers and *chain modules* (see [Note:
chain modules] in trace/units.py).  These tests pin which modules split and
which stay whole, that the tracer and the runtime see the same set, and that
managed training of transformer and ConvNeXt models with per-layer units is
bit-identical to plain training (params, grads, buffers after 5 SGD steps).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from memstrata.hardware import profile
from memstrata.manager import Manager
from memstrata.plan.api import minimum_budget
from memstrata.plan.forced import forced_plan
from memstrata.runtime import ActivationRuntime
from memstrata.runtime.check import state_mismatches, train_steps
from memstrata.trace.record import trace_model
from memstrata.trace.units import find_units, is_chain_module

from runtime_cases import cpu_hierarchy, setup_case

STEPS = 5

# ----------------------------------------------------------------------------- the rule


class Res(nn.Module):
    """A residual block: x + f(x).  Never split."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))

    def forward(self, x):
        return x + self.f(x)


class Stage(nn.Module):
    """timm-style stage: glue, a norm, a Sequential of blocks, glue, a norm: a chain."""

    def __init__(self, c: int = 8, n: int = 3) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(c))
        self.pre = nn.LayerNorm(c)
        self.blocks = nn.Sequential(*[Res(c) for _ in range(n)])
        self.post = nn.LayerNorm(c)

    def forward(self, x):
        x = self.pre(x + self.pos)
        x = self.blocks(x)
        return self.post(x * 0.5).view(x.shape[0], -1)  # shapes may be read from anything


class LoopStage(nn.Module):
    """Blocks in a ModuleList, called in a Python loop (grandchildren through a container)."""

    def __init__(self, c: int = 8, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Res(c) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Skip(nn.Module):
    """Two composite children, but the second reads the stage input too."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = Res(c), Res(c)

    def forward(self, x):
        return self.b(self.a(x) + x)


class Twice(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = Res(c), Res(c)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


class InplaceGlue(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = Res(c), Res(c)

    def forward(self, x):
        y = self.a(x)
        y.add_(x)  # an in-place write of a skip: the data-flow check cannot see it, so refuse
        return self.b(y)


class Branchy(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = Res(c), Res(c)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable symbolically
            return self.b(self.a(x))
        return self.a(x)


class Leaves(nn.Module):
    """A chain of leaf modules (DenseNet's _DenseLayer shape): splitting would free nothing."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c)

    def forward(self, x):
        return self.l2(self.act(self.l1(torch.cat([x, x], 0))))


class TrainOnly(nn.Module):
    """A chain only in training mode: the rule must not depend on model.train()/eval()."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = Res(c), Res(c)

    def forward(self, x):
        if self.training:
            return self.b(self.a(x))
        return self.b(self.a(x) + x)


class Net(nn.Module):
    def __init__(self, mid: nn.Module, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(4, c)
        self.mid = mid
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.mid(self.stem(x)).reshape(x.shape[0], -1))


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in find_units(model)]


def test_chain_stage_yields_per_block_units():
    assert names(Net(Stage())) == ["stem", "mid.pre", "mid.blocks.0", "mid.blocks.1", "mid.blocks.2", "mid.post",
                                   "head"]
    assert names(Net(LoopStage())) == ["stem", "mid.blocks.0", "mid.blocks.1", "mid.blocks.2", "head"]


@pytest.mark.parametrize("mid", [Res(), Skip(), Twice(), InplaceGlue(), Branchy(), Leaves(), TrainOnly()],
                         ids=lambda m: type(m).__name__)
def test_non_chains_stay_whole_units(mid):
    assert not is_chain_module(mid)
    assert names(Net(mid)) == ["stem", "mid", "head"]


def test_rule_does_not_depend_on_training_mode():
    m = Net(Stage())
    train = names(m.train())
    assert names(m.eval()) == train
    m.train()
    t = TrainOnly()
    for mode in (True, False):
        t.train(mode)
        assert not is_chain_module(t) and t.training is mode  # the flag is restored


def test_replacing_a_child_is_seen():
    m = Net(Stage())
    assert "mid.blocks.1" in names(m)
    m.mid.blocks = Res()  # now the stage's second call is a residual block, not a Sequential
    assert names(m) == ["stem", "mid.pre", "mid.blocks", "mid.post", "head"]


def test_torchvision_transformers_and_convnext_get_per_layer_units():
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
        swin = torchvision.models.swin_t()
        cnx = torchvision.models.convnext_tiny()
    n = names(vit)
    assert n == (["conv_proj", "encoder.dropout"] + [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
                 + ["encoder.ln", "heads.head"])
    n = names(swin)
    blocks = [x for x in n if type(swin.get_submodule(x)).__name__ == "SwinTransformerBlock"]
    assert len(blocks) == 2 + 2 + 6 + 2
    assert sum(type(swin.get_submodule(x)).__name__ == "PatchMerging" for x in n) == 3  # whole, not split
    n = names(cnx)
    assert sum(type(cnx.get_submodule(x)).__name__ == "CNBlock" for x in n) == 3 + 3 + 9 + 3


def test_unchanged_for_cnns():
    """The rule adds chain modules only: the CNNs' unit sets are what they were."""
    with torch.device("meta"):
        r = torchvision.models.resnet50()
        e = torchvision.models.efficientnet_b0()
    assert names(r) == (["conv1", "bn1", "relu", "maxpool"] + [f"layer{i}.{j}" for i, n in
                                                               ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n)]
                        + ["avgpool", "fc"])
    assert all(type(e.get_submodule(x)).__name__ in ("Conv2d", "BatchNorm2d", "SiLU", "MBConv", "AdaptiveAvgPool2d",
                                                     "Dropout", "Linear") for x in names(e))


def test_vit_meta_trace_units_and_minimum_budget():
    """The issue's first symptom: vit_b_16's minimum budget was its unmanaged peak (one encoder unit)."""
    tr = trace_model("vit_b_16", 32, 224, "a100-80gb")  # the setting
    mods = [u.module for u in tr.units]
    assert sum(m.startswith("encoder.layers.") for m in mods) == 12
    for u in tr.units:
        if u.module.startswith("encoder.layers."):
            assert u.first_backward_op is not None and u.pack_end > u.pack_start
    h = profile("a100-80gb")
    assert minimum_budget(tr, h) <= 0.6 * tr.observed_peak


# ----------------------------------------------------------------------------- bit-exact training


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def small_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                              window_size=[4, 4], stochastic_depth_prob=0.2, num_classes=10)


def small_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig

    cfg = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)]
    return torchvision.models.ConvNeXt(cfg, stochastic_depth_prob=0.2, num_classes=10)


MODELS = {
    "vit_small": (small_vit, 32),
    "swin_small": (small_swin, 32),
    "convnext_small": (small_convnext, 32),
    # the real architectures at a small image size (slow tier)
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), 32),
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=10), 32),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 32),
}
SMALL = ["vit_small", "swin_small", "convnext_small"]
FULL = [pytest.param(n, marks=pytest.mark.slow) for n in ("vit_b_16", "swin_t", "convnext_tiny")]
# the modules that must be recomputed as per-layer units when every unit is forced to recompute
LAYER_TYPES = ("EncoderBlock", "SwinTransformerBlock", "SwinTransformerBlockV2", "CNBlock")

def setup_model(name: str):
    make, res = MODELS[name]
    return setup_case(name, make, res, STEPS)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.mark.parametrize("kind", ["recompute", "selective", "mixed"])
@pytest.mark.parametrize("model_name", SMALL + FULL)
def test_forced_per_layer_recompute_bit_exact(model_name, kind, tmp_path):
    base, x, y, ref, trace = setup_model(model_name)
    layer_units = [u for u in trace.units if type(base.get_submodule(u.module)).__name__ in LAYER_TYPES]
    assert len(layer_units) >= 2, [u.module for u in trace.units]
    h = cpu_hierarchy(tmp_path)
    plan = forced_plan(trace, kind, h)
    planned = {d.unit for d in plan.units}
    assert any(u.index in planned for u in layer_units)
    model = copy.deepcopy(base)
    rt = ActivationRuntime(model, trace, plan, h)
    try:
        train_steps(model, x, y, steps=STEPS, step_ctx=rt.step)
        assert rt.last_stats.misaligned is None, rt.last_stats.misaligned
        assert rt.last_stats.recomputed_units > 0
        assert not [n for n in rt.notes if "not recomputed" in n or "not found" in n], rt.notes
        assert state_mismatches(ref, model) == []
    finally:
        rt.close()
    assert not any(tmp_path.iterdir())


# Not vit_b_16 at 32 px: 5 tokens a sample, so its peak is the end of the backward (parameters and all their
# gradients, 2 x 344 MB) and the minimum budget equals the peak: there is nothing to plan.  The small ViT runs
# the same torchvision Encoder / EncoderBlock code with activations that matter.
@pytest.mark.parametrize("model_name", SMALL + FULL[1:])
def test_planned_bit_exact(model_name, tmp_path):
    """The Manager's own trace and plan, at a budget halfway between the minimum and the peak."""
    base, x, y, ref, trace = setup_model(model_name)
    h = cpu_hierarchy(tmp_path)
    lo, hi = minimum_budget(trace, h), trace.observed_peak
    assert lo < hi
    model = copy.deepcopy(base)
    mgr = Manager(model, budget=(lo + hi) // 2, nvme_dir=tmp_path, warmup_steps=0)
    try:
        train_steps(model, x, y, steps=STEPS, step_ctx=lambda: mgr.step(x))
        modes = [s["mode"] for s in mgr.report()["steps"]]
        assert modes == ["trace"] + ["managed"] * (STEPS - 1)
        assert len(mgr.plan.storages) + len(mgr.plan.units) + len(mgr.plan.replays) > 0, mgr.plan.notes
        assert [r["stats"]["misaligned"] for r in mgr.report()["steps"][1:]] == [None] * (STEPS - 1)
        assert state_mismatches(ref, model) == []
    finally:
        mgr.close()
    assert not any(tmp_path.iterdir())
