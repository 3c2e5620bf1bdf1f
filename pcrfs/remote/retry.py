"""Retries with exponential backoff for requests to a remote store.

Only errors that can go away are retried: timeouts, refused or reset
connections, 5xx answers and throttling. A definite answer -- the object or
bucket does not exist, access is denied, there are no credentials -- is final
and raised at once, so a user mistake fails fast with its own message.

Inside a read with a deadline (:mod:`.deadline`), retries stop when the time left
is less than the next try would need: its backoff plus as long as the last try took
(a try that timed out would time out again). The last error is then raised.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from .deadline import Deadline, DeadlineExceeded, Interrupted, current

log = logging.getLogger("pcrfs.remote")
T = TypeVar("T")

# botocore exception class names that mean "this will not work however often you try"
_FINAL_BOTOCORE = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError",
                   "ParamValidationError", "UnknownSignatureVersionError", "InvalidConfigError",
                   "ProfileNotFound", "ConfigNotFound"}


def is_final(exc: BaseException) -> bool:
    """True for errors that retrying cannot fix."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        ValueError, TypeError, KeyError, DeadlineExceeded, Interrupted)):
        return True
    return any(cls.__name__ in _FINAL_BOTOCORE for cls in type(exc).__mro__)


@dataclass
class RetryPolicy:
    """``attempts`` tries in all, sleeping ``base * factor**n`` (capped, with jitter) between them."""
    attempts: int = 5
    base: float = 0.1
    factor: float = 2.0
    max_delay: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    retried: int = 0  # retries done so far (for counters)

    def delay(self, n: int) -> float:
        d = min(self.max_delay, self.base * self.factor ** n)
        return d * (0.5 + random.random() / 2)

    def call(self, fn: Callable[[], T], what: str = "request", deadline: Deadline | None = None) -> T:
        """``fn()``, retried; ``deadline``: the read's (default: the one in progress on this thread)."""
        deadline = deadline or current()
        for n in range(self.attempts):
            if deadline is not None and n:
                deadline.check(what)
            started = time.monotonic()
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified right below
                if is_final(e) or n == self.attempts - 1:
                    raise
                d = self.delay(n)
                if deadline is not None and deadline.remaining() < d + (time.monotonic() - started):
                    log.warning("%s failed (%s: %s); no retry: the read's deadline is too close", what,
                                type(e).__name__, e)
                    raise
                self.retried += 1
                log.warning("%s failed (%s: %s); retry %d of %d in %.2fs", what, type(e).__name__,
                            e, n + 1, self.attempts - 1, d)
                self.sleep(d)
        raise AssertionError("unreachable")
