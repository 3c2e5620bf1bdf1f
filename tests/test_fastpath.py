"""What reaches the daemon when a loader reads through the mount, counted exactly.

The mount's speed rests on the kernel answering almost everything itself: no
``open`` (answered ENOSYS once, then never sent), no ``flush`` (ENOSYS once), no
``getattr`` per open (attributes cached for an hour), no ``getxattr`` on reads. A
change that brought any of them back would cost a daemon round trip per file and
show up only as a slower benchmark; here the daemon's own request log (libfuse
``-o debug``: one "opcode:" line per request, with the caller's pid) is counted
for each pass, with the compiled path and with PCRFS_NO_FASTPATH=1.

Python's ``open()`` (before 3.14) asks ``isatty`` once per file: an ioctl the
kernel forwards to the filesystem whatever it answered before (fs/fuse/ioctl.c has
no "no_ioctl" flag), so it is the one request a re-read still costs; a reader that
opens with ``buffering=0`` or ``os.open`` costs the daemon nothing at all.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import termios
from collections import Counter
from pathlib import Path

import pytest

from pcrfs.fuse import fastpath

from mountutil import fuse_unavailable

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

OPCODE = re.compile(r"opcode: (\w+) \(\d+\), nodeid: \d+, insize: \d+, pid: (\d+)")


def files_of(root: Path) -> list[Path]:
    out = []
    for d, subs, files in os.walk(root):
        subs.sort()
        out += [Path(d) / f for f in sorted(files)]
    return out


class RequestLog:
    """The FUSE requests this process sent to one daemon, by opcode, since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.pid = path, 0, str(os.getpid())

    def since_last(self) -> Counter:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            raw = f.read()
        self.offset += len(raw)
        text = raw.decode(errors="replace")
        return Counter(op for op, pid in OPCODE.findall(text) if pid == self.pid)


def python_open(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:  # the loader's way (PIL.Image.open, torchvision's default loader)
            n += len(f.read())
    return n


def unbuffered_open(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:  # explicit buffering: Python asks no isatty
            n += len(f.read())
    return n


def os_open(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            n += len(os.read(fd, os.fstat(fd).st_size + 1))
        finally:
            os.close(fd)
    return n


@pytest.fixture(params=["compiled", "python"])
def debug_mount(request, demo_store, mounts, monkeypatch):
    """A fresh mount whose daemon logs every request (libfuse -o debug)."""
    if request.param == "compiled":
        monkeypatch.delenv(fastpath.DISABLE_ENV, raising=False)
        if fastpath.load()[0] is None:
            pytest.skip(f"compiled path unavailable: {fastpath.load()[1]}")
    else:
        monkeypatch.setenv(fastpath.DISABLE_ENV, "1")
    info = mounts.mount(demo_store, f"debug-{request.param}", options=["debug"])
    return Path(info.mountpoint), RequestLog(Path(info.log_file)), request.param


def test_requests_per_file_first_and_second_pass(debug_mount, reader):
    mnt, requests, path_kind = debug_mount
    paths = files_of(mnt / "full")
    n = len(paths)
    assert n == reader.num_images
    requests.since_last()  # mount, init, the walk's listings

    assert python_open(paths) > 0
    first = requests.since_last()
    # One lookup and one read per file, the isatty ioctl of Python's open(); OPEN and
    # FLUSH are answered ENOSYS once and then never sent again (the kernel remembers).
    assert first["LOOKUP"] == n, first
    assert n <= first["READ"] <= n + 8, first  # a rare file may take a second READ
    assert first["IOCTL"] == n, first
    assert first["OPEN"] <= 1 and first["FLUSH"] <= 1, first
    assert set(first) <= {"LOOKUP", "READ", "IOCTL", "OPEN", "FLUSH"}, first

    # Second pass, every page in the kernel's cache: the ioctl is the one request left.
    python_open(paths)
    assert requests.since_last() == Counter({"IOCTL": n})
    # ... and a reader that asks no isatty reaches the daemon not at all.
    assert unbuffered_open(paths) == os_open(paths) > 0
    assert requests.since_last() == Counter()

    # Counters survive the kernel answering by itself: a first read per file, once.
    doc = json.loads(os.getxattr(mnt, "user.pcrfs.stats"))
    assert doc["views"]["full"]["first_reads"] == n
    assert doc["errors"]["eio"] == 0
    if path_kind == "compiled":  # the compiled path answers (and counts) the ioctls
        assert doc["fastpath"]["ioctls"] == 2 * n
    else:
        assert "fastpath" not in doc


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_isatty_is_answered_not_a_tty(demo_store, mounts, monkeypatch, compiled):
    if compiled:
        monkeypatch.delenv(fastpath.DISABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(fastpath.DISABLE_ENV, "1")
    mnt = Path(mounts.mount(demo_store, "tty").mountpoint)
    path = files_of(mnt / "full")[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not os.isatty(fd)
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
