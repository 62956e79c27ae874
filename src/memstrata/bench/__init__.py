"""`memstrata bench`: real training steps of memstrata and its peers, side by side.

cli.py registers the command with::

    from memstrata.bench import add_bench_arguments, run_bench
    sub = subparsers.add_parser("bench", help=...)
    add_bench_arguments(sub)
    ...  return run_bench(args)

Also runnable on its own: ``python -m memstrata.bench --help``.
"""

from .contenders import CONTENDERS
from .harness import add_bench_arguments, run_bench

__all__ = ["CONTENDERS", "add_bench_arguments", "run_bench"]
