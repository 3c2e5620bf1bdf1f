"""The on-disk cache alone: ranges, the size cap, LRU order, persistence, crash leftovers."""
from __future__ import annotations

import os

import pytest

from pcrfs.store.sources.diskcache import DiskCache


def test_put_read_and_ranges(tmp_path):
    c = DiskCache(tmp_path, 1000)
    assert c.read("a") is None and c.size("a") is None
    assert c.put("a", b"0123456789")
    assert c.read("a") == b"0123456789"
    assert c.read("a", 2, 3) == b"234"
    assert c.read("a", 8, 5) is None  # past the end: a miss, not a short answer
    assert c.size("a") == 10 and c.nbytes == 10
    assert c.put("a", b"xy") and c.read("a") == b"xy" and c.nbytes == 2
    c.discard("a")
    assert c.read("a") is None and c.nbytes == 0 and len(c) == 0


def test_size_cap_evicts_least_recently_used(tmp_path):
    c = DiskCache(tmp_path, 250)
    for key in "abc":
        c.put(key, key.encode() * 100)
    assert c.nbytes <= 250 and c.size("a") is None  # "a" was oldest
    c.read("b")  # "b" is now more recent than "c"
    c.put("d", b"d" * 100)
    assert c.size("c") is None and c.size("b") == 100 and c.size("d") == 100
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) <= 250
    assert not c.put("huge", b"x" * 251)


def test_survives_a_restart_and_cleans_crash_leftovers(tmp_path):
    c = DiskCache(tmp_path, 1000)
    c.put("a", b"A" * 10)
    c.put("b", b"B" * 20)
    leftover = tmp_path / DiskCache._shard("c") / "c.123.tmp"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"half")
    again = DiskCache(tmp_path, 1000)
    assert again.read("a") == b"A" * 10 and again.read("b") == b"B" * 20 and again.nbytes == 30
    assert not leftover.exists()
    smaller = DiskCache(tmp_path, 25)  # a lower cap applies at start-up
    assert smaller.nbytes <= 25


def test_a_vanished_file_is_a_miss(tmp_path):
    c = DiskCache(tmp_path, 1000)
    c.put("a", b"data")
    os.unlink(tmp_path / DiskCache._shard("a") / "a")
    assert c.read("a") is None and c.size("a") is None


def test_a_full_file_system_costs_old_entries_not_the_write(tmp_path, monkeypatch):
    import errno as errno_mod

    from pcrfs.store.sources import diskcache as dc_mod

    cache = dc_mod.DiskCache(tmp_path / "c", 1 << 20)
    assert cache.put("old1", b"a" * 1000) and cache.put("old2", b"b" * 1000)
    real_create = dc_mod.DiskCache._create
    fail = [1]

    def full_once(dir_fd, tmp):  # ENOSPC once, as if another tenant filled the disk
        if fail[0] and str(tmp).endswith(dc_mod._TMP_SUFFIX):
            fail[0] = 0
            raise OSError(errno_mod.ENOSPC, "No space left on device")
        return real_create(dir_fd, tmp)

    monkeypatch.setattr(dc_mod.DiskCache, "_create", staticmethod(full_once))
    assert cache.put("new", b"c" * 1500)
    assert cache.read("new") == b"c" * 1500
    assert cache.size("old1") is None and cache.size("old2") is None  # both made room (1500 > 1000)
    assert cache.stats()["evicted"] == 2


def test_put_file_keeps_what_the_writer_wrote_and_nothing_when_it_fails(tmp_path):
    cache = DiskCache(tmp_path / "c", 1 << 20)

    def write(fd):
        os.pwrite(fd, b"world", 6)
        os.pwrite(fd, b"hello ", 0)
        return 11
    assert cache.put_file("k", write)
    assert cache.read("k") == b"hello world" and cache.size("k") == 11
    assert cache.read_ranges("k", [(6, 5), (0, 5)]) == [b"world", b"hello"]
    assert cache.read_ranges("k", [(6, 6)]) is None  # past the end: a miss, the entry stays
    assert cache.size("k") == 11

    def fails(fd):
        os.pwrite(fd, b"partial", 0)
        raise OSError("the writer found its data damaged")
    assert not cache.put_file("bad", fails)
    assert cache.size("bad") is None
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != "k"]  # no temporary left
    assert not cache.put_file("big", lambda fd: (os.pwrite(fd, b"x" * 10, 0), (1 << 20) + 1)[1])  # over capacity


