"""Files changed under an open store (issue 26, items 1 and 2): records edited in place,
index files truncated or copied over, while a reader or a mount serves them. Every read
is the intact bytes or EIO; nothing crashes the reader; nothing is served unchecked.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from mountutil import fuse_unavailable
from pcrfs.fuse import mounting
from pcrfs.store import format as fmt
from pcrfs.store.read import largegroups as large_mod
from pcrfs.store.read.reader import CorruptData, open_store
from reliability import read_all_files

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


def _xor_every_record(root: Path) -> None:
    """Flip bytes all through every record in place (same size, same header: only CRCs can tell)."""
    for p in sorted((root / fmt.RECORDS_DIR).glob("*" + fmt.RECORD_SUFFIX)):
        data = bytearray(p.read_bytes())
        for pos in range(fmt.RECORD_HEADER_SIZE, len(data), 97):
            data[pos] ^= 0x5A
        with open(p, "r+b") as f:  # in place: the open descriptors see it
            f.write(data)


def _random_reads(store, rng: random.Random, n: int) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(n):
        i = rng.randrange(store.num_images)
        k = rng.randint(1, store.num_groups)
        size = store.size(i, k)
        off = rng.randrange(size)
        out.append((i, k, off, rng.randint(1, min(size - off, 1 << 17))))
    return out


@pytest.mark.parametrize("cut", ["small", "large"])
def test_records_edited_in_place_are_never_served(demo_store, tmp_path, cut):
    """Reads at random offsets, each once before and again after every record was edited in
    place: afterwards each is the intact bytes or CorruptData. With every group counted as
    "large" (cut ones are checked once and then served by range), this returned wrong bytes."""
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    with open_store(demo_store) as intact, open_store(root, cache_bytes=1 << 20) as s:
        if cut == "large":
            s.range_group_bytes = 256  # nearly every group a read cuts goes the large-group way
        reads = _random_reads(intact, random.Random(7), 400)
        before = [s.read_at(i, k, off, n) for i, k, off, n in reads]
        assert before == [intact.read_at(i, k, off, n) for i, k, off, n in reads]
        _xor_every_record(root)
        wrong = corrupt = 0
        for (i, k, off, n), good in zip(reads, before):
            try:
                got = s.read_at(i, k, off, n)
            except CorruptData:
                corrupt += 1
                continue
            wrong += got != good
        assert wrong == 0
        # whatever was not kept as checked bytes (the group cache, private large-group copies) is EIO now
        assert corrupt > 0 or cut == "large"


def test_huge_groups_are_checked_block_by_block_after_their_first_pass(demo_store, tmp_path, monkeypatch):
    """A group too large to keep is served by blocks whose CRCs its checked pass recorded:
    an edit after that pass is found in the block it touches, never served."""
    monkeypatch.setattr(large_mod, "KEEP_GROUP_BYTES", 0)  # every large group goes the block way
    monkeypatch.setattr(large_mod, "CHECK_BLOCK", 256)
    monkeypatch.setattr(large_mod, "GROUP_PIECE", 1024)
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    with open_store(root) as s:
        s.range_group_bytes = 256
        i = max(range(s.num_images), key=lambda j: s.ranges(j, 1)[0].length)
        rng = s.ranges(i, 1)[0]
        assert rng.length > 4096
        good = s.read(i, 1)
        assert s.read_at(i, 1, 10, 100) == good[10:110]  # the checked pass
        with open(root / fmt.record_name(rng.record), "r+b") as f:
            f.seek(rng.offset + 3000)
            b = f.read(1)
            f.seek(rng.offset + 3000)
            f.write(bytes([b[0] ^ 1]))
        assert s.read_at(i, 1, 0, 2048) == good[:2048]  # blocks the edit did not touch
        with pytest.raises(CorruptData):
            s.read_at(i, 1, 2900, 200)
        assert s.read_at(i, 1, 3600, 500) == good[3600:4100]


def test_index_files_truncated_or_rewritten_after_open_change_nothing(demo_store, tmp_path):
    """The index is read into private memory at open: truncating or rewriting its files
    afterwards (a store copied over in place) neither changes what is served nor crashes."""
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    with open_store(demo_store) as intact, open_store(root) as s:
        os.truncate(root / fmt.INDEX_DIR / "group_lengths.npy", 200)
        (root / fmt.INDEX_DIR / "group_crc32.npy").write_bytes(b"\0" * 64)
        with open(root / fmt.INDEX_DIR / "paths.bin", "r+b") as f:
            f.write(b"X" * 64)
        for i in range(s.num_images):
            assert s.path(i) == intact.path(i)
            for k in (1, s.num_groups):
                assert s.size(i, k) == intact.size(i, k)
                assert s.read(i, k) == intact.read(i, k)


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@needs_fuse
@pytest.mark.parametrize("cache_size", ["0", "4M"])
def test_mount_serves_no_wrong_byte_when_records_and_index_change_in_place(demo_store, tmp_path, mounts,
                                                                           cache_size):
    """The finding: every file read once through the mount, then every record's bytes XORed
    in place, an index file truncated, and the kernel's page cache of the files dropped;
    whole-file reads and reads at random offsets are the intact bytes or EIO, and the
    daemon lives (it died of SIGBUS on the truncated, memory-mapped index)."""
    root = tmp_path / "live.pcr"
    shutil.copytree(demo_store, root)
    info = mounts.mount(root, f"live{cache_size}", cache_size=cache_size)
    mnt = Path(info.mountpoint)
    with open_store(demo_store) as intact:
        first = read_all_files(mnt, intact)
        assert first["wrong"] == [] and not first["eio"]
        _xor_every_record(root)
        os.truncate(root / fmt.INDEX_DIR / "group_lengths.npy", 200)
        os.truncate(root / fmt.INDEX_DIR / "images.npy", 100)
        rng = random.Random(3)
        wrong, eio, other = [], 0, []
        for i, k, off, n in _random_reads(intact, rng, 300):
            view = "full" if k == intact.num_groups else f"scan{k}"
            p = mnt / view / intact.path(i)
            try:
                _drop_page_cache(p)
                fd = os.open(p, os.O_RDONLY)
                try:
                    got = os.pread(fd, n, off)
                finally:
                    os.close(fd)
            except OSError as e:
                if e.errno == errno.EIO:
                    eio += 1
                else:
                    other.append(repr(e))
                continue
            if got != intact.read_at(i, k, off, n):
                wrong.append((view, intact.path(i), off, n))
        assert wrong == [] and other == []
        again = read_all_files(mnt, intact)
        assert again["wrong"] == [] and again["other_errors"] == []
        assert again["eio"] or eio  # the edits were seen
    assert mounting.daemon_alive(info.pid)


def test_s3_records_replaced_after_open_are_never_served_by_any_door(demo_store, tmp_path_factory):
    """Every record object of an s3:// store replaced by a damaged copy after the readers opened
    it (a store re-uploaded in place): the Store API (record prefixes and per-image reads), the
    pcr:// fsspec filesystem and pcrfs.torch.ImageFolder each give the intact bytes (from what
    they had checked and kept) or an error -- never a wrong byte (issue 26, first target)."""
    from s3util import store_on_moto

    from pcrfs.access.filesystem import PCRFileSystem
    from pcrfs.remote.fs import RemoteOptions, filesystem
    from pcrfs.store.errors import StoreUnavailable
    from pcrfs.store.read.reader import ReadOptions

    with store_on_moto(demo_store, "replaced", "demo.pcr", tmp_path_factory) as (path, endpoint):
        url = f"s3://{path}"
        so = {"endpoint_url": endpoint, "readahead_bytes": 0, "attempts": 1}
        with open_store(demo_store) as intact:
            n, k = intact.num_images, intact.num_groups
            want = {(i, kk): intact.read(i, kk) for i in range(n) for kk in (2, k)}
            names = [intact.path(i) for i in range(n)]
        doors, stores = [], []
        for prefixes in (True, False):
            opts = ReadOptions(remote=RemoteOptions(endpoint_url=endpoint, attempts=1), readahead_bytes=0,
                               record_prefix=prefixes, cache_bytes=(64 << 20) if prefixes else (1 << 20))
            s = open_store(url, options=opts)
            stores.append(s)
            doors.append((f"store prefixes={prefixes}", lambda i, kk, s=s: s.read(i, kk)))
        fs = PCRFileSystem(url, target_options=so)
        doors.append(("pcr://", lambda i, kk: fs.cat_file(f"{'full' if kk == k else f'scan{kk}'}/{names[i]}")))
        try:
            from pcrfs.access.torch import ImageFolder
        except ImportError:  # pragma: no cover - torch is in the test extras
            ImageFolder = None
        if ImageFolder is not None:
            ds = ImageFolder(url, view="scan2", storage_options=so, shared_cache=False)
            order = {int(img): j for j, img in enumerate(ds._images)}
            doors.append(("ImageFolder", lambda i, kk: ds.read_bytes(order[i]) if kk == 2 and i in order
                          else want[(i, kk)]))
        for _, read in doors:  # a first pass: some of it is kept (caches, record prefixes)
            for i in range(0, n, 3):
                assert read(i, 2) == want[(i, 2)]
        assert stores[0].io_stats()["record_prefix"]["fetches"] > 0  # that door read record prefixes
        s3 = filesystem(url, RemoteOptions(endpoint_url=endpoint))
        for key in s3.ls(f"{path}/{fmt.RECORDS_DIR}"):
            data = bytearray(s3.cat_file(key))
            for j in range(fmt.RECORD_HEADER_SIZE, len(data), 97):
                data[j] ^= 0x5A
            s3.pipe_file(key, bytes(data))
        for name, read in doors:
            wrong = failed = 0
            for i in range(n):
                for kk in (2, k):
                    try:
                        got = read(i, kk)
                    except (CorruptData, StoreUnavailable, OSError):
                        failed += 1
                        continue
                    wrong += got != want[(i, kk)]
            assert wrong == 0, name
            assert failed > 0, name  # what was not kept is read again, and found damaged
        for s in stores:
            s.close()
