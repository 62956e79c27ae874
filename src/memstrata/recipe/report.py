"""Tables and the validation top-1 vs wall-clock plot of recipe runs."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_top1", "epochs_table"]

COLORS = {"memstrata": "#1f77b4", "baseline": "#ff7f0e"}


def plot_top1(path: str, runs: list[dict[str, Any]], title: str | None = None) -> None:
    """Validation top-1 (%) against cumulative wall time (s), one line per run (repeats share a colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    for r in runs:
        eps = [e for e in r.get("per_epoch", []) if e.get("top1") is not None]
        if not eps:
            continue
        name = r.get("name", "?")
        ax.plot([0.0] + [e["wall_s"] for e in eps], [None] + [100 * e["top1"] for e in eps], "o-",
                color=COLORS.get(name), alpha=0.85, label=None if name in labelled else name)
        labelled.add(name)
    ax.set_xlabel("wall-clock time since start (s), store build and validation included")
    ax.set_ylabel("validation top-1 (%)")
    first = runs[0] if runs else {}
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title or f"{first.get('model', '')}: validation top-1 vs wall time", 70)),
                 fontsize=10)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epochs_table(run: dict[str, Any]):
    """rich Table of one run's epochs."""
    from rich.table import Table

    cfg = run.get("config", {})
    t = Table(title=(f"memstrata train · {run['name']} · {run['model']} · {run['train_images']} train / "
                     f"{run['val_images']} val images · {run['classes']} classes · batch {cfg.get('batch')} x "
                     f"{run['world_size']} · {cfg.get('res')} px · {run['device']}"),
              caption=(f"samples/s over epochs 2.. {_f(run['samples_per_s'], 1)} · data wait "
                       f"{_pct(run['data_wait_fraction'])} · top-1 {_pct(run['top1'], 2)} · wall {run['wall_s']:.1f} s"))
    for c in ("epoch", "train s", "images/s", "data wait", "loss", "lr", "val top-1", "val s", "wall s"):
        t.add_column(c, justify="right")
    for e in run["per_epoch"]:
        t.add_row(str(e["epoch"]), f"{e['train_s']:.1f}", _f(e["samples_per_s"], 1), _pct(e["data_wait_fraction"]),
                  _f(e["loss"], 4), f"{e['lr']:.4g}", _pct(e["top1"], 2), f"{e['val_s']:.1f}", f"{e['wall_s']:.1f}")
    return t


def _f(v, nd: int = 0) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _pct(v, nd: int = 0) -> str:
    return "-" if v is None else f"{100 * v:.{nd}f}%"
