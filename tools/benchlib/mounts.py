"""Mounts for the benchmarks: a pcrfs mount or any foreground FUSE server, by PID, always
unmounted. Everything a run starts is registered in :data:`CLEANUP`; call ``CLEANUP.all()``
in a ``finally`` (it stops only those PIDs and unmounts only those mount points)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pcrfs.fuse import mounting

from . import log, quiet

STATS_XATTR = "user.pcrfs.stats"


def is_mounted(mp: str | os.PathLike) -> bool:
    """True if ``mp`` is a mount point now (any file system)."""
    return mounting.mount_entry(os.fspath(mp)) is not None


def stop_process(p: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a child, SIGKILL it after ``timeout`` s, and reap it."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def unmount_any(mp: str | os.PathLike) -> None:
    """Unmount a FUSE mount made by this run, lazily as a last resort."""
    mp = os.fspath(mp)
    for cmd in (["fusermount3", "-u", mp], ["fusermount", "-u", mp], ["umount", mp],
                ["fusermount3", "-uz", mp], ["umount", "-l", mp]):
        if not is_mounted(mp):
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def pids_serving(mp: str) -> set[int]:
    """Processes with ``mp`` as one of their arguments (the daemons this run started for it)."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if mp.encode() in argv:
            out.add(int(d))
    return out


def _stop_pid(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)  # libfuse unmounts on SIGTERM
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while mounting.daemon_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if mounting.daemon_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cleanup:
    """Mount points, child processes and daemon PIDs this run made; ``all()`` releases what is left."""

    def __init__(self) -> None:
        self.mounts: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.pids: set[int] = set()

    def add_mount(self, mp: str) -> None:
        if mp not in self.mounts:
            self.mounts.append(mp)

    def all(self) -> None:
        for p in list(self.procs):
            stop_process(p)
        # a daemon may still be starting (a signal arrived while mount() waited for it):
        # also find the processes serving one of our mount points by their argv
        pids = set(self.pids)
        for mp in self.mounts:
            pids |= pids_serving(mp)
            pid = mounting.read_pid(mp)
            if pid is not None:
                pids.add(pid)
        for pid in pids:
            if pid != os.getpid() and mounting.daemon_alive(pid):
                log(f"cleanup: stopping pid {pid}")
                _stop_pid(pid)
        for mp in self.mounts:
            if is_mounted(mp):
                log(f"cleanup: unmounting {mp}")
                unmount_any(mp)


CLEANUP = Cleanup()


def on_signals() -> None:
    """SIGTERM raises KeyboardInterrupt, so a tool's ``finally: CLEANUP.all()`` runs."""
    def raise_interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)


def libfuse_of(pid: int | None) -> str | None:
    """The libfuse shared object a running server has mapped (e.g. libfuse3.so.3.14.0)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            libs = {line.rsplit("/", 1)[-1].strip() for line in f if "/libfuse" in line}
        return ", ".join(sorted(libs)) or None
    except (OSError, TypeError):
        return None


def read_stats(mp: str | os.PathLike) -> dict:
    """A pcrfs mount's counters: the ``user.pcrfs.stats`` xattr of its root, else MNT/.pcrfs/stats."""
    mp = os.fspath(mp)
    try:
        return json.loads(os.getxattr(mp, STATS_XATTR))
    except OSError:
        with open(os.path.join(mp, ".pcrfs", "stats"), "rb") as f:
            return json.loads(f.read())


def daemon_pid(mp: str | os.PathLike) -> int | None:
    """The PID of the pcrfs daemon serving ``mp`` (from its pid file), registered with
    :data:`CLEANUP` (for mounts made another way, e.g. by timing the ``pcrfs mount`` CLI)."""
    mp = os.path.abspath(os.fspath(mp))
    CLEANUP.add_mount(mp)
    pid = mounting.read_pid(mp)
    if pid is not None:
        CLEANUP.pids.add(pid)
    return pid


