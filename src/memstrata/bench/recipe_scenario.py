"""`memstrata bench --scenario recipe`: the whole recipe, `memstrata train` vs `memstrata train --baseline`.

Each repeat of each contender is its own process (``python -m memstrata train
ROOT --json``), contenders alternating in ABBA order (rep 1: baseline, memstrata;
rep 2: memstrata, baseline; ...) with the same seed, so slow drift of a shared
machine and any order effect hit both alike.  memstrata starts from a cold,
empty store every repeat: building it is part of its time (it happens during
its first epoch).  Reported per contender (medians over repeats): ``wall_s``
(the whole run: set-up, store build, every epoch's training and validation),
``samples_per_s`` (training images / s over epochs >= 2), ``data_wait_fraction``
(over the same epochs; see [Note: what is measured] in recipe/loop.py) and
``top1`` (validation top-1 after the last epoch), plus the ratios to the baseline.

The dataset is `synth_recipe_root` (train/ and val/ from one generator) under
``--data DIR`` or ``~/.cache/memstrata/recipe-N-V-C[-sS]``; an existing
ImageFolder root with train/ and val/ under --data is used as is.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import BenchInputError, BenchProgress, _int, check_output_paths, resolve_device

__all__ = ["run_recipe_scenario", "recipe_config", "summarise_recipe", "add_recipe_bench_arguments", "CONTENDERS"]

CONTENDERS = ("baseline", "memstrata")
DEFAULTS = {
    "cpu": dict(images=1024, val_images=256, classes=10, batch=128, res=64, epochs=8, repeats=3,
                model="shufflenet_v2_x0_5", source_noise=16.0),  # see [Note: the CPU default is input-bound]
    "cuda": dict(images=8192, val_images=1024, classes=100, batch=256, res=224, epochs=2, repeats=1,
                 model="resnet50", source_noise=16.0),
}


class RecipeBenchInputError(BenchInputError):
    """Bad command-line input: one line on stderr, exit status 2."""


def add_recipe_bench_arguments(parser) -> None:
    """The recipe scenario's own options (the shared ones come from data_scenarios.add_data_bench_arguments).

    --max-side's default becomes None (the recipe's default, `default_max_side(res)`;
    the loader scenarios read None as their 160).
    """
    parser.set_defaults(max_side=None)
    have = set(parser._option_string_actions)  # noqa: SLF001 - argparse has no public query
    if "--concurrent" not in have:
        parser.add_argument("--concurrent", action="store_true",
                            help="recipe: run each repeat's contenders at the same time, one intra-op thread each "
                                 "(see [Note: concurrent pairs] in bench/recipe_scenario.py)")
    if "--source-noise" not in have:
        parser.add_argument("--source-noise", default=None,
                            help="recipe: the generated JPEGs' per-pixel noise sd (default on CPU: 16, ~95 KB "
                                 "per 500x375 JPEG like an ImageNet photo; 6 makes ~55 KB ones)")
    if "--lr" not in have:
        parser.add_argument("--lr", default=None, help="recipe: peak learning rate (default: the recipe's 0.1 x batch / 256)")


# [Note: the CPU default is input-bound]
# Training on ImageNet is input-bound when decoding and cropping a JPEG costs more than the step's compute
# per image: an H200 trains ResNet-50 at ~4,700 images/s while PIL needs ~2.7 ms of a core per photo.  On a
# 2-core CPU box the cores do both jobs, so the analogue is a model whose compute per image is about the
# pipeline's: shufflenet_v2_x0_5 at 64 px, batch 128 (~2.7 ms of CPU per image for a training step, as
# much as PIL's decode + RandomResizedCrop of a 500x375, ~95 KB JPEG: --source-noise 16).  The earlier
# default (mobilenet_v3_small, batch 64, ~55 KB JPEGs, 3 epochs) spent ~5 ms per image in the step and
# only ~1.7 in the pipeline: compute-bound on the faster VM of 2026-12-05 (data wait 5%), and its 3 epochs
# did not amortise the store build, which real training (90+ epochs) does; 8 epochs is still few.
# Measured in bench/results/2026-12-05c-cpu-recipe/.


# [Note: concurrent pairs]
# On a shared machine the load from other jobs changes over minutes, and a run of a compute-bound model
# is as fast as the CPU share it gets: two alternating runs measure the machine as much as the pipelines
# (single runs of the same command differ by 1.3x here).  With --concurrent a repeat starts both
# contenders at once, each with one intra-op thread (unless --threads says otherwise) and --workers
# workers (default: half the cores), so whatever else runs meanwhile takes from both alike, and the ratio
# of the two runs of one repeat (`samples_per_s_pair_ratios`) cancels it.  The launch order alternates
# (ABBA).  Each contender then has half the machine; that is a different, smaller setting than a
# sequential run's, stated in the table's title.  Since 2026-12-05 the two also start every epoch >= 2
# together ([Note: epoch-aligned pairs] in recipe/pairsync.py): without it they drift apart (memstrata's
# first epoch and validations are shorter) and a load that changes within the run no longer cancels.


def recipe_config(args) -> dict[str, Any]:
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    device = resolve_device(g("device"), RecipeBenchInputError)
    d = DEFAULTS[device]
    cfg: dict[str, Any] = {"scenario": "recipe", "device": device}
    for k in ("images", "classes", "batch", "res", "epochs", "repeats"):
        cfg[k] = _int(k, g(k) or d[k])
    cfg["val_images"] = _int("val-images", g("val_images") or d["val_images"])
    cfg["seed"] = _int("seed", g("seed") if g("seed") is not None else 0, lo=0)
    cfg["source_noise"] = _noise(g("source_noise"), d["source_noise"])
    from ..recipe.config import default_max_side

    cfg["max_side"] = _int("max-side", g("max_side"), lo=8) if g("max_side") is not None else default_max_side(cfg["res"])
    if cfg["classes"] > min(cfg["images"], cfg["val_images"]):
        raise RecipeBenchInputError(f"--classes {cfg['classes']} exceeds --images or --val-images")
    from .data_scenarios import usable_cores

    cfg["cores"] = usable_cores()
    cfg["concurrent"] = bool(g("concurrent", False))
    default_workers = max(1, cfg["cores"] // 2) if cfg["concurrent"] else cfg["cores"]
    cfg["workers"] = _int("workers", g("workers"), lo=0) if g("workers") is not None else default_workers
    cfg["model"] = g("model") or d["model"]
    from ..recipe.optim import known_models

    if cfg["model"] not in known_models():
        raise RecipeBenchInputError(f"unknown torchvision classification model {cfg['model']!r}")
    names = list(CONTENDERS)
    if g("contenders"):
        names = [c.strip() for c in str(g("contenders")).split(",") if c.strip()]
        bad = [c for c in names if c not in CONTENDERS]
        if bad or not names:
            raise RecipeBenchInputError(f"unknown contender {bad[0] if bad else ''!r} for --scenario recipe: "
                                        f"choose from {', '.join(CONTENDERS)}")
    cfg["contenders"] = names
    check_output_paths(g("json_path"), g("plot_path"), RecipeBenchInputError)
    cfg["json_path"], cfg["plot_path"] = g("json_path"), g("plot_path")
    cfg["run_timeout"] = float(_int("run-timeout", int(float(g("run_timeout") or 900))))
    cfg["quiet"] = bool(g("quiet", False))
    cfg["log_dir"] = g("log_dir")
    cfg["threads"] = _int("threads", g("threads")) if g("threads") is not None else (1 if cfg["concurrent"] else None)
    cfg["extra"] = []
    if g("lr") is not None:
        try:
            lr = float(str(g("lr")))
        except ValueError:
            raise RecipeBenchInputError(f"--lr must be a number, got {g('lr')!r}") from None
        if not lr > 0:
            raise RecipeBenchInputError(f"--lr must be > 0, got {lr}")
        cfg["extra"] += ["--lr", repr(lr)]
    data = g("data")
    if data is not None and Path(data).exists() and not Path(data).is_dir():
        raise RecipeBenchInputError(f"--data {data!r} is not a directory")
    base = Path(os.environ.get("MEMSTRATA_CACHE", Path.home() / ".cache" / "memstrata"))
    name = (f"recipe-{cfg['images']}-{cfg['val_images']}-{cfg['classes']}" + (f"-s{cfg['seed']}" if cfg["seed"] else "")
            + (f"-n{cfg['source_noise']:g}" if cfg["source_noise"] != 6.0 else ""))
    cfg["data"] = str(Path(data).expanduser().resolve()) if data else str(base / name)
    cfg["data_given"] = data is not None
    return cfg


def _noise(v, default: float) -> float:
    if v is None:
        return float(default)
    try:
        x = float(str(v))
    except ValueError:
        raise RecipeBenchInputError(f"--source-noise must be a number, got {v!r}") from None
    if not 0 <= x <= 64:
        raise RecipeBenchInputError(f"--source-noise must be in [0, 64], got {x:g}")
    return x


def ensure_root(cfg: dict[str, Any], console=None) -> Path:
    from ..recipe.synth import synth_recipe_root

    root = Path(cfg["data"])
    if cfg["data_given"] and (root / "train").is_dir() and (root / "val").is_dir():
        return root
    if console is not None and not cfg["quiet"]:
        console.print(f"dataset: {cfg['images']} + {cfg['val_images']} synthetic images in {cfg['classes']} classes "
                      f"-> {root}", highlight=False)
    return synth_recipe_root(root, cfg["images"], cfg["val_images"], cfg["classes"], seed=cfg["seed"],
                             progress=not cfg["quiet"], noise=cfg["source_noise"])


def _argv(cfg: dict[str, Any], name: str, root: Path, store: str) -> list[str]:
    a = [sys.executable, "-m", "memstrata", "train", str(root), "--model", cfg["model"], "--epochs", str(cfg["epochs"]),
         "--batch", str(cfg["batch"]), "--res", str(cfg["res"]), "--workers", str(cfg["workers"]),
         "--seed", str(cfg["seed"]), "--max-side", str(cfg["max_side"]), "--device", cfg["device"],
         "--json", "--quiet"]
    if cfg["threads"] is not None:
        a += ["--threads", str(cfg["threads"])]
    if name == "baseline":
        a.append("--baseline")
    else:
        a += ["--store", store]
    return a + list(cfg["extra"])


class _Run:
    """One contender's run in its own process: started by `start()`, collected by `finish()`."""

    def __init__(self, cfg, name, rep, root, workdir, pair: tuple[str, int] | None = None):
        self.cfg, self.name, self.rep = cfg, name, rep
        self.store = tempfile.mkdtemp(prefix=f"memstrata-recipe-store-rep{rep}-")  # cold: built during this run
        shutil.rmtree(self.store)  # the loader creates it; an empty directory would be just as cold
        self.log = os.path.join(workdir, f"recipe-{name}-rep{rep}.log")
        src = str(Path(__file__).resolve().parents[2])
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = src + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        if pair is not None:  # [Note: epoch-aligned pairs] in recipe/pairsync.py
            from ..recipe.pairsync import ENV_DIR, ENV_NAME, ENV_SIZE

            self.env.update({ENV_DIR: pair[0], ENV_NAME: name, ENV_SIZE: str(pair[1])})
        else:
            for k in ("MEMSTRATA_RECIPE_PAIR_DIR", "MEMSTRATA_RECIPE_PAIR_NAME", "MEMSTRATA_RECIPE_PAIR_SIZE"):
                self.env.pop(k, None)
        self.argv = _argv(cfg, name, root, self.store)
        self.proc = None

    def start(self) -> "_Run":
        self._err = open(self.log, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err, env=self.env, text=True)
        return self

    def finish(self, deadline: float) -> dict[str, Any]:
        name, rep = self.name, self.rep
        try:
            try:
                out, _ = self.proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                return {"name": name, "repeat": rep, "status": "error",
                        "reason": f"timed out after {self.cfg['run_timeout']:g} s", "log": self.log}
            wall = time.perf_counter() - self.t0
            self._err.close()
            if self.proc.returncode != 0:
                tail = Path(self.log).read_text().strip().splitlines()[-1:] or [""]
                return {"name": name, "repeat": rep, "status": "error",
                        "reason": f"exit {self.proc.returncode}: {tail[0]}"[:500], "log": self.log, "process_wall_s": wall}
            r = json.loads(out.strip().splitlines()[-1])
            r.update(status="ok", reason="", repeat=rep, process_wall_s=wall)
            return r
        finally:
            self._err.close()
            shutil.rmtree(self.store, ignore_errors=True)


