"""Durable small-file writes shared by the store writer and the adaptive index, and the
lock that keeps two conversions out of one store."""
from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import Callable, Iterable


def write_atomic(path: Path, data: bytes | Iterable[bytes | memoryview], unique_tmp: bool = False,
                 fsync: Callable[[int], None] = os.fsync) -> None:
    """Write ``data`` (bytes, or chunks written in order without joining them) to
    ``path`` through a temporary file, fsync and rename: readers see the old file or
    the whole new one, never a torn one.

    ``unique_tmp`` names the temporary file after this process and a random token, for
    writers that may race on the same ``path`` (two attempts of one Dask task, on one or
    several machines sharing the filesystem): each renames its own complete file.
    ``fsync`` is what makes the file durable before the rename (a benchmark passes a timed one).
    """
    suffix = f".{os.getpid()}-{secrets.token_hex(4)}.tmp" if unique_tmp else ".tmp"
    tmp = path.with_name(path.name + suffix)
    with open(tmp, "wb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            f.writelines(data)
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the renames inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockHeld(Exception):
    """Another process holds the lock."""


def lock_exclusive(path: Path, *, create_file: bool = False) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (a directory, or with ``create_file`` a file
    made if missing) without waiting; returns the fd that holds it (close it to release;
    the kernel releases it when the process dies, so a killed holder never leaves a stale
    lock). LockHeld if another process holds it; None where the filesystem has no flock
    (some network filesystems), in which case nothing is locked.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_CREAT if create_file else os.O_DIRECTORY)
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(str(path)) from None
    except OSError:
        os.close(fd)
        return None
    return fd



def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; the new soft limit.

    A mount serves record files from a bounded table of descriptors sized from this
    limit; the common default soft limit (1024) is far below the usual hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # some systems cap the soft limit below an infinite hard one
            pass
    return soft
