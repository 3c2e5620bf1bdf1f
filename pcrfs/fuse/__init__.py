"""The FUSE mount: a thin adapter from the kernel to :class:`pcrfs.access.views.ViewTree`.

* :mod:`pcrfs.fuse.ops`      -- the mfusepy ``Operations`` (read-only, caching policy)
* :mod:`pcrfs.fuse.fastpath` -- the optional compiled lookups and reads (``_fastpath.c``)
* :mod:`pcrfs.fuse.mfuse_compat` -- every use of mfusepy's internals, checked when a mount starts
* :mod:`pcrfs.fuse.config`   -- ``MountConfig``: the mount's options, declared once
* :mod:`pcrfs.fuse.mounting` -- ``mount``/``umount`` from the caller's side: start, readiness, stale mounts
* :mod:`pcrfs.fuse.daemon`   -- the serving process (``python -m pcrfs.fuse.daemon``)
* :mod:`pcrfs.fuse.mount_helper` -- ``mount.pcrfs`` for ``mount -t pcrfs`` and fstab

The ``pcrfs mount|umount|stats`` commands are in :mod:`pcrfs.cli.mount`, ``pcrfs demo`` in
:mod:`pcrfs.cli.demo`.

mfusepy binds libfuse 2 unless told otherwise; :func:`load_mfusepy` makes it
bind libfuse 3 when that is installed (readdirplus, ``init`` with a config,
ENOTTY-cheap ioctls), without leaving anything changed in the environment.
"""
from __future__ import annotations

import os
import sys
from ctypes.util import find_library

_SELECTORS = ("FUSE_LIBRARY_PATH", "FUSE_LIBRARY_NAME")


def load_mfusepy():
    """Import mfusepy, preferring libfuse 3 unless the user chose a library."""
    if "mfusepy" in sys.modules:
        return sys.modules["mfusepy"]
    if any(os.environ.get(k) for k in _SELECTORS) or not find_library("fuse3"):
        import mfusepy

        return mfusepy
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        import mfusepy
    finally:
        del os.environ["FUSE_LIBRARY_NAME"]
    return mfusepy
