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
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .contenders import BUDGET_KNOBS, COMPILED, CONTENDERS, FIXED_SETTINGS, REPORTED_APART, skip_reason
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
    precision: str = "fp32"  # GPT-2 models: fp32, or bf16 parameters with fp32 master weights
    nvme_bw: tuple[float, float] | None = None  # state bench: probed NVMe (read, write) bytes/s
    budget_texts: list[str] = field(default_factory=list)  # every budget (--budgets); [budget_text] for --budget
    memstrata_plan: str = "each"  # once | each | a plan file ([Note: one plan for every repeat] in plan_once.py)

    @property
    def pareto(self) -> bool:
        """Several budgets (--budgets a,b,...): the Pareto table and chart instead of the one-budget ones."""
        return len(self.budget_texts) > 1


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
    a("--budget", default=None, help="memory budget above the baseline: a size (512MiB, 12GiB), a percentage of "
      "the unmanaged peak (50%%), or P%%act: the unmanaged peak less (100-P)%% of its activation peak (default 50%%act)")
    a("--budgets", default=None, metavar="B1,B2,...",
      help="several budgets, comma-separated (30%%act,50%%act,70%%act): memstrata at each, every peer at each of its "
      "settings; a Pareto table and chart (samples/s against measured peak). Instead of --budget")
    a("--repeats", default="3", help="alternating repeats per contender (default 3)")
    a("--memstrata-plan", default="auto", metavar="once|each|FILE",
      help="once: one untimed planning run per budget, its plan run by every memstrata repeat (default on CPU); "
      "each: every repeat traces and plans in its own Manager (default on CUDA, where the Manager tunes to its "
      "measured peak); FILE: run the plan a planning run wrote (one budget)")
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
    a("--precision", default="fp32", metavar="fp32|bf16",
      help="parameters for --model gpt2-*: fp32 (default), or bf16 with fp32 master weights (memstrata.MasterWeights "
      "over AdamW) on every arm; unmanaged and memstrata only")


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


