"""The `pcrfs` command line: the only layer (with the `mount.pcrfs` helper and the demo
tour) that writes to the terminal. One module per group of commands:

- ``main``: the group, ``convert``, ``info``, ``verify``, ``get``, ``make-demo``;
- ``quality``: ``quality`` (measure, plot, write the adaptive index);
- ``mount``: ``mount``, ``umount``, ``demo``;
- ``options``: option types shared by several commands.
"""
from .main import main

__all__ = ["main"]
