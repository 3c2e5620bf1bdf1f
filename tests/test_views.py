"""Directory listings without FUSE: name splitting, DirEntries, and the FUSE
adapter's listing block handed to a real (ctypes) filler callback."""
from __future__ import annotations

import ctypes
import os
import stat as st

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pcrfs.fuse.ops import FUSE_FILL_DIR_PLUS, FUSE_READDIR_PLUS, PcrfsFUSE, PcrfsOperations
from pcrfs.store.read.reader import open_store
from pcrfs.access.views import ViewTree, split_names

# names as a filesystem allows them: any bytes but '/' and NUL, not "." or ".."
name_bytes = hs.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"-")).filter(
    lambda b: b not in (b".", b".."))


@settings(max_examples=400, deadline=None)
@given(dir_parts=hs.lists(name_bytes, max_size=3), names=hs.lists(name_bytes, max_size=30))
def test_split_names_recovers_every_child(dir_parts, names):
    prefix = b"/".join(dir_parts) + b"/" if dir_parts else b""
    paths = [prefix + n for n in names]
    rel = [0]
    for p in paths:
        rel.append(rel[-1] + len(p))
    assert split_names(b"".join(paths), rel, prefix) == names


def test_split_names_with_prefix_lookalikes():
    # names that end like the directory's name, or repeat it, must not be cut
    prefix = b"a/a/"
    names = [b"a", b"aa", b"a.a", b"aa.jpg"]
    paths = [prefix + n for n in names]
    rel = [0]
    for p in paths:
        rel.append(rel[-1] + len(p))
    assert split_names(b"".join(paths), rel, prefix) == names


@pytest.fixture(scope="module")
def tree(demo_store):
    return ViewTree(open_store(demo_store))


def test_dir_entries_index_like_a_list(tree):
    entries = tree.readdir("/scan2")
    rows = list(entries)
    assert len(rows) == len(entries) and rows == entries[:]
    for name, attr in rows:
        assert attr.is_dir
        inner = tree.readdir(f"/scan2/{name}")
        files = list(inner)
        assert files and all(not a.is_dir for _, a in files)
        for fname, a in files:
            # the listing says exactly what a lookup of the path says
            assert tree.getattr(f"/scan2/{name}/{fname}") == a
        assert inner[-1] == files[-1]


FILLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int)


def _fill(ops: PcrfsOperations, path: str, offset: int, flags: int, stop_after: int | None = None) -> list:
    """Run the libfuse 3 readdir callback with a real C-callable filler; collect what it hands over."""
    from pcrfs.fuse.ops import mf

    got = []

    def filler(buf, name, stat_p, off, fill_flags):
        s = mf.c_stat.from_address(stat_p)
        got.append((name, off, fill_flags, s.st_ino, s.st_mode, s.st_size, s.st_nlink, s.st_uid,
                    s.st_mtimespec.tv_sec * 10**9 + s.st_mtimespec.tv_nsec, buf))
        return 1 if stop_after is not None and len(got) >= stop_after else 0

    callback = FILLER(filler)
    fake = type("F", (), {"operations": ops, "encoding": "utf-8", "errors": "surrogateescape"})()
    fh = ops.opendir(path)
    fi = type("FI", (), {"fh": fh})()
    fip = type("P", (), {"contents": fi})()
    try:
        assert PcrfsFUSE.readdir_fuse_3(fake, path.encode(), 0xABC0, callback, offset, fip, flags) == 0
    finally:
        ops.releasedir(path, fh)
    return got


@pytest.mark.parametrize("plus", [False, True])
def test_readdir_hands_the_kernel_exact_stats(tree, plus):
    ops = PcrfsOperations(tree)
    cls = next(name for name, _ in tree.readdir("/scan3"))
    path = f"/scan3/{cls}"
    got = _fill(ops, path, 0, FUSE_READDIR_PLUS if plus else 0)
    expected = [(".", tree.getattr(path)), ("..", tree.getattr("/scan3"))] + list(tree.readdir(path))
    assert [g[0] for g in got] == [os.fsencode(n) for n, _ in expected]
    for pos, (g, (name, a)) in enumerate(zip(got, expected)):
        _, off, flags, ino, mode, size, nlink, uid, mtime, buf = g
        assert buf == 0xABC0 and off == pos + 1
        assert (ino, mode, size, nlink, uid) == (a.ino, a.mode, a.size, a.nlink, os.getuid())
        assert mtime == a.mtime_ns
        assert flags == (FUSE_FILL_DIR_PLUS if plus and name not in (".", "..") else 0)
        assert st.S_ISREG(mode) or name in (".", "..")


def test_readdir_resumes_at_offsets_and_stops_when_full(tree):
    ops = PcrfsOperations(tree)
    path = "/full/" + next(name for name, _ in tree.readdir("/full"))
    whole = _fill(ops, path, 0, 0)
    first = _fill(ops, path, 0, 0, stop_after=3)
    assert [g[0] for g in first] == [g[0] for g in whole[:3]]
    rest = _fill(ops, path, 3, 0)
    assert [g[:2] for g in rest] == [g[:2] for g in whole[3:]]


def test_after_a_bare_walk_listings_go_whole_and_names_only(tree):
    ops = PcrfsOperations(tree)
    path = "/scan1/" + next(name for name, _ in tree.readdir("/scan1"))
    paged = _fill(ops, path, 0, FUSE_READDIR_PLUS)
    _fill(ops, path, len(paged), 0)  # the kernel asked for a later chunk without attributes
    assert ops._listing_attrs_used is False
    whole = _fill(ops, path, 0, FUSE_READDIR_PLUS)
    # every entry at offset 0 (libfuse keeps the listing) and none with attributes ...
    assert [(g[1], g[2]) for g in whole] == [(0, 0)] * len(paged)
    # ... but with the names, inode numbers and types a walk needs
    assert [(g[0], g[3], g[4]) for g in whole] == [(g[0], g[3], g[4]) for g in paged]
    ops._attr_of(path + "/" + os.fsdecode(whole[-1][0]))  # a file lookup: callers stat again
    assert [g[2] for g in _fill(ops, path, 0, FUSE_READDIR_PLUS)] == [g[2] for g in paged]


def test_file_is_the_one_path_lookup_and_agrees_with_resolve(tree):
    """ViewTree.file (memoized per directory; the pcr:// filesystem's per-read lookup) gives
    the (image, k) the mount's resolve gives, for every file of two views; directories and
    missing names fail as resolve does."""
    store = tree.store
    for view in ("scan2", "full"):
        for i in range(store.num_images):
            path = f"{view}/{store.path(i)}"
            node = tree.resolve("/" + path)
            assert tree.file(path) == tree.file("/" + path) == (node.image, node.view.k_of(node.image)) == \
                (i, tree.views[view].k)
    klass = store.path(0).split("/")[0]
    with pytest.raises(IsADirectoryError):
        tree.file(f"scan2/{klass}")
    with pytest.raises(FileNotFoundError):
        tree.file(f"scan2/{klass}/no-such.jpg")
    with pytest.raises(FileNotFoundError):
        tree.file(f"scan99/{store.path(0)}")