def parse_budget_list(text: str) -> list[str]:
    """--budgets "30%act,50%act,70%act" -> the budget texts, each checked by `parse_budget`.

    BenchInputError (one line) for an empty list or item, a malformed budget or a repeated one.

    >>> parse_budget_list(" 30%act, 50%act ,1GiB")
    ['30%act', '50%act', '1GiB']
    """
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise BenchInputError("--budgets is empty: give budgets separated by commas (30%act,50%act,70%act)")
    if not all(items):
        raise BenchInputError(f"--budgets {text!r} has an empty item")
    seen: dict[tuple[str, float], str] = {}
    for t in items:
        b = parse_budget(t)
        same = (b.kind, round(b.value, 9))
        if same in seen:
            raise BenchInputError(f"--budgets {text!r}: {t!r} repeats {seen[same]!r}")
        seen[same] = t
    return items


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
        if model.lower().startswith("gpt"):  # the optimizer-state bench's models are not torchvision's
            from .gpt2 import GPT2_MODELS
            close = list(GPT2_MODELS)
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

    if g("budget") is not None and g("budgets") is not None:
        raise BenchInputError("give --budget or --budgets, not both")
    if g("budgets") is not None:
        budget_texts = parse_budget_list(g("budgets"))
    else:
        budget_texts = [str(g("budget") or DEFAULT_BUDGET).strip()]
    budget_text = budget_texts[0]
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
    mp = str(g("memstrata_plan", "auto") or "auto")
    if mp == "auto":
        mp = "each" if device == "cuda" else "once"
    if mp not in ("once", "each"):
        if not os.path.isfile(mp):
            raise BenchInputError(f"--memstrata-plan {mp!r}: not once, each or an existing plan file")
        if len(budget_texts) > 1:
            raise BenchInputError("--memstrata-plan FILE takes one budget (--budget), not --budgets")
        mp = os.path.abspath(mp)
    cfg = BenchConfig(
        memstrata_plan=mp,
        model=model,
        batch=batch,
        res=_int("res", g("res") or d["res"], lo=16),
        device=device,
        steps=_int("steps", g("steps") or d["steps"]),
        warmup=_int("warmup", g("warmup") if g("warmup") is not None else d["warmup"], lo=0),
        repeats=_int("repeats", g("repeats") or 3),
        amp=amp,
        budget_text=budget_text,
        budget_texts=budget_texts,
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


# [Note: arms] One *arm* is one (contender, setting) pair: what one row of the
# table, one object of the JSON and one point of the Pareto chart stand for.
# Contenders with a knob (`BUDGET_KNOBS`) get one arm per budget: memstrata the
# budget itself, microbatch the k chosen for it, compile_memory_budget the
# budget's fraction as `activation_memory_budget`.  Two budgets that give the
# same setting (the same k, the same fraction) share one arm, labelled with the
# smaller budget.  Every other contender has one arm.  With one budget every
# contender has exactly one arm, so the JSON has one object per contender as
# it always had.
@dataclass(frozen=True)
class Arm:
    name: str  # the contender
    budget_index: int | None = None  # the budget it is set from (BUDGET_KNOBS), else None
    setting: str = ""
    microbatches: int = 1
    microbatches_fit: bool = True  # microbatch: the estimate says k fits the budget
    fraction: float | None = None  # compile_memory_budget
    skip: str | None = None  # why it cannot run, known before starting a worker

    def key(self, pareto: bool) -> str:
        return f"{self.name}@{self.budget_index}" if pareto and self.budget_index is not None else self.name


def initial_arms(cfg: BenchConfig) -> list[Arm]:
    """Arms in run order: contenders in canonical order (unmanaged first), knobbed ones once per budget."""
    arms: list[Arm] = []
    for name in cfg.contenders:
        if name in BUDGET_KNOBS:
            arms += [Arm(name, i, setting=f"budget {t}") for i, t in enumerate(cfg.budget_texts)]
        else:
            arms.append(Arm(name, setting=FIXED_SETTINGS.get(name, "")))
    return arms


def resolve_budgets(cfg: BenchConfig, unmanaged_peak: int | None) -> tuple[list[int], int | None]:
    """Each budget in bytes (and the activation peak when a P%act budget needed it)."""
    act = None
    if any(parse_budget(t).kind == "activations" for t in cfg.budget_texts):
        act = activation_peak_bytes(cfg)
    out = []
    for t in cfg.budget_texts:
        b = parse_budget(t)
        if b.kind != "bytes" and unmanaged_peak is None:
            raise _BudgetUnresolved(t)
        out.append(b.resolve_peaks(unmanaged_peak or 0, act or 0))
    return out, act


def memory_budget_fraction(text: str, budget_bytes: int, unmanaged_peak: int | None) -> float | None:
    """compile_memory_budget's `activation_memory_budget` for one bench budget.

    "P%act" and "P%" give P/100 (capped at 1): compile's knob is the fraction of
    the activation bytes its default partition saves, the closest thing to
    "keep P% of the saved activations".  A size gives size / unmanaged peak
    (None when that peak is unknown).
    """
    b = parse_budget(text)
    if b.kind in ("peak", "activations"):
        return min(1.0, float(b.value))
    if unmanaged_peak:
        return min(1.0, budget_bytes / unmanaged_peak)
    return None


def _settle(arm: Arm, cfg: BenchConfig, budgets: list[int], unmanaged_peak: int | None,
            param_bytes: int | None) -> Arm:
    if arm.budget_index is None:
        return arm
    i = arm.budget_index
    if arm.name == "microbatch":
        if cfg.microbatches is not None:
            k, fits = cfg.microbatches, True
        elif unmanaged_peak is None or param_bytes is None:
            return replace(arm, skip="micro-batch count needs the unmanaged peak (unmanaged did not run); "
                                     "give --microbatches")
        else:
            k, fits = choose_microbatches(cfg.batch, unmanaged_peak, param_bytes, budgets[i])
        return replace(arm, microbatches=k, microbatches_fit=fits, setting=f"k={k}")
    if arm.name == "compile_memory_budget":
        f = memory_budget_fraction(cfg.budget_texts[i], budgets[i], unmanaged_peak)
        if f is None:
            return replace(arm, skip="activation_memory_budget for a size budget needs the unmanaged peak "
                                     "(unmanaged did not run)")
        return replace(arm, fraction=f, setting=f"activation_memory_budget={f:g}")
    return arm


def settle_arms(arms: list[Arm], cfg: BenchConfig, budgets: list[int], unmanaged_peak: int | None,
                param_bytes: int | None) -> list[Arm]:
    """Set every knobbed arm from its budget; drop arms whose setting repeats one at a smaller budget."""
    arms = [_settle(arm, cfg, budgets, unmanaged_peak, param_bytes) for arm in arms]
    kept: dict[tuple[str, str], Arm] = {}
    for arm in sorted(arms, key=lambda a: budgets[a.budget_index] if a.budget_index is not None else -1):
        if arm.name in ("microbatch", "compile_memory_budget") and not arm.skip:
            kept.setdefault((arm.name, arm.setting), arm)
    return [a for a in arms if a.name not in ("microbatch", "compile_memory_budget") or a.skip
            or kept[(a.name, a.setting)] is a]


def _tag(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def run_all(cfg: BenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every arm `cfg.repeats` times, alternating; returns (summary list, meta)."""
    workdir = cfg.log_dir or tempfile.mkdtemp(prefix="memstrata-bench-")
    os.makedirs(workdir, exist_ok=True)
    nvme_dir = cfg.nvme_dir or tempfile.mkdtemp(prefix="memstrata-bench-nvme-")
    arms = initial_arms(cfg)
    runs: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, Any] = {"budget_source": "size" if cfg.budget_bytes is not None else "percentage"}
    budgets: list[int] | None = None
    act_peak: int | None = None
    unmanaged_peak: int | None = None
    param_bytes: int | None = None

    plan_paths: dict[str, str] = {}  # arm key -> the plan every memstrata repeat runs
    plan_runs: dict[str, dict[str, Any]] = {}  # arm key -> its planning run's result

    def spec_for(arm: Arm, steps: int | None = None, warmup: int | None = None) -> RunSpec:
        if arm.budget_index is not None and budgets:
            budget = budgets[arm.budget_index]
        else:  # one budget: every contender is told it (as before); several: no knob, no budget
            budget = budgets[0] if budgets and not cfg.pareto else None
        return RunSpec(
            contender=arm.name, model=cfg.model, batch=cfg.batch, res=cfg.res, device=cfg.device,
            steps=steps or cfg.steps, warmup=cfg.warmup if warmup is None else warmup,
            num_classes=cfg.num_classes, amp=cfg.amp, channels_last=cfg.channels_last, seed=cfg.seed,
            budget_bytes=budget, microbatches=arm.microbatches, nvme_dir=nvme_dir,
            unmanaged_peak_bytes=unmanaged_peak,
            max_seconds=cfg.max_seconds, threads=cfg.threads, cpu_peak=cfg.cpu_peak, seq=cfg.seq, precision=cfg.precision,
            setting=arm.setting, memory_budget_fraction=arm.fraction,
            nvme_read_bw=cfg.nvme_bw[0] if cfg.nvme_bw else None, nvme_write_bw=cfg.nvme_bw[1] if cfg.nvme_bw else None,
            plan_path=plan_paths.get(arm.key(cfg.pareto)) if arm.name == "memstrata" else None,
        )

    def plan_memstrata(arm: Arm, progress: BenchProgress) -> None:
        """[Note: one plan for every repeat] in plan_once.py: the planning run, before the first repeat."""
        key = arm.key(cfg.pareto)
        if cfg.memstrata_plan == "each" or key in plan_runs:
            return
        if cfg.memstrata_plan != "once":  # a plan file
            plan_paths[key] = cfg.memstrata_plan
            plan_runs[key] = {"status": "ok", "plan_path": cfg.memstrata_plan, "source": "file"}
            return
        spec = spec_for(arm)
        spec.plan_only = True
        spec.plan_path = os.path.join(workdir, f"plan-{_tag(key)}.json")
        progress.describe(f"planning · {key}")
        r, wall = run_worker(spec, workdir, _tag(f"plan-{key}"), cfg.run_timeout)
        r["wall_s"] = wall
        r["source"] = "planning run"
        plan_runs[key] = r
        if r.get("status") == "ok":
            plan_paths[key] = spec.plan_path
        info = r.get("plan_info") or {}
        progress.advance(f"  plan  {key:<21} {r.get('status')}: {info.get('chosen', r.get('reason', ''))}  ({wall:.1f} s)")

    def settle() -> None:
        nonlocal budgets, act_peak, arms
        budgets, act_peak = resolve_budgets(cfg, unmanaged_peak)
        arms = settle_arms(arms, cfg, budgets, unmanaged_peak, param_bytes)

    def summary() -> list[dict[str, Any]]:
        done = [a for a in arms if runs.get(a.key(cfg.pareto))]
        rows = summarise(cfg, done, runs, budgets or [])
        for a, row in zip(done, rows):
            pr = plan_runs.get(a.key(cfg.pareto))
            if pr is not None:
                row["plan_once"] = {k: pr.get(k) for k in ("status", "reason", "source", "plan_path", "plan_info",
                                                          "plan", "wall_s")}
        return rows

    def total_runs() -> int:
        plans = sum(a.name == "memstrata" and not a.skip for a in arms) if cfg.memstrata_plan == "once" else 0
        return cfg.repeats * len(arms) + (1 if need_calibration else 0) + plans

    kinds = [parse_budget(t).kind for t in cfg.budget_texts]
    needs_peak = any(k != "bytes" for k in kinds) or (
        cfg.microbatches is None and "microbatch" in cfg.contenders) or (
        "compile_memory_budget" in cfg.contenders and "bytes" in kinds)
    need_calibration = "unmanaged" not in cfg.contenders and needs_peak
    builds = None
    if is_gpt2(cfg.model):  # [Note: the DeepSpeed build] in states_prebuild.py
        from .states_prebuild import start_peer_builds

        builds = start_peer_builds(cfg.contenders, cfg.device, workdir, cfg.run_timeout)
    try:
        with BenchProgress(total_runs(), cfg.quiet) as progress:
            if need_calibration:
                progress.describe("calibrating: unmanaged peak")
                r, wall = run_worker(spec_for(Arm("unmanaged"), steps=1, warmup=1), workdir, "calibrate-unmanaged",
                                     cfg.run_timeout)
                progress.advance(_summary_line(0, "unmanaged (calibration)", r, wall))
                meta["calibration"] = {k: r.get(k) for k in ("status", "reason", "peak_bytes", "samples_per_s")}
                if r.get("status") == "ok":
                    unmanaged_peak, param_bytes = r["peak_bytes"], r.get("param_bytes")
                elif any(k != "bytes" for k in kinds):
                    raise _BudgetUnresolved(cfg.budget_text, r.get("status"), r.get("reason"))
            for rep in range(1, cfg.repeats + 1):
                i = 0
                while i < len(arms):
                    if budgets is None and arms[i].name != "unmanaged":
                        settle()  # [Note: arms]: unmanaged (index 0) has run, or a calibration run stood in
                        progress.set_total(total_runs())
                    arm = arms[i]
                    i += 1
                    key = arm.key(cfg.pareto)
                    label = key if not cfg.pareto else f"{arm.name} {arm.setting}".strip()
                    why = (states_skip_reason if is_gpt2(cfg.model) else skip_reason)(arm.name, cfg.device) or arm.skip
                    if why:
                        r = {"name": arm.name, "setting": arm.setting, "status": "skipped", "reason": why, "repeat": rep}
                        runs.setdefault(key, []).append(r)
                        progress.advance(_summary_line(rep, label, r, 0.0))
                        continue
                    if arm.name == "memstrata":
                        plan_memstrata(arm, progress)
                    progress.describe(f"rep {rep}/{cfg.repeats} · {label}")
                    r, wall = run_worker(spec_for(arm), workdir, _tag(f"rep{rep}-{key}"), cfg.run_timeout)
                    r["repeat"] = rep
                    r["wall_s"] = wall
                    runs.setdefault(key, []).append(r)
                    if arm.name == "unmanaged" and unmanaged_peak is None and r.get("status") == "ok":
                        unmanaged_peak, param_bytes = r["peak_bytes"], r.get("param_bytes")
                    progress.advance(_summary_line(rep, label, r, wall))
                    if budgets is None and arm.name == "unmanaged" and unmanaged_peak is None and needs_peak:
                        if any(k != "bytes" for k in kinds):
                            raise _BudgetUnresolved(cfg.budget_text, r.get("status"), r.get("reason"))
                    if cfg.json_path:  # partial results survive an interrupted run
                        _write_json(cfg.json_path, summary())
            if budgets is None:  # only unmanaged ran
                settle()
    finally:
        if builds is not None:
            builds.stop()
        if not cfg.log_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        if not cfg.nvme_dir:
            shutil.rmtree(nvme_dir, ignore_errors=True)
    mb = next((a for a in arms if a.name == "microbatch" and not a.skip), None)
    meta.update(nvme_dir=cfg.nvme_dir or "(temporary)", budget_bytes=(budgets or [None])[0],
                budgets=[{"text": t, "bytes": b} for t, b in zip(cfg.budget_texts, budgets or [])],
                activation_peak_bytes=act_peak, unmanaged_peak_first=unmanaged_peak,
                microbatches=mb.microbatches if mb else cfg.microbatches,
                microbatches_fit=mb.microbatches_fit if mb else True, log_dir=cfg.log_dir)
    return summary(), meta


class _BudgetUnresolved(RuntimeError):
    def __init__(self, text: str, status: str | None = None, reason: str | None = None) -> None:
        why = f"unmanaged run {status}: {reason}" if status else "unmanaged did not run"
        super().__init__(f"budget {text} is a percentage of the unmanaged peak, but {why}; give --budget as a size (e.g. 8GiB)")


# ------------------------------------------------------------------ summary
def summarise(cfg: BenchConfig, arms: list[Arm], runs: dict[str, list[dict[str, Any]]],
              budgets: list[int]) -> list[dict[str, Any]]:
    """One row per arm (see [Note: arms]), in run order."""
    rows: list[dict[str, Any]] = []
    for arm in arms:
        name = arm.name
        rs = runs.get(arm.key(cfg.pareto), [])
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
        if arm.budget_index is not None and budgets:
            budget: int | None = budgets[arm.budget_index]
            budget_text: str | None = cfg.budget_texts[arm.budget_index]
        elif budgets and not cfg.pareto:
            budget, budget_text = budgets[0], cfg.budget_texts[0]
        else:
            budget, budget_text = None, None
        row: dict[str, Any] = {
            "name": name,
            "setting": arm.setting,
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
            "cuda_alloc_conf": ok[0].get("cuda_alloc_conf") if ok else None,
            "repeats": len(ok),
            "repeats_run": len(rs),
            "budget_bytes": budget,
            "budget_text": budget_text,
            "within_budget": (max(peaks) <= budget) if (peaks and budget) else None,
            "state_peak_bytes": max((r["state_peak_bytes"] for r in ok if r.get("state_peak_bytes") is not None),
                                    default=None),  # the state bench: [Note: what "state peak" is]
            "reported_apart": name in REPORTED_APART,
            "compiled": name in COMPILED,
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
                                       "setup_s", "warmup_s", "wall_s", "losses", "steps_done", "state_peak_bytes",
                                       "plan_path")}
                for r in rs
            ],
        }
        if row["state_peak_bytes"] is not None:  # the state bench's budget is the fast tier for states
            row["within_budget"] = row["state_peak_bytes"] <= budget if budget else None
        if cfg.pareto:
            row["fits_budgets"] = {t: (max(peaks) <= b) if peaks else None for t, b in zip(cfg.budget_texts, budgets)}
            row["budgets"] = [{"text": t, "bytes": b} for t, b in zip(cfg.budget_texts, budgets)]
        if name == "microbatch" and not arm.skip:
            row["notes"] = {**row["notes"], "microbatches": arm.microbatches, "estimated_to_fit": arm.microbatches_fit,
                            "caveat": "BatchNorm sees micro-batches: statistics differ from the full batch"}
        if name == "compile_memory_budget" and arm.fraction is not None:
            row["notes"] = {**row["notes"], "activation_memory_budget": arm.fraction}
        gpu = next((r.get("gpu") for r in ok if r.get("gpu")), None)
        if gpu:
            row["gpu"] = gpu
        rows.append(row)
    by = {}
    for r in rows:
        by.setdefault(r["name"], r)  # unmanaged and checkpoint have one arm each
    ref_runs = runs.get("unmanaged", [])
    for arm, r in zip(arms, rows):
        for ref, key in (("unmanaged", "ratio_to_unmanaged"), ("checkpoint", "ratio_to_checkpoint")):
            base = by.get(ref)
            if base and base["samples_per_s"] and r["samples_per_s"]:
                r[key] = r["samples_per_s"] / base["samples_per_s"]
        base = by.get("unmanaged")
        if base and base["peak_bytes"] and r["peak_bytes"] is not None:
            r["peak_ratio_to_unmanaged"] = r["peak_bytes"] / base["peak_bytes"]
        r["losses_match_unmanaged"] = _losses_match(ref_runs, runs.get(arm.key(cfg.pareto), []))
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
    from .report import make_console, print_header, print_pareto_table, print_table, write_pareto_plot, write_plot

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
        (print_pareto_table if cfg.pareto else print_table)(console, rows, cfg, meta, elapsed)
    if cfg.json_path:
        _write_json(cfg.json_path, rows)
        console.print(f"results: {cfg.json_path}")
    if cfg.plot_path:
        (write_pareto_plot if cfg.pareto else write_plot)(cfg.plot_path, rows, cfg, meta)
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
