"""Reports: what a plan does, as numbers (`summary_dict`), as rich tables
(`plan_summary`, `hierarchy_table`) and as a memory timeline picture
(`plot_timeline`).  Used by the CLI and by the benchmarks.

Everything here reads plain data (Trace, Plan, Timeline, Hierarchy); nothing
touches a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .hardware import Hierarchy, format_size

# ----------------------------------------------------------------------------- timeline view
# [Note: reading a Timeline]
# `simulate.Timeline` speaks in events: occupancy is (event start times, bytes
# during that event), stalls are (event, seconds), recomputes are (unit,
# event, seconds).  `_view` turns those into time intervals for drawing.  A
# stall or recompute inserted at event e happens after event_start[e] and
# before op e runs ([Note: simulation semantics] in simulate.py); we draw it
# starting at event_start[e] (recomputes first, then the stall), which is
# exact when only one of them is inserted at e.


@dataclass
class _View:
    step_time: float
    compute_time: float
    recompute_time: float
    stall_time: float
    peaks: dict[str, int]
    occupancy: dict[str, tuple[list[float], list[float]]]  # step plot: times (with the step end), bytes
    lanes: dict[str, list[tuple[float, float]]]
    stalls: list[tuple[float, float]]
    recompute: list[tuple[float, float]]
    bytes_moved: dict[str, int]
    forward_end_time: float | None
    backward_end_time: float | None


def _view(timeline: Any, trace: Any = None) -> _View:
    es = [float(t) for t in timeline.event_start]
    end = float(timeline.step_time)
    occupancy = {}
    for name, (ts, bs) in timeline.occupancy.items():
        ts, bs = [float(t) for t in ts], [float(b) for b in bs]
        if bs:  # close the last step at the step's end
            ts, bs = ts + [end], bs + [bs[-1]]
        occupancy[str(name)] = (ts, bs)

    def at(e: int) -> float:
        return es[e] if 0 <= e < len(es) else end

    rec_end: dict[int, float] = {}
    recompute = []
    for _unit, e, sec in timeline.recomputes:
        s0 = rec_end.get(e, at(e))
        recompute.append((s0, s0 + float(sec)))
        rec_end[e] = s0 + float(sec)
    stalls = []
    for e, sec in timeline.stalls:
        s0 = rec_end.get(e, at(e))
        stalls.append((s0, s0 + float(sec)))
    fwd = bwd = None
    if trace is not None:
        fwd = at(trace.forward_end + 1)
        bwd = at(trace.backward_end + 1)
    return _View(
        step_time=end,
        compute_time=float(timeline.compute_time),
        recompute_time=float(timeline.recompute_time),
        stall_time=float(timeline.stall_time),
        peaks={str(k): int(v) for k, v in timeline.peaks.items()},
        occupancy=occupancy,
        lanes={str(k): [(float(a), float(b)) for a, b in v] for k, v in timeline.busy.items()},
        stalls=stalls,
        recompute=recompute,
        bytes_moved={str(k): int(v) for k, v in timeline.bytes_moved.items()},
        forward_end_time=fwd,
        backward_end_time=bwd,
    )


# ----------------------------------------------------------------------------- numbers


def decision_summary(trace: Any, plan: Any) -> dict[str, dict[str, int]]:
    """{kind: {"count": n, "bytes": b}} over keep / offload:<tier> / recompute.

    "keep" counts the saved activations that stay in tier 0 (storages without
    a record are kept); "recompute" counts units, and as bytes the saved
    activations produced inside them that are re-run rather than kept
    (outputs of `save_ops` stay).  Parameters, gradients and optimizer states
    are not listed: this release keeps them in tier 0.
    """
    nbytes = {s.id: s.nbytes for s in trace.storages}
    out: dict[str, dict[str, int]] = {}

    def add(key: str, n: int, b: int) -> None:
        d = out.setdefault(key, {"count": 0, "bytes": 0})
        d["count"] += n
        d["bytes"] += b

    handled: set[int] = set()
    for d in plan.storages:
        if d.action == "offload":
            add(f"offload:{d.tier}", 1, nbytes.get(d.storage, 0))
            handled.add(d.storage)
    for r in getattr(plan, "replays", ()):
        add("replay", 1, nbytes.get(r.storage, 0))
        handled.add(r.storage)
    for kind, decs in (("recompute", [u for u in plan.units if not u.is_segment]),
                       ("segment", [u for u in plan.units if u.is_segment])):
        if not decs:
            continue
        rec_bytes = 0
        for ud in decs:
            keep_ops = set(ud.save_ops)
            for s in trace.storages:
                if (s.saved and s.kind == "activation" and s.unit is not None and ud.unit <= s.unit <= ud.last_unit
                        and s.producer not in keep_ops and s.id not in handled):
                    rec_bytes += s.nbytes
                    handled.add(s.id)
        add(kind, len(decs), rec_bytes)
    kept = [s for s in trace.saved_storages() if s.id not in handled]
    out["keep"] = {"count": len(kept), "bytes": sum(s.nbytes for s in kept)}
    return out


def summary_dict(
    trace: Any,
    plan: Any,
    timeline: Any,
    hierarchy: Hierarchy,
    *,
    minimum_budget: int | None = None,
    planning_s: float | None = None,
    unmanaged_step_s: float | None = None,
) -> dict[str, Any]:
    """Every figure the report shows, as plain JSON-able data."""
    v = _view(timeline, trace)
    batch = int(trace.batch_size)
    unmanaged = float(trace.step_time if unmanaged_step_s is None else unmanaged_step_s)
    predicted = v.step_time if v.step_time > 0 else float(plan.predicted_step_time or unmanaged)
    peaks = v.peaks or {str(n): int(b) for n, b in plan.predicted_peaks}
    decisions = decision_summary(trace, plan)
    counts = {k: d["count"] for k, d in decisions.items()}
    counts.setdefault("recompute", 0)
    return {
        "model": trace.model,
        "batch": batch,
        "input_shape": list(trace.input_shape),
        "profile": hierarchy.name,
        "planner": plan.planner,
        "budget_bytes": int(plan.budget),
        "minimum_budget_bytes": None if minimum_budget is None else int(minimum_budget),
        "unmanaged_peak_bytes": int(trace.observed_peak),
        "peak_bytes": peaks,
        "capacity_bytes": {t.name: int(t.capacity) for t in hierarchy.tiers},
        "predicted_step_s": predicted,
        "unmanaged_step_s": unmanaged,
        "slowdown": predicted / unmanaged if unmanaged > 0 else None,
        "compute_s": v.compute_time,
        "recompute_s": v.recompute_time,
        "stall_s": v.stall_time,
        "samples_per_s": batch / predicted if predicted > 0 else None,
        "unmanaged_samples_per_s": batch / unmanaged if unmanaged > 0 else None,
        "decisions": counts,
        "decision_bytes": {k: d["bytes"] for k, d in decisions.items()},
        "bytes_moved": v.bytes_moved,
        "lane_busy_s": {k: sum(e - s for s, e in iv) for k, iv in v.lanes.items()},
        "num_stalls": len(v.stalls),
        "planning_s": planning_s,
    }


# ----------------------------------------------------------------------------- rich


def _ms(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.2f} s"


def plan_summary(
    trace: Any,
    plan: Any,
    timeline: Any,
    hierarchy: Hierarchy,
    *,
    minimum_budget: int | None = None,
    planning_s: float | None = None,
    unmanaged_step_s: float | None = None,
):
    """A rich renderable: the plan's decisions, traffic, step time and peaks."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    d = summary_dict(
        trace, plan, timeline, hierarchy,
        minimum_budget=minimum_budget, planning_s=planning_s, unmanaged_step_s=unmanaged_step_s,
    )
    shape = "x".join(str(x) for x in d["input_shape"])
    head = Text.assemble(
        ("memstrata plan ", "bold"),
        f"{d['model']}  batch {d['batch']}  input {shape}  on {d['profile']}  "
        f"(trace: {trace.mode}, planner: {d['planner']})",
    )
    tier0 = hierarchy.tiers[0].name
    peak0 = d["peak_bytes"].get(tier0)
    line = Text(
        f"{tier0} memory {format_size(d['unmanaged_peak_bytes'])} -> "
        f"{format_size(peak0) if peak0 is not None else '?'} "
        f"(budget {format_size(d['budget_bytes'])}); step {_ms(d['unmanaged_step_s'])} -> {_ms(d['predicted_step_s'])}",
        style="bold green" if (d["slowdown"] or 1) <= 1.15 else "bold yellow",
    )

    step = Table(title="Step time", title_justify="left", show_header=True, header_style="bold")
    step.add_column("")
    step.add_column("unmanaged", justify="right")
    step.add_column("planned", justify="right")
    step.add_row("step", _ms(d["unmanaged_step_s"]), _ms(d["predicted_step_s"]))
    step.add_row("  compute", _ms(d["unmanaged_step_s"]), _ms(d["compute_s"]) if d["compute_s"] else "—")
    step.add_row("  recompute", "—", _ms(d["recompute_s"]))
    step.add_row("  exposed stalls", "—", f"{_ms(d['stall_s'])} ({d['num_stalls']} stalls)")
    step.add_row(
        "samples/s",
        f"{d['unmanaged_samples_per_s']:.1f}" if d["unmanaged_samples_per_s"] else "—",
        f"{d['samples_per_s']:.1f}" if d["samples_per_s"] else "—",
    )
    step.add_row("slowdown", "1.000x", f"{d['slowdown']:.3f}x" if d["slowdown"] else "—")

    peaks = Table(title="Peak per tier", title_justify="left", header_style="bold")
    peaks.add_column("tier")
    peaks.add_column("kind")
    peaks.add_column("peak", justify="right")
    peaks.add_column("limit", justify="right")
    peaks.add_column("use", justify="right")
    for t in hierarchy.tiers:
        limit = min(d["budget_bytes"], t.capacity) if t.name == tier0 else t.capacity
        p = d["peak_bytes"].get(t.name, 0)
        frac = p / limit if limit else math.nan
        style = "red" if frac > 1 else ""
        label = "budget" if t.name == tier0 and limit == d["budget_bytes"] else "capacity"
        peaks.add_row(t.name, t.kind, format_size(p), f"{format_size(limit)} ({label})", f"{frac:.0%}", style=style)

    dec = Table(title="Decisions", title_justify="left", header_style="bold")
    dec.add_column("decision")
    dec.add_column("count", justify="right")
    dec.add_column("bytes", justify="right")
    dec.add_column("of saved activations", justify="right")
    total = sum(d["decision_bytes"].values()) or 1
    for k in sorted(d["decision_bytes"], key=lambda k: (k != "keep", k)):
        label = {"keep": f"keep in {tier0}", "recompute": "recompute", "segment": "recompute segments",
                 "replay": "replay (op-level)"}.get(k, k.replace("offload:", "offload to "))
        unit = {"recompute": " units", "segment": " runs", "replay": " storages"}.get(k, "")
        b = d["decision_bytes"][k]
        dec.add_row(label, f"{d['decisions'][k]}{unit}", format_size(b), f"{b / total:.0%}")

    lanes = Table(title="Copy lanes", title_justify="left", header_style="bold")
    lanes.add_column("lane")
    lanes.add_column("bytes moved", justify="right")
    lanes.add_column("busy", justify="right")
    names = [n for n in list(d["bytes_moved"]) + list(d["lane_busy_s"]) if n != "compute"]
    for n in dict.fromkeys(names):
        lanes.add_row(n, format_size(d["bytes_moved"].get(n, 0)), _ms(d["lane_busy_s"].get(n)))
    if not names:
        lanes.add_row("(no transfers)", "0 B", "—")

    foot = []
    if d["minimum_budget_bytes"] is not None:
        foot.append(f"minimum feasible budget {format_size(d['minimum_budget_bytes'])}")
    if d["planning_s"] is not None:
        foot.append(f"planned in {d['planning_s']:.2f} s")
    parts: list[Any] = [head, line, step, peaks, dec, lanes]
    if foot:
        parts.append(Text("; ".join(foot), style="dim"))
    return Group(*parts)


