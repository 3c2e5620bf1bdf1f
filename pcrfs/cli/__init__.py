"""The `pcrfs` command line: the only layer (with the `mount.pcrfs` helper and the demo
tour) that writes to the terminal. One module per group of commands:

- ``main``: the group, ``convert``, ``info``, ``verify``, ``get``;
- ``quality``: ``quality`` (measure, plot, write the adaptive index);
- ``mount``: ``mount``, ``umount``, ``stats`` (options from :mod:`pcrfs.fuse.config`);
- ``demo``: ``demo`` (the tour) and ``make-demo``;
- ``options``: options and helpers shared by several commands (``fail``, the Dask options).
"""
from .main import main

__all__ = ["main"]
