"""Pieces shared by the command lines (`memstrata/cli.py`, `memstrata/data/cli.py`, the benchmarks).

The one-line-error parser, the user-error type, argparse value types, the
check of an output path before any work, and the consoles.  This module
imports no other part of memstrata, so every command line can import it
without importing another.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Iterator

__all__ = ["UsageError", "Parser", "positive_int", "positive_float", "nonneg_int", "int_at_least",
           "usage_errors", "output_path_problem", "check_output_path", "stdout_console", "stderr_console"]


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block) raised as UsageError for `main`'s handler."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- argument types


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= lo."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Around a call whose ValueError means bad user input (not a bug): report it as a UsageError."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from e


# ----------------------------------------------------------------------------- output paths


def output_path_problem(flag: str, path: str | os.PathLike, suffix: str | None = None) -> str | None:
    """Why `path` cannot take the file of option `flag` (e.g. "--plot"), or None when it can.

    Checked before any work, so a long run does not end in a traceback: the
    name must not be a directory, must end in `suffix` when given, and its
    directory must exist and accept a new file (tried by creating and removing
    a scratch file, since permission bits do not tell root, /proc or a
    read-only mount apart).  An existing file is opened for appending, which
    changes nothing in it.
    """
    text = os.fspath(path)
    p = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(p):
        return f"{flag} {text!r} is a directory; name a file"
    if suffix and not p.lower().endswith(suffix):
        return f"{flag} must name a {suffix} file, got {text!r}"
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        return f"{flag} {text!r}: directory {parent!r} does not exist"
    try:
        if os.path.exists(p):
            with open(p, "ab"):
                pass
        else:
            scratch = os.path.join(parent, f".memstrata-write-check-{os.getpid()}")
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(scratch)
    except OSError as e:
        return f"{flag} {text!r}: cannot write there ({e.strerror or e})"
    return None


def check_output_path(flag: str, path: str | os.PathLike | None, suffix: str | None = None,
                      error: type[Exception] = UsageError) -> None:
    """Raise `error` (UsageError) when `path` (if given) cannot take the output of `flag`."""
    if path is None:
        return
    why = output_path_problem(flag, path, suffix)
    if why:
        raise error(why)


# ----------------------------------------------------------------------------- consoles
# [Note: console width]
# rich wraps at the terminal's width, and at 80 columns when stdout is a file
# or a pipe, which breaks long lines (a command line, a path) in logs.  Off a
# terminal we render at a width no line of ours reaches (COLUMNS, when set,
# still wins); tables keep their natural width since none of them expands.

_WIDE = 1000
_consoles: dict[bool, Any] = {}


def _console(stderr: bool):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    c = _consoles.get(stderr)
    if c is None or c.file is not stream:  # stdout/stderr swapped (tests capture them): a fresh console
        wide = not stream.isatty() and not os.environ.get("COLUMNS")
        c = Console(file=stream, width=_WIDE if wide else None)
        _consoles[stderr] = c
    return c


def stdout_console():
    """The rich console on stdout (see [Note: console width])."""
    return _console(False)


def stderr_console():
    """The rich console on stderr: progress display, only drawn on a terminal."""
    return _console(True)
