"""`memstrata …` — the command line.

    memstrata probe [--nvme DIR] [--json] [--no-cache]
    memstrata plan --model resnet50 --batch 256 --res 224 --profile h200 --budget 50% [--json] [--plot FILE.png]
    memstrata demo

Exit status: 0 on success, 2 on bad input (unknown model or profile, malformed
size, budget below the minimum, ...) with a one-line message on stderr and no
traceback.  Set MEMSTRATA_DEBUG=1 to get the traceback anyway.  Anything else
that goes wrong is a bug, and shows its traceback.

Adding a subcommand: write `_setup_<name>(parser) -> handler` and add it to
`SUBCOMMANDS` (see [Note: subcommand registry]).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block) and go through `main`'s handler."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- helpers


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def parse_budget(text: str, unmanaged_peak: int | None = None) -> tuple[int | None, float | None]:
    """'12GiB' -> (bytes, None); '50%' -> (bytes of unmanaged_peak or None, 0.5).

    ValueError on a malformed size or a non-positive budget.
    """
    from .hardware import parse_budget_text

    frac, n = parse_budget_text(text, max_percent=float("inf"))
    if frac is not None:
        return (None if unmanaged_peak is None else int(frac * unmanaged_peak)), frac
    return n, None


_err_console = None


def _stderr_console():
    global _err_console
    if _err_console is None:
        from rich.console import Console

        _err_console = Console(stderr=True)
    return _err_console


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Around a call whose ValueError means bad user input (not a bug): report it as a UsageError."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from e


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner on stderr while a step runs (only drawn on a terminal; stdout stays clean for --json)."""
    console = _stderr_console()
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def _print(renderable: Any) -> None:
    from rich.console import Console

    Console().print(renderable)


# ----------------------------------------------------------------------------- probe


def _setup_probe(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--nvme", metavar="DIR", help="directory on the disk to measure as the lowest tier")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--max-seconds", type=_positive_float, default=20.0, help="time bound of the measurement (default 20)")
    return cmd_probe


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import probe_report

    with progress(f"Probing this machine (at most {args.max_seconds:g} s)..."):
        r = probe_report(args.nvme, cache=not args.no_cache, max_seconds=args.max_seconds)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    from rich.text import Text

    from .report import hierarchy_table

    _print(hierarchy_table(r.hierarchy, title=f"probed: {r.hierarchy.name} ({r.hierarchy.device})"))
    how = f"from cache {r.cache_path}" if r.cached else f"measured in {r.details.get('measure_seconds', r.seconds):.1f} s, cached at {r.cache_path}"
    extra = "" if args.nvme else "; no disk tier (pass --nvme DIR to measure one)"
    disk = r.details.get("disk")
    if disk:
        extra += f"; disk I/O: {disk['io']}"
    _print(Text(how + extra, style="dim"))
    return 0


# ----------------------------------------------------------------------------- plan


