"""A progress bar for long data work (store builds, synthetic sets): rich on a terminal, nothing when off."""

from __future__ import annotations

__all__ = ["progress_bar"]


class _NullBar:
    """No display."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def advance(self, n: int = 1) -> None:
        pass


class _RichBar:
    def __init__(self, total: int, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), transient=False)
        self._total, self._desc = total, description

    def __enter__(self):
        self._p.__enter__()
        self._task = self._p.add_task(self._desc, total=self._total)
        return self

    def __exit__(self, *a):
        return self._p.__exit__(*a)

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._task, n)


def progress_bar(enabled: bool, total: int, description: str):
    return _RichBar(total, description) if enabled else _NullBar()
