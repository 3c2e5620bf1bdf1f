"""Every use of mfusepy beyond its public API, in one place, checked when a mount starts.

pcrfs relies on these internals of mfusepy (pinned ``mfusepy>=3.1.1,<3.2`` in pyproject.toml):

* ``FUSE.__init__`` fills its ``fuse_operations`` struct and calls the module's
  ``fuse_main_real`` from within: :class:`FUSE` swaps that function for the duration of
  the call so that the compiled path's callbacks go into the struct (``install``).
* ``FUSE._wrapper`` runs every callback: :class:`FUSE` keeps each libfuse worker's Python
  thread state there (``worker_pinned`` is told once per worker).
* ``FUSE.getattr_fuse_3``, ``FUSE.readdir_fuse_3`` and ``FUSE.opendir`` (the raw libfuse 3
  forms) are overridden by name in :class:`pcrfs.fuse.ops.PcrfsFUSE`.
* ``_libfuse`` (the CDLL): ``fuse_get_context``, ``fuse_invalidate_path``, ``fuse_interrupted``.
* ``c_stat``: the platform's ``struct stat`` as mfusepy declares it (the listings' stat encoder).

:func:`check` finds each with the signature pcrfs was written against: a missing or changed
one stops the mount with a message naming it (rather than mfusepy's own, slower, method
silently serving in its place); an mfusepy version outside the pinned range that still has
them all is served with a warning.
"""
from __future__ import annotations

import ctypes
import inspect
import logging
import threading
from importlib import metadata
from typing import Any, Callable

from . import load_mfusepy

mf = load_mfusepy()
log = logging.getLogger("pcrfs.fuse")

SUPPORTED = ((3, 1, 1), (3, 2))  # [lowest, first unsupported): pyproject's mfusepy>=3.1.1,<3.2
# the FUSE methods used or overridden by name, with the parameters pcrfs calls them with
METHODS = {
    "_wrapper": ["self", "func", "args", "kwargs"],
    "getattr_fuse_3": ["self", "path", "buf", "fip"],
    "readdir_fuse_3": ["self", "path", "buf", "filler", "offset", "fip", "flags"],
    "opendir": ["self", "path", "fip"],
}
LIBFUSE = ("fuse_get_context", "fuse_invalidate_path")  # fuse_interrupted is optional (see interrupt_functions)
STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_size", "st_blocks", "st_blksize", "st_uid", "st_gid",
               "st_atimespec", "st_mtimespec", "st_ctimespec")

c_stat = mf.c_stat


def version() -> str:
    try:
        return metadata.version("mfusepy")
    except metadata.PackageNotFoundError:
        return getattr(mf, "__version__", "unknown")


def _numbers(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def problems() -> list[str]:
    """The internals above that this mfusepy lacks or has with other parameters."""
    found = []
    for name, params in METHODS.items():
        method = getattr(mf.FUSE, name, None)
        if method is None:
            found.append(f"FUSE.{name} is gone")
            continue
        got = list(inspect.signature(method).parameters)
        if got != params:
            found.append(f"FUSE.{name}{tuple(got)} is not FUSE.{name}{tuple(params)}")
    if not callable(getattr(mf, "fuse_main_real", None)):
        found.append("fuse_main_real is gone")
    libfuse = getattr(mf, "_libfuse", None)
    if libfuse is None:
        found.append("_libfuse is gone")
    else:
        found += [f"_libfuse.{name} is missing" for name in LIBFUSE if not hasattr(libfuse, name)]
    fields = {f[0] for f in getattr(c_stat, "_fields_", [])}
    found += [f"c_stat has no {name}" for name in STAT_FIELDS if name not in fields]
    return found


def check() -> None:
    """At a mount's start: RuntimeError naming what is missing; a warning for an unpinned version."""
    v = version()
    wrong = problems()
    if wrong:
        raise RuntimeError(f"mfusepy {v} lacks what pcrfs uses of it ({'; '.join(wrong)}); "
                           "pcrfs needs mfusepy>=3.1.1,<3.2")
    n = _numbers(v)
    if not SUPPORTED[0] <= n < SUPPORTED[1]:
        log.warning("mfusepy %s: pcrfs was written for mfusepy>=3.1.1,<3.2 (the internals it uses are there)", v)


def context_fuse() -> int | None:
    """The ``struct fuse *`` of the session serving this callback (libfuse 3's init and callbacks)."""
    ctx = mf._libfuse.fuse_get_context()
    return ctx.contents.fuse if ctx else None


def invalidate_path() -> Callable[[ctypes.c_void_p, bytes], int]:
    """libfuse's ``fuse_invalidate_path(struct fuse *, const char *path)``."""
    f = mf._libfuse.fuse_invalidate_path
    f.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    f.restype = ctypes.c_int
    return f


def interrupt_functions() -> tuple[Callable[[], int], Callable[[], Any]] | None:
    """libfuse's ``fuse_interrupted()`` and ``fuse_get_context()``, or None if this libfuse lacks one."""
    interrupted = getattr(mf._libfuse, "fuse_interrupted", None)
    context = getattr(mf._libfuse, "fuse_get_context", None)
    if interrupted is None or context is None:
        return None
    interrupted.argtypes = []
    interrupted.restype = ctypes.c_int
    return interrupted, context


_worker = threading.local()
_PyGILState_Ensure = ctypes.pythonapi.PyGILState_Ensure
_PyGILState_Ensure.restype = ctypes.c_int
_PyGILState_Ensure.argtypes = []


class FUSE(mf.FUSE):
    """mfusepy's FUSE with a hook into its ``fuse_operations`` struct and pinned worker threads.

    ``install(ops)``, if given, is called with the filled struct just before libfuse
    starts (the compiled path replaces callbacks in it)."""

    def __init__(self, operations: Any, mountpoint: str, *, install: Callable[[Any], None] | None = None,
                 **kwargs: Any) -> None:
        if install is None:
            super().__init__(operations, mountpoint, **kwargs)
            return
        # mfusepy fills its fuse_operations struct and calls fuse_main_real() within
        # __init__: the struct is handed to install at that call.
        real_main = mf.fuse_main_real

        def main_with_install(argc, argv, ops_p, size, user_data):
            install(ops_p.contents)
            return real_main(argc, argv, ops_p, size, user_data)

        mf.fuse_main_real = main_with_install
        try:
            super().__init__(operations, mountpoint, **kwargs)
        finally:
            mf.fuse_main_real = real_main

    def _wrapper(self, func, *args, **kwargs):
        # libfuse's worker threads are not Python threads: ctypes creates a Python
        # thread state for every callback and destroys it on return, which cost more
        # CPU than the callbacks themselves. One extra, never-released
        # PyGILState_Ensure per worker keeps its thread state for the worker's life.
        if not getattr(_worker, "pinned", False):
            _PyGILState_Ensure()
            _worker.pinned = True
            self.worker_pinned()
        return super()._wrapper(func, *args, **kwargs)

    def worker_pinned(self) -> None:
        """Called once per libfuse worker thread, on its first callback."""
