"""Exceptions of the store layer (shared by the reader, the backends and the locations)."""
from __future__ import annotations

import errno

from ..remote.deadline import DeadlineExceeded


class StoreError(Exception):
    """The store cannot be opened (missing, incomplete, damaged manifest or index)."""


class CorruptData(OSError):
    """Stored bytes failed their check; maps to EIO on the mount."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class StoreUnavailable(OSError):
    """The store's bytes cannot be had right now (the object store is unreachable
    or keeps failing after retries); maps to EIO, and a later read may succeed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class ReadTimedOut(StoreUnavailable, DeadlineExceeded):
    """A read of a remote store did not finish within its deadline
    (``RemoteOptions.read_deadline``, the mount's ``--read-deadline``); maps to EIO."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)
