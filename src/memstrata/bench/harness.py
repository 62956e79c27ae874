"""`memstrata bench`: contenders side by side, each run in its own process.

The harness never trains in its own process.  For every repeat it launches one
worker process per contender, round-robin (rep 1: A, B, C ...; rep 2: A, B,
C ...), so no run sees another's memory and slow drift of the machine (thermal,
neighbours) hits every contender alike.  ``unmanaged`` always runs first: its
measured peak defines a percentage budget and sizes the micro-batches.

Per contender it reports the median over repeats of samples/s (each repeat's
samples/s is batch / median step time), and the *maximum* over repeats of the
peak memory above the baseline (the conservative choice; the median is in the
JSON as ``peak_bytes_median``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .contenders import CONTENDERS, REPORTED_APART, skip_reason
from .gpt2 import is_gpt2
from .states_contenders import states_skip_reason
from .peak import EXACT_ENV
from .spec import RunSpec
from ..progress import BenchProgress  # noqa: F401  (one progress bar for benches and the recipe)

if TYPE_CHECKING:
    from memstrata.hardware import Budget

# Defaults that depend on the device (see bench/README.md).
CPU_DEFAULTS = dict(model="resnet18", batch=64, res=112, steps=3, warmup=1, amp="off")
CUDA_DEFAULTS = dict(model="resnet50", batch=256, res=224, steps=10, warmup=3, amp="bf16")


class BenchInputError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


@dataclass
class BenchConfig:
    model: str
    batch: int
    res: int
    device: str
    steps: int
    warmup: int
    repeats: int
    amp: str
    budget_text: str
    budget_fraction: float | None  # set when the budget is a percentage of the unmanaged peak
    budget_bytes: int | None  # set when the budget is a size (or once resolved)
    contenders: list[str]
    num_classes: int = 1000
    channels_last: bool = False
    nvme_dir: str | None = None
    json_path: str | None = None
    plot_path: str | None = None
    log_dir: str | None = None
    microbatches: int | None = None
    max_seconds: float | None = None
    run_timeout: float = 900.0
    cpu_peak: str = "exact"
    threads: int | None = None
    seed: int = 0
    quiet: bool = False
    budget_of_activations: bool = False  # "50%act": the fraction is of the activation peak, see [Note: budgets]
    seq: int = 0  # GPT-2 models (the state bench): tokens per sample
    nvme_bw: tuple[float, float] | None = None  # state bench: probed NVMe (read, write) bytes/s


# ------------------------------------------------------------------ arguments
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `memstrata bench` on `parser` (cli.py calls this).

    Values are taken as text and validated by `run_bench`, so bad input gives
    one line and exit status 2.
    """
    a = parser.add_argument
    a("--model", default=None, help="torchvision classification model (default: resnet18 on CPU, resnet50 on CUDA)")
    a("--batch", default=None, help="batch size (default: 64 on CPU, 256 on CUDA)")
    a("--res", default=None, help="input resolution in pixels (default: 112 on CPU, 224 on CUDA)")
    a("--budget", default=DEFAULT_BUDGET, help="memory budget above the baseline: a size (512MiB, 12GiB), a percentage of "
      "the unmanaged peak (50%%), or P%%act: the unmanaged peak less (100-P)%% of its activation peak (default 50%%act)")
    a("--repeats", default="3", help="alternating repeats per contender (default 3)")
    a("--steps", default=None, help="timed steps per run (default: 3 on CPU, 10 on CUDA)")
    a("--warmup", default=None, help="untimed warm-up steps per run (default: 1 on CPU, 3 on CUDA)")
    a("--contenders", default=None,
      help="comma-separated subset of: " + ", ".join(CONTENDERS) + " (default: all)")
    a("--device", default="auto", help="auto | cpu | cuda (default auto: cuda when available)")
    a("--amp", "--dtype", dest="amp", default="auto",
      help="autocast dtype: auto | off | bf16 | fp16 (also float32/bfloat16/float16); auto = bf16 on CUDA, off on CPU")
    a("--num-classes", default="1000", help="classifier outputs (default 1000)")
    a("--channels-last", default="auto", help="auto | on | off (auto: on for CUDA)")
    a("--nvme", default=None, metavar="DIR",
      help="directory for NVMe/disk offload files of memstrata and disk_offload_hooks (default: a fresh temporary directory)")
    a("--cpu-peak", default="exact",
      help="CPU peak method: exact (one untimed step with glibc returning freed memory; default) or rss (the timed steps' resident set)")
    a("--microbatches", default=None, help="force the micro-batch count k (default: chosen from the budget)")
    a("--max-seconds", default=None, help="cap on the timed part of one run, in seconds (at least one step runs)")
    a("--run-timeout", default="900", help="kill a run after this many seconds (default 900)")
    a("--threads", default=None, help="torch intra-op threads in each worker (default: torch's choice)")
    a("--json", dest="json_path", default=None, metavar="FILE", help="write the results as a JSON list")
    a("--plot", dest="plot_path", default=None, metavar="FILE.png", help="write bar charts of samples/s and peak")
    a("--log-dir", default=None, metavar="DIR", help="keep every run's spec, result and log here")
    a("--quiet", action="store_true", help="no progress display")
    a("--seq", default=None, help="tokens per sample for --model gpt2-* (the optimizer-state bench; default 64 on CPU, "
      "1024 on CUDA)")


