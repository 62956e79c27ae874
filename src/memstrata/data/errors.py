"""Typed errors of the data side.  All derive from `DataError`."""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of memstrata data-pipeline errors."""


class CorruptSourceError(DataError):
    """A source sample (e.g. a JPEG) could not be decoded.  `path` names it."""

    def __init__(self, path: str, index: int, cause: BaseException | None = None):
        self.path, self.index = path, index
        why = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        self.what = f"corrupt source sample {index} at {path}{why}"  # without the hint
        super().__init__(f"{self.what} (pass on_corrupt='skip' to skip such samples)")


class StoreFullError(DataError, OSError):
    """The store's directory ran out of space.  Nothing half-written is left behind."""

    def __init__(self, directory: str, needed: int, free: int | None = None):
        self.directory, self.needed, self.free = directory, needed, free
        free_s = f", {free} bytes free" if free is not None else ""
        super().__init__(f"no space left for the sample store in {directory}: needed {needed} more bytes{free_s}; "
                         f"free space there, choose another store_dir, or lower max_side")


class StoreMismatchError(DataError):
    """An existing store was built from a different source or with different settings."""


class StoreReadOnlyError(DataError, OSError):
    """The store's directory cannot be written (read-only media, no permission) and the action needs writes.

    Reading the complete samples of such a store works; building the missing ones does not.
    """


class StoreWriteError(DataError, OSError):
    """Writing the store failed for a reason other than a full disk: the file-size limit (`ulimit -f`,
    EFBIG), an I/O error.  What was committed before stays; nothing half-written remains."""
