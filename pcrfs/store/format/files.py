"""Opening a store's own files: regular files only, never blocking, never unbounded.

A store is a directory anyone may have handed us, so each of its files (the
manifest, the index, the adaptive index, every record) is opened the same way:
``O_NOFOLLOW`` so a symlink is refused instead of followed out of the store,
``O_NONBLOCK`` so a FIFO put in place of a file cannot block the open (opening a
FIFO for reading waits for a writer), then ``fstat`` and a regular-file check on
the descriptor itself, so what is checked is what is read. Small files are read
with a byte cap taken from what the manifest promises, so a crafted
``/dev/zero``-like or huge file costs an error, not memory.
"""
from __future__ import annotations

import errno
import os
import stat

# O_NONBLOCK has no effect on regular files; it only keeps a FIFO's open from waiting.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
READ_PIECE = 1 << 20  # bytes per read() of a capped read


class NotRegularFile(OSError):
    """A store file is a symlink, FIFO, device, directory or socket; or larger than it may be."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


def kind_of(mode: int) -> str:
    """'a FIFO', 'a symlink', ... for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> tuple[int, int]:
    """``(fd, size)`` of the regular file at ``path``; :class:`NotRegularFile` for anything
    else (a symlink included), plain OSError (ENOENT, EACCES, ...) if it cannot be opened."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:  # what O_NOFOLLOW answers for a symlink
            raise NotRegularFile(f"{os.fspath(path)} is a symlink (a store serves only its own regular files)") \
                from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{os.fspath(path)} is {kind_of(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path`` if it holds at most ``max_bytes``;
    :class:`NotRegularFile` if it is not a regular file or holds more."""
    fd, size = open_regular(path)
    try:
        if size > max_bytes:
            raise NotRegularFile(f"{os.fspath(path)} is {size} bytes, more than the {max_bytes} it may hold")
        parts, got = [], 0
        # read to EOF, not to st_size: a file that grows meanwhile still stops at the cap
        while chunk := os.read(fd, min(READ_PIECE, max_bytes + 1 - got)):
            parts.append(chunk)
            got += len(chunk)
            if got > max_bytes:
                raise NotRegularFile(f"{os.fspath(path)} holds more than the {max_bytes} bytes it may hold")
        return b"".join(parts)
    finally:
        os.close(fd)
