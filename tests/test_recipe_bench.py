"""`memstrata bench --scenario recipe`: summary arithmetic, input checks, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from memstrata.bench.recipe_scenario import summarise_recipe
from memstrata.cli import main


def _run(name, rep, wall, sps, wait, top1):
    return {"name": name, "repeat": rep, "status": "ok", "reason": "", "wall_s": wall, "samples_per_s": sps,
            "data_wait_fraction": wait, "top1": top1, "process_wall_s": wall + 5,
            "per_epoch": [{"epoch": 1, "train_s": wall / 2, "wall_s": wall / 2, "top1": top1 / 2},
                          {"epoch": 2, "train_s": wall / 3, "wall_s": wall, "top1": top1}]}


def test_summary_takes_medians_and_ratios_to_the_baseline():
    cfg = dict(model="m", epochs=2, device="cpu", cores=2, workers=2, batch=8, res=32, images=64, val_images=32,
               classes=4, seed=0, threads=None)
    runs = {"baseline": [_run("baseline", 1, 100, 10, 0.5, 0.50), _run("baseline", 2, 120, 12, 0.6, 0.52),
                         _run("baseline", 3, 110, 11, 0.4, 0.54)],
            "memstrata": [_run("memstrata", 1, 50, 30, 0.1, 0.53), _run("memstrata", 2, 70, 20, 0.2, 0.51),
                          {"name": "memstrata", "repeat": 3, "status": "error", "reason": "exit 1: boom"}]}
    base, ms = summarise_recipe(cfg, runs)
    assert base["wall_s"] == 110 and base["samples_per_s"] == 11 and base["top1"] == 0.52
    assert base["samples_per_s_ratio"] == 1.0 and base["top1_delta_points"] == 0.0
    assert ms["wall_s"] == 60 and ms["samples_per_s"] == 25 and ms["repeats"] == 2
    assert ms["wall_s_ratio"] == pytest.approx(60 / 110) and ms["samples_per_s_ratio"] == pytest.approx(25 / 11)
    assert ms["top1_delta_points"] == pytest.approx(100 * (0.52 - 0.52))
    assert "1 of 3 repeats failed: exit 1: boom" in ms["reason"] and ms["status"] == "ok"
    assert ms["data_wait_fraction"] == pytest.approx(0.15)
    # per repeat, against the baseline's run of the same repeat (the failed repeat 3 has no pair)
    assert ms["samples_per_s_pair_ratios"] == pytest.approx([3.0, 20 / 12])
    assert ms["samples_per_s_pair_ratio_median"] == pytest.approx((3.0 + 20 / 12) / 2)
    assert ms["top1_pair_delta_points"] == pytest.approx([3.0, -1.0])


def test_config_defaults_stored_side_and_concurrent_thread_budget():
    from types import SimpleNamespace

    from memstrata.bench.recipe_scenario import recipe_config

    c = recipe_config(SimpleNamespace(device="cpu", res="224"))
    assert c["max_side"] == 256 and c["threads"] is None and c["workers"] == c["cores"] and not c["concurrent"]
    c = recipe_config(SimpleNamespace(device="cpu", res="112", concurrent=True, max_side="200", lr="0.2"))
    assert c["max_side"] == 200 and c["threads"] == 1 and c["workers"] == max(1, c["cores"] // 2)
    assert c["extra"] == ["--lr", "0.2"]


def test_source_noise_default_names_its_own_dataset_and_makes_bigger_jpegs():
    """The recipe's default set has ImageNet-sized JPEGs (noise 16); other noises get their own cache folder."""
    import io
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from memstrata.bench.recipe_scenario import recipe_config
    from memstrata.data.synth import synth_image

    c = recipe_config(SimpleNamespace(device="cpu"))
    assert c["source_noise"] == 16 and c["data"].endswith("-n16")
    assert recipe_config(SimpleNamespace(device="cpu", source_noise="6"))["data"].endswith("recipe-1024-256-10")

    def jpeg(noise):
        a, _ = synth_image(0, 5, 4, (200, 150), noise=noise)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        return a, len(buf.getvalue())

    a6, n6 = jpeg(6.0)
    assert np.array_equal(a6, synth_image(0, 5, 4, (200, 150))[0])  # the default set is unchanged
    a16, n16 = jpeg(16.0)
    assert n16 > 1.4 * n6 and a16.shape == a6.shape


@pytest.mark.parametrize("argv, msg", [
    (["--contenders", "memstrata,peer"], "unknown contender 'peer'"),
    (["--model", "nosuchnet"], "unknown torchvision classification model"),
    (["--classes", "100", "--images", "10"], "exceeds"),
    (["--plot", "x.jpg"], ".png"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--source-noise", "x"], "--source-noise must be a number"),
])
def test_bad_input_is_one_line(argv, msg, capsys):
    assert main(["bench", "--scenario", "recipe", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("concurrent", [False, True], ids=["alternating", "concurrent"])
def test_recipe_scenario_end_to_end(tmp_path, concurrent):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--scenario", "recipe", "--images", "32", "--val-images", "16", "--classes", "2",
               "--epochs", "2", "--repeats", "1", "--res", "32", "--batch", "8", "--workers", "1",
               "--model", "mobilenet_v3_small", "--data", str(tmp_path / "data"), "--json", str(js),
               "--plot", str(png), "--quiet"] + (["--concurrent"] if concurrent else []))
    assert rc == 0
    rows = json.loads(js.read_text())
    assert [r["name"] for r in rows] == ["baseline", "memstrata"]
    for r in rows:
        assert r["status"] == "ok" and r["epochs"] == 2 and r["repeats"] == 1
        for k in ("wall_s", "samples_per_s", "data_wait_fraction", "top1"):
            assert r[k] is not None
        assert len(r["runs"][0]["per_epoch"]) == 2
        assert r["concurrent"] is concurrent and r["torch_threads_seen"]
        if concurrent:  # one intra-op thread each, epoch 2 started together ([Note: epoch-aligned pairs])
            assert r["torch_threads_seen"] == [1]
            assert r["runs"][0]["pair_wait_s"] >= 0 and r["runs"][0]["per_epoch"][1]["pair_wait_s"] >= 0
        else:
            assert r["runs"][0]["pair_wait_s"] == 0
    assert len(rows[1]["samples_per_s_pair_ratios"]) == 1
    assert rows[1]["samples_per_s_ratio"] > 0 and png.stat().st_size > 0


def test_epoch_rendezvous_waits_for_the_other_contender(tmp_path):
    """[Note: epoch-aligned pairs]: the first to reach an epoch waits for the other; nobody waits twice for a dead one."""
    import threading
    import time

    from memstrata.recipe.pairsync import ENV_DIR, ENV_NAME, ENV_SIZE, EpochRendezvous

    assert EpochRendezvous.from_env({}) is None
    a = EpochRendezvous.from_env({ENV_DIR: str(tmp_path), ENV_NAME: "memstrata", ENV_SIZE: "2"})
    b = EpochRendezvous(tmp_path, "baseline", 2)
    late = threading.Timer(0.4, lambda: b.wait(1))
    late.start()
    t0 = time.perf_counter()
    waited = a.wait(1)
    late.join()
    assert waited >= 0.3 and time.perf_counter() - t0 >= 0.3  # held until the baseline reached epoch 1
    lone = EpochRendezvous(tmp_path / "lone", "memstrata", 2, timeout_s=0.2)
    assert 0.2 <= lone.wait(1) < 2 and lone.gave_up
    assert lone.wait(2) == 0.0  # gave up on a partner that is gone: no second wait
