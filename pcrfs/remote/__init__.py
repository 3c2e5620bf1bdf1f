"""Stores on object storage: the pieces the remote read and write paths are made of.

* :mod:`.retry`   -- retries with exponential backoff, and which errors deserve one;
* :mod:`.bwlimit` -- a token bucket that caps the bandwidth taken from the store;
* :mod:`.fs`      -- fsspec/s3fs filesystems from URLs, and errors a user can act on.

Nothing here knows about the PCR format; :mod:`pcrfs.store.sources.backends` and
:mod:`pcrfs.store.sources.location` build the store's view of a remote location on top.
"""
