"""How a bench worker reports a failed run: out of memory or an error, in one line."""

from __future__ import annotations


def is_oom(exc: BaseException) -> bool:
    """torch's out-of-memory errors, MemoryError, and the allocators' RuntimeError messages."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    if oom_types and isinstance(exc, oom_types):
        return True
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


def one_line(exc: BaseException) -> str:
    """'Type: first line of the message', at most 500 characters."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]
