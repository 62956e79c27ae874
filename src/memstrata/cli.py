"""`memstrata …` — the command line.

    memstrata probe [--nvme DIR] [--json] [--no-cache]
    memstrata plan --model resnet50 --batch 256 --res 224 --profile h200 --budget 50% [--json] [--plot FILE.png]
    memstrata demo

Exit status: 0 on success, 2 on bad input (unknown model or profile, malformed
size, budget below the minimum, ...) with a one-line message on stderr and no
traceback.  With --json (probe, plan) stdout stays one JSON object even then:
{"error": "<the same line>", "exit_status": 2}.  Output paths (--plot) are
checked before any work.  Set MEMSTRATA_DEBUG=1 to get the traceback anyway.
Anything else that goes wrong is a bug, and shows its traceback.

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
from typing import Any, Callable, Iterator

from .cli_args import Parser, UsageError, check_output_path, positive_float, positive_int, stderr_console
from .cli_args import stdout_console, usage_errors

Handler = Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- helpers




@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner on stderr while a step runs (only drawn on a terminal; stdout stays clean for --json)."""
    console = stderr_console()
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def _print(renderable: Any) -> None:
    stdout_console().print(renderable)


# ----------------------------------------------------------------------------- probe


def _setup_probe(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--nvme", metavar="DIR", help="directory on the disk to measure as the lowest tier")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--max-seconds", type=positive_float, default=20.0, help="time bound of the measurement (default 20)")
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
    p.add_argument("--batch", type=positive_int, required=True, help="batch size")
    p.add_argument("--res", type=positive_int, default=224, help="input resolution (square images, default 224)")
    p.add_argument("--profile", default="h200",
                   help="hardware profile: h200, h100, a100-80gb, rtx4090, cpu, or 'probe' for this machine (default h200)")
    p.add_argument("--nvme", metavar="DIR", help="with --profile probe: directory of the disk tier to probe")
    p.add_argument("--budget", required=True,
                   help="tier-0 memory budget: a size (12GiB, 8GB) or a percentage of the unmanaged peak (50%%)")
    p.add_argument("--planner", choices=("auto", "greedy", "milp"), default="auto", help="planner (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the model and its activations (default float32)")
    p.add_argument("--fused-replay", action="store_true",
                   help="price op-level replays as one fused (compiled) kernel each instead of the eager ops "
                        "(implies --replays)")
    p.add_argument("--replays", action=argparse.BooleanOptionalAction, default=True,
                   help="let the planner choose op-level replays (default: on; --no-replays plans units, "
                        "segments and offloads only)")
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
    fused_replay: bool = False,
    replays: bool = True,
) -> tuple[dict[str, Any], Any]:
    """Trace, plan and simulate; returns (summary dict, rich renderable).

    Raises ValueError / UsageError on bad input.
    """
    from .hardware import Budget, format_size, profile

    if batch <= 0 or res <= 0:
        raise UsageError(f"batch and res must be positive integers, got batch={batch} res={res}")
    if nvme is not None and profile_name != "probe":
        raise UsageError("--nvme only applies with --profile probe")
    if profile_name == "probe":
        from .probe import probe

        with progress("Probing this machine (cached after the first time)..."):
            hierarchy = probe(nvme)
    else:
        with usage_errors():
            hierarchy = profile(profile_name)
    if fused_replay:
        from dataclasses import replace

        hierarchy = replace(hierarchy, fused_replay=True)
    with usage_errors():
        budget_spec = Budget.parse(budget)  # fail on a malformed budget before spending time tracing
    check_output_path("--plot", plot, ".png")  # before any work, not after planning

    import torch

    from .plan.api import minimum_budget, plan as make_plan
    from .report import plan_summary, summary_dict
    from .simulate import simulate
    from .trace.record import ModelInputError, classification_models, trace_model

    known = classification_models()
    if model not in known:
        import difflib

        close = difflib.get_close_matches(model, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known[:6])}, ..."
        raise UsageError(f"unknown torchvision classification model {model!r}{hint}")

    t0 = time.perf_counter()
    with progress(f"Tracing {model} (batch {batch}, {res}x{res}) on meta..."):
        try:
            trace = trace_model(model, batch, res, profile=hierarchy, dtype=getattr(torch, dtype))
        except ModelInputError as e:  # an input the model cannot take (too small, not its fixed size)
            raise UsageError(str(e)) from e
    tracing_s = time.perf_counter() - t0

    with usage_errors():
        if budget_spec.kind == "slowdown":
            from .plan.api import least_budget_within

            with progress(f"Finding the least memory within {budget_spec}..."):
                budget_bytes = least_budget_within(trace, hierarchy, budget_spec.value)
        else:
            budget_bytes = budget_spec.resolve(trace)
        frac = budget_spec.value if budget_spec.kind == "peak" else None
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
        from .decisions import InfeasibleBudgetError

        from .plan.api import explain_minimum

        raise InfeasibleBudgetError(budget_bytes, min_budget, f"{model} batch {batch} at {res}x{res} on "
                                    f"{hierarchy.name}: {explain_minimum(trace, hierarchy)}")

    t1 = time.perf_counter()
    with progress(f"Planning at a budget of {format_size(budget_bytes)}..."):
        the_plan = make_plan(trace, hierarchy, budget_bytes, planner=planner, replays=replays or fused_replay)
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
        planner=args.planner, dtype=args.dtype, plot=args.plot, nvme=args.nvme, fused_replay=args.fused_replay, replays=args.replays,
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
    # the main job: the reference recipe, memstrata against the way people run it (input-bound setting:
    # [Note: the CPU default is input-bound] in bench/recipe_scenario.py)
    ["bench", "--scenario", "recipe", "--repeats", "1", "--json", "memstrata-demo-recipe.json",
     "--plot", "memstrata-demo-recipe.png"],
    # the activation side: real training steps under half the activations, against unmanaged and full
    # checkpointing (the other peers, `memstrata bench`'s default, add ~1.5 min on a busy 2-core box: the
    # demo's 5 minutes hold only without them since the recipe became input-bound, 2026-12-05c)
    ["bench", "--repeats", "1", "--contenders", "unmanaged,memstrata,checkpoint",
     "--json", "memstrata-demo-bench.json", "--plot", "memstrata-demo-bench.png"],
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

