"""`memstrata train`: the end-to-end recipe on a tiny synthetic ImageFolder (CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from memstrata.cli import main
from memstrata.recipe import RecipeConfig, train
from memstrata.recipe.data import CenterCropAugment
from memstrata.recipe.optim import build_model, lr_factor, param_groups


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from memstrata.recipe.synth import synth_recipe_root

    return synth_recipe_root(tmp_path_factory.mktemp("recipe-data"), 32, 16, 2, progress=False, size=(64, 48),
                             workers=1)


def test_synth_root_val_is_disjoint_from_train_same_classes(root):
    tr = sorted(p.name for p in (root / "train").rglob("*.jpg"))
    va = sorted(p.name for p in (root / "val").rglob("*.jpg"))
    assert len(tr) == 32 and len(va) == 16 and not set(tr) & set(va)
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(p.name for p in (root / "train").iterdir())


def _cfg(root, tmp_path, **kw) -> RecipeConfig:
    base = dict(root=str(root), model="mobilenet_v3_small", epochs=2, batch=8, res=32, workers=1,
                store=str(tmp_path / "store"))
    base.update(kw)
    return RecipeConfig(**base)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------ pure parts
def test_config_validates_and_derives():
    c = RecipeConfig(root="/x", batch=64, epochs=10)
    assert c.peak_lr == pytest.approx(0.1 * 64 / 256)
    assert c.warmup == pytest.approx(2.0)  # 5 epochs, capped at a fifth of a 10-epoch run
    assert RecipeConfig(root="/x", epochs=90).warmup == 5.0
    assert c.val_resize == 256 and RecipeConfig(root="/x", res=64).val_resize == 73
    for bad in (dict(epochs=0), dict(batch=-1), dict(lr=0.0), dict(momentum=1.0), dict(label_smoothing=1.0),
                dict(warmup_epochs=10.0), dict(device="tpu"), dict(resume=True), dict(baseline=True, budget="50%"),
                dict(nvme_dir="/tmp")):
        with pytest.raises(ValueError):
            RecipeConfig(**{"root": "/x", "epochs": 10, **bad})


def test_stored_side_covers_the_validation_resize():
    """[Note: stored side]: memstrata stores at least res x 256/224, so validation never upsamples from the store."""
    assert RecipeConfig(root="/x", res=224).max_side == 256
    assert RecipeConfig(root="/x", res=112).max_side == 160 and RecipeConfig(root="/x", res=64).max_side == 160
    assert RecipeConfig(root="/x", res=224, max_side=200).max_side == 200  # an explicit side is kept


def test_validation_images_are_as_sharp_as_the_baselines():
    """At 224 px the default stored side gives validation crops as sharp as torchvision's Resize(256) +
    CenterCrop(224) of the JPEG; the loader's 160 would stretch a 140-px square to 224 (the bug it fixes)."""
    import io

    from PIL import Image
    from torchvision import transforms

    from memstrata.data.source import decode_bytes
    from memstrata.data.synth import synth_image
    from memstrata.recipe.config import default_max_side

    def sharpness(t):
        return float((t[:, :, 1:] - t[:, :, :-1]).abs().mean())

    ref_t = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    aug = CenterCropAugment(size=224, crop_fraction=224 / 256, normalize=False)
    ratios = {160: [], default_max_side(224): []}
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(synth_image(0, i, 10)[0]).save(buf, format="JPEG", quality=90)
        ref = ref_t(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        for side in ratios:
            st = decode_bytes(buf.getvalue(), side)
            boxes, flips = aug.params(0, 0, [0], [st.shape[0]], [st.shape[1]])
            ratios[side].append(sharpness(aug([st], boxes, flips)[0]) / sharpness(ref))
    assert min(ratios[256]) > 0.97 and max(ratios[256]) < 1.03
    assert sum(ratios[160]) / 3 < 0.95  # measurably blurrier: the difference the default removes


def test_lr_schedule_warmup_then_cosine_to_zero():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, 0.01) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(f[:warm], f[1:warm + 1]))  # rising during the warm-up
    assert f[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # falling afterwards
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert f[warm + 45] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_weight_decay_on_norms_and_biases():
    m = build_model("resnet18", 3, seed=0)
    g = param_groups(m, 1e-4, 0.0)
    decay = {id(p) for p in g[0]["params"]}
    no = {id(p) for p in g[1]["params"]}
    assert g[0]["weight_decay"] == 1e-4 and g[1]["weight_decay"] == 0.0
    assert id(m.bn1.weight) in no and id(m.bn1.bias) in no and id(m.fc.bias) in no
    assert id(m.conv1.weight) in decay and id(m.fc.weight) in decay
    assert len(decay) + len(no) == len(list(m.parameters())) and not decay & no


def test_center_crop_boxes_match_resize_then_centercrop():
    """CenterCropAugment's output ~= torchvision Resize(S) + CenterCrop(size) on the same stored image."""
    from PIL import Image
    from torchvision import transforms

    from memstrata.data import IMAGENET_MEAN, IMAGENET_STD

    # smooth content, and sizes where Resize(36) scales by exactly 1/4, so the two pipelines cut the same region
    # and differ only by one resample vs two
    yy, xx = np.mgrid[0:144, 0:192]
    img = np.stack([(127 + 100 * np.sin(xx / 23 + c) * np.cos(yy / 31)).astype(np.uint8) for c in range(3)], -1)
    aug = CenterCropAugment(size=32, crop_fraction=32 / 36)
    boxes, flips = aug.params(0, 0, [0, 1], [144, 90], [192, 121])
    assert not flips.any()
    assert boxes[0].tolist() == [8, 32, 128, 128]
    t, l, h, w = boxes[1].tolist()  # rounding on an odd size: centred square of side 32 * 90 / 36
    assert h == w == 80 and t == 5 and l == round((121 - 80) / 2)
    ours = aug([img], boxes[:1], flips[:1])
    ref = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.ToTensor(),
                              transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(Image.fromarray(img))
    assert ours.shape == (1, 3, 32, 32)
    assert (ours[0] - ref).abs().mean() < 0.05  # normalised units: ~3 grey levels on average


# ------------------------------------------------------------------ end to end
def test_train_json_fields_checkpoint_and_plot(root, tmp_path, capsys):
    plot = tmp_path / "top1.png"
    rc = main(["train", str(root), "--model", "mobilenet_v3_small", "--epochs", "2", "--batch", "8", "--res", "32",
               "--workers", "1", "--store", str(tmp_path / "store"), "--checkpoint", str(tmp_path / "ck"),
               "--json", "--quiet", "--plot", str(plot)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("name", "epochs", "wall_s", "samples_per_s", "data_wait_fraction", "top1", "per_epoch"):
        assert k in out
    assert out["name"] == "memstrata" and out["epochs"] == 2 and out["train_images"] == 32 and out["val_images"] == 16
    assert 0 <= out["data_wait_fraction"] <= 1 and 0 <= out["top1"] <= 1 and out["samples_per_s"] > 0
    e1, e2 = out["per_epoch"]
    assert e1["images"] == e2["images"] == 32 and e1["val_images"] == 16
    for e in (e1, e2):  # recipe/probe.py: what tells the pipeline from the machine's load apart
        assert 0 < e["step_s_p10"] <= e["step_s_median"] <= e["step_s_p90"] and e["compute_s"] <= e["train_s"]
        assert 0 < e["compute_thread_cpu_s"] <= e["cpu_s"] and e["children_cpu_s"] >= 0 and e["torch_threads"] >= 1 and e["os_threads"] >= 1
    assert out["step_s_median"] == e2["step_s_median"] and out["cpu_s_per_image"] > 0
    assert out["manager"] is None  # no --budget: no Manager at all, not one at a budget that happens to fit
    assert e2["wall_s"] > e1["wall_s"] > 0 and e2["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    ck = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and len(ck["history"]) == 2
    assert plot.stat().st_size > 0


EXTRAS = dict(auto_augment="ta_wide", random_erase=0.25, mixup_alpha=0.2, cutmix_alpha=1.0)


@pytest.mark.parametrize("baseline, extras", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["memstrata", "baseline", "memstrata-extras", "baseline-extras"])
def test_resume_continues_exactly(root, tmp_path, baseline, extras, one_torch_thread):
    """2 epochs straight == 1 epoch, stop, resume 1 epoch: parameters and buffers torch.equal.

    With the extras (TrivialAugment, RandomErasing, MixUp/CutMix: global-RNG draws in memstrata's consumer
    thread, in the baseline's DataLoader workers) too.
    """
    kw = dict(baseline=baseline, **(EXTRAS if extras else {}))
    straight = train(_cfg(root, tmp_path, checkpoint=str(tmp_path / "a"), **kw), progress=False)
    first = train(_cfg(root, tmp_path, checkpoint=str(tmp_path / "b"), **kw), progress=False, stop_after=1)
    assert first["epochs"] == 1
    resumed = train(_cfg(root, tmp_path, checkpoint=str(tmp_path / "b"), resume=True, **kw), progress=False)
    assert resumed["resumed_at_epoch"] == 1 and resumed["epochs"] == 2
    a, b = _params(straight["_model"]), _params(resumed["_model"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert resumed["per_epoch"][1]["loss"] == straight["per_epoch"][1]["loss"]
    assert resumed["top1"] == straight["top1"]
    # and the resumed run really trained epoch 2 (not a copy of epoch 1's weights)
    p1 = _params(first["_model"])
    assert any(not torch.equal(p1[k], b[k]) for k in b)


def test_baseline_and_memstrata_read_the_same_order_and_learn(root, tmp_path, one_torch_thread):
    m = train(_cfg(root, tmp_path, epochs=1), progress=False)
    b = train(_cfg(root, tmp_path, epochs=1, baseline=True), progress=False)
    assert m["name"] == "memstrata" and b["name"] == "baseline"
    assert m["train_images"] == b["train_images"] == 32 and m["classes"] == b["classes"] == 2
    assert m["per_epoch"][0]["images"] == b["per_epoch"][0]["images"] == 32
    assert m["store"] is not None and b["store"] is None
    from memstrata.data import epoch_order

    for seed in (0, 2):  # every epoch, not only the first: the baseline's sampler draws again from its generator
        g = torch.Generator()
        g.manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(range(32), generator=g)
        for epoch in range(3):
            assert epoch_order(32, seed=seed, epoch=epoch).tolist() == list(sampler), (seed, epoch)


def test_extras_change_the_training_batches(root, tmp_path, one_torch_thread):
    plain = train(_cfg(root, tmp_path, epochs=1), progress=False)
    extra = train(_cfg(root, tmp_path, epochs=1, **EXTRAS), progress=False)
    assert math.isfinite(extra["per_epoch"][0]["loss"])
    assert extra["per_epoch"][0]["loss"] != plain["per_epoch"][0]["loss"]
    assert extra["config"]["auto_augment"] == "ta_wide" and extra["config"]["cutmix_alpha"] == 1.0


def test_train_with_budget_uses_the_manager_and_changes_no_value(root, tmp_path, one_torch_thread):
    plain = train(_cfg(root, tmp_path, epochs=1, model="resnet18"), progress=False)
    out = train(_cfg(root, tmp_path, epochs=1, model="resnet18", budget="100%", nvme_dir=str(tmp_path)),
                progress=False)
    assert plain["manager"] is None
    assert out["manager"] is not None and out["manager"]["steps"] == 4 and out["manager"]["shapes"]
    a, b = _params(plain["_model"]), _params(out["_model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_model_with_a_budget_is_managed(root, tmp_path, one_torch_thread, monkeypatch):
    """--compile --budget: the Manager runs the compiled model (no longer refused); at a fitting budget it
    keeps every value of the same compiled run without memstrata.  A tiny conv net stands in for the
    torchvision model so that inductor compiles in seconds."""
    from torch import nn

    import memstrata.recipe.loop as loop

    def tiny(name, classes, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    monkeypatch.setattr(loop, "build_model", tiny)
    plain = train(_cfg(root, tmp_path, epochs=1, compile=True), progress=False)
    out = train(_cfg(root, tmp_path, epochs=1, compile=True, budget="100%"), progress=False)
    assert plain["manager"] is None
    (shape,) = out["manager"]["shapes"].values()
    assert out["manager"]["steps"] == 4 and shape["compiled"] and shape["misaligned_steps"] == 0
    a, b = _params(plain["_model"]), _params(out["_model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ user errors: one line, exit 2
@pytest.mark.parametrize("argv, msg", [
    (["train", "/nonexistent-memstrata-root"], "not a directory"),
    (["train", "{root}", "--model", "resnet1"], "unknown torchvision classification model"),
    (["train", "{root}", "--resume"], "--resume needs --checkpoint"),
    (["train", "{root}", "--resume", "--checkpoint", "{tmp}/none"], "no checkpoint"),
    (["train", "{root}", "--baseline", "--budget", "50%"], "does not apply to --baseline"),
    (["train", "{root}", "--epochs", "0"], "positive integer"),
    (["train", "{tmp}"], "has no class folders"),
    # `memstrata data synth DIR` writes a flat ImageFolder; the old hint sent users back to it
    (["train", "{root}/train"], "ROOT itself holds class folders: move them under ROOT/train and ROOT/val"),
    (["train", "{tmp}"], "memstrata data synth ROOT/train --images N --classes C"),
    # these two were tracebacks from the Manager, after the store was built
    (["train", "{root}", "--budget", "abc"], "malformed budget 'abc'"),
    (["train", "{root}", "--budget", "50%", "--nvme-dir", "{tmp}/none"], "is not an existing directory"),
])
def test_user_errors_are_one_line(root, tmp_path, capsys, argv, msg):
    argv = [a.format(root=root, tmp=tmp_path) for a in argv] + ["--store", str(tmp_path / "store")]
    assert main(argv + ["--quiet", "--epochs", "1"] if "--epochs" not in argv else argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


def test_resume_with_other_settings_is_refused(root, tmp_path, capsys):
    ck = str(tmp_path / "ck")
    common = ["train", str(root), "--model", "mobilenet_v3_small", "--batch", "8", "--res", "32", "--workers", "0",
              "--store", str(tmp_path / "st"), "--checkpoint", ck, "--quiet"]
    assert main(common + ["--epochs", "2", "--stop-after", "1"]) == 0
    assert main(common + ["--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "epochs" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ torchrun: 2 ranks, gloo
def _torchrun(root, tmp_path, *extra, nproc=2, timeout=240):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "memstrata", "train", str(root), "--model", "mobilenet_v3_small", "--epochs", "2", "--batch", "4",
           "--res", "32", "--workers", "1", "--json", "--quiet", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_order_store_once_and_resume(root, tmp_path):
    """DDP over gloo: per-rank order == DistributedSampler's (memstrata and baseline), the store is built once
    per node (local rank 0, before training: no rank decodes a JPEG afterwards), and --resume is exact."""
    from torch.utils.data.distributed import DistributedSampler

    store = str(tmp_path / "store")
    m = _torchrun(root, tmp_path, "--store", store, "--checkpoint", str(tmp_path / "ck"))
    b = _torchrun(root, tmp_path, "--baseline")
    assert m["world_size"] == b["world_size"] == 2 and m["config"]["global_batch"] == 8
    assert m["store_built_by_ranks"] == [0] and b["store_built_by_ranks"] == []
    assert [s["source_reads"] for s in m["loader_stats"]] == [0, 0]  # both ranks read the prebuilt store
    assert all(s["store_hits"] == 2 * 16 for s in m["loader_stats"])  # 32 images / 2 ranks, 2 epochs
    import hashlib

    import numpy as np

    for e in range(2):
        want = []
        for r in range(2):
            s = DistributedSampler(range(32), num_replicas=2, rank=r, shuffle=True, seed=0)
            s.set_epoch(e)
            want.append(hashlib.sha1(np.asarray(list(s), dtype=np.int64).tobytes()).hexdigest())
        assert [d["sha1"] for d in m["per_epoch"][e]["rank_orders"]] == want
        assert [d["sha1"] for d in b["per_epoch"][e]["rank_orders"]] == want
        assert m["per_epoch"][e]["images_all_ranks"] == 32 and m["per_epoch"][e]["images"] == 16
    assert 0 <= m["top1"] <= 1 and m["per_epoch"][0]["val_images"] == 16
    # exact resume under DDP: 1 epoch, stop, resume -> the same final loss and top-1 as straight
    r1 = _torchrun(root, tmp_path, "--store", store, "--checkpoint", str(tmp_path / "ck2"), "--stop-after", "1")
    r2 = _torchrun(root, tmp_path, "--store", store, "--checkpoint", str(tmp_path / "ck2"), "--resume")
    assert r1["epochs"] == 1 and r2["resumed_at_epoch"] == 1
    assert r2["per_epoch"][1]["loss"] == m["per_epoch"][1]["loss"] and r2["top1"] == m["top1"]
    a = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=False)["model"]
    c = torch.load(tmp_path / "ck2" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_budget_under_torchrun_runs_the_manager_and_changes_no_value(root, tmp_path):
    """DDP + the Manager (every rank runs rank 0's plan): the same model as plain DDP, bit for bit."""
    store = str(tmp_path / "store")
    plain = _torchrun(root, tmp_path, "--store", store, "--checkpoint", str(tmp_path / "a"), "--epochs", "1")
    managed = _torchrun(root, tmp_path, "--store", store, "--checkpoint", str(tmp_path / "b"), "--epochs", "1",
                        "--budget", "50%act", "--nvme-dir", str(tmp_path))
    assert managed["per_epoch"][0]["loss"] == plain["per_epoch"][0]["loss"]
    assert not plain.get("manager")
    plans = [sh["plan"]["counts"] for sh in managed["manager"]["shapes"].values() if sh.get("plan")]
    assert plans and any(sum(c.values()) > 0 for c in plans), plans  # the Manager really moved something
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
