"""What a benchmark records about the machine and the code it measured."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess

from . import REPO


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


def package_version(name: str) -> str | None:
    """An installed distribution's version (None if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def source_state() -> dict:
    """Which pcrfs code was measured: HEAD, pcrfs files differing from it, a hash of pcrfs/**/*.py."""
    h = hashlib.sha1()
    for f in sorted((REPO / "pcrfs").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    status = _git("status", "--porcelain", "--", "pcrfs")
    return {"head": _git("rev-parse", "HEAD"), "pcrfs_py_sha1": h.hexdigest(),
            "pcrfs_changed_vs_head": status.splitlines() if status else []}


def machine_facts(packages: tuple[str, ...] | list[str] = ()) -> dict:
    """Cores, CPU, memory, kernel, Python, pcrfs version, git commit and ``packages``' versions."""
    import pcrfs

    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "mem_gb": memory_gb(), "kernel": platform.release(),
           "platform": platform.platform(), "python": platform.python_version(),
           "pcrfs": pcrfs.__version__, "git_commit": _git("rev-parse", "HEAD")}
    if packages:
        out["packages"] = {p: package_version(p) for p in packages}
    return out
