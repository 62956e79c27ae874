"""Table (rich) and chart (matplotlib) of a `memstrata bench` run."""

from __future__ import annotations

import re

from typing import Any


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def make_console():
    """The rich console on stdout: no line broken at 80 columns in a file or pipe (logs).

    See [Note: console width] in memstrata/cli_args.py.
    """
    from memstrata.cli_args import stdout_console

    return stdout_console()


def print_header(console, cfg) -> None:
    budget = cfg.budget_text if cfg.budget_bytes is None else fmt_bytes(cfg.budget_bytes)
    if getattr(cfg, "pareto", False):
        budget = "s " + ", ".join(cfg.budget_texts)
    console.print(
        f"[bold]memstrata bench[/]  {cfg.model}  batch {cfg.batch}  {cfg.res}x{cfg.res}  {cfg.device}"
        f"  amp {cfg.amp}{'  channels_last' if cfg.channels_last else ''}  budget {budget}"
        f"  {cfg.repeats} repeats x ({cfg.warmup} warm-up + {cfg.steps} timed steps)"
        f"  contenders: {', '.join(cfg.contenders)}",
        highlight=False,
    )


def print_table(console, rows: list[dict[str, Any]], cfg, meta: dict[str, Any], elapsed: float) -> None:
    from rich.table import Table

    budget = meta.get("budget_bytes")
    title = (f"{cfg.model} · batch {cfg.batch} · {cfg.res}x{cfg.res} · {cfg.device} · amp {cfg.amp} · "
             f"budget {fmt_bytes(budget)}" + (f" ({cfg.budget_text} of unmanaged)" if cfg.budget_fraction and not cfg.budget_of_activations
                else f" (unmanaged peak less {100 - 100 * cfg.budget_fraction:g}% of its activation peak)"
                if cfg.budget_fraction else ""))
    method = next((r["peak_method"] for r in rows if r.get("peak_method")), "n/a")
    t = Table(title=title, caption=(
        f"samples/s: median of {cfg.repeats} alternating repeats; peak: max over repeats, above the "
        f"baseline ({method}); vs = samples/s ratio; wall {elapsed:.0f} s"
        + ("; CPU s/step: process CPU time per step, steadier than wall time on a shared box" if cfg.device == "cpu" else "")))
    t.add_column("contender", no_wrap=True)
    t.add_column("samples/s", justify="right", no_wrap=True)
    t.add_column("peak", justify="right", no_wrap=True)
    t.add_column("fits", justify="center")
    t.add_column("vs unmanaged", justify="right", no_wrap=True)
    t.add_column("vs checkpoint", justify="right", no_wrap=True)
    t.add_column("peak/unm.", justify="right")
    cpu = cfg.device == "cpu"
    if cpu:
        t.add_column("CPU s/step", justify="right", no_wrap=True)
    t.add_column("status", no_wrap=True)
    main_rows = [r for r in rows if not r["reported_apart"]]
    apart = [r for r in rows if r["reported_apart"]]
    notes: list[str] = []
    for r in main_rows + apart:
        if apart and r is apart[0]:
            t.add_section()
        status = r["status"]
        style = {"ok": "green", "oom": "red", "error": "red", "skipped": "yellow"}.get(status, "")
        text = f"[{style}]{status}[/]" if style else status
        if r.get("reason"):
            notes.append(f"{r['name']}: {status}: {r['reason']}")
            text += f" [{len(notes)}]"
        name = r["name"]
        if r["reported_apart"]:
            k = r.get("notes", {}).get("microbatches")
            name += f" k={k}" if k else ""
        if r.get("compiled"):
            name += " *"
            if r["name"] == "compile_memory_budget" and r.get("setting"):
                name += f" ({r['setting'].replace('activation_memory_budget=', 'amb=')})"
        fits = {True: "yes", False: "[red]no[/]", None: "-"}[r.get("within_budget")]
        cells = [
            name,
            "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.2f}",
            fmt_bytes(r["peak_bytes"]),
            fits,
            _ratio(r["ratio_to_unmanaged"]),
            _ratio(r["ratio_to_checkpoint"]),
            _ratio(r["peak_ratio_to_unmanaged"]),
        ]
        if cpu:
            c = r.get("cpu_s_per_step")
            cells.append("-" if c is None else f"{c:.2f}")
        t.add_row(*cells, text)
    console.print(t)
    if apart:
        console.print("below the line: reported apart (BatchNorm sees micro-batches, so the math differs)", highlight=False)
    if any(r.get("compiled") for r in rows):
        console.print("*: torch.compile (generated kernels: losses close to, not bitwise equal to, eager's; amb = "
                      "activation_memory_budget)", highlight=False)
    for i, n in enumerate(notes, 1):
        console.print(f"[{i}] {n}", highlight=False, markup=False)
    line = memstrata_line(rows)
    if line:
        console.print(line, highlight=False, markup=False)