def unmount_pcrfs(mp: str | os.PathLike, pid: int | None = None) -> None:
    """``pcrfs umount`` (detaching if that fails), then wait for daemon ``pid`` to exit
    (SIGTERM, then SIGKILL, if it does not within 10 s)."""
    mp = os.path.abspath(os.fspath(mp))
    if is_mounted(mp):
        try:
            mounting.umount(mp, echo=quiet, timeout=30)
        except mounting.MountError as e:
            log(f"pcrfs umount {mp} failed ({e}); detaching")
            unmount_any(mp)
    if pid is not None:
        deadline = time.monotonic() + 10
        while mounting.daemon_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if mounting.daemon_alive(pid):
            log(f"daemon {pid} still alive after its unmount; stopping it")
            _stop_pid(pid)
        CLEANUP.pids.discard(pid)


class PcrfsMount:
    """``pcrfs mount STORE MP`` (a background daemon) for the duration of a with-block.

    ``env`` sets environment variables for the daemon only (e.g. ``{"PCRFS_NO_FASTPATH": "1"}``);
    ``cache_size``, ``read_options``, ``options`` are passed to ``pcrfs.fuse.mounting.mount``.
    ``.pid`` is the daemon's PID; the exit unmounts (detaching if it must) and waits for it."""

    def __init__(self, store: str | os.PathLike, mp: str | os.PathLike, log_file: str | os.PathLike | None = None,
                 *, cache_size: int | str | None = None, read_options=None, options: tuple | list = (),
                 env: dict[str, str | None] | None = None, timeout: float = 60) -> None:
        self.store, self.mp = store, os.path.abspath(os.fspath(mp))
        self.log_file = log_file
        self.kw: dict = {"options": list(options), "read_options": read_options, "timeout": timeout}
        if cache_size is not None:
            self.kw["cache_size"] = cache_size
        self.env = env or {}
        self.pid: int | None = None

    def __enter__(self) -> "PcrfsMount":
        CLEANUP.add_mount(self.mp)
        Path(self.mp).mkdir(parents=True, exist_ok=True)
        saved = {k: os.environ.get(k) for k in self.env}
        try:
            for k, v in self.env.items():  # the daemon inherits this process's environment
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            info = mounting.mount(self.store, self.mp, log_file=self.log_file, echo=quiet, **self.kw)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.pid = info.pid
        CLEANUP.pids.add(info.pid)
        return self

    def stats(self) -> dict:
        return read_stats(self.mp)

    def __exit__(self, *exc) -> None:
        unmount_pcrfs(self.mp, self.pid)


class ProcessMount:
    """A FUSE server run in the foreground as a child (``argv``) for the duration of a with-block:
    ready once ``mp`` is a FUSE mount and ``ready(mp)`` holds (default: it lists something);
    the exit unmounts, then waits for the child (SIGTERM after 20 s)."""

    def __init__(self, argv: list[str], mp: str | os.PathLike, log_file: str | os.PathLike, *, name: str = "server",
                 timeout: float = 120, ready=None, env: dict | None = None) -> None:
        self.argv, self.mp, self.log_file, self.name = argv, os.fspath(mp), log_file, name
        self.timeout, self.env = timeout, env
        self.ready = ready or (lambda m: bool(os.listdir(m)))
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> "ProcessMount":
        CLEANUP.add_mount(self.mp)
        if is_mounted(self.mp):
            raise RuntimeError(f"{self.mp} is already mounted")
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
        CLEANUP.procs.append(self.proc)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"{self.name} exited with {self.proc and self.proc.returncode}; "
                                   f"see {self.log_file}")
            e = mounting.mount_entry(self.mp)
            if e is not None and e.fstype.startswith("fuse"):
                try:
                    if self.ready(self.mp):
                        return self
                except OSError:
                    pass
            time.sleep(0.02)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not mount {self.mp} within {self.timeout:.0f} s; see {self.log_file}")

    def stats(self) -> dict:
        return read_stats(self.mp)

    def __exit__(self, *exc) -> None:
        if is_mounted(self.mp):
            unmount_any(self.mp)
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not exit after its unmount; terminating it")
                stop_process(self.proc)
            if self.proc in CLEANUP.procs:
                CLEANUP.procs.remove(self.proc)
