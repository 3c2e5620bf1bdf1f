"""pcrfs: Progressive Compressed Records served as a filesystem of fidelity views."""
__version__ = "0.1.0"


def open_store(location, **kwargs):
    """Open a PCR store read-only; see :class:`pcrfs.store.reader.Store`."""
    from .store.reader import open_store as _open

    return _open(location, **kwargs)


__all__ = ["open_store", "__version__"]