def memstrata_line(rows: list[dict[str, Any]]) -> str:
    """One line on what memstrata did: its plan, predicted vs measured step, what tuning kept."""
    r = next((r for r in rows if r["name"] == "memstrata" and r.get("notes")), None)
    if r is None:
        return ""
    n = r["notes"]
    parts = []
    counts = " ".join(f"{k} {v}" for k, v in ((n.get("plan") or {}).get("counts") or {}).items() if v)
    if counts:
        parts.append(f"plan {counts}")
    last = n.get("last_step") or {}
    source = str(n.get("plan_source") or "")
    if source.startswith("given"):
        # [Note: one plan for every repeat] in plan_once.py: the plan's predicted time is on the planning run's
        # trace (op times scaled to its CPU time), not this repeat's clock: compare slowdowns, not milliseconds
        m = re.search(r"\(([0-9.]+)x\)", " ".join(map(str, (n.get("plan") or {}).get("notes") or ())))
        un = next((x for x in rows if x["name"] == "unmanaged" and x.get("samples_per_s")), None)
        pred = f"{float(m.group(1)):.3f}x" if m else "?"
        meas = (f"{un['samples_per_s'] / r['samples_per_s']:.3f}x" if un and r.get("samples_per_s") else "?")
        parts.append(f"the given plan predicted {pred} the unmanaged step (planning trace), measured {meas} "
                     "(unmanaged / memstrata samples/s)")
    elif last.get("predicted_seconds") and last.get("seconds"):
        parts.append(f"last step predicted {last['predicted_seconds'] * 1e3:.1f} ms, "
                     f"measured {last['seconds'] * 1e3:.1f} ms")
    tun = n.get("tuning")
    if tun and tun.get("trials"):
        tried = ", ".join(t["name"] for t in tun["trials"])
        parts.append(f"tuning tried {tried}; kept {tun.get('chosen')}")
    return ("memstrata: " + "; ".join(parts)) if parts else ""


_COLORS = {"memstrata": "#1f77b4", "peer": "#ff7f0e", "apart": "#999999"}


