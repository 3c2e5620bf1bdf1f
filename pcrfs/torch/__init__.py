"""``pcrfs.torch``, the public name of :mod:`pcrfs.access.torch` (the FUSE-free access layer's
package, ``pcrfs/access/``): this module *is* that one (and its submodules are that
package's), so both names give the same objects."""
import sys

from ..access import torch as _module
from ..access.torch import ahead as _ahead, dataset as _dataset

sys.modules[__name__] = _module
sys.modules[__name__ + ".ahead"] = _ahead
sys.modules[__name__ + ".dataset"] = _dataset
