"""The serving process: ``python -m pcrfs.fuse.daemon STORE MOUNTPOINT [OPTIONS]``.

:func:`pcrfs.fuse.mounting.mount` starts this as a daemon (and ``pcrfs mount
--foreground`` calls :func:`serve` in its own process): it opens the store, checks
the mount point, sends its output to the log file, mounts, and serves until
unmounted. Its command line is :meth:`MountConfig.to_argv` (the options of
``pcrfs mount``, see :data:`pcrfs.fuse.config.OPTIONS`); it always serves in the
foreground. What it has to say goes to its log through :mod:`logging`, configured
here; an error that stops it is one ``pcrfs: error: ...`` line there, which
``mount()`` repeats to its caller.

SIGTERM, SIGINT and SIGHUP make the daemon unmount and exit (libfuse's handlers).

Mounting from the caller's side (start, wait, unmount, stale mounts) is
:mod:`pcrfs.fuse.mounting`; its names are also importable from here, as they were
before the two were split.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Iterable

from ..fsutil import raise_open_file_limit
from ..units import format_size
from .config import DEFAULT_CACHE_SIZE, MountConfig, fuse_options, parse_switch, split_options  # noqa: F401
from .mounting import (  # noqa: F401 - the caller's side, importable from here for existing callers
    FSTYPE, READY_TIMEOUT, STALE_ERRNOS, Echo, MountEntry, MountError, MountInfo, daemon_alive,
    default_log_file, detach_stale, is_stale, mount, mount_config, mount_entry, open_log,
    open_store_checked, pid_file_for, prepare_mountpoint, probe, read_pid, resolved, runtime_dir, umount)

if TYPE_CHECKING:
    from ..store.reader import ReadOptions

log = logging.getLogger("pcrfs.fuse")
LOG_FORMAT = "%(asctime)s pcrfs[%(process)d] %(levelname)s %(message)s"


def configure_logging() -> None:
    """The daemon's log lines, on its stderr (its log file once :func:`serve` redirected it)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True, format=LOG_FORMAT)


def _redirect_output(log_file: str) -> None:
    """Send fds 1 and 2 (Python and libfuse messages alike) to ``log_file``."""
    fd = open_log(log_file)
    sys.stdout.flush()  # what Python buffered for the old fds goes there, not into the log
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def serve(config: MountConfig, echo: Echo = log.info, read_options: "ReadOptions | None" = None) -> None:
    """Mount as ``config`` says and serve in this process until unmounted or signalled.
    ``read_options`` overrides what ``config`` says about reading the store."""
    from ..views import ViewTree
    from .ops import PcrfsOperations

    config = resolved(config)
    kwargs, nonempty = config.fuse_options()
    if config.log_file:
        os.close(open_log(config.log_file))  # an unusable log file is an error now, not after the checks
    raise_open_file_limit()  # before the store sizes its table of open record files from it
    store = open_store_checked(config.store, config.cache_size, read_options or config.read_options())
    prepare_mountpoint(config.mountpoint, echo, allow_nonempty=nonempty)
    if config.log_file:
        _redirect_output(config.log_file)
    configure_logging()
    try:
        tree = ViewTree(store)
    except Exception as e:  # noqa: BLE001 - a store that opened but cannot be laid out as a tree
        log.exception("cannot build the mount's tree")
        raise MountError(f"the store cannot be mounted: {type(e).__name__}: {e}") from None
    pid_file = pid_file_for(config.mountpoint)
    ops = PcrfsOperations(tree, extra_stats={"mountpoint": config.mountpoint, "log_file": config.log_file,
                                             "pid_file": str(pid_file)})
    pid_file.write_text(f"{os.getpid()}\n")
    log.info("mounting %s at %s (cache %s, options %s)", config.store, config.mountpoint,
             format_size(config.cache_size),
             ",".join(f"{k}={v}" if v is not True else k for k, v in kwargs.items()) or "-")
    try:
        _serve_until_unmounted(ops, config, kwargs)
    finally:
        if read_pid(config.mountpoint) == os.getpid():
            pid_file.unlink(missing_ok=True)
        store.close()


def _serve_until_unmounted(ops, config: MountConfig, kwargs: dict[str, object]) -> None:
    from .ops import FUSE_MAIN_FAILURES, FUSE_MAIN_LOOP_ENDED, serve as fuse_serve

    status = fuse_serve(ops, config.mountpoint, fsname=config.store, options=kwargs)
    if status in FUSE_MAIN_FAILURES:
        raise MountError(f"libfuse could not {FUSE_MAIN_FAILURES[status]} (fuse_main status {status}); "
                         "its message is above")
    log.info("unmounted %s%s", config.mountpoint,
             " (stopped by a signal)" if status == FUSE_MAIN_LOOP_ENDED else "")


def run_foreground(store: str, mountpoint: str, *, options: Iterable[str] = (), cache_size: int | str,
                   log_file: str | None = None, allow_other: bool = False, echo: Echo = log.info,
                   read_options: "ReadOptions | None" = None) -> None:
    """:func:`serve` with keyword arguments (for callers that predate :class:`MountConfig`)."""
    mount(store, mountpoint, foreground=True, options=options, cache_size=cache_size, log_file=log_file,
          allow_other=allow_other, echo=echo, read_options=read_options)


def read_options_from(endpoint_url: str | None = None, bwlimit: str | None = None, disk_cache: str | None = None,
                      disk_cache_size: str = "10G", readahead: str | None = None,
                      record_prefix: str | None = None) -> "ReadOptions":
    """ReadOptions from their fstab spellings (ValueError naming a malformed one); through
    :class:`MountConfig`, for callers that predate it."""
    values = dict(endpoint_url=endpoint_url, bwlimit=bwlimit, disk_cache=disk_cache,
                  disk_cache_size=disk_cache_size, readahead=readahead, record_prefix=record_prefix)
    return MountConfig.from_values("", "", values).read_options()


def read_options_argv(o: "ReadOptions | None") -> list[str]:
    """The daemon arguments that carry ``o`` (:meth:`MountConfig.to_argv` without the
    store and the mount point), for callers that predate :class:`MountConfig`."""
    argv = MountConfig("", "").with_read_options(o).to_argv()[:-2]
    return [part for arg in argv for part in arg.split("=", 1)]  # --flag VALUE, as they always were


# ---- python -m pcrfs.fuse.daemon ------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        serve(MountConfig.from_argv(sys.argv[1:] if argv is None else argv), echo=log.warning)
    except (MountError, ValueError) as e:
        log.error("pcrfs: error: %s", e)
        return 1
    except Exception as e:  # noqa: BLE001 - the traceback goes to the log, one line to `pcrfs mount`
        log.exception("the daemon failed")
        log.error("pcrfs: error: the daemon failed: %s: %s", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