def test_every_dropped_or_replaced_entry_is_reported(tmp_path):
    cache = DiskCache(tmp_path / "c", 3000)
    dropped = []
    cache.on_drop(dropped.append)
    assert cache.put("a", b"1" * 1000) and cache.put("b", b"2" * 1000) and dropped == []
    assert cache.put("a", b"3" * 1000)  # replaced: a reader of the old file must let it go
    assert dropped == ["a"]
    assert cache.put("c", b"4" * 1000) and cache.put("d", b"5" * 1000)  # over capacity: b, the LRU one
    assert dropped == ["a", "b"]
    cache.discard("c")
    cache.discard("never-stored")
    assert dropped == ["a", "b", "c"]
    cache.on_drop(lambda key: 1 / 0)  # a failing listener does not fail the cache
    cache.discard("d")
    assert dropped[-1] == "d" and cache.size("d") is None


# ---- a cache directory others could reach (issue 26: writes outside the cache, FIFO hangs) ----

def test_a_symlink_planted_as_a_temporary_file_is_never_written_through(tmp_path):
    import threading

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    cache = DiskCache(tmp_path / "c", 1 << 20)
    shard = tmp_path / "c" / DiskCache._shard("k")
    shard.mkdir(mode=0o700, exist_ok=True)
    # the exact name the next write of "k" by this thread would create
    (shard / f"k.{threading.get_ident()}.tmp").symlink_to(victim)
    assert cache.put("k", b"record bytes")
    assert victim.read_bytes() == b"precious"
    assert cache.read("k") == b"record bytes"


def test_a_fifo_or_symlink_in_place_of_an_entry_is_a_miss_not_a_hang(tmp_path):
    cache = DiskCache(tmp_path / "c", 1 << 20)
    assert cache.put("f", b"x" * 10) and cache.put("s", b"y" * 10)
    entry_f = tmp_path / "c" / DiskCache._shard("f") / "f"
    entry_s = tmp_path / "c" / DiskCache._shard("s") / "s"
    entry_f.unlink()
    os.mkfifo(entry_f)  # opening it for reading without O_NONBLOCK would wait for a writer forever
    outside = tmp_path / "outside"
    outside.write_bytes(b"y" * 10)
    entry_s.unlink()
    entry_s.symlink_to(outside)
    assert cache.read("f") is None and cache.open_entry("f") is None
    assert cache.read("s") is None
    again = DiskCache(tmp_path / "c", 1 << 20)  # a restart ignores what it did not write
    assert again.size("f") is None and again.size("s") is None


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_directory_others_can_write_is_refused(tmp_path, mode):
    from pcrfs.store.sources.diskcache import UnsafeCacheDirectory

    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(UnsafeCacheDirectory, match="chmod go-w"):
        DiskCache(d, 1 << 20)


def test_a_cache_directory_that_is_a_symlink_or_owned_by_another_user_is_refused(tmp_path):
    from pcrfs.store.sources.diskcache import UnsafeCacheDirectory

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeCacheDirectory, match="not a directory"):
        DiskCache(tmp_path / "link", 1 << 20)
    if os.geteuid() == 0:  # root can hand a directory to another user
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, 12345)
        with pytest.raises(UnsafeCacheDirectory, match="owned by uid 12345"):
            DiskCache(other, 1 << 20)
    # a shard planted as a symlink (while the directory was still open to others) is refused too
    c = tmp_path / "c"
    c.mkdir(mode=0o700)
    (c / "5a").symlink_to(real)
    with pytest.raises(UnsafeCacheDirectory):
        DiskCache(c, 1 << 20)
