"""The on-disk cache alone: ranges, the size cap, LRU order, persistence, crash leftovers."""
from __future__ import annotations

import os

from pcrfs.store.diskcache import DiskCache


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

    from pcrfs.store import diskcache as dc_mod

    cache = dc_mod.DiskCache(tmp_path / "c", 1 << 20)
    assert cache.put("old1", b"a" * 1000) and cache.put("old2", b"b" * 1000)
    real_create = dc_mod.DiskCache._create
    fail = [1]

    def full_once(tmp):  # ENOSPC once, as if another tenant filled the disk
        if fail[0] and str(tmp).endswith(dc_mod._TMP_SUFFIX):
            fail[0] = 0
            raise OSError(errno_mod.ENOSPC, "No space left on device")
        return real_create(tmp)

    monkeypatch.setattr(dc_mod.DiskCache, "_create", staticmethod(full_once))
    assert cache.put("new", b"c" * 1500)
    assert cache.read("new") == b"c" * 1500
    assert cache.size("old1") is None and cache.size("old2") is None  # both made room (1500 > 1000)
    assert cache.stats()["evicted"] == 2
