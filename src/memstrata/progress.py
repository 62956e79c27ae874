"""One progress display for long jobs (benchmarks, the training recipe): a rich bar, or nothing when quiet."""

from __future__ import annotations

__all__ = ["BenchProgress"]


class BenchProgress:
    """rich progress bar (or nothing with --quiet / no terminal support); shared by the data scenarios."""

    def __init__(self, total: int, quiet: bool, label: str = "bench", *, stderr: bool = False) -> None:
        self.quiet = quiet
        self._p = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            from memstrata.cli_args import stdout_console  # per-run lines whole in a log ([Note: console width])

            self._p = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.description}"), TimeElapsedColumn(), transient=False,
                               console=Console(stderr=True) if stderr else stdout_console())
            self._task = self._p.add_task("", total=total)

    def __enter__(self):
        if self._p is not None:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)

    def advance(self, line: str) -> None:
        if self._p is not None:
            self._p.console.print(line, highlight=False)
            self._p.advance(self._task)

    def set_total(self, total: int) -> None:
        """Change the number of items (the bench learns its run count once the budgets are resolved)."""
        if self._p is not None:
            self._p.update(self._task, total=total)

    def tick(self, n: int = 1) -> None:
        """Advance without printing a line (e.g. one training step)."""
        if self._p is not None:
            self._p.advance(self._task, n)
