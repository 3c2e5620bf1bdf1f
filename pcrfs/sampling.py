"""``pcrfs.sampling``, the public name of :mod:`pcrfs.access.sampling` (the FUSE-free access layer's
package, ``pcrfs/access/``): this module *is* that one, so both names give the same objects."""
import sys

from .access import sampling as _module

sys.modules[__name__] = _module