def write_plot(path: str, rows: list[dict[str, Any]], cfg, meta: dict[str, Any]) -> None:
    """Two horizontal bar panels, throughput and peak, one row per contender, with a legend for the colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def role(r):
        return "memstrata" if r["name"] == "memstrata" else "apart" if r["reported_apart"] else "peer"

    names = [r["name"] + (" (apart)" if r["reported_apart"] else "") for r in rows]
    colors = [_COLORS[role(r)] for r in rows]
    sps = [r["samples_per_s"] or 0.0 for r in rows]
    peaks = [(r["peak_bytes"] or 0) / 2**20 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 2.4 + 0.55 * len(rows)), sharey=True)
    ys = list(range(len(rows)))
    ax1.barh(ys, sps, color=colors)
    ax2.barh(ys, peaks, color=colors)
    ax1.set_yticks(ys)
    ax1.set_yticklabels(names, fontsize=10)
    ax1.invert_yaxis()  # first contender on top, as in the table
    ax1.set_xlabel("samples/s (median over repeats; higher is better)", fontsize=10)
    ax1.set_title("throughput", fontsize=11)
    ax2.set_xlabel("peak above baseline, MiB (max over repeats; lower is better)", fontsize=10)
    ax2.set_title("peak memory", fontsize=11)
    for ax, vals, label in ((ax1, sps, lambda r, v: f"{v:.1f}" + (f"  ({r['ratio_to_unmanaged']:.2f}x)"
                                                                  if r.get("ratio_to_unmanaged") else "")),
                            (ax2, peaks, lambda r, v: f"{v:.0f}")):
        top = max(vals, default=0) or 1.0
        ax.set_xlim(0, top * 1.3)  # room for the value labels
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=9)
        for i, (r, v) in enumerate(zip(rows, vals)):
            text = label(r, v) if r["status"] == "ok" else r["status"]
            ax.text(v + top * 0.01, i, text, va="center", fontsize=9, color="black" if r["status"] == "ok" else "red",
                    bbox=dict(facecolor="white", alpha=0.8, lw=0, pad=1))
    handles = [Patch(color=_COLORS["memstrata"], label="memstrata"), Patch(color=_COLORS["peer"], label="peers")]
    if any(r["reported_apart"] for r in rows):
        handles.append(Patch(color=_COLORS["apart"], label="reported apart (micro-batches: other math)"))
    budget = meta.get("budget_bytes")
    if budget:
        ax2.axvline(budget / 2**20, color="red", linestyle="--")
        handles.append(Line2D([], [], color="red", linestyle="--", label=f"budget {fmt_bytes(budget)}"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(f"memstrata bench: {cfg.model}, batch {cfg.batch}, {cfg.res}x{cfg.res}, {cfg.device}, amp {cfg.amp}"
                 "  (throughput label: samples/s and ratio to unmanaged)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ several budgets: the Pareto view
def _section(r: dict[str, Any]) -> int:
    """0: identical math (eager); 1: compiled (same model, generated kernels); 2: reported apart."""
    return 2 if r.get("reported_apart") else 1 if r.get("compiled") else 0


def _fits_list(r: dict[str, Any]) -> str:
    fits = r.get("fits_budgets") or {}
    if r["status"] != "ok" or not fits:
        return "-"
    ok = [t for t, f in fits.items() if f]
    return ", ".join(ok) if ok else "[red]none[/]"


def best_per_budget(rows: list[dict[str, Any]], budgets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget: memstrata's arm for it, and the fastest other arm of each kind whose measured peak fits it.

    Kinds: identical-math peers (eager, bit-identical losses by construction), compiled peers.
    Micro-batching (other math) is left out, as in the table.
    """
    out = []
    ok = [r for r in rows if r["status"] == "ok" and r.get("peak_bytes") is not None and r.get("samples_per_s")]
    for b in budgets:
        text, cap = b["text"], b["bytes"]
        fits = [r for r in ok if r["peak_bytes"] <= cap]
        mine = next((r for r in rows if r["name"] == "memstrata" and r.get("budget_text") == text), None)
        peers = [r for r in fits if r["name"] not in ("memstrata", "unmanaged") and _section(r) == 0]
        compiled = [r for r in fits if _section(r) == 1 and r["name"] != "memstrata_compile"]
        best = max(peers, key=lambda r: r["samples_per_s"], default=None)
        best_c = max(compiled, key=lambda r: r["samples_per_s"], default=None)
        m_sps = mine["samples_per_s"] if mine and mine["status"] == "ok" else None
        mc = next((r for r in rows if r["name"] == "memstrata_compile" and r.get("budget_text") == text), None)
        mc_sps = mc["samples_per_s"] if mc and mc["status"] == "ok" else None
        out.append({
            "budget_text": text, "budget_bytes": cap,
            "memstrata_samples_per_s": m_sps,
            "memstrata_peak_bytes": mine.get("peak_bytes") if mine else None,
            "memstrata_fits": (mine["peak_bytes"] <= cap) if mine and mine.get("peak_bytes") is not None else None,
            "best_identical_peer": None if best is None else f"{best['name']} ({best['setting']})",
            "best_identical_peer_samples_per_s": best["samples_per_s"] if best else None,
            "memstrata_vs_best_identical_peer": (m_sps / best["samples_per_s"]) if (m_sps and best) else None,
            "best_compiled": None if best_c is None else f"{best_c['name']} ({best_c['setting']})",
            "best_compiled_samples_per_s": best_c["samples_per_s"] if best_c else None,
            "memstrata_vs_best_compiled": (m_sps / best_c["samples_per_s"]) if (m_sps and best_c) else None,
            # memstrata over the compiled model, against the compiled peers (torch.compile, its own knob)
            "memstrata_compile_samples_per_s": mc_sps,
            "memstrata_compile_peak_bytes": mc.get("peak_bytes") if mc else None,
            "memstrata_compile_fits": (mc["peak_bytes"] <= cap) if mc and mc.get("peak_bytes") is not None else None,
            "memstrata_compile_vs_best_compiled": (mc_sps / best_c["samples_per_s"]) if (mc_sps and best_c) else None,
        })
    return out


