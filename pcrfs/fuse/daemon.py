"""The serving process: ``python -m pcrfs.fuse.daemon STORE MOUNTPOINT [OPTIONS]``.

:func:`pcrfs.fuse.mounting.mount` starts this as a daemon (and ``pcrfs mount
--foreground`` calls :func:`serve` in its own process): it opens the store, checks
the mount point, sends its output to the log file, mounts, and serves until
unmounted. Its command line is :meth:`MountConfig.to_argv` (the options of
``pcrfs mount``, see :data:`pcrfs.fuse.config.OPTIONS`); it always serves in the
foreground. What it has to say goes to its log through :mod:`logging`, configured
here; an error that stops it is one ``pcrfs: error: ...`` line there, which
``mount()`` repeats to its caller. Until the store is open and the mount point checked,
what the user should hear and the error that stops it also go to ``mount()`` over its
start-up pipe (:class:`~pcrfs.fuse.mounting.StartupReport`): the daemon is the only
process that opens the store.

SIGTERM, SIGINT and SIGHUP make the daemon unmount and exit (libfuse's handlers).

Mounting from the caller's side (start a daemon, wait, unmount, stale mounts) is
:mod:`pcrfs.fuse.mounting`; :func:`start` is the one entry for both: it serves in the
calling process for a foreground config and starts a daemon otherwise.
"""
from __future__ import annotations

import logging
import gc
import os
import sys
from typing import TYPE_CHECKING

from ..fsutil import raise_open_file_limit
from ..units import format_size
from .config import MountConfig
from .mounting import (Echo, MountError, MountInfo, READY_TIMEOUT, StartupReport, mount_config, open_log,
                       open_store_checked, pid_file_for, prepare_mountpoint, read_pid, resolved)

if TYPE_CHECKING:
    from ..store.read.reader import ReadOptions

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


def serve(config: MountConfig, echo: Echo = log.info, read_options: "ReadOptions | None" = None,
          report: StartupReport | None = None) -> None:
    """Mount as ``config`` says and serve in this process until unmounted or signalled.
    ``read_options`` overrides what ``config`` says about reading the store; ``report``
    is told once the store is open and the mount point checked."""
    from ..access.views import ViewTree
    from .ops import PcrfsOperations

    config = resolved(config)
    kwargs, nonempty = config.fuse_options()
    if config.log_file:
        os.close(open_log(config.log_file))  # an unusable log file is an error now, not after the checks
    raise_open_file_limit()  # before the store sizes its table of open record files from it
    store = open_store_checked(config.store, config.cache_size, read_options or config.read_options())
    prepare_mountpoint(config.mountpoint, echo, allow_nonempty=nonempty)
    if report is not None:
        report.checked()
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
    # Everything made so far (the S3 client's service models, numpy, the index's tables)
    # lives as long as the mount: out of the collector's sight, a full collection while
    # serving costs a few ms instead of ~70 (perf: 25-40% of a shuffled remote epoch's
    # daemon CPU went to collections walking the start-up heap).
    gc.collect()
    gc.freeze()
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


def start(config: MountConfig, echo: Echo = log.info, timeout: float = READY_TIMEOUT,
          read_options: "ReadOptions | None" = None) -> MountInfo | None:
    """Mount as ``config`` says: serve in this process until unmounted (``foreground``;
    returns None), or start a daemon and return once its mount is ready."""
    if config.foreground:
        serve(config, echo=echo, read_options=read_options)
        return None
    return mount_config(config, echo=echo, timeout=timeout, read_options=read_options)


# ---- python -m pcrfs.fuse.daemon ------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    configure_logging()
    report = StartupReport.from_environment()

    def echo(text: str) -> None:
        log.warning("%s", text)
        if report is not None:
            report.echo(text)

    try:
        serve(MountConfig.from_argv(sys.argv[1:] if argv is None else argv), echo=echo, report=report)
    except (MountError, ValueError) as e:
        log.error("pcrfs: error: %s", e)
        if report is not None:  # before the checks were done: mount() raises this; after: a no-op
            report.error(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - the traceback goes to the log, one line to `pcrfs mount`
        log.exception("the daemon failed")
        log.error("pcrfs: error: the daemon failed: %s: %s", type(e).__name__, e)
        return 1
    finally:
        if report is not None:
            report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
