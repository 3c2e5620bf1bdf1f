"""What the benchmarks record about the machine they ran on (shared by the tools)."""
from __future__ import annotations

import os


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def memory_gb() -> float | None:
    """Physical memory in GiB, one decimal (None if unknown)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None