def hierarchy_table(h: Hierarchy, title: str | None = None):
    """A rich table of a hierarchy's tiers and roofline."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title or f"{h.name} ({h.device})", title_justify="left", header_style="bold")
    for c in ("tier", "kind", "capacity", "read (up)", "write (down)", "latency", "path"):
        t.add_column(c, justify="right" if c not in ("tier", "kind", "path") else "left")
    for i, tier in enumerate(h.tiers):
        top = "n/a: top tier"  # tier 0 has no faster tier to copy to (its traffic is in the roofline line)
        t.add_row(
            tier.name,
            tier.kind,
            format_size(tier.capacity),
            top if i == 0 else _bw(tier.read_bandwidth),
            top if i == 0 else _bw(tier.write_bandwidth),
            "—" if i == 0 or not tier.latency else f"{tier.latency * 1e6:.1f} us",
            tier.path or "",
        )
    roof = Text(
        f"compute {h.peak_flops / 1e12:.3g} TFLOP/s, tier-0 memory traffic {h.fast_bandwidth / 1e9:.3g} GB/s, "
        f"op launch {h.kernel_overhead * 1e6:.1f} us" + (f"\nsource: {h.source}" if h.source else ""),
        style="dim",
    )
    return Group(t, roof)


def _bw(b: float) -> str:
    return f"{b / 1e9:.2f} GB/s" if b else "—"


# ----------------------------------------------------------------------------- plot

_LANE_COLORS = {
    "compute": "#4c72b0",
    "dram:write": "#c44e52",
    "dram:read": "#55a868",
    "nvme:write": "#dd8452",
    "nvme:read": "#64b5cd",
}


def plot_timeline(
    timeline: Any,
    hierarchy: Hierarchy,
    path: str,
    title: str = "",
    *,
    budget: int | None = None,
    trace: Any = None,
) -> str:
    """Write a PNG: occupancy of every tier over the step, the budget line,
    the forward/backward boundary, stalls and recompute marked; under it the
    busy intervals of compute and each copy lane.  Returns `path`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    v = _view(timeline, trace)
    # Tier 0 always; a lower tier only when it holds something at some point (an empty panel says nothing).
    held = lambda t: t.name in v.occupancy and max(v.occupancy[t.name][1], default=0) > 0  # noqa: E731
    tiers = [t for i, t in enumerate(hierarchy.tiers) if (i == 0 and t.name in v.occupancy) or (i > 0 and held(t))]
    tiers = tiers or list(hierarchy.tiers[:1])
    unused = [t.name for t in hierarchy.tiers[1:] if not held(t)]
    lane_names = [n for n in v.lanes if v.lanes[n]]
    n_rows = len(tiers) + (1 if lane_names else 0)
    ratios = [3] + [1.6] * (len(tiers) - 1) + ([0.25 * max(2, len(lane_names))] if lane_names else [])
    fig, axes = plt.subplots(n_rows, 1, figsize=(11, 2.2 + 1.7 * n_rows), sharex=True,
                             gridspec_kw={"height_ratios": ratios}, squeeze=False)
    axes = axes[:, 0]
    end = v.step_time or max((ts[-1] for ts, _ in v.occupancy.values() if ts), default=1.0)
    tscale, tunit = (1e3, "ms") if end < 1.0 else (1.0, "s")
    T = lambda t: t * tscale  # noqa: E731
    fills = ["#4c72b0", "#55a868", "#dd8452", "#64b5cd"]
    for i, (ax, tier) in enumerate(zip(axes, tiers)):
        ts, bs = v.occupancy.get(tier.name, ([0.0, end], [0.0, 0.0]))
        top_val = max(bs + ([budget or 0] if i == 0 else []) + ([trace.observed_peak] if i == 0 and trace else []),
                      default=0)
        scale, unit = (1024**3, "GiB") if top_val >= 1024**3 else (1024**2, "MiB")
        tt = [T(t) for t in ts]
        ax.step(tt, [b / scale for b in bs], where="post", color=fills[i % len(fills)], lw=1.2)
        ax.fill_between(tt, [b / scale for b in bs], step="post", alpha=0.25, color=fills[i % len(fills)])
        ax.set_ylabel(f"{tier.name}\n{unit}")
        # lower tiers: headroom for the peak label above the data
        ax.set_ylim(0, top_val / scale * (1.08 if i == 0 else 1.3) if top_val > 0 else 1.0)
        ax.grid(alpha=0.3)
        if i == 0:
            if budget is not None:
                ax.axhline(budget / scale, color="#c44e52", ls="--", lw=1.2, label=f"budget {format_size(budget)}")
            if trace is not None and trace.observed_peak:
                ax.axhline(trace.observed_peak / scale, color="grey", ls=":", lw=1.0,
                           label=f"unmanaged peak {format_size(trace.observed_peak)}")
        peak = v.peaks.get(tier.name)
        if peak is not None and i == 0:  # in the legend, clear of the budget and unmanaged-peak lines
            ax.plot([], [], color=fills[0], lw=1.2, label=f"{tier.name} occupancy, peak {format_size(peak)}")
        elif peak is not None:
            ax.text(0.995, 0.95, f"peak {format_size(peak)} of {format_size(tier.capacity)}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, bbox=dict(facecolor="white", alpha=0.7, lw=0))
    for ax in axes:
        for s, e in v.stalls:
            ax.axvspan(T(s), T(max(e, s + end * 2e-4)), color="#c44e52", alpha=0.35, lw=0)
        for s, e in v.recompute:
            ax.axvspan(T(s), T(e), color="#8172b2", alpha=0.25, lw=0)
        if v.forward_end_time is not None:
            ax.axvline(T(v.forward_end_time), color="black", lw=1.0, ls="-.")
        if v.backward_end_time is not None and v.backward_end_time < end:
            ax.axvline(T(v.backward_end_time), color="black", lw=0.8, ls=":")
    top = axes[0]
    handles, labels = top.get_legend_handles_labels()
    extra = []
    if v.stalls:
        extra.append(Patch(color="#c44e52", alpha=0.35, label=f"stall ({len(v.stalls)})"))
    if v.recompute:
        extra.append(Patch(color="#8172b2", alpha=0.25, label=f"recompute ({len(v.recompute)})"))
    from matplotlib.lines import Line2D

    if v.forward_end_time is not None:
        extra.append(Line2D([], [], color="black", ls="-.", label="forward | backward"))
    if v.backward_end_time is not None and v.backward_end_time < end:
        extra.append(Line2D([], [], color="black", ls=":", lw=0.8, label="backward | optimizer"))
    if unused:
        extra.append(Line2D([], [], ls="none", label=f"{', '.join(unused)}: holds nothing (not drawn)"))
    if handles or extra:
        # above the top panel, so it hides no data
        top.legend(handles=handles + extra, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=3, fontsize=8,
                   frameon=False)
    if lane_names:
        ax = axes[-1]
        for i, name in enumerate(lane_names):
            iv = v.lanes[name]
            ax.broken_barh([(T(s), T(e - s)) for s, e in iv], (i - 0.4, 0.8),
                           color=_LANE_COLORS.get(name, "#999999"))
        ax.set_yticks(range(len(lane_names)))
        ax.set_yticklabels(lane_names, fontsize=8)
        ax.set_ylim(-0.6, len(lane_names) - 0.4)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    axes[-1].set_xlabel(f"time in step ({tunit})")
    axes[-1].set_xlim(0, T(end))
    fig.suptitle(title or f"memory timeline on {hierarchy.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- the Manager's report
class Report(dict):
    """`Manager.report()`: a JSON-able dict; `str()` / `table()` render it with rich."""

    def table(self) -> str:
        import io

        from rich.console import Console
        from rich.table import Table

        buf = io.StringIO()
        console = Console(file=buf, width=150, force_terminal=False, color_system=None)
        state = "on" if self["enabled"] else "OFF (MEMSTRATA_DISABLE or enabled=False)"
        where = f" rank {self['rank']}/{self['world_size']}," if self.get("world_size", 1) > 1 else ""
        console.print(f"memstrata {state} — device {self['device']},{where} hierarchy {self['hierarchy']}, "
                      f"budget {self['budget']}")
        fmt = lambda b: format_size(b) if b is not None else "-"  # noqa: E731
        ms = lambda v: f"{v * 1e3:.1f} ms" if v is not None else "-"  # noqa: E731
        t = Table(title="steps: predicted vs measured")
        for col in ("step", "shape", "mode", "time ms", "pred ms", "peak", "pred peak", "budget", "offloaded", "recomp", "notes"):
            t.add_column(col, justify="right" if col not in ("shape", "mode", "notes") else "left")
        for s in self["steps"]:
            st = s.get("stats") or {}
            off = st.get("offloaded") or {}
            offs = " ".join(f"{k}:{v}" for k, v in off.items() if v) or "-"
            notes = []
            if st.get("misaligned"):
                notes.append("misaligned -> keep, re-trace")
            if st.get("demand_fetches"):
                notes.append(f"{st['demand_fetches']} demand fetches")
            t.add_row(
                str(s["index"]), s["shape"], s["mode"], f"{s['seconds'] * 1e3:.1f}",
                f"{s['predicted_seconds'] * 1e3:.1f}" if s.get("predicted_seconds") is not None else "-",
                fmt(s.get("peak_bytes")), fmt(s.get("predicted_peak_bytes")), fmt(s.get("budget_bytes")),
                offs if s["mode"].startswith("managed") else "-", str(st.get("recomputed_units", "-")) if st else "-",
                "; ".join(notes),
            )
        console.print(t)
        console.print(f"peak = {self['peak_source']}")
        for key, sh in self["shapes"].items():
            p = sh.get("plan")
            if not p:
                continue
            d = Table(title=f"plan for {key}: {p['planner']}, budget {format_size(sh['budget_bytes'])} "
                            f"(unmanaged peak {format_size(sh['observed_peak'])})")
            d.add_column("decision")
            d.add_column("count", justify="right")
            for k, v in p["counts"].items():
                d.add_row(k, str(v))
            console.print(d)
            for n in list(sh.get("notes", ())) + list(p.get("notes", ())) + \
                    list((sh.get("runtime") or {}).get("notes", ()))[:8]:
                console.print(f"  {n}")
            cal = sh.get("calibration")
            if cal and cal.get("measured_seconds") and cal.get("predicted_seconds"):
                console.print(f"  step: predicted {ms(cal['predicted_seconds'])} (simulated "
                              f"{ms(cal['simulated_seconds'])} + runtime {ms(cal['runtime_overhead_seconds'])}), "
                              f"measured {ms(cal['measured_seconds'])} ({cal['basis']}): "
                              f"x{cal['predicted_over_measured']:.2f}")
            tun = sh.get("tuning")
            if tun:
                for tr in tun["trials"]:
                    console.print(f"  tuning: {tr['name']}: predicted {ms(tr['predicted_seconds'])}, "
                                  f"{fmt(tr['predicted_peak_bytes'])}; measured {ms(tr['measured_seconds'])}, "
                                  f"{fmt(tr['measured_peak_bytes'])} over {tr['steps']} step(s)")
                console.print(f"  tuning: {'in progress' if tun['active'] else 'kept ' + str(tun['chosen'])}")
        return buf.getvalue()

    def __str__(self) -> str:  # noqa: D105
        return self.table()
