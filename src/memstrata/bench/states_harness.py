"""`memstrata bench --model gpt2-*`: the optimizer-state bench's options and its table.

The harness (harness.py) runs it like the activation bench (one process per
contender and repeat, alternating, medians, the same JSON rows); this module
only reads the options that differ and prints the table.

* ``--budget``: the fast-tier bytes for optimizer states: a size, or a
  percentage of the AdamW states (8 bytes per parameter; 12 with ``--precision bf16``:
  the fp32 master too; default 50%).
* ``--precision bf16``: bf16 parameters, `MasterWeights` (fp32 masters and moments)
  over AdamW on the arms that run (unmanaged and the memstrata arms; the peers
  have their own mixed-precision regimes and are skipped).
* ``--seq`` tokens per sample, ``--batch`` samples (CPU: 256 x 1, at most the model's context; CUDA: 1024 x 8).
* The NVMe directory (``--nvme``, default a temporary directory) is probed
  with `memstrata probe` (cached); the memstrata contender plans with those
  bandwidths and the table shows what its steps moved against them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Callable

from . import gpt2
from .states_contenders import (CPU_DEFAULTS, CUDA_DEFAULTS, MASTER_WEIGHT_ARMS, PRECISIONS, STATES_CONTENDERS,
                                 precision_label, state_bytes)


def states_config_from_args(args: argparse.Namespace, config_cls: type, error: type[Exception], *,
                            resolve_device: Callable[[str], str], check_output_paths: Callable[..., None],
                            default_budget: str):
    """A `BenchConfig` for a GPT-2 model (errors: `error`, one line); the harness lends its helpers."""
    from memstrata.hardware import parse_size

    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    device = resolve_device(g("device", "auto"))
    d = CUDA_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    model = g("model")

    def pos_int(name: str, text: Any, lo: int = 1) -> int:
        try:
            v = int(str(text))
        except ValueError:
            raise error(f"--{name} must be an integer, got {text!r}") from None
        if v < lo:
            raise error(f"--{name} must be >= {lo}, got {v}")
        return v

    if g("contenders"):
        names = [c.strip() for c in str(g("contenders")).split(",") if c.strip()]
        bad = [c for c in names if c not in STATES_CONTENDERS]
        if bad:
            raise error(f"unknown contender {bad[0]!r} for {model}: choose from {', '.join(STATES_CONTENDERS)}")
        names = [c for c in STATES_CONTENDERS if c in names]
    else:
        names = list(STATES_CONTENDERS)
    precision = str(g("precision") or "fp32").strip().lower()
    precision = {"float32": "fp32", "bfloat16": "bf16"}.get(precision, precision)
    if precision not in PRECISIONS:
        raise error(f"--precision {g('precision')!r}: choose fp32 or bf16 (bf16 parameters with fp32 master weights)")
    if precision != "fp32" and not g("contenders"):
        names = [c for c in names if c in MASTER_WEIGHT_ARMS]
    text = str(g("budget") or "50%").strip()
    if text == default_budget:  # the activation bench's default ("50%act") means nothing here
        text = "50%"
    total = state_bytes(model, precision)
    if text.endswith("%"):
        try:
            frac = float(text[:-1]) / 100
        except ValueError:
            raise error(f"--budget {text!r}: a size (1GiB) or a percentage of the optimizer states (50%)") from None
        if not 0 < frac <= 1:
            raise error(f"--budget {text!r} must be in (0%, 100%] of the optimizer states")
        budget = int(total * frac)
    else:
        try:
            budget = parse_size(text)
        except ValueError as e:
            raise error(f"--budget {text!r}: {e}") from None
    seq = pos_int("seq", g("seq") or min(d["seq"], gpt2.GPT2_MODELS[model].ctx))  # the default within the context
    if seq > gpt2.GPT2_MODELS[model].ctx:
        raise error(f"--seq {seq} exceeds the context of {model} ({gpt2.GPT2_MODELS[model].ctx})")
    nvme = g("nvme")
    if nvme is not None and not (os.path.isdir(nvme) and os.access(nvme, os.W_OK | os.X_OK)):
        raise error(f"--nvme {nvme!r} is not an existing writable directory")
    check_output_paths(g("json_path"), g("plot_path"), error)
    cfg = config_cls(
        model=model, batch=pos_int("batch", g("batch") or d["batch"]), res=0, device=device,
        steps=pos_int("steps", g("steps") or d["steps"]),
        warmup=pos_int("warmup", g("warmup") if g("warmup") is not None else d["warmup"], lo=0),
        repeats=pos_int("repeats", g("repeats") or 3), amp="off", budget_text=text, budget_fraction=None,
        budget_bytes=budget, contenders=names, nvme_dir=os.path.abspath(nvme) if nvme else None,
        json_path=g("json_path"), plot_path=g("plot_path"), log_dir=g("log_dir"),
        max_seconds=float(g("max_seconds")) if g("max_seconds") is not None else None,
        run_timeout=float(g("run_timeout") or 900), threads=pos_int("threads", g("threads")) if g("threads") else None,
        quiet=bool(g("quiet", False)), seq=seq, precision=precision,
        budget_texts=[str(budget)],  # resolved here (a share of the states), so the harness sees bytes
    )
    if "memstrata" in names and device == "cpu":  # on CUDA the slow tier is pinned host RAM ([Note: states on CUDA])
        cfg.nvme_bw = probe_nvme(cfg.nvme_dir or tempfile.gettempdir())
    return cfg


def probe_nvme(directory: str) -> tuple[float, float] | None:
    """(read, write) bytes/s of the disk under `directory` from `memstrata probe` (cached), or None."""
    from memstrata.probe import probe

    try:
        nv = probe(directory).nvme_tier()
    except Exception:  # noqa: BLE001 - the planner falls back to the cpu profile's disk
        return None
    return (nv.read_bandwidth, nv.write_bandwidth) if nv is not None else None


def print_states_header(console, cfg) -> None:
    from .report import fmt_bytes

    console.print(
        f"[bold]memstrata bench[/]  {cfg.model} ({precision_label(cfg.precision)})  batch {cfg.batch} x {cfg.seq} "
        f"tokens  {cfg.device}  state budget {fmt_bytes(cfg.budget_bytes)} ({cfg.budget_text} of "
        f"{fmt_bytes(state_bytes(cfg.model, cfg.precision))})"
        f"  {cfg.repeats} repeats x ({cfg.warmup} warm-up + {cfg.steps} timed steps)"
        f"  contenders: {', '.join(cfg.contenders)}", highlight=False)


def print_states_table(console, rows: list[dict[str, Any]], cfg, meta: dict[str, Any], elapsed: float) -> None:
    from rich.table import Table

    from .report import fmt_bytes

    total = state_bytes(cfg.model, cfg.precision)
    cuda = cfg.device == "cuda"
    t = Table(title=f"{cfg.model} · {precision_label(cfg.precision)} · batch {cfg.batch} x {cfg.seq} · {cfg.device} · "
                    f"state budget {fmt_bytes(cfg.budget_bytes)} of {fmt_bytes(total)} states",
              caption=(f"samples/s: median of {cfg.repeats} alternating repeats; state peak: optimizer states on the "
                       f"fast tier; " + (
                           "process peak: CUDA max allocated above the built model; host I/O: state bytes moved "
                           "to and from pinned host RAM per step / median step time" if cuda else
                           "process peak: resident set above the built model (VmHWM); NVMe: bytes moved per "
                           "step / median step time (probe: read/write)") + f"; wall {elapsed:.0f} s"))
    for col, just in (("contender", "left"), ("samples/s", "right"), ("vs unmanaged", "right"),
                      ("state peak", "right"), ("fits", "center"), ("process peak", "right"),
                      ("host I/O" if cuda else "NVMe", "right"), ("same losses", "center"), ("status", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    notes: list[str] = []
    bw = cfg.nvme_bw
    for r in rows:
        status = r["status"]
        style = {"ok": "green", "oom": "red", "error": "red", "skipped": "yellow"}.get(status, "")
        text = f"[{style}]{status}[/]" if style else status
        if r.get("reason"):
            notes.append(f"{r['name']}: {status}: {r['reason']}")
            text += f" [{len(notes)}]"
        nv = "-"
        moved = (r.get("notes") or {}).get("nvme_bytes_per_step")
        if moved and r.get("samples_per_s"):
            step = cfg.batch / r["samples_per_s"]
            nv = f"{moved / step / 1e9:.2f} GB/s"
            if bw:
                nv += f" ({bw[0] / 1e9:.2f}/{bw[1] / 1e9:.2f})"
        ratio = r.get("ratio_to_unmanaged")
        same = {True: "yes", False: "[red]no[/]", None: "-"}[r.get("losses_match_unmanaged")]
        t.add_row(r["name"], "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.3f}",
                  "-" if ratio is None else f"{ratio:.2f}x", fmt_bytes(r.get("state_peak_bytes")),
                  {True: "yes", False: "[red]no[/]", None: "-"}[r.get("within_budget")], fmt_bytes(r.get("peak_bytes")),
                  nv, same, text)
    console.print(t)
    for i, n in enumerate(notes, 1):
        console.print(f"[{i}] {n}", highlight=False, markup=False)
    for name in ("memstrata", "memstrata_lowpeak", "memstrata_lowpeak_grads"):
        m = next((r for r in rows if r["name"] == name and r["status"] == "ok"), None)
        if m and m.get("notes", {}).get("plan"):
            console.print(f"{name}: {m['notes']['plan']}", highlight=False, markup=False)


__all__ = ["states_config_from_args", "print_states_header", "print_states_table", "probe_nvme"]