def _int(name: str, text: Any, lo: int = 1) -> int:
    try:
        v = int(str(text))
    except ValueError:
        raise BenchInputError(f"--{name} must be an integer, got {text!r}") from None
    if v < lo:
        raise BenchInputError(f"--{name} must be >= {lo}, got {v}")
    return v


def _float(name: str, text: Any, lo: float = 0.0) -> float:
    try:
        v = float(str(text))
    except ValueError:
        raise BenchInputError(f"--{name} must be a number, got {text!r}") from None
    if not v > lo:
        raise BenchInputError(f"--{name} must be > {lo:g}, got {text}")
    return v


# [Note: budgets]
# A bench budget is a measured peak above the baseline (parameters, buffers,
# optimizer states and the batch are the baseline).  Three spellings:
# * a size ("512MiB"): that many bytes;
# * "P%": P% of the unmanaged run's measured peak;
# * "P%act" (the default): the unmanaged measured peak minus (100-P)% of the
#   unmanaged *activation* peak, i.e. "keep only P% of the saved activations".
#   The activation peak is the largest total of saved-for-backward activation
#   bytes live at one event in a meta trace of the same model and shape.  On a
#   CPU box the measured peak also holds gradients, temporaries and op-internal
#   scratch (oneDNN reorders) that no activation manager can remove, so "P%" of
#   the whole peak can ask for more than every activation.
DEFAULT_BUDGET = "50%act"


def activation_peak_bytes(cfg: "BenchConfig") -> int:
    """Peak bytes of saved activations live at one event (meta trace of the same step)."""
    import torch

    from memstrata.trace import live_bytes_per_event, trace_model

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.float32)
    trace = trace_model(cfg.model, cfg.batch, cfg.res, profile="cpu" if cfg.device == "cpu" else "h200",
                        dtype=dtype, num_classes=cfg.num_classes)
    acts = [s for s in trace.storages if s.saved and s.kind == "activation"]
    return int(max(live_bytes_per_event(acts, len(trace.ops)), default=0))


def parse_budget(text: str) -> "Budget":
    """The bench's --budget as the one `Budget` type; BenchInputError (one line) when malformed."""
    from memstrata.hardware import Budget

    try:
        b = Budget.parse(text, max_percent=1000.0)
    except ValueError as e:
        raise BenchInputError(str(e)) from None
    if b.kind == "slowdown":
        raise BenchInputError(f"--budget {text!r}: the bench compares contenders at one memory budget; "
                              "give a size or a percentage")
    return b


def _classification_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def resolve_device(text: str | None, error: type[Exception] | None = None) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda"; `error` (BenchInputError) on bad input."""
    error = error or BenchInputError
    device = str(text or "auto").lower()
    if device not in ("auto", "cpu", "cuda"):
        raise error(f"--device must be auto, cpu or cuda, got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda, but CUDA is not available on this machine")
    return device


