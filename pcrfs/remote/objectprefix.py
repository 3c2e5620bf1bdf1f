"""One prefix of an object store (``s3://bucket/prefix``) with pcrfs's retry policy.

The reading side (:class:`pcrfs.store.sources.location.RemoteLocation`) and the writing side
(:class:`pcrfs.store.write.sink.ObjectSink`) both talk to a store's prefix the same way:
names relative to the store, every call retried by one :class:`~.retry.RetryPolicy`,
and a failure that survives the retries turned into one readable line. They differ
only in the exception that line travels in.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from .fs import RemoteError, RemoteOptions, explain, filesystem, split_url
from .retry import RetryPolicy

T = TypeVar("T")


class ObjectPrefix:
    """The objects under one URL; ``_call`` runs an fsspec call with retries."""

    error: type[Exception] = RemoteError      # what a call that failed for good raises
    passthrough: tuple[type[BaseException], ...] = ()  # exceptions the caller handles itself

    def __init__(self, url: str, options: RemoteOptions = RemoteOptions()) -> None:
        self.url = url.rstrip("/")
        self.options = options
        self.fs = filesystem(self.url, options)
        self.base = split_url(self.url)[1]
        self.retry = RetryPolicy(attempts=options.attempts)

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` with retries; any failure but ``passthrough`` becomes ``error`` with a readable message."""
        try:
            return self.retry.call(fn, what=what)
        except self.passthrough:
            raise
        except Exception as e:  # noqa: BLE001 - reported as a message, not a traceback
            raise self.error(explain(e, self.url, self.options)) from None
