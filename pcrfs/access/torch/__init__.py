"""PyTorch without FUSE: a drop-in for ``torchvision.datasets.ImageFolder`` over a store.

``RecordShuffleSampler`` (from :mod:`pcrfs.sampling`) yields indices in this
dataset's order -- the order of ``torchvision.datasets.ImageFolder`` over a mounted
view -- so it serves both as ``sampler=``.

Needs PyTorch (``pip install 'pcrfs[torch]'``, which also brings torchvision for
the transforms); importing :mod:`pcrfs` itself never does.
"""
try:
    import torch  # noqa: F401 - absolute: the real PyTorch, not this package
except ImportError as e:  # pragma: no cover - exercised with torch hidden
    raise ImportError(f"pcrfs.torch needs PyTorch ({e}): pip install 'pcrfs[torch]'") from e

from ..imagefolder import IMG_EXTENSIONS
from ..sampling import RecordShuffleSampler  # pure Python; here so `sampler=` is one import away
from .dataset import ImageFolder, pil_loader

__all__ = ["ImageFolder", "IMG_EXTENSIONS", "RecordShuffleSampler", "pil_loader"]
