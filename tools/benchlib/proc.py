"""CPU and load from /proc: what a benchmark reports per item, steady under load."""
from __future__ import annotations

import os
import time


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` from /proc/PID/stat (10 ms ticks; 0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_split_s(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (see :func:`cpu_s`; (0, 0) if unknown)."""
    if pid is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def threads_cpu_s(pid: int | None) -> float:
    """CPU seconds of every thread of ``pid``: the sum of /proc/PID/task/*/schedstat (nanoseconds).

    /proc/PID/stat counts 10 ms ticks, about 2 µs per file over 5,000 files: too coarse for
    a pass that costs the daemon a few µs per file. Threads that already exited are not
    counted, so use it for servers whose threads live as long as they do (libfuse's
    workers); falls back to :func:`cpu_s`."""
    if pid is None:
        return 0.0
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return cpu_s(pid)
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def self_cpu_s(children: bool = False) -> float:
    """This process's user + system CPU seconds; with ``children``, plus its children that
    have exited and been waited for (e.g. a DataLoader's finished workers)."""
    t = os.times()
    return t.user + t.system + (t.children_user + t.children_system if children else 0.0)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, two decimals."""
    return [round(x, 2) for x in os.getloadavg()]


class Meter:
    """Wall time, this process's CPU and another process's CPU (``pid``, e.g. a daemon) over a
    with-block. ``precise=True`` reads the other process's threads' schedstat (ns) instead of
    its 10 ms ticks; ``children=True`` counts this process's waited-for children as its own.

        with Meter(daemon_pid) as m:
            for p in paths: ...
        m.per_item(len(paths))  # {"seconds", "items", "items_per_s", "self_us_per_item", ...}
    """

    def __init__(self, pid: int | None = None, precise: bool = False, children: bool = False) -> None:
        self.pid, self.children = pid, children
        self._cpu = threads_cpu_s if precise else cpu_s
        self.seconds = self.self_cpu = self.daemon_cpu = 0.0

    def __enter__(self) -> "Meter":
        self._s0, self._d0 = self_cpu_s(self.children), self._cpu(self.pid)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.self_cpu = self_cpu_s(self.children) - self._s0
        self.daemon_cpu = self._cpu(self.pid) - self._d0

    def per_item(self, n: int) -> dict:
        """The with-block's figures per item (``n`` items); daemon figures only with a pid."""
        n = max(n, 1)
        out = {"seconds": self.seconds, "items": n, "items_per_s": n / self.seconds if self.seconds else 0.0,
               "self_us_per_item": self.self_cpu * 1e6 / n}
        if self.pid is not None:
            out["daemon_us_per_item"] = self.daemon_cpu * 1e6 / n
            out["daemon_cores"] = self.daemon_cpu / self.seconds if self.seconds else 0.0
        return out