def print_pareto_table(console, rows: list[dict[str, Any]], cfg, meta: dict[str, Any], elapsed: float) -> None:
    """Several budgets: one row per (contender, setting), then who is fastest within each budget."""
    from rich.table import Table

    budgets = meta.get("budgets") or []
    method = next((r["peak_method"] for r in rows if r.get("peak_method")), "n/a")
    title = (f"{cfg.model} · batch {cfg.batch} · {cfg.res}x{cfg.res} · {cfg.device} · amp {cfg.amp} · budgets "
             + ", ".join(f"{b['text']} = {fmt_bytes(b['bytes'])}" for b in budgets))
    t = Table(title=title, caption=(
        f"samples/s: median of {cfg.repeats} alternating repeats; peak: max over repeats, above the baseline "
        f"({method}); fits: the budgets that peak is within; wall {elapsed:.0f} s"))
    for col, just in (("contender", "left"), ("setting", "left"), ("samples/s", "right"), ("peak", "right"),
                      ("peak/unm.", "right"), ("vs unmanaged", "right"), ("vs checkpoint", "right"),
                      ("fits", "left")):
        t.add_column(col, justify=just, no_wrap=col not in ("setting", "fits"))
    cpu = cfg.device == "cpu"
    if cpu:
        t.add_column("CPU s/step", justify="right", no_wrap=True)
    t.add_column("status", no_wrap=True)
    notes: list[str] = []
    ordered = sorted(rows, key=_section)
    for i, r in enumerate(ordered):
        if i and _section(r) != _section(ordered[i - 1]):
            t.add_section()
        status = r["status"]
        style = {"ok": "green", "oom": "red", "error": "red", "skipped": "yellow"}.get(status, "")
        text = f"[{style}]{status}[/]" if style else status
        if r.get("reason"):
            notes.append(f"{r['name']} ({r['setting']}): {status}: {r['reason']}")
            text += f" [{len(notes)}]"
        cells = [r["name"], r.get("setting") or "",
                 "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.2f}",
                 fmt_bytes(r["peak_bytes"]), _ratio(r["peak_ratio_to_unmanaged"]), _ratio(r["ratio_to_unmanaged"]),
                 _ratio(r["ratio_to_checkpoint"]), _fits_list(r)]
        if cpu:
            c = r.get("cpu_s_per_step")
            cells.append("-" if c is None else f"{c:.2f}")
        t.add_row(*cells, text)
    console.print(t)
    console.print("sections: eager, identical math | torch.compile (generated kernels: close to, not bitwise equal "
                  "to, eager) | reported apart (micro-batches: BatchNorm sees fewer samples)", highlight=False)
    for i, n in enumerate(notes, 1):
        console.print(f"[{i}] {n}", highlight=False, markup=False)

    b = Table(title="within each budget: memstrata vs the fastest peer whose measured peak fits it")
    per = best_per_budget(rows, budgets)
    mc = any(r["name"] == "memstrata_compile" for r in rows)
    cols = ["budget", "memstrata samples/s", "fits", "best identical-math peer", "samples/s", "memstrata vs it",
            "best compiled peer", "samples/s ", "memstrata vs it "]
    if mc:
        cols += ["memstrata_compile samples/s", "fits ", "memstrata_compile vs it"]
    for col in cols:
        b.add_column(col, justify="left" if col.startswith(("budget", "best", "fits")) else "right")
    yes = {True: "yes", False: "[red]no[/]", None: "-"}
    for p in per:
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        cells = [f"{p['budget_text']} ({fmt_bytes(p['budget_bytes'])})", f(p["memstrata_samples_per_s"]),
                 yes[p["memstrata_fits"]],
                 p["best_identical_peer"] or "none fits", f(p["best_identical_peer_samples_per_s"]),
                 _ratio(p["memstrata_vs_best_identical_peer"]), p["best_compiled"] or "none fits",
                 f(p["best_compiled_samples_per_s"]), _ratio(p["memstrata_vs_best_compiled"])]
        if mc:
            cells += [f(p["memstrata_compile_samples_per_s"]), yes[p["memstrata_compile_fits"]],
                      _ratio(p["memstrata_compile_vs_best_compiled"])]
        b.add_row(*cells)
    console.print(b)