def _setup_plan(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--model", required=True, help="torchvision classification model name, e.g. resnet50")
    p.add_argument("--batch", type=_positive_int, required=True, help="batch size")
    p.add_argument("--res", type=_positive_int, default=224, help="input resolution (square images, default 224)")
    p.add_argument("--profile", default="h200",
                   help="hardware profile: h200, h100, a100-80gb, rtx4090, cpu, or 'probe' for this machine (default h200)")
    p.add_argument("--nvme", metavar="DIR", help="with --profile probe: directory of the disk tier to probe")
    p.add_argument("--budget", required=True,
                   help="tier-0 memory budget: a size (12GiB, 8GB) or a percentage of the unmanaged peak (50%%)")
    p.add_argument("--planner", choices=("auto", "greedy", "milp"), default="auto", help="planner (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the model and its activations (default float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="write the memory timeline picture here")
    return cmd_plan


def run_plan(
    model: str,
    batch: int,
    res: int,
    profile_name: str,
    budget: str,
    *,
    planner: str = "auto",
    dtype: str = "float32",
    plot: str | None = None,
    nvme: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """Trace, plan and simulate; returns (summary dict, rich renderable).

    Raises ValueError / UsageError on bad input.
    """
    from .hardware import format_size, profile

    if batch <= 0 or res <= 0:
        raise UsageError(f"batch and res must be positive integers, got batch={batch} res={res}")
    if nvme is not None and profile_name != "probe":
        raise UsageError("--nvme only applies with --profile probe")
    if profile_name == "probe":
        from .probe import probe

        with progress("Probing this machine (cached after the first time)..."):
            hierarchy = probe(nvme)
    else:
        with _usage_errors():
            hierarchy = profile(profile_name)
    with _usage_errors():
        parse_budget(budget)  # fail on a malformed budget before spending time tracing
    if plot is not None:
        parent = Path(plot).expanduser().resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--plot: directory {str(parent)!r} does not exist")

    import torch

    from .plan.api import minimum_budget, plan as make_plan
    from .report import plan_summary, summary_dict
    from .simulate import simulate
    from .trace.record import classification_models, trace_model

    known = classification_models()
    if model not in known:
        import difflib

        close = difflib.get_close_matches(model, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known[:6])}, ..."
        raise UsageError(f"unknown torchvision classification model {model!r}{hint}")

    t0 = time.perf_counter()
    with progress(f"Tracing {model} (batch {batch}, {res}x{res}) on meta..."):
        trace = trace_model(model, batch, res, profile=hierarchy, dtype=getattr(torch, dtype))
    tracing_s = time.perf_counter() - t0

    with _usage_errors():
        budget_bytes, frac = parse_budget(budget, trace.observed_peak)
    assert budget_bytes is not None
    fast = hierarchy.tiers[0]
    if budget_bytes > fast.capacity:
        raise UsageError(
            f"budget {format_size(budget_bytes)} exceeds the {fast.name} capacity {format_size(fast.capacity)} "
            f"of profile {hierarchy.name}"
        )
    with progress("Finding the minimum feasible budget..."):
        min_budget = int(minimum_budget(trace, hierarchy))
    if budget_bytes < min_budget:
        from .plan.schema import InfeasibleBudgetError

        raise InfeasibleBudgetError(budget_bytes, min_budget, f"{model} batch {batch} at {res}x{res} on {hierarchy.name}")

    t1 = time.perf_counter()
    with progress(f"Planning at a budget of {format_size(budget_bytes)}..."):
        the_plan = make_plan(trace, hierarchy, budget_bytes, planner=planner)
    planning_s = time.perf_counter() - t1
    with progress("Simulating the plan..."):
        timeline = simulate(trace, the_plan, hierarchy)

    kw = dict(minimum_budget=min_budget, planning_s=planning_s)
    summary = summary_dict(trace, the_plan, timeline, hierarchy, **kw)
    summary["res"] = res
    summary["dtype"] = dtype
    summary["budget_spec"] = budget
    summary["budget_fraction_of_unmanaged_peak"] = budget_bytes / trace.observed_peak if trace.observed_peak else None
    summary["tracing_s"] = tracing_s
    if plot is not None:
        from .report import plot_timeline

        with progress(f"Drawing {plot}..."):
            title = (f"{model} batch {batch} {res}x{res} on {hierarchy.name}: budget {format_size(budget_bytes)}"
                     + (f" ({frac:.0%} of unmanaged peak)" if frac is not None else ""))
            plot_timeline(timeline, hierarchy, plot, title, budget=budget_bytes, trace=trace)
        summary["plot"] = str(plot)
    return summary, plan_summary(trace, the_plan, timeline, hierarchy, **kw)


def cmd_plan(args: argparse.Namespace) -> int:
    summary, renderable = run_plan(
        args.model, args.batch, args.res, args.profile, args.budget,
        planner=args.planner, dtype=args.dtype, plot=args.plot, nvme=args.nvme,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    _print(renderable)
    if args.plot:
        _print(f"[dim]timeline written to {args.plot}[/dim]")
    return 0


# ----------------------------------------------------------------------------- demo


# The embedded default job: first the plan for the headline GPU case (meta trace,
# seconds), then real training steps side by side on this machine (`bench`
# defaults: about two to three minutes on a 2-core box).
DEMO_RUNS = [
    ["plan", "--model", "resnet50", "--batch", "256", "--res", "224", "--profile", "h200",
     "--budget", "50%", "--plot", "memstrata-demo-timeline.png"],
    ["bench", "--json", "memstrata-demo-bench.json", "--plot", "memstrata-demo-bench.png"],
]


def _setup_demo(p: argparse.ArgumentParser) -> Handler:
    return cmd_demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default job (`make demo`): one `memstrata` command line, run in-process."""
    status = 0
    for argv in DEMO_RUNS:
        _print(f"[bold]memstrata demo:[/bold] memstrata {' '.join(argv)}")
        status = max(status, main(argv))
    return status


# ----------------------------------------------------------------------------- registry
# [Note: subcommand registry]
# name -> (one-line help, setup function).  A setup function adds the
# subcommand's arguments to its parser and returns the handler, which gets the
# parsed arguments and returns the exit status.  Handlers raise ValueError or
# UsageError for bad input; `main` turns those into one line on stderr and
# exit status 2.  Order here is the order in `memstrata --help`.
#
# Still to come (the lead adds them here):
#   "bench": run benchmark scenarios side by side  (memstrata.bench)
#   "data":  tiered training-data store            (memstrata.data)

def _setup_bench(p: argparse.ArgumentParser) -> Handler:
    # training steps side by side (issue: model state), or the data scenarios
    from .bench import add_bench_arguments, run_bench
    from .bench.data_scenarios import DATA_SCENARIOS, add_data_bench_arguments, run_data_scenario

    add_bench_arguments(p)
    add_data_bench_arguments(p)

    def handler(args: argparse.Namespace) -> int:
        if getattr(args, "scenario", None) in DATA_SCENARIOS:
            return run_data_scenario(args)
        return run_bench(args)

    return handler


def _setup_data(p: argparse.ArgumentParser) -> Handler:
    from .data.cli import setup_data  # memstrata data synth | build

    return setup_data(p)


def _setup_train(p: argparse.ArgumentParser) -> Handler:
    # the end-to-end ImageNet recipe (memstrata.recipe); under torchrun: torchrun -m memstrata train ...
    from .data.errors import DataError
    from .recipe.cli import add_train_arguments, config_from_args, run_train
    from .recipe.config import RecipeInputError

    add_train_arguments(p)

    def handler(args: argparse.Namespace) -> int:
        with _usage_errors():
            cfg = config_from_args(args)
        try:
            run_train(cfg, args)
        except DataError as e:  # a corrupt JPEG, a store built from other settings, a full disk
            raise UsageError(str(e)) from e
        except RecipeInputError as e:  # found once running: a checkpoint from other settings, no CUDA, ...
            raise UsageError(str(e)) from e
        return 0

    return handler


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "probe": ("measure this machine's memory hierarchy", _setup_probe),
    "plan": ("trace a torchvision model on meta, plan it at a budget and simulate the plan", _setup_plan),
    "demo": ("run the embedded default job", _setup_demo),
    "bench": ("run training steps side by side: memstrata vs unmanaged vs peers (or --scenario loader|data-train|cache-policy)",
              _setup_bench),
    "data": ("tiered training-data store: synth a dataset, build a sample store", _setup_data),
    "train": ("train a torchvision model on an ImageFolder with the reference recipe (memstrata or --baseline)",
              _setup_train),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="memstrata", description="Hierarchical GPU memory management for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"memstrata {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, setup) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_handler=setup(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .plan.schema import InfeasibleBudgetError
    from .probe import ProbeInputError

    parser = build_parser()
    debug = bool(os.environ.get("MEMSTRATA_DEBUG"))
    try:
        args = parser.parse_args(argv)
        if getattr(args, "_handler", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args._handler(args) or 0)
    except (UsageError, InfeasibleBudgetError, ProbeInputError) as e:
        if debug:
            raise
        msg = " ".join(str(e).split())  # one line, whatever the message looked like
        print(msg if msg.startswith("memstrata") else f"memstrata: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memstrata: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
