"""Mounting and unmounting, from the caller's side: start the daemon, wait until the
mount answers, unmount, and recover stale mounts.

``mount()`` by default starts ``python -m pcrfs.fuse.daemon STORE MNT [OPTIONS]``
(:mod:`pcrfs.fuse.daemon`, the serving process) in its own session, with stdin from
/dev/null and stdout/stderr going to a log file (never to the caller's streams: a
caller that captures them would otherwise wait forever for them to close), and returns
once the mount answers. The daemon writes its pid to a pid file (see
:func:`pid_file_for`) and into ``/.pcrfs/stats``.

The store is opened once per mount, by the daemon (its index is read and checked at
open: ~0.9 s at ImageNet scale). Over a pipe (:class:`StartupReport`) the daemon tells
its caller what a user should hear while it opens the store and checks the mount point
(a stale mount recovered), and either that both are fine or the error that stops it,
which ``mount()`` raises as the :class:`MountError` it would have raised itself had it
opened the store.

A mount whose daemon died (``kill -9``, OOM) stays in the mount table and fails
every access with ENOTCONN ("Transport endpoint is not connected"). ``mount()``
notices that on its mount point (with ``statfs``: ``stat`` may be answered from
the kernel's attribute cache), detaches the dead mount and mounts afresh.

Nothing here writes to the terminal: what a user should hear goes to ``echo``
(default: the ``pcrfs.fuse`` logger), errors are :class:`MountError`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .config import DEFAULT_CACHE_SIZE, MountConfig

if TYPE_CHECKING:  # the store layer itself is imported when a mount starts
    from ..store.read.reader import ReadOptions

log = logging.getLogger("pcrfs.fuse")

READY_TIMEOUT = 30.0
PROBE_TIMEOUT = 3.0    # a live daemon answers statfs at once; longer means stopped or hung
UNMOUNT_TIMEOUT = 5.0  # per unmount tool; umount(8) stats the mount point and hangs with its daemon
FSTYPE = "fuse.pcrfs"
STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)

Echo = Callable[[str], None]
_log = log.info  # the default echo: silent unless the caller configures logging


class MountError(Exception):
    """A mount or unmount cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class MountInfo:
    store: str
    mountpoint: str
    pid: int
    log_file: str | None
    pid_file: str


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


# ---- where state lives ------------------------------------------------------------------

def runtime_dir() -> Path:
    """Directory for pid files and default logs (/run/pcrfs for root).

    ``PCRFS_RUNTIME_DIR`` overrides the choice (a test run, or a container whose
    /run is read-only, keeps its state elsewhere)."""
    candidates = []
    if os.environ.get("PCRFS_RUNTIME_DIR"):
        candidates.append(Path(os.environ["PCRFS_RUNTIME_DIR"]))
    if os.geteuid() == 0:
        candidates.append(Path("/run/pcrfs"))
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "pcrfs")
    candidates.append(Path(f"/tmp/pcrfs-{os.geteuid()}"))
    for d in candidates:
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    raise MountError("no writable directory for pcrfs's pid files (tried " +
                     ", ".join(map(str, candidates)) + ")")


