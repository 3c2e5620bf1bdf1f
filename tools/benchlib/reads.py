"""Reading files the way a data loader does (one sequential reader), and listing them."""
from __future__ import annotations

import os
import time
from pathlib import Path


def walk(root: str | os.PathLike) -> list[str]:
    """Relative paths of all files under ``root``, sorted (ImageFolder-like listing)."""
    root = os.fspath(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            out.append(name if rel == "." else f"{rel}/{name}")
    out.sort()
    return out


def read_pass(paths: list[str]) -> tuple[float, int]:
    """``open(p, 'rb')`` + read whole + close for every path, in order, one thread: (seconds, bytes)."""
    nbytes = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            nbytes += len(f.read())
    return time.perf_counter() - t0, nbytes


def read_pass_os(paths: list[str]) -> tuple[float, int]:
    """``os.open`` + fstat + ``os.read`` + ``os.close`` per file: no isatty ioctl (Python's open() sends one)."""
    nbytes = 0
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            nbytes += len(os.read(fd, os.fstat(fd).st_size + 1))
        finally:
            os.close(fd)
    return time.perf_counter() - t0, nbytes


def sample(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them if ``n`` >= their number)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def warm(paths_or_dir: str | os.PathLike | list) -> None:
    """Read files into the page cache: a list of paths, or every file under a directory."""
    if isinstance(paths_or_dir, (str, os.PathLike)):
        files = sorted(f for f in Path(paths_or_dir).rglob("*") if f.is_file())
    else:
        files = list(paths_or_dir)
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass
