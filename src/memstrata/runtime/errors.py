"""Errors the runtime raises.  All derive from `MemstrataRuntimeError`."""

from __future__ import annotations


class MemstrataRuntimeError(RuntimeError):
    """Base class for errors raised while executing a plan."""


class NVMeDirectoryError(MemstrataRuntimeError):
    """The NVMe directory cannot hold the plan's offloaded bytes.

    Raised before any managed step runs (missing directory, not writable, not
    enough free space).  Nothing is left behind in the directory.
    """


class NVMeIOError(MemstrataRuntimeError):
    """A read or write of an offloaded activation failed during a step."""


class UnrecomputableUnitError(MemstrataRuntimeError):
    """A recomputed unit changed one of its inputs in place; recomputing it cannot be exact."""