def _setup_bench(p: argparse.ArgumentParser) -> Handler:
    # training steps side by side (issue: model state), or the data scenarios
    from .bench import add_bench_arguments, run_bench
    from .bench.data_scenarios import DATA_SCENARIOS, add_data_bench_arguments, run_data_scenario

    from .bench.recipe_scenario import add_recipe_bench_arguments

    add_bench_arguments(p)
    add_data_bench_arguments(p)
    add_recipe_bench_arguments(p)

    def handler(args: argparse.Namespace) -> int:
        if getattr(args, "scenario", None) == "recipe":  # the whole training recipe: bench/recipe_scenario.py
            from .bench.recipe_scenario import run_recipe_scenario

            return run_recipe_scenario(args)
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
        with usage_errors():
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
    "bench": ("run training steps side by side: memstrata vs unmanaged vs peers (or --scenario loader|data-train|cache-policy|recipe)",
              _setup_bench),
    "data": ("tiered training-data store: synth a dataset, build a sample store", _setup_data),
    "train": ("train a torchvision model on an ImageFolder with the reference recipe (memstrata or --baseline)",
              _setup_train),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="memstrata", description="Hierarchical GPU memory management for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"memstrata {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    json_flag: set[str] = set()
    for name, (help_text, setup) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_handler=setup(p))
        action = p._option_string_actions.get("--json")  # noqa: SLF001 - argparse has no public query
        if action is not None and action.nargs == 0:  # --json is a flag (probe, plan), not a file (bench)
            json_flag.add(name)
    parser.set_defaults(_json_flag_commands=frozenset(json_flag))
    return parser


def _json_requested(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Did this command line ask for JSON on stdout (`--json` of a command whose --json is a flag)?

    Read from the raw arguments, since the error may be that they do not parse.
    """
    flag_commands = parser.get_default("_json_flag_commands") or frozenset()
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    return command in flag_commands and "--json" in argv


def main(argv: list[str] | None = None) -> int:
    from .decisions import InfeasibleBudgetError
    from .probe import ProbeInputError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
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
        line = msg if msg.startswith("memstrata") else f"memstrata: error: {msg}"
        if _json_requested(parser, argv):  # stdout stays one JSON object, error or not
            print(json.dumps({"error": line, "exit_status": 2}))
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memstrata: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