def _run_one(cfg, name, rep, root, workdir) -> dict[str, Any]:
    run = _Run(cfg, name, rep, root, workdir).start()
    return run.finish(run.t0 + cfg["run_timeout"])


def _line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"  rep {r['repeat']}  {r['name']:<10} {r['status']}: {r['reason']}"
    return (f"  rep {r['repeat']}  {r['name']:<10} wall {r['wall_s']:7.1f} s  {r['samples_per_s']:7.1f} images/s  "
            f"data wait {100 * r['data_wait_fraction']:3.0f}%  top-1 {100 * r['top1']:5.1f}%")


def run_repeats(cfg: dict[str, Any], root: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in cfg["contenders"]}
    workdir = cfg["log_dir"] or tempfile.mkdtemp(prefix="memstrata-recipebench-")
    os.makedirs(workdir, exist_ok=True)
    with BenchProgress(cfg["repeats"] * len(cfg["contenders"]), cfg["quiet"], "recipe") as bar:
        for rep in range(1, cfg["repeats"] + 1):
            order = cfg["contenders"] if rep % 2 else list(reversed(cfg["contenders"]))  # ABBA
            if cfg.get("concurrent"):  # see [Note: concurrent pairs]
                bar.describe(f"rep {rep} {' + '.join(order)} at once")
                sync = tempfile.mkdtemp(prefix=f"rep{rep}-pair-", dir=workdir)
                started = [_Run(cfg, name, rep, root, workdir, pair=(sync, len(order))).start() for name in order]
                deadline = time.perf_counter() + cfg["run_timeout"]
                for run in started:
                    r = run.finish(deadline)
                    runs[run.name].append(r)
                    bar.advance(_line(r))
                continue
            for name in order:
                bar.describe(f"rep {rep} {name}")
                r = _run_one(cfg, name, rep, root, workdir)
                runs[name].append(r)
                bar.advance(_line(r))
    if not cfg["log_dir"] and all(r["status"] == "ok" for rs in runs.values() for r in rs):
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise_recipe(cfg: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok"]
        bad = [r for r in rs if r["status"] != "ok"]
        row = {
            "name": name, "scenario": "recipe", "status": "ok" if ok else (bad[0]["status"] if bad else "skipped"),
            "reason": (f"{len(bad)} of {len(rs)} repeats failed: {bad[0]['reason']}" if bad else ""),
            "model": cfg["model"], "epochs": cfg["epochs"], "repeats": len(ok),
            "wall_s": _med([r["wall_s"] for r in ok]),
            "samples_per_s": _med([r["samples_per_s"] for r in ok]),
            "samples_per_s_stat": "median over repeats of training images / s over epochs 2..",
            "data_wait_fraction": _med([r["data_wait_fraction"] for r in ok]),
            "top1": _med([r["top1"] for r in ok]),
            "wall_s_values": [r["wall_s"] for r in ok], "samples_per_s_values": [r["samples_per_s"] for r in ok],
            "top1_values": [r["top1"] for r in ok], "data_wait_values": [r["data_wait_fraction"] for r in ok],
            "epoch1_s_values": [r["per_epoch"][0]["train_s"] for r in ok],
            "step_s_median": _med([r.get("step_s_median") for r in ok]),
            "step_s_values": [r.get("step_s_median") for r in ok],
            "cpu_s_per_image": _med([r.get("cpu_s_per_image") for r in ok]),
            "cpu_s_per_image_values": [r.get("cpu_s_per_image") for r in ok],
            "compute_cpu_s_per_image": _med([r.get("compute_cpu_s_per_image") for r in ok]),
            "pipeline_cpu_s_per_image": _med([r.get("pipeline_cpu_s_per_image") for r in ok]),
            "torch_threads_seen": sorted({e.get("torch_threads") for r in ok for e in r["per_epoch"]} - {None}),
            "load_values": [_run_load(r) for r in ok],
            "concurrent": bool(cfg.get("concurrent")), "max_side": cfg.get("max_side"),
            "device": cfg["device"], "cores": cfg["cores"], "workers": cfg["workers"], "batch": cfg["batch"],
            "res": cfg["res"], "images": cfg["images"], "val_images": cfg["val_images"], "classes": cfg["classes"],
            "seed": cfg["seed"], "torch_threads": cfg["threads"], "source_noise": cfg.get("source_noise"),
            "process_wall_s": _med([r.get("process_wall_s") for r in ok]),
            "runs": [{k: r.get(k) for k in ("repeat", "status", "reason", "wall_s", "samples_per_s",
                                            "data_wait_fraction", "top1", "step_s_median", "cpu_s_per_image",
                                            "compute_cpu_s_per_image", "pipeline_cpu_s_per_image",
                                            "per_epoch", "process_wall_s", "pair_wait_s", "log")}
                     for r in rs],
        }
        rows.append(row)
    base = next((r for r in rows if r["name"] == "baseline" and r["status"] == "ok"), None)
    for r in rows:
        if base is None or r["status"] != "ok":
            r["samples_per_s_ratio"] = r["wall_s_ratio"] = r["top1_delta_points"] = None
            r["samples_per_s_pair_ratios"], r["samples_per_s_pair_ratio_median"] = [], None
            continue
        r["samples_per_s_ratio"] = r["samples_per_s"] / base["samples_per_s"]
        # per repeat: this contender's run against the baseline's run of the same repeat (adjacent in time, or
        # at the same time with --concurrent)
        b_by_rep = {x["repeat"]: x for x in base["runs"] if x["status"] == "ok"}
        pairs = [(x, b_by_rep[x["repeat"]]) for x in r["runs"] if x["status"] == "ok" and x["repeat"] in b_by_rep]
        r["samples_per_s_pair_ratios"] = [x["samples_per_s"] / b["samples_per_s"] for x, b in pairs]
        r["wall_s_pair_ratios"] = [x["wall_s"] / b["wall_s"] for x, b in pairs]
        r["top1_pair_delta_points"] = [100 * (x["top1"] - b["top1"]) for x, b in pairs]
        r["samples_per_s_pair_ratio_median"] = _med(r["samples_per_s_pair_ratios"])
        r["wall_s_ratio"] = r["wall_s"] / base["wall_s"]
        r["top1_delta_points"] = 100 * (r["top1"] - base["top1"])
    return rows


def _run_load(r: dict[str, Any]) -> float | None:
    """Mean 1-minute load average over the run's epochs (start and end of each), None if not recorded."""
    xs = [v for e in r.get("per_epoch", []) for v in (e.get("load_start"), e.get("load_end")) if v is not None]
    return sum(xs) / len(xs) if xs else None


def print_table(console, cfg, rows, elapsed) -> None:
    from rich.table import Table

    t = Table(title=(f"recipe · {cfg['model']} · {cfg['images']} train / {cfg['val_images']} val images · "
                     f"{cfg['classes']} classes · batch {cfg['batch']} · {cfg['res']} px · {cfg['epochs']} epochs · "
                     f"{cfg['device']} · {cfg['workers']} workers on {cfg['cores']} cores · "
                     f"{cfg['threads'] or 'default'} torch thread(s)"
                     + (" · contenders run at the same time" if cfg.get("concurrent") else "")),
              caption=(f"medians of {cfg['repeats']} alternating (ABBA) repeats, one process each, same seed; "
                       f"wall = whole run incl. memstrata's store build (cold every repeat) and validation; "
                       f"images/s = training, epochs 2..; bench wall {elapsed:.0f} s"))
    left = ("contender", "repeats (wall s / images/s)", "per-repeat images/s ratio")
    for c in ("contender", "wall s", "vs baseline", "images/s", "vs baseline", "data wait", "top-1", "Δ top-1",
              "repeats (wall s / images/s)", "per-repeat images/s ratio"):
        t.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["name"], "-", "-", "-", "-", "-", "-", "-", f"{r['status']}: {r['reason']}", "-")
            continue
        reps = ", ".join(f"{w:.0f}/{s:.1f}" for w, s in zip(r["wall_s_values"], r["samples_per_s_values"]))
        pairs = ", ".join(f"{v:.2f}" for v in r.get("samples_per_s_pair_ratios") or []) or "-"
        t.add_row(r["name"], f"{r['wall_s']:.1f}", _x(r["wall_s_ratio"]), f"{r['samples_per_s']:.1f}",
                  _x(r["samples_per_s_ratio"]), f"{100 * r['data_wait_fraction']:.0f}%", f"{100 * r['top1']:.1f}%",
                  "-" if r["top1_delta_points"] is None else f"{r['top1_delta_points']:+.1f}", reps, pairs)
    console.print(t)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def write_plot(path: str, cfg: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from ..recipe.report import plot_top1

    runs = [dict(rr, name=r["name"]) for r in rows for rr in r["runs"] if rr.get("status") == "ok"]
    plot_top1(path, runs, title=(f"{cfg['model']} {cfg['res']} px, {cfg['images']} images, {cfg['epochs']} epochs, "
                                 f"{cfg['workers']} workers: top-1 vs wall time ({cfg['repeats']} repeats)"))


def run_recipe_scenario(args) -> int:
    from .data_scenarios import _console, _error

    try:
        cfg = recipe_config(args)
    except BenchInputError as e:
        return _error(str(e))
    console = _console()
    t0 = time.perf_counter()
    try:
        try:
            root = ensure_root(cfg, console)
        except (ValueError, OSError) as e:
            return _error(f"dataset {cfg['data']}: {e}")
        if not cfg["quiet"]:
            console.print(f"[bold]memstrata bench --scenario recipe[/]  {root}  {cfg['model']}  {cfg['device']}  "
                          f"batch {cfg['batch']}  {cfg['res']} px  {cfg['workers']} workers on {cfg['cores']} cores  "
                          f"{cfg['epochs']} epochs  {cfg['repeats']} repeat(s)", highlight=False)
        rows = summarise_recipe(cfg, run_repeats(cfg, root))
    except KeyboardInterrupt:
        print("memstrata bench: interrupted", file=sys.stderr)
        return 130
    print_table(console, cfg, rows, time.perf_counter() - t0)
    if cfg["json_path"]:
        with open(cfg["json_path"], "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if cfg["plot_path"]:
        write_plot(cfg["plot_path"], cfg, rows)
    return 1 if any(r["status"] == "error" for r in rows) else 0
