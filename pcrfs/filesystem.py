"""``pcrfs.filesystem``, the public name of :mod:`pcrfs.access.filesystem` (the FUSE-free access layer's
package, ``pcrfs/access/``): this module *is* that one, so both names give the same objects."""
import sys

from .access import filesystem as _module

sys.modules[__name__] = _module