def check_output_paths(json_path: str | None, plot_path: str | None, error: type[Exception]) -> None:
    """--json / --plot: each must be a file that can be written (the plot a .png); `error` otherwise.

    Checked before the bench runs, so a bad path does not end a long run in a traceback.
    """
    from memstrata.cli_args import check_output_path

    check_output_path("--json", json_path, error=error)
    check_output_path("--plot", plot_path, ".png", error=error)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from .gpt2 import is_gpt2

    if is_gpt2(getattr(args, "model", None)):
        from .states_harness import states_config_from_args

        return states_config_from_args(args, BenchConfig, BenchInputError, resolve_device=resolve_device,
                                       check_output_paths=check_output_paths, default_budget=DEFAULT_BUDGET)
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    device = resolve_device(g("device", "auto"))
    d = CUDA_DEFAULTS if device == "cuda" else CPU_DEFAULTS

    model = g("model") or d["model"]
    models = _classification_models()
    if model not in models:
        close = [m for m in models if m.startswith(model[:4])][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BenchInputError(f"unknown torchvision classification model {model!r}{hint}")

    amp = str(g("amp", "auto") or "auto").lower()
    amp = {"float32": "off", "fp32": "off", "none": "off", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(amp, amp)
    if amp == "auto":
        amp = d["amp"]
    if amp not in ("off", "bf16", "fp16"):
        raise BenchInputError(f"--amp must be auto, off, bf16 or fp16, got {g('amp')!r}")
    if amp == "fp16" and device == "cpu":
        raise BenchInputError("--amp fp16 needs CUDA; use bf16 or off on CPU")

    cl = str(g("channels_last", "auto") or "auto").lower()
    if cl not in ("auto", "on", "off"):
        raise BenchInputError(f"--channels-last must be auto, on or off, got {cl!r}")
    channels_last = device == "cuda" if cl == "auto" else cl == "on"

    if g("contenders"):
        names = [c.strip() for c in str(g("contenders")).split(",") if c.strip()]
        bad = [c for c in names if c not in CONTENDERS]
        if bad:
            raise BenchInputError(f"unknown contender {bad[0]!r}: choose from {', '.join(CONTENDERS)}")
        if not names:
            raise BenchInputError("--contenders is empty")
        names = [c for c in CONTENDERS if c in names]  # canonical order, unmanaged first
    else:
        names = list(CONTENDERS)

    budget_text = str(g("budget", DEFAULT_BUDGET) or DEFAULT_BUDGET).strip()
    budget_spec = parse_budget(budget_text)
    of_activations = budget_spec.kind == "activations"
    fraction = budget_spec.value if budget_spec.kind in ("peak", "activations") else None
    size = int(budget_spec.value) if budget_spec.kind == "bytes" else None
    nvme = g("nvme")
    if nvme is not None:
        if not os.path.isdir(nvme):
            raise BenchInputError(f"--nvme {nvme!r} is not an existing directory")
        if not os.access(nvme, os.W_OK | os.X_OK):
            raise BenchInputError(f"--nvme {nvme!r} is not writable")
    check_output_paths(g("json_path"), g("plot_path"), BenchInputError)

    cpu_peak = str(g("cpu_peak", "exact") or "exact").lower()
    if cpu_peak not in ("exact", "rss"):
        raise BenchInputError(f"--cpu-peak must be exact or rss, got {cpu_peak!r}")
    batch = _int("batch", g("batch") or d["batch"])
    mb = g("microbatches")
    microbatches = _int("microbatches", mb) if mb is not None else None
    if microbatches is not None and batch % microbatches:
        raise BenchInputError(f"--microbatches {microbatches} does not divide --batch {batch}")
    if microbatches is not None and microbatches > 1 and batch // microbatches < 2:
        raise BenchInputError(f"--microbatches {microbatches} leaves micro-batches of one sample (BatchNorm needs 2)")
    cfg = BenchConfig(
        model=model,
        batch=batch,
        res=_int("res", g("res") or d["res"], lo=16),
        device=device,
        steps=_int("steps", g("steps") or d["steps"]),
        warmup=_int("warmup", g("warmup") if g("warmup") is not None else d["warmup"], lo=0),
        repeats=_int("repeats", g("repeats") or 3),
        amp=amp,
        budget_text=budget_text,
        budget_of_activations=of_activations,
        budget_fraction=fraction,
        budget_bytes=size,
        contenders=names,
        num_classes=_int("num-classes", g("num_classes") or 1000, lo=2),
        channels_last=channels_last,
        nvme_dir=os.path.abspath(nvme) if nvme else None,
        json_path=g("json_path"),
        plot_path=g("plot_path"),
        log_dir=g("log_dir"),
        microbatches=microbatches,
        max_seconds=_float("max-seconds", g("max_seconds")) if g("max_seconds") is not None else None,
        run_timeout=_float("run-timeout", g("run_timeout") or 900),
        threads=_int("threads", g("threads")) if g("threads") is not None else None,
        quiet=bool(g("quiet", False)),
        cpu_peak=cpu_peak,
    )
    from memstrata.trace.record import ModelInputError, check_model_input

    try:  # on meta, in well under a second: not minutes later in every worker
        check_model_input(cfg.model, cfg.batch // (cfg.microbatches or 1), cfg.res, num_classes=cfg.num_classes)
    except ModelInputError as e:
        raise BenchInputError(str(e)) from None
    return cfg


# ------------------------------------------------------------------ running
# [Note: OpenMP spinning on a shared machine]
# With libgomp's default (active) waiting, a worker whose 2 OpenMP threads share
# 2 cores with other busy processes spins at every barrier while its partner
# thread is descheduled.  Measured on the 2-core box under load: unmanaged
# ResNet-18 steps took 4.3 s (4.2 s of CPU) instead of 1.2 s, while a memstrata
# worker in the same minutes took 1.3 s -- probably because its extra threads
# make libgomp throttle spinning -- so the comparison inverted.  With
# OMP_WAIT_POLICY=PASSIVE both took 1.2-1.3 s under load, and on an idle box
# passive waiting cost nothing measurable (0.56-0.62 s per step either way).
# So CPU workers wait passively unless the caller's environment says otherwise.


def _worker_env(spec: RunSpec) -> dict[str, str]:
    env = dict(os.environ)
    for k in EXACT_ENV:
        env.pop(k, None)
    if spec.device == "cpu" and spec.cpu_peak == "exact":
        env.update(EXACT_ENV)  # [Note: allocator-held memory] in peak.py
    if spec.device == "cpu" and "OMP_WAIT_POLICY" not in env:
        # [Note: OpenMP spinning on a shared machine]
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # .../src
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_worker(spec: RunSpec, workdir: str, tag: str, timeout: float) -> tuple[dict[str, Any], float]:
    """Run one worker process; always returns a result dict (status error on failure)."""
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    out_path = os.path.join(workdir, f"{tag}.result.json")
    log_path = os.path.join(workdir, f"{tag}.log")
    with open(spec_path, "w") as f:
        json.dump(asdict(spec), f)
    cmd = [sys.executable, "-m", "memstrata.bench.worker", "--spec", spec_path, "--out", out_path]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(spec))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return ({"name": spec.contender, "status": "error", "reason": f"timed out after {timeout:g} s", "log": log_path},
                    time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    if os.path.exists(out_path):
        with open(out_path) as f:
            result = json.load(f)
        result["log"] = log_path
        return result, wall
    if rc < 0 and -rc == 9:
        reason = "killed by SIGKILL (out of host memory?)"
        status = "oom"
    else:
        status = "error"
        tail = ""
        try:
            with open(log_path) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            tail = lines[-1] if lines else ""
        except OSError:
            pass
        reason = f"worker exited with status {rc}" + (f": {tail}" if tail else "")
    return {"name": spec.contender, "status": status, "reason": reason[:500], "log": log_path}, wall


def choose_microbatches(batch: int, unmanaged_peak: int, param_bytes: int, budget: int) -> tuple[int, bool]:
    """Smallest divisor k of `batch` whose estimated peak fits `budget`.

    Model: the peak above the baseline is a part that scales with the batch
    (activations) plus a fixed part.  Under accumulation the fixed part is
    about two parameter-sized buffers (the accumulated gradients plus the
    micro-batch's fresh ones before they are summed), so a micro-batch of
    batch/k samples peaks at about (unmanaged_peak - 2 P) / k + 2 P.
    Micro-batches keep at least 2 samples (BatchNorm cannot train on one).
    Returns (k, fits); when nothing fits, the largest allowed k and False.
    """
    fixed = 2 * param_bytes
    act = max(unmanaged_peak - fixed, 0)
    kmax = batch // 2 if batch >= 2 else 1
    ks = [k for k in range(1, kmax + 1) if batch % k == 0]
    for k in ks:
        if act / k + fixed <= budget:
            return k, True
    return ks[-1], False


def _summary_line(rep: int, name: str, r: dict[str, Any], wall: float) -> str:
    from .report import fmt_bytes

    if r.get("status") == "ok":
        return (f"  rep {rep}  {name:<21} {r['samples_per_s']:9.2f} samples/s   peak {fmt_bytes(r['peak_bytes']):>10}"
                f"   ({wall:.1f} s)")
    return f"  rep {rep}  {name:<21} {r.get('status')}: {r.get('reason', '')}"


def run_all(cfg: BenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every contender `cfg.repeats` times, alternating; returns (summary list, meta)."""
    workdir = cfg.log_dir or tempfile.mkdtemp(prefix="memstrata-bench-")
    os.makedirs(workdir, exist_ok=True)
    nvme_dir = cfg.nvme_dir or tempfile.mkdtemp(prefix="memstrata-bench-nvme-")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cfg.contenders}
    meta: dict[str, Any] = {"budget_source": "size" if cfg.budget_bytes is not None else "percentage"}
    budget = cfg.budget_bytes
    unmanaged_peak: int | None = None
    param_bytes: int | None = None
    microbatches = cfg.microbatches
    mb_fits = True

    def spec_for(name: str, steps: int | None = None, warmup: int | None = None) -> RunSpec:
        return RunSpec(
            contender=name, model=cfg.model, batch=cfg.batch, res=cfg.res, device=cfg.device,
            steps=steps or cfg.steps, warmup=cfg.warmup if warmup is None else warmup,
            num_classes=cfg.num_classes, amp=cfg.amp, channels_last=cfg.channels_last, seed=cfg.seed,
            budget_bytes=budget, microbatches=microbatches or 1, nvme_dir=nvme_dir,
            unmanaged_peak_bytes=unmanaged_peak,
            max_seconds=cfg.max_seconds, threads=cfg.threads, cpu_peak=cfg.cpu_peak, seq=cfg.seq,
            nvme_read_bw=cfg.nvme_bw[0] if cfg.nvme_bw else None, nvme_write_bw=cfg.nvme_bw[1] if cfg.nvme_bw else None,
        )

    need_calibration = "unmanaged" not in cfg.contenders and (
        budget is None or ("microbatch" in cfg.contenders and microbatches is None))
    total = cfg.repeats * len(cfg.contenders) + (1 if need_calibration else 0)
    try:
        with BenchProgress(total, cfg.quiet) as progress:
            if need_calibration:
                progress.describe("calibrating: unmanaged peak")
                r, wall = run_worker(spec_for("unmanaged", steps=1, warmup=1), workdir, "calibrate-unmanaged", cfg.run_timeout)
                progress.advance(_summary_line(0, "unmanaged (calibration)", r, wall))
                meta["calibration"] = {k: r.get(k) for k in ("status", "reason", "peak_bytes", "samples_per_s")}
                if r.get("status") == "ok":
                    unmanaged_peak, param_bytes = r["peak_bytes"], r.get("param_bytes")
            for rep in range(1, cfg.repeats + 1):
                for name in cfg.contenders:
                    why = (states_skip_reason if is_gpt2(cfg.model) else skip_reason)(name, cfg.device)
                    if why:
                        r = {"name": name, "status": "skipped", "reason": why, "repeat": rep}
                        runs[name].append(r)
                        progress.advance(_summary_line(rep, name, r, 0.0))
                        continue
                    if budget is None and name != "unmanaged":
                        if unmanaged_peak is None:
                            raise _BudgetUnresolved(cfg.budget_text)
                        act = 0
                        if cfg.budget_of_activations:
                            act = activation_peak_bytes(cfg)
                            meta["activation_peak_bytes"] = act
                        budget = parse_budget(cfg.budget_text).resolve_peaks(unmanaged_peak, act)
                    if name == "microbatch" and microbatches is None:
                        if unmanaged_peak is None or param_bytes is None:
                            r = {"name": name, "status": "skipped",
                                 "reason": "micro-batch count needs the unmanaged peak (unmanaged did not run); give --microbatches"}
                            runs[name].append(r)
                            progress.advance(_summary_line(rep, name, r, 0.0))
                            continue
                        microbatches, mb_fits = choose_microbatches(cfg.batch, unmanaged_peak, param_bytes, budget)
                    progress.describe(f"rep {rep}/{cfg.repeats} · {name}")
                    r, wall = run_worker(spec_for(name), workdir, f"rep{rep}-{name}", cfg.run_timeout)
                    r["repeat"] = rep
                    r["wall_s"] = wall
                    runs[name].append(r)
                    if name == "unmanaged" and unmanaged_peak is None and r.get("status") == "ok":
                        unmanaged_peak, param_bytes = r["peak_bytes"], r.get("param_bytes")
                    progress.advance(_summary_line(rep, name, r, wall))
                    if cfg.json_path:  # partial results survive an interrupted run
                        _write_json(cfg.json_path, summarise(cfg, {k: v for k, v in runs.items() if v},
                                                             budget, microbatches, mb_fits))
                    if budget is None and name == "unmanaged" and unmanaged_peak is None:
                        raise _BudgetUnresolved(cfg.budget_text, r.get("status"), r.get("reason"))
    finally:
        if not cfg.log_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        if not cfg.nvme_dir:
            shutil.rmtree(nvme_dir, ignore_errors=True)
    meta.update(nvme_dir=cfg.nvme_dir or "(temporary)", budget_bytes=budget, unmanaged_peak_first=unmanaged_peak, microbatches=microbatches,
                microbatches_fit=mb_fits, log_dir=cfg.log_dir)
    return summarise(cfg, runs, budget, microbatches, mb_fits), meta


class _BudgetUnresolved(RuntimeError):
    def __init__(self, text: str, status: str | None = None, reason: str | None = None) -> None:
        why = f"unmanaged run {status}: {reason}" if status else "unmanaged did not run"
        super().__init__(f"budget {text} is a percentage of the unmanaged peak, but {why}; give --budget as a size (e.g. 8GiB)")


# ------------------------------------------------------------------ summary
def summarise(cfg: BenchConfig, runs: dict[str, list[dict[str, Any]]], budget: int | None,
              microbatches: int | None, mb_fits: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, rs in runs.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        statuses = [r.get("status") for r in rs]
        if ok and len(ok) == len(rs):
            status, reason = "ok", ""
        elif ok:
            bad = next(r for r in rs if r.get("status") != "ok")
            status, reason = "ok", f"{len(rs) - len(ok)} of {len(rs)} repeats {bad.get('status')}: {bad.get('reason', '')}"
        else:
            first = rs[0] if rs else {"status": "skipped", "reason": "did not run"}
            for s in ("oom", "error", "skipped"):
                if s in statuses:
                    first = next(r for r in rs if r.get("status") == s)
                    break
            status, reason = first.get("status", "error"), first.get("reason", "")
        sps = [r["samples_per_s"] for r in ok]
        peaks = [r["peak_bytes"] for r in ok]
        row: dict[str, Any] = {
            "name": name,
            "status": status,
            "reason": reason,
            "samples_per_s": statistics.median(sps) if sps else None,
            "samples_per_s_stat": "median over repeats of batch / median step time",
            "cpu_s_per_step": statistics.median([statistics.median(r["step_cpu_times"]) for r in ok
                                                 if r.get("step_cpu_times")]) if any(r.get("step_cpu_times") for r in ok) else None,
            "peak_bytes": max(peaks) if peaks else None,
            "peak_bytes_stat": "max over repeats of the peak above the baseline",
            "peak_bytes_median": statistics.median(peaks) if peaks else None,
            "peak_total_bytes": max((r["peak_total_bytes"] for r in ok), default=None),
            "peak_rss_default_bytes": max((r["peak_rss_default_bytes"] for r in ok if r.get("peak_rss_default_bytes") is not None), default=None),
            "kept_bytes": max((r["kept_bytes"] for r in ok if r.get("kept_bytes") is not None), default=None),
            "baseline_bytes": statistics.median([r["baseline_bytes"] for r in ok]) if ok else None,
            "peak_method": ok[0].get("peak_method") if ok else None,
            "omp_wait_policy": ok[0].get("omp_wait_policy") if ok else None,
            "repeats": len(ok),
            "repeats_run": len(rs),
            "budget_bytes": budget,
            "within_budget": (max(peaks) <= budget) if (peaks and budget) else None,
            "state_peak_bytes": max((r["state_peak_bytes"] for r in ok if r.get("state_peak_bytes") is not None),
                                    default=None),  # the state bench: [Note: what "state peak" is]
            "reported_apart": name in REPORTED_APART,
            "ratio_to_unmanaged": None,
            "peak_ratio_to_unmanaged": None,
            "ratio_to_checkpoint": None,
            "model": cfg.model, "batch": cfg.batch, "res": cfg.res, "device": cfg.device, "amp": cfg.amp,
            "channels_last": cfg.channels_last, "steps": cfg.steps, "warmup": cfg.warmup,
            "notes": ok[-1].get("notes", {}) if ok else {},
            "per_repeat": [
                {k: r.get(k) for k in ("repeat", "status", "reason", "samples_per_s", "samples_per_s_total",
                                       "peak_bytes", "peak_total_bytes", "baseline_bytes", "peak_rss_default_bytes",
                                       "kept_bytes", "peak_method", "step_times", "step_cpu_times",
                                       "setup_s", "warmup_s", "wall_s", "losses", "steps_done", "state_peak_bytes")}
                for r in rs
            ],
        }
        if row["state_peak_bytes"] is not None:  # the state bench's budget is the fast tier for states
            row["within_budget"] = row["state_peak_bytes"] <= budget if budget else None
        if name == "microbatch" and microbatches:
            row["notes"] = {**row["notes"], "microbatches": microbatches, "estimated_to_fit": mb_fits,
                            "caveat": "BatchNorm sees micro-batches: statistics differ from the full batch"}
        gpu = next((r.get("gpu") for r in ok if r.get("gpu")), None)
        if gpu:
            row["gpu"] = gpu
        rows.append(row)
    by = {r["name"]: r for r in rows}
    for r in rows:
        for ref, key in (("unmanaged", "ratio_to_unmanaged"), ("checkpoint", "ratio_to_checkpoint")):
            base = by.get(ref)
            if base and base["samples_per_s"] and r["samples_per_s"]:
                r[key] = r["samples_per_s"] / base["samples_per_s"]
        base = by.get("unmanaged")
        if base and base["peak_bytes"] and r["peak_bytes"] is not None:
            r["peak_ratio_to_unmanaged"] = r["peak_bytes"] / base["peak_bytes"]
        r["losses_match_unmanaged"] = _losses_match(runs.get("unmanaged", []), runs.get(r["name"], []))
    return rows


def _write_json(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    os.replace(tmp, path)


def _losses_match(ref_runs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> bool | None:
    """Same losses step for step as unmanaged (bitwise), over the common prefix; None if unknown."""
    ref = next((r.get("losses") for r in ref_runs if r.get("status") == "ok" and r.get("losses")), None)
    mine = [r.get("losses") for r in runs if r.get("status") == "ok" and r.get("losses")]
    if not ref or not mine:
        return None
    return all(a[: min(len(a), len(ref))] == ref[: min(len(a), len(ref))] for a in mine)


# ------------------------------------------------------------------ entry point
def _error(msg: str) -> int:
    print(f"memstrata bench: error: {msg}", file=sys.stderr)
    return 2


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of `memstrata bench` (argparse namespace from `add_bench_arguments`)."""
    try:
        cfg = config_from_args(args)
    except BenchInputError as e:
        return _error(str(e))
    from .report import make_console, print_header, print_table, write_plot

    console = make_console()
    if not cfg.quiet:
        if is_gpt2(cfg.model):
            from .states_harness import print_states_header

            print_states_header(console, cfg)
        else:
            print_header(console, cfg)
    t0 = time.perf_counter()
    try:
        rows, meta = run_all(cfg)
    except _BudgetUnresolved as e:
        print(f"memstrata bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memstrata bench: interrupted", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    if is_gpt2(cfg.model):
        from .states_harness import print_states_table

        print_states_table(console, rows, cfg, meta, elapsed)
    else:
        print_table(console, rows, cfg, meta, elapsed)
    if cfg.json_path:
        _write_json(cfg.json_path, rows)
        console.print(f"results: {cfg.json_path}")
    if cfg.plot_path:
        write_plot(cfg.plot_path, rows, cfg, meta)
        console.print(f"chart: {cfg.plot_path}")
    if any(r["status"] == "error" for r in rows):
        return 1
    return 0


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """`python -m memstrata.bench` (the same options as `memstrata bench`)."""
    p = _OneLineParser(prog="memstrata bench", description="Benchmark memstrata against its peers.")
    add_bench_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return run_bench(args)
