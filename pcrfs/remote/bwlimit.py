"""A token bucket shared by every request of a store: ``--bwlimit RATE``.

Callers report the bytes they received; the bucket makes them wait so that the
aggregate rate over all threads stays at ``rate`` bytes per second (with a burst
of ``burst`` bytes). Like rclone's ``--bwlimit``, this emulates or respects a slow
link; it does not shape individual TCP streams.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Callable

from ..units import parse_size


def parse_rate(text: str) -> int:
    """'10M', '512K/s', '1.5MiB/s' -> bytes per second (binary multiples)."""
    value = re.sub(r"(?i)\s*/\s*s\s*$", "", str(text))
    rate = parse_size(value)
    if rate <= 0:
        raise ValueError(f"a bandwidth limit must be positive, got {text!r}")
    return rate


class TokenBucket:
    """Reserve-then-sleep token bucket; thread-safe."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(64 * 1024, rate / 20))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()
        self.waited = 0.0  # total seconds callers were held back

    def consume(self, nbytes: int) -> float:
        """Take ``nbytes`` tokens, sleeping as long as the debt needs; returns the wait."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.waited += wait
        if wait > 0:
            self._sleep(wait)
        return wait