def _short_setting(r: dict[str, Any]) -> str:
    s = r.get("setting") or ""
    if r["name"] in ("memstrata", "memstrata_compile") and r.get("budget_text"):
        return r["budget_text"]
    return s.replace("activation_memory_budget=", "amb=")


_LINE_STYLE = {
    "memstrata": dict(color="#1f77b4", lw=2.5, marker="o", ms=8, zorder=5),
    "checkpoint": dict(color="#d62728", marker="s"),
    "selective_checkpoint": dict(color="#ff7f0e", marker="D"),
    "save_on_cpu": dict(color="#8c564b", marker="v"),
    "disk_offload_hooks": dict(color="#7f7f7f", marker="x"),
    "trl_offload": dict(color="#e377c2", marker="P"),
    "compile": dict(color="#2ca02c", marker="^"),
    "compile_memory_budget": dict(color="#2ca02c", marker="^", ls="--"),
    "memstrata_compile": dict(color="#17becf", lw=2.5, marker="o", ms=8, ls="--", zorder=5),
    "microbatch": dict(color="#aaaaaa", marker=".", ls=":"),
}


def write_pareto_plot(path: str, rows: list[dict[str, Any]], cfg, meta: dict[str, Any]) -> None:
    """samples/s against measured peak, one line per contender (its settings by peak), unmanaged as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get("peak_bytes") is not None and r.get("samples_per_s")]
    fig, ax = plt.subplots(figsize=(11, 6.5))
    mib = lambda n: n / 2**20  # noqa: E731
    names = list(dict.fromkeys(r["name"] for r in ok))
    for name in names:
        pts = sorted((r for r in ok if r["name"] == name), key=lambda r: r["peak_bytes"])
        xs = [mib(r["peak_bytes"]) for r in pts]
        ys = [r["samples_per_s"] for r in pts]
        if name == "unmanaged":
            ax.axhline(ys[0], color="black", lw=1, ls="--", alpha=0.6)
            ax.plot(xs, ys, marker="*", ms=14, color="black", ls="none", label="unmanaged (ceiling)", zorder=6)
            continue
        style = dict(_LINE_STYLE.get(name, dict(marker="o")))
        label = name + (" (compiled)" if name == "compile_memory_budget" else "") + (
            " (other math)" if pts[0].get("reported_apart") else "")
        ax.plot(xs, ys, label=label, **style)
        for r, x, y in zip(pts, xs, ys):
            s = _short_setting(r)
            if len(pts) > 1 and s:
                ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=8,
                            color=style.get("color", "black"))
    top = max((r["samples_per_s"] for r in ok), default=1.0)
    for b in meta.get("budgets") or []:
        if b.get("bytes"):
            ax.axvline(mib(b["bytes"]), color="red", ls=":", lw=1.2, alpha=0.8)
            ax.text(mib(b["bytes"]), top * 1.07, f" budget {b['text']}", color="red", fontsize=8, rotation=90,
                    va="top", ha="right")
    ax.set_ylim(0, top * 1.1)
    ax.set_xlim(left=0)
    ax.set_xlabel("measured peak above the baseline, MiB (max over repeats; left is better)")
    ax.set_ylabel("samples/s (median over repeats; up is better)")
    ax.grid(alpha=0.3)
    failed = [f"{r['name']} ({r.get('setting')}): {r['status']}" for r in rows if r["status"] != "ok"]
    if failed:
        ax.text(0.01, 0.01, "not on the chart: " + "; ".join(failed), transform=ax.transAxes, fontsize=7,
                color="gray", va="bottom", wrap=True)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(f"memstrata bench: {cfg.model}, batch {cfg.batch}, {cfg.res}x{cfg.res}, {cfg.device}, amp {cfg.amp}: "
                 "throughput against peak memory", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