def _state_name(mountpoint: str) -> str:
    digest = hashlib.sha1(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    readable = mountpoint.strip("/").replace("/", "-")[-60:].lstrip("-") or "root"
    return f"{readable}-{digest}"


def pid_file_for(mountpoint: str) -> Path:
    return runtime_dir() / (_state_name(_abs(mountpoint)) + ".pid")


def default_log_file(mountpoint: str) -> Path:
    return runtime_dir() / (_state_name(_abs(mountpoint)) + ".log")


def _abs(path: str | os.PathLike) -> str:
    """The absolute, symlink-free form of ``path``, found without stat'ing ``path`` itself
    unless it is a symlink: on a mount whose daemon is stopped, a stat of the mount point
    blocks (readlink of a directory fails at once, from the dentry alone)."""
    p = os.path.abspath(os.fspath(path))
    head, tail = os.path.split(p)
    try:
        os.readlink(p)
    except OSError:  # not a symlink (or not there): only the directories above need resolving
        return os.path.join(os.path.realpath(head), tail) if tail else p
    return os.path.realpath(p)


def read_pid(mountpoint: str) -> int | None:
    try:
        return int(pid_file_for(mountpoint).read_text().strip())
    except (OSError, ValueError):
        return None


# ---- the mount table ----------------------------------------------------------------------

def _unescape_mountinfo(field: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str) -> MountEntry | None:
    """The (topmost) mount at ``mountpoint``, or None."""
    target = _abs(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            if _unescape_mountinfo(fields[4]) == target:
                found = MountEntry(target, rest[0], _unescape_mountinfo(rest[1]))
    return found


def is_stale(mountpoint: str) -> bool:
    """True if ``mountpoint`` is a FUSE mount whose daemon is gone (ENOTCONN)."""
    return probe(mountpoint) == "stale"


def probe(mountpoint: str, timeout: float = PROBE_TIMEOUT) -> str:
    """"ok", "stale" (its daemon is gone: ENOTCONN) or "hung" (no answer in ``timeout``
    seconds: the daemon is stopped or stuck). The ``statfs`` runs in a daemon thread
    because it blocks for as long as the daemon does not answer; an abandoned one ends
    with this process (the kernel's wait for a FUSE reply is killable)."""
    result: list[str] = []
    done = threading.Event()

    def check() -> None:
        try:
            os.statvfs(mountpoint)
            result.append("ok")
        except OSError as e:
            result.append("stale" if e.errno in STALE_ERRNOS else "ok")
        done.set()

    threading.Thread(target=check, name="pcrfs-probe", daemon=True).start()
    return result[0] if done.wait(timeout) else "hung"


def _not_answering(mountpoint: str) -> tuple[str, str]:
    """(why the daemon of ``mountpoint`` does not answer, a remedy with a trailing ", "
    or ""), as far as its pid file and /proc tell."""
    pid = read_pid(mountpoint)
    if pid is None or not daemon_alive(pid):
        return "its daemon does not answer", ""
    if _stopped(pid):
        return f"its daemon (pid {pid}) is stopped", f"resume it with `kill -CONT {pid}`, or "
    return f"its daemon (pid {pid}) does not answer", ""


def _stopped(pid: int) -> bool:
    """True if ``pid`` is stopped (SIGSTOP, or a debugger)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _run(cmd: list[str], timeout: float = UNMOUNT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _unmount_commands(mountpoint: str, lazy: bool) -> list[list[str]]:
    cmds = []
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            cmds.append([tool, "-u"] + (["-z"] if lazy else []) + [mountpoint])
    if os.geteuid() == 0 and shutil.which("umount"):
        cmds.append(["umount"] + (["-l"] if lazy else []) + [mountpoint])
    return cmds


TIMED_OUT = "timed out"  # what _try_unmount says when every tool that ran hung


def _try_unmount(mountpoint: str, lazy: bool) -> tuple[bool, str]:
    """Run the unmount tools in turn; (success, what they said). A "busy" answer wins
    (the others would only add a less useful message), then a tool's own words; if the
    tools only hung (a stopped daemon), it is :data:`TIMED_OUT`."""
    said = "no fusermount3, fusermount or umount found"
    timed_out = False
    for cmd in _unmount_commands(mountpoint, lazy):
        try:
            res = _run(cmd)
        except subprocess.TimeoutExpired:
            timed_out = True
            if mount_entry(mountpoint) is None:
                return True, ""
            continue
        except OSError as e:
            said = f"{cmd[0]}: {e.strerror or e}"
            continue
        if res.returncode == 0 and mount_entry(mountpoint) is None:
            return True, ""
        said = (res.stderr or res.stdout).strip() or f"{' '.join(cmd)} exited {res.returncode}"
        if mount_entry(mountpoint) is None:
            return True, ""
        if "busy" in said.lower():
            return False, said
    if timed_out and said.startswith("no fusermount3"):
        said = TIMED_OUT
    return False, said


def detach_stale(mountpoint: str, echo: Echo = _log) -> None:
    """Remove the dead FUSE mount at ``mountpoint`` (its daemon is gone)."""
    echo(f"pcrfs: {mountpoint} is a stale mount (its daemon is gone: Transport endpoint is not "
         "connected); unmounting it")
    ok, said = _try_unmount(mountpoint, lazy=False)
    if not ok:
        ok, said = _try_unmount(mountpoint, lazy=True)
    if not ok:
        raise MountError(f"{mountpoint} is a stale mount and could not be unmounted ({said}); "
                         f"try: fusermount3 -uz {mountpoint}  (or as root: umount -l {mountpoint})")
    stale_pid = pid_file_for(mountpoint)
    stale_pid.unlink(missing_ok=True)


def prepare_mountpoint(mountpoint: str, echo: Echo = _log, allow_nonempty: bool = False) -> None:
    """Check that ``mountpoint`` can be mounted on; recover it if it is a stale mount."""
    entry = mount_entry(mountpoint)
    if entry is not None:
        state = probe(mountpoint) if entry.fstype.startswith("fuse") else "ok"
        if state == "stale":
            detach_stale(mountpoint, echo)
        elif state == "hung":
            why, remedy = _not_answering(mountpoint)
            raise MountError(f"{mountpoint} is already mounted and {why}: {remedy}detach that mount with "
                             f"`pcrfs umount --lazy {mountpoint}` and mount again")
        else:
            raise MountError(f"{mountpoint} is already mounted ({entry.fstype} from {entry.source}); "
                             f"unmount it first: pcrfs umount {mountpoint}")
    if not os.path.exists(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist (create it: mkdir -p {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if not allow_nonempty:
        with os.scandir(mountpoint) as it:
            if next(it, None) is not None:
                raise MountError(f"mount point {mountpoint} is not empty; pcrfs mounts on an empty "
                                 "directory (the mount would hide what is there). Use an empty directory, "
                                 "or -o nonempty to hide the contents while mounted")


# ---- the store and the log, checked before a daemon starts ----------------------------------

def store_location(store: str | os.PathLike) -> str:
    """An absolute path for a local store (found as :func:`_abs` finds one: the daemon runs
    from another directory); a URL (s3://...) without a trailing slash."""
    from ..store.sources.location import canonical_location

    return canonical_location(store, _abs)


def open_store_checked(store: str, cache_bytes: int, read_options: "ReadOptions | None" = None):
    """The store, opened; MountError with the reader's reason if it cannot be."""
    from ..store.read.reader import StoreError, open_store

    try:
        return open_store(store, cache_bytes=cache_bytes, options=read_options)
    except StoreError as e:
        raise MountError(str(e)) from e
    except OSError as e:  # e.g. a --disk-cache directory that cannot be made
        raise MountError(f"{e.filename or store}: {e.strerror or e}") from e


def open_log(log_file: str) -> int:
    """An fd appending to ``log_file``; MountError saying why if it cannot be written."""
    try:
        return os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise MountError(f"cannot write the log file {log_file}: {e.strerror}; choose another "
                         "with --log-file") from None



# ---- the daemon's start-up report ------------------------------------------------------------

STATUS_FD_ENV = "PCRFS_STATUS_FD"  # the daemon's end of the start-up pipe (a descriptor number)


class StartupReport:
    """The daemon's side of the pipe its caller (:func:`mount`) reads while the daemon
    opens the store and checks the mount point: ``echo`` lines for the user, then either
    ``checked`` (the caller goes on to wait for the mount) or the ``error`` that stops the
    daemon. One JSON object per line; closed after the last one. A caller that went away
    is not an error: the daemon goes on."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # not for libfuse's fusermount3 nor any other child
        self._file = os.fdopen(fd, "w", encoding="ascii")

    @classmethod
    def from_environment(cls) -> "StartupReport | None":
        """The report :func:`mount` asked for (``PCRFS_STATUS_FD``), or None (started otherwise)."""
        value = os.environ.pop(STATUS_FD_ENV, "")
        try:
            return cls(int(value)) if value else None
        except (ValueError, OSError):
            return None

    def echo(self, text: str) -> None:
        self._send({"echo": text})

    def checked(self) -> None:
        self._send({"checked": True})
        self.close()

    def error(self, text: str) -> None:
        """The error that stops the daemon before ``checked`` (nothing once that was sent)."""
        self._send({"error": text})
        self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _send(self, message: dict) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(message) + "\n")  # ASCII: lone surrogates of odd paths escaped
            self._file.flush()
        except OSError:  # the caller is gone (EPIPE)
            self.close()


def _wait_checked(proc: subprocess.Popen, report: int, echo: Echo) -> None:
    """Relay the daemon's start-up report (see :class:`StartupReport`) until it has opened
    the store and checked the mount point; its error is raised as MountError. Returns at
    ``checked`` or when the pipe ends without one (the daemon died: :func:`_wait_ready`
    reports that). Like the caller's own store open it replaces, this has no time limit;
    an interrupt stops the daemon."""
    with os.fdopen(report, "rb") as lines:
        try:
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "echo" in message:
                    echo(str(message["echo"]))
                elif "error" in message:
                    _reap(proc)
                    raise MountError(str(message["error"]))
                elif message.get("checked"):
                    return
        except BaseException as e:
            if not isinstance(e, MountError):
                _reap(proc, stop=True)
            raise


def _reap(proc: subprocess.Popen, stop: bool = False) -> None:
    """Wait for a daemon that is exiting (SIGTERM it first if ``stop``; SIGKILL after 5 s)."""
    if stop:
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _children.pop(proc.pid, None)


_children: dict[int, subprocess.Popen] = {}  # keeps Popen objects alive (no ResourceWarning)


def daemon_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of this process counts as gone and is reaped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            _children.pop(pid, None)
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


def _log_tail(path: str, start: int = 0, lines: int = 15) -> str:
    """The last ``lines`` lines ``path`` gained after byte ``start``, indented."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (nothing logged)"


def _log_reason(path: str, start: int = 0) -> str:
    """One line saying why the daemon stopped: its own ``pcrfs: error:`` line if it wrote
    one, else the last line it logged (a traceback's last line names the exception);
    the whole traceback stays in the log."""
    tail = [line.strip() for line in _log_tail(path, start, lines=200).splitlines() if line.strip()]
    for line in reversed(tail):
        if "pcrfs: error: " in line:  # after the log line's time and pid
            return line.partition("pcrfs: error: ")[2]
    return tail[-1] if tail else "(nothing logged)"


def _wait_ready(proc: subprocess.Popen, mountpoint: str, log_file: str, log_start: int, timeout: float) -> None:
    stats = os.path.join(mountpoint, ".pcrfs", "stats")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _children.pop(proc.pid, None)
            raise MountError(f"the pcrfs daemon exited with status {proc.returncode} before the mount was "
                             f"ready: {_log_reason(log_file, log_start)} (its log: {log_file})")
        entry = mount_entry(mountpoint)
        if entry is not None and entry.fstype == FSTYPE and os.path.exists(stats):
            return
        time.sleep(0.02)
    _reap(proc, stop=True)
    if mount_entry(mountpoint) is not None:
        _try_unmount(mountpoint, lazy=True)
    raise MountError(f"the mount at {mountpoint} was not ready after {timeout:.0f}s; see {log_file}:\n"
                     f"{_log_tail(log_file, log_start)}")


def mount(store: str | os.PathLike, mountpoint: str | os.PathLike,
          options: Iterable[str] = (), cache_size: int | str = DEFAULT_CACHE_SIZE,
          log_file: str | os.PathLike | None = None, allow_other: bool = False,
          echo: Echo = _log, timeout: float = READY_TIMEOUT,
          read_options: "ReadOptions | None" = None) -> MountInfo | None:
    """Mount ``store`` at ``mountpoint``.

    Starts the daemon and returns a :class:`MountInfo` once the mount is ready (to
    serve in the calling process, see :func:`pcrfs.fuse.daemon.start`).
    ``store`` is a directory or a URL (``s3://bucket/prefix``); ``read_options``
    carries the endpoint, bandwidth limit, disk cache and readahead settings (those the
    daemon's command line can say: :meth:`MountConfig.with_read_options`).
    Raises :class:`MountError` with a message meant for the user (ValueError for
    a malformed option value).
    """
    options = tuple(options) + (("allow_other",) if allow_other else ())
    config = MountConfig.from_values(os.fspath(store), os.fspath(mountpoint), {
        "options": options, "cache_size": cache_size,
        "log_file": os.fspath(log_file) if log_file else None}).with_read_options(read_options)
    return mount_config(config, echo=echo, timeout=timeout, read_options=read_options)


def mount_config(config: MountConfig, echo: Echo = _log, timeout: float = READY_TIMEOUT,
                 read_options: "ReadOptions | None" = None) -> MountInfo:
    """Start a daemon that mounts as ``config`` says, and wait until it is ready (see
    :func:`mount`). A foreground config is served in the calling process by
    :func:`pcrfs.fuse.daemon.start` instead: this module never loads the serving side."""
    if config.foreground:
        raise ValueError("a foreground mount is served by pcrfs.fuse.daemon.start, not started as a daemon")
    return _start_daemon(resolved(config.with_read_options(read_options)), echo, timeout)


def resolved(config: MountConfig) -> MountConfig:
    """``config`` with absolute paths: the daemon runs in / and may be started from anywhere."""
    return replace(config, store=store_location(config.store), mountpoint=_abs(config.mountpoint),
                   log_file=_abs(config.log_file) if config.log_file else None,
                   disk_cache=_abs(config.disk_cache) if config.disk_cache else None)


def _start_daemon(config: MountConfig, echo: Echo, timeout: float) -> MountInfo:
    mp = config.mountpoint
    log_path = config.log_file or str(default_log_file(mp))
    # a default log made for a mount that fails its checks goes again (none was made when
    # this process ran the checks itself)
    drop_log = not config.log_file and not os.path.exists(log_path)
    if config.log_file:
        os.close(open_log(log_path))
    # The daemon opens the store and checks the mount point, in the order this process
    # used to before starting it, and reports each error as this process would have
    # (_wait_checked): the store's index is read once per mount.
    argv = [sys.executable, "-m", "pcrfs.fuse.daemon", *replace(config, log_file=log_path).to_argv()]
    report, report_w = os.pipe()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{STATUS_FD_ENV: str(report_w)})
    try:
        with open(log_path, "ab") as logf:
            log_start = logf.tell()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, pass_fds=(report_w,), cwd="/",
                                    env=env)
    except BaseException:
        os.close(report)
        raise
    finally:
        os.close(report_w)
    _children[proc.pid] = proc
    try:
        _wait_checked(proc, report, echo)
    except MountError:
        if drop_log:
            Path(log_path).unlink(missing_ok=True)
        raise
    _wait_ready(proc, mp, log_path, log_start, timeout)
    echo(f"pcrfs: mounted {config.store} at {mp} (daemon pid {proc.pid}, log {log_path})")
    return MountInfo(config.store, mp, proc.pid, log_path, str(pid_file_for(mp)))


def umount(mountpoint: str | os.PathLike, lazy: bool = False, echo: Echo = _log,
           timeout: float = 10.0) -> None:
    """Unmount a pcrfs mount and wait for its daemon to exit (unless ``lazy``)."""
    mp = _abs(mountpoint)
    entry = mount_entry(mp)
    if entry is None:
        raise MountError(f"{mp} is not mounted")
    if not entry.fstype.startswith("fuse"):
        raise MountError(f"{mp} is a {entry.fstype} mount, not pcrfs; use umount(8)")
    pid = read_pid(mp)
    ok, said = _try_unmount(mp, lazy)
    if not ok:
        if "busy" in said.lower() and probe(mp) == "hung":
            why, remedy = _not_answering(mp)
            raise MountError(f"{mp} is busy: processes wait for reads there (see: fuser -vm {mp}) and {why}: "
                             f"{remedy}detach the mount now with `pcrfs umount --lazy {mp}`.")
        if "busy" in said.lower():
            raise MountError(f"{mp} is busy: a process has a file open there or its working directory "
                             f"inside (see: fuser -vm {mp}). Close it and retry, or detach now with "
                             f"`pcrfs umount --lazy {mp}` (the mount is released when the last user lets go).")
        if said == TIMED_OUT:
            why, remedy = _not_answering(mp)
            raise MountError(f"could not unmount {mp}: the unmount did not finish in {UNMOUNT_TIMEOUT:.0f}s "
                             f"and {why}: {remedy}detach it now with `pcrfs umount --lazy {mp}`")
        raise MountError(f"could not unmount {mp}: {said}")
    if pid is not None and not lazy:
        deadline = time.monotonic() + timeout
        while daemon_alive(pid) and not _stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not daemon_alive(pid):
            pid_file_for(mp).unlink(missing_ok=True)
        elif _stopped(pid):
            echo(f"pcrfs: unmounted {mp}; its daemon (pid {pid}) is stopped and exits once resumed "
                 f"(kill -CONT {pid})")
            return
        else:
            echo(f"pcrfs: unmounted {mp}, but its daemon (pid {pid}) has not exited after {timeout:.0f}s")
            return
    echo(f"pcrfs: unmounted {mp}" + (" (lazily: released when no longer in use)" if lazy else ""))

