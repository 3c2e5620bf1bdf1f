"""pcrfs: Progressive Compressed Records served as a filesystem of fidelity views."""
from ._version import __version__


def open_store(location, **kwargs):
    """Open a PCR store read-only; see :class:`pcrfs.store.read.reader.Store`."""
    from .store.read.reader import open_store as _open

    return _open(location, **kwargs)


__all__ = ["open_store", "__version__"]
