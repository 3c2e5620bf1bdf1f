"""The compiled path's record holders under contention, without FUSE.

``_fastpath`` serves a record from a descriptor or a buffer it may be asked to give back
at any time (``revoke``: the cache dropped the prefix). Here its read callback is called
directly (through ctypes, which releases the GIL) from several threads while another
thread revokes and re-adopts the records' holders as fast as it can: every read must
return the image's exact bytes or fall back to the Python callback, and nothing may
crash. A buffer must stay alive while a read copies from it (here the module holds the
only reference to each), and a descriptor must not be closed under a pread: either bug
shows as a crash, wrong bytes, or -- where the CRC-32 check catches the damage -- reads
that fall back although a holder was there (counted, not asserted: that race is benign).
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

import pytest

from pcrfs.fuse import fastpath
from pcrfs.store.read.reader import open_store
from pcrfs.access.views import ViewTree

READ = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                        ctypes.c_void_p)
GETATTR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p)
GETXATTR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
FALLBACK = -errno.EAGAIN  # what the stand-in for the Python callbacks answers


@pytest.fixture
def module():
    mod, why = fastpath.load()
    if mod is None:
        pytest.skip(f"compiled path unavailable: {why}")
    return mod


def test_reads_stay_exact_while_holders_come_and_go(module, demo_store):
    fallbacks = [0]

    @READ
    def py_read(path, buf, size, off, fi):
        fallbacks[0] += 1
        return FALLBACK

    @GETATTR
    def py_getattr(path, st, fi):
        return -errno.ENOENT

    @GETXATTR
    def py_getxattr(path, name, value, size):
        return -errno.ENODATA

    addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    with open_store(demo_store) as store:
        tree = ViewTree(store)
        fp = fastpath.FastPath(module, tree, (os.getuid(), os.getgid()))
        state = fp.state
        fast_read_addr = state.install(addr(py_read), addr(py_getattr), addr(py_getxattr))[0]
        try:
            _contend(store, state, READ(fast_read_addr), fallbacks)
        finally:
            fp.release()  # uninstalled: another test's State may be installed next


def _contend(store, state, fast_read, fallbacks: list[int]) -> None:
    index = store.index
    k = 3
    records = sorted({index.record_of(i) for i in range(store.num_images)})
    whole = {r: store.read_record(r) for r in records}
    images = [i for i in range(store.num_images) if store.n_groups(i) >= k][:60]
    expected = {i: store.read(i, k) for i in images}
    stop = threading.Event()
    errors: list[str] = []
    served = [0]

    def holders() -> None:  # revoke and adopt, alternating buffers and descriptors
        turn = 0
        while not stop.is_set():
            for r in records:
                state.revoke(r)
                if turn % 2:
                    state.adopt(r, bytearray(whole[r]), 0, index.num_groups, True)  # the only reference
                else:
                    fd = os.open(store.records.describe(r), os.O_RDONLY)
                    if not state.adopt(r, fd, 0, index.num_groups, False):
                        os.close(fd)
            turn += 1

    def reader(seed: int) -> None:
        buf = ctypes.create_string_buffer(1 << 20)
        for n in range(3000):
            i = images[(seed * 7 + n) % len(images)]
            path = f"/scan{k}/{store.path(i)}".encode()
            got = fast_read(path, buf, len(buf), 0, None)
            if got == FALLBACK:
                continue
            if buf.raw[:got] != expected[i]:
                errors.append(f"image {i}: {got} bytes, not the image's")
                return
            served[0] += 1

    changer = threading.Thread(target=holders)
    changer.start()
    readers = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    t0 = time.monotonic()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    changer.join()
    for r in records:
        state.revoke(r)
    assert not errors, errors
    assert served[0] > 100 and fallbacks[0] > 0, (served[0], fallbacks[0])  # both sides of the race ran
    assert time.monotonic() - t0 < 120
