"""Helpers for tests that mount for real.

Every mount made through :class:`Mounts` is unmounted when the test ends, even
on failure, and every daemon it knows of is killed by pid, so no mount and no
process is left behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pcrfs.fuse import mounting


def fuse_unavailable() -> str | None:
    """Why real mounts cannot run here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount3/fusermount"
    try:
        from pcrfs.fuse import load_mfusepy

        load_mfusepy()
    except (ImportError, OSError) as e:
        return f"mfusepy/libfuse unavailable: {e}"
    return None


def wait_until(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def kill_daemon(pid: int) -> None:
    """Stop ``pid`` (SIGTERM, then SIGKILL) and reap it if it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not mounting.daemon_alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        wait_until(lambda: not mounting.daemon_alive(pid), timeout=5)


def force_unmount(mnt: str | os.PathLike) -> None:
    """Detach whatever is mounted at ``mnt`` (lazily if need be)."""
    mnt = os.fspath(mnt)
    for cmd in (["fusermount3", "-uz", mnt], ["fusermount", "-uz", mnt], ["umount", "-l", mnt]):
        if mounting.mount_entry(mnt) is None:
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def pcrfs_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``pcrfs`` command line (captured: this also proves the daemon does not hold our pipes)."""
    return subprocess.run([sys.executable, "-m", "pcrfs.cli", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


class Mounts:
    """Mounts made by one test (or module); :meth:`cleanup` undoes all of them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.points: list[Path] = []
        self.pids: set[int] = set()

    def point(self, name: str) -> Path:
        mnt = self.base / name
        mnt.mkdir(parents=True, exist_ok=True)
        self.points.append(mnt)
        return mnt

    def mount(self, store, name: str, **kwargs) -> mounting.MountInfo:
        mnt = self.point(name)
        kwargs.setdefault("echo", lambda _m: None)
        kwargs.setdefault("log_file", self.base / f"{name}.log")  # not /run/pcrfs: tests leave nothing behind
        info = mounting.mount(store, mnt, **kwargs)
        self.pids.add(info.pid)
        return info

    def track(self, mnt: Path) -> int | None:
        """Remember the daemon serving ``mnt`` (one started through the CLI)."""
        pid = mounting.read_pid(str(mnt))
        if pid is not None:
            self.pids.add(pid)
        return pid

    def cleanup(self) -> list[str]:
        """Unmount everything, kill every daemon; returns the mount points that were still mounted."""
        leftovers = []
        for mnt in self.points:
            self.track(mnt)
            if mounting.mount_entry(str(mnt)) is not None:
                leftovers.append(str(mnt))
                try:
                    mounting.umount(mnt, echo=lambda _m: None, timeout=5)
                except mounting.MountError:
                    force_unmount(mnt)
        for pid in self.pids:
            kill_daemon(pid)
        for mnt in self.points:
            force_unmount(mnt)
        return leftovers
