"""Warnings that point at the user's line, not at memstrata's or contextlib's.

[Note: where a warning points]
`warnings.warn(msg, stacklevel=n)` names the frame n levels up.  A fixed n is wrong for most of memstrata's
warnings: they are raised after a `with mgr.step(...)` block's body, from a generator that contextlib's
`__exit__` resumes, or from a hook torch calls, so the frame n levels up is `contextlib.py` or a torch
module, and the user cannot see which of their lines it was about.  `warn_user` walks the stack instead and
names the first frame outside memstrata, contextlib and torch: the user's code.  (Python 3.12's
`skip_file_prefixes` does the same; 3.11 has no such argument.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__],
                                                                                   torch))
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path == _CONTEXTLIB or path.startswith(_INTERNAL)


def user_stacklevel() -> int:
    """The `stacklevel` (for a `warnings.warn` called by this function's caller) of the first user frame."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the user's line that led to it."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
