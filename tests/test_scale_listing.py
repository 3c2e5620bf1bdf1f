"""What a walk of a big view costs the daemon per entry: the compiled listing loop
(``_fastpath.fill_dir``) hands libfuse exactly what the Python loop did, and a
names-only listing builds neither the files' sizes nor their complete stats."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from pcrfs.fuse import fastpath
from pcrfs.fuse.ops import FUSE_READDIR_PLUS, STAT_SIZE, PcrfsFUSE, PcrfsOperations, mf
from pcrfs.store.read.reader import open_store
from pcrfs.access.views import ViewTree

FILLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int)
COMPILED = fastpath.fill_dir_function(STAT_SIZE)
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="pcrfs.fuse._fastpath is not built")


@pytest.fixture(scope="module")
def tree(demo_store):
    return ViewTree(open_store(demo_store))


def _fill(ops: PcrfsOperations, path: str, offset: int, flags: int, stop_after: int | None = None) -> list:
    """libfuse 3's readdir callback with a real C-callable filler; what it was handed, stats decoded."""
    got = []

    def filler(buf, name, stat_p, off, fill_flags):
        s = mf.c_stat.from_address(stat_p)
        got.append((name, off, fill_flags, s.st_ino, s.st_mode, s.st_size, s.st_nlink, s.st_uid, s.st_gid,
                    s.st_blocks, s.st_blksize, s.st_mtimespec.tv_sec, s.st_mtimespec.tv_nsec, buf))
        return 1 if stop_after is not None and len(got) >= stop_after else 0

    callback = FILLER(filler)
    fake = type("F", (), {"operations": ops, "encoding": "utf-8", "errors": "surrogateescape"})()
    fh = ops.opendir(path)
    fip = type("P", (), {"contents": type("FI", (), {"fh": fh})()})()
    try:
        assert PcrfsFUSE.readdir_fuse_3(fake, path.encode(), 0xABC0, callback, offset, fip, flags) == 0
    finally:
        ops.releasedir(path, fh)
    return got


def _both(tree: ViewTree, attrs_used: bool, *calls) -> tuple[list, list]:
    """The same readdir calls through the Python loop and through the compiled one."""
    out = []
    for compiled in (None, COMPILED):
        ops = PcrfsOperations(tree)
        ops.fill_dir = compiled
        ops._listing_attrs_used = attrs_used
        out.append([_fill(ops, *call) for call in calls])
    return out[0], out[1]


@needs_compiled
@pytest.mark.parametrize("attrs_used", [True, False])
def test_compiled_loop_hands_libfuse_what_the_python_loop_did(tree, attrs_used):
    cls = next(name for name, _ in tree.readdir("/scan3"))
    path = f"/scan3/{cls}"
    calls = [(path, 0, FUSE_READDIR_PLUS), (path, 0, 0), (path, 0, FUSE_READDIR_PLUS, 1), (path, 0, 0, 5),
             (path, 2, FUSE_READDIR_PLUS), (path, 4, 0, 3), ("/scan3", 0, FUSE_READDIR_PLUS), ("/", 0, 0)]
    python, compiled = _both(tree, attrs_used, *calls)
    assert compiled == python
    assert len(python[0]) == len(tree.readdir(path)) + 2 and len(python[2]) == 1 and len(python[3]) == 5


@needs_compiled
def test_a_names_only_listing_carries_inodes_and_types_and_builds_no_sizes(demo_store):
    tree = ViewTree(open_store(demo_store))
    ops = PcrfsOperations(tree)
    ops.fill_dir = COMPILED
    cls = next(name for name, _ in tree.readdir("/scan2"))
    path = f"/scan2/{cls}"
    complete = _fill(ops, path, 0, FUSE_READDIR_PLUS)  # attributes used: complete stats, paged
    ops._listing_attrs_used = False  # as after a bare walk
    names_only = _fill(ops, path, 0, FUSE_READDIR_PLUS)
    assert [(g[1], g[2]) for g in names_only] == [(0, 0)] * len(complete)  # whole, no attributes
    assert [g[0] for g in names_only] == [g[0] for g in complete]
    assert [(g[3], g[4]) for g in names_only] == [(g[3], g[4]) for g in complete]  # d_ino and d_type
    # the files' sizes were computed for the first (complete) listing only: a fresh tree
    # that only ever lists names only never computes them
    fresh = ViewTree(open_store(demo_store))
    ops = PcrfsOperations(fresh)
    ops.fill_dir, ops._listing_attrs_used = COMPILED, False
    assert [g[:5] for g in _fill(ops, path, 0, FUSE_READDIR_PLUS)] == [g[:5] for g in names_only]
    d = fresh.resolve(path).dir_id
    assert fresh.listing(d)._sizes is None


def test_lazy_sizes_are_the_sizes(tree):
    """A listing's sizes, computed on first use, are every file's size in every view."""
    store = tree.store
    for name, _ in tree.readdir("/full"):
        listing = tree.listing(tree.resolve(f"/full/{name}").dir_id)
        for col, image in enumerate(listing.images[:5]):
            assert [int(v) for v in listing.sizes[col]] == [store.size(int(image), k)
                                                          for k in range(1, store.num_groups + 1)]
        entries = tree.readdir(f"/scan2/{name}")
        assert entries.file_sizes.tolist() == [store.size(int(i), 2) for i in listing.images]


@needs_compiled
def test_compiled_loop_refuses_what_it_cannot_read():
    stats = np.zeros(2, mf.c_stat)
    filler = ctypes.cast(FILLER(lambda *a: 0), ctypes.c_void_p).value
    with pytest.raises(ValueError):
        COMPILED(filler, 0, [b"a", b"b"], stats.ctypes.data, 0, 3, 0, False)  # past the names
    with pytest.raises(ValueError):
        COMPILED(filler, 0, [b"a"], 0, 0, 1, 0, False)  # no stats
    with pytest.raises(TypeError):
        COMPILED(filler, 0, [b"a", "b"], stats.ctypes.data, 0, 2, 0, False)  # a str among the names


def test_compiled_loop_is_off_with_the_compiled_path(monkeypatch):
    monkeypatch.setenv(fastpath.DISABLE_ENV, "1")
    assert fastpath.fill_dir_function(STAT_SIZE) is None
    monkeypatch.delenv(fastpath.DISABLE_ENV)
    if COMPILED is not None:
        assert fastpath.fill_dir_function(STAT_SIZE + 8) is None  # another struct stat: not used
