"""Crafted stores and hostile files (issue 18): the store layer serves only regular files
inside the store, never blocks on a FIFO, keeps memory bounded by what the manifest and
index promise, refuses absurd shapes and names at open, reads large groups by range, and
serves a store with more records than the process may open files.

Every store here is crafted in the test (tiny fake scan groups through the writer API, then
edited index files with checksums to match), so each case is the one the issue describes.
Hang cases run in a subprocess with a timeout, so a regression fails instead of hanging.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mountutil import fuse_unavailable
from pcrfs.cli import main as cli_main
from pcrfs.store import format as fmt
from pcrfs.store.sources.backends import LocalRecords
from pcrfs.store.errors import CorruptData, StoreError
from pcrfs.store.format.index import file_crc32
from pcrfs.store.read.reader import open_store
from pcrfs.store.read.verify import verify_store
from pcrfs.store.write.writer import ImageEntry, StoreWriter
from reliability import pcrfs_argv, run_limited

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
QUICK = 30  # seconds a command may take on a crafted store before it counts as a hang


# ---- crafting stores -----------------------------------------------------------------------------

def _groups(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [b"\xff\xd8" + rng.bytes(40)] + [rng.bytes(30 + 7 * g) for g in range(1, n)]


def tiny_store(root: Path, names: list[str], per_record: int = 1, groups: int = 3) -> Path:
    """A store of ``names`` with fake scan groups, ``per_record`` images per record file."""
    w = StoreWriter(root)
    w.start("crafted")
    entries = [ImageEntry(name, 100, 0, 0, _groups(groups, n))
               for n, name in enumerate(sorted(names, key=fmt.path_sort_key))]
    for r, first in enumerate(range(0, len(entries), per_record)):
        w.write_record(r, entries[first:first + per_record], sources=(first, min(first + per_record, len(entries))))
    w.finalize({"classes": sorted({p.split("/")[0] for p in names if "/" in p})})
    return root


def class_names(n: int, classes: int = 3) -> list[str]:
    return [f"c{i % classes}/img{i:05d}.jpg" for i in range(n)]


def manifest(root: Path) -> dict:
    return yaml.safe_load((root / fmt.MANIFEST).read_text())


def write_manifest(root: Path, m: dict) -> None:
    (root / fmt.MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))


def replace_index_file(root: Path, name: str, content: np.ndarray | bytes) -> None:
    """Put ``content`` in index file ``name`` and make the manifest's size and CRC match."""
    p = root / fmt.INDEX_DIR / name
    if isinstance(content, np.ndarray):
        with open(p, "wb") as f:
            np.save(f, content, allow_pickle=False)
    else:
        p.write_bytes(content)
    m = manifest(root)
    m["index_files"][name] = {"size": p.stat().st_size, "crc32": file_crc32(p)}
    write_manifest(root, m)


def index_array(root: Path, name: str) -> np.ndarray:
    return np.load(root / fmt.INDEX_DIR / name, allow_pickle=False)


def assert_clean_cli_error(args: list, *needles: str) -> str:
    r = CliRunner().invoke(cli_main, [str(a) for a in args])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in r.output, r.output
    return r.output


def py(code: str, timeout: float = QUICK, **kwargs) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this checkout first on the path), killed and failed at ``timeout``."""
    return run_limited([sys.executable, "-c", code], timeout=timeout, **kwargs)


def daemon_stats(mnt: Path) -> dict:
    return json.loads((mnt / ".pcrfs" / "stats").read_text())


# ---- 1. more records than open files -------------------------------------------------------------

@pytest.fixture(scope="module")
def many_records(tmp_path_factory) -> Path:
    """300 images, one record each: more records than the open-file limits used below."""
    return tiny_store(tmp_path_factory.mktemp("many") / "many.pcr", class_names(300, classes=7))


def test_reader_serves_more_records_than_it_may_open_files(many_records):
    """Under a hard open-file limit of 64 the reader API reads all 300 records (and again,
    in another order), with its table of open records bounded."""
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from pcrfs.store.read.reader import open_store
s = open_store({str(many_records)!r})
want = [s.read(i, s.num_groups) for i in range(s.num_images)]
for i in reversed(range(s.num_images)):
    assert s.read(i, 2) == want[i][:s.size(i, 2) - 2] + b"\\xff\\xd9"
print(s.records.max_open, s.records.open_count(), s.records.opens)
"""
    res = py(code)
    assert res.returncode == 0, res.stderr[-2000:]
    max_open, open_now, opens = map(int, res.stdout.split())
    assert open_now <= max_open < 64 and opens > 300


@needs_fuse
def test_mount_serves_more_records_than_the_soft_limit(many_records, mounts, tmp_path):
    """A daemon started with a soft limit of 48 (hard 200) raises it to 200 and serves every
    file of a 300-record store with 0 EIO, keeping at most a quarter of its limit open."""
    mnt = mounts.point("many")
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 200))
from pcrfs.fuse import mounting
info = mounting.mount({str(many_records)!r}, {str(mnt)!r}, log_file={str(tmp_path / 'many.log')!r},
                    echo=lambda m: None, cache_size=0)
print(info.pid)
"""
    res = py(code, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    pid = int(res.stdout.split()[-1])
    mounts.pids.add(pid)
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert any(line.startswith("Max open files") and line.split()[3:5] == ["200", "200"]
               for line in limits.splitlines()), limits
    with open_store(many_records) as s:
        eio = 0
        for k in (s.num_groups, 1):
            for i in range(s.num_images):
                try:
                    got = (mnt / f"scan{k}" / s.path(i)).read_bytes()
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    eio += 1
                    continue
                assert got == s.read(i, k)
    assert eio == 0
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    # LocalRecords keeps a quarter of the limit open, the compiled read path (if built) its
    # own duplicates within half of it less a reserve: well inside the limit, never at it
    from pcrfs.fuse.fastpath import FD_RESERVE, FD_SHARE
    assert fds <= 200 // 4 + max(0, int(200 * FD_SHARE) - FD_RESERVE) + 20, fds


def test_systemd_unit_raises_the_open_file_limit():
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "pcrfs@.service").read_text()
    values = [int(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert values and values[0] >= 16384, values


def test_lru_never_closes_a_descriptor_in_use(many_records):
    """Readers on many threads through a table of 4 descriptors: every byte right."""
    with open_store(many_records) as s:
        want = [s.read(i, s.num_groups) for i in range(s.num_images)]
        s.records.close()
        s.records = LocalRecords(many_records, np.asarray(s.index.records["size"]), max_open=4)
        s.images.source = s.records
        errors = []

        def reader(seed: int) -> None:
            order = np.random.default_rng(seed).permutation(s.num_images)
            for i in order[:150]:
                if s.read(int(i), s.num_groups) != want[i]:
                    errors.append(int(i))

        threads = [threading.Thread(target=reader, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and s.records.open_count() <= 4


# ---- 2. only regular files inside the store ------------------------------------------------------

@pytest.fixture
def small(tmp_path) -> Path:
    return tiny_store(tmp_path / "s.pcr", class_names(12), per_record=4)


def _symlink_to_identical_copy(root: Path, rel: str, outside: Path) -> None:
    """Replace ``rel`` by a symlink to a byte-identical copy outside the store: even right
    bytes are not served from outside."""
    outside.mkdir(exist_ok=True)
    target = outside / rel.replace("/", "_")
    shutil.move(root / rel, target)
    os.symlink(target, root / rel)


def test_symlinked_record_is_refused_at_open(small, tmp_path):
    _symlink_to_identical_copy(small, fmt.record_name(1), tmp_path / "outside")
    with pytest.raises(StoreError, match="00001.pcr is a symlink"):
        open_store(small)
    for args in (["info", small], ["verify", "-q", small], ["get", small, "c0/img00000.jpg", "-o", tmp_path / "o"],
                 ["mount", small, tmp_path / "outside"]):
        assert_clean_cli_error(args, "symlink")


def test_record_swapped_for_a_symlink_after_open_is_not_followed(small, tmp_path, mounts):
    """Checked again whenever a record file is opened: a record that becomes a symlink
    (to a byte-identical copy, even) after the store was opened is not served."""
    with open_store(small) as s:
        first = int(s.index.records[1]["first_image"])
        _symlink_to_identical_copy(small, fmt.record_name(1), tmp_path / "outside")
        with pytest.raises(CorruptData, match="symlink"):
            s.read(first, 1)
        assert s.read(0, s.num_groups)  # record 0 is served as ever
        damage = verify_store(s)
        assert [d.record for d in damage] == [1] and "symlink" in damage[0].reason
        path, good = s.path(first), s.path(0)
        want = s.read(0, s.num_groups)
    if fuse_unavailable() is None:
        os.unlink(small / fmt.record_name(1))
        shutil.copy(tmp_path / "outside" / fmt.record_name(1).replace("/", "_"), small / fmt.record_name(1))
        info = mounts.mount(small, "sym", cache_size=0)
        _symlink_to_identical_copy(small, fmt.record_name(1), tmp_path / "outside2")
        with pytest.raises(OSError) as e:
            (Path(info.mountpoint) / "full" / path).read_bytes()
        assert e.value.errno == errno.EIO
        assert (Path(info.mountpoint) / "full" / good).read_bytes() == want


def test_records_linking_a_foreign_file_serve_nothing_of_it(tmp_path, mounts):
    """The issue's crafted store: 1-byte groups whose CRCs are guessed, records symlinked to
    a file outside the store. No byte of that file comes back, through any interface."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET-" * 10)
    root = tiny_store(tmp_path / "s.pcr", [f"c/{i:03d}.jpg" for i in range(4)], per_record=1, groups=1)
    # one image per record, each one 1-byte group: the secret's byte at offset 16 + r
    lengths = np.ones((4, 1), dtype=fmt.GROUP_LENGTH_DTYPE)
    crcs = np.array([[zlib.crc32(secret.read_bytes()[16 + r:17 + r])] for r in range(4)], dtype=fmt.GROUP_CRC_DTYPE)
    records = index_array(root, "records.npy")
    records["size"] = secret.stat().st_size
    replace_index_file(root, "group_lengths.npy", lengths)
    replace_index_file(root, "group_crc32.npy", crcs)
    replace_index_file(root, "records.npy", records)
    replace_index_file(root, "record_group_offsets.npy", np.full((4, 1), 16 + np.arange(4)[:, None], dtype="<u8"))
    # opened while the records were regular files, then swapped for links: first use refuses
    with open_store(root) as s:
        for r in range(4):
            p = root / fmt.record_name(r)
            p.unlink()
            os.symlink(secret, p)
        for i in range(4):
            with pytest.raises(CorruptData, match="symlink"):
                s.read(i, 1)
    with pytest.raises(StoreError, match="symlink"):
        open_store(root)
    out = assert_clean_cli_error(["get", root, "c/000.jpg", "-o", tmp_path / "x"], "symlink")
    assert "SECRET" not in out and not (tmp_path / "x").exists()
    if fuse_unavailable() is None:
        (tmp_path / "mnt").mkdir()
        assert_clean_cli_error(["mount", root, tmp_path / "mnt"], "symlink")


def test_record_with_a_foreign_header_is_not_served(small):
    """A regular file of the right size whose header is not this record's: refused, even
    though its groups' CRCs match."""
    p = small / fmt.record_name(2)
    data = bytearray(p.read_bytes())
    data[:fmt.RECORD_HEADER_SIZE] = fmt.record_header(7)
    p.write_bytes(bytes(data))
    with open_store(small) as s:
        first = int(s.index.records[2]["first_image"])
        with pytest.raises(CorruptData, match="header"):
            s.read(first, s.num_groups)
        assert [d.record for d in verify_store(s)] == [2]


@pytest.mark.parametrize("rel", [fmt.MANIFEST, f"{fmt.INDEX_DIR}/images.npy", f"{fmt.INDEX_DIR}/paths.bin"])
def test_symlinked_manifest_or_index_is_refused(small, tmp_path, rel):
    _symlink_to_identical_copy(small, rel, tmp_path / "outside")
    with pytest.raises(StoreError, match="symlink"):
        open_store(small)
    assert_clean_cli_error(["info", small], "symlink")


def _with_adaptive_index(root: Path) -> str:
    from pcrfs.store.format import adaptiveindex as adaptive
    from pcrfs.store.write import install

    with open_store(root) as s:
        install.adaptive_index(s, np.zeros((s.num_images, 3), dtype=np.uint8))
    return f"{fmt.INDEX_DIR}/{manifest(root)['adaptive_index']['file']}"


def test_symlinked_adaptive_index_is_refused(small, tmp_path):
    from pcrfs.store.format import adaptiveindex as adaptive
    from pcrfs.store.write import install

    rel = _with_adaptive_index(small)
    with open_store(small) as s:
        assert adaptive.load(s) is not None
    _symlink_to_identical_copy(small, rel, tmp_path / "outside")
    with open_store(small) as s:
        with pytest.raises(adaptive.AdaptiveIndexError, match="symlink"):
            adaptive.load(s)


# ---- 3. FIFOs never hang -------------------------------------------------------------------------

def _fifo_in_place_of(root: Path, rel: str) -> None:
    (root / rel).unlink()
    os.mkfifo(root / rel)


@pytest.mark.parametrize("rel", [fmt.MANIFEST, f"{fmt.INDEX_DIR}/group_lengths.npy", f"{fmt.INDEX_DIR}/dirs.bin"])
def test_fifo_manifest_or_index_fails_fast(small, tmp_path, rel):
    _fifo_in_place_of(small, rel)
    for args in (["info", small], ["verify", "-q", small], ["get", small, "c0/img00000.jpg", "-o", tmp_path / "o"],
                 ["mount", small, tmp_path / "mnt"]):
        (tmp_path / "mnt").mkdir(exist_ok=True)
        res = run_limited(pcrfs_argv(*args), timeout=QUICK)
        assert res.returncode == 1 and "FIFO" in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_fifo_record_is_refused_at_open(small, tmp_path):
    _fifo_in_place_of(small, fmt.record_name(1))
    with pytest.raises(StoreError, match="00001.pcr is a FIFO"):
        open_store(small)
    (tmp_path / "mnt").mkdir()
    for args in (["info", small], ["verify", "-q", small], ["get", small, "c0/img00000.jpg", "-o", tmp_path / "o"],
                 ["mount", small, tmp_path / "mnt"]):
        res = run_limited(pcrfs_argv(*args), timeout=QUICK)
        assert res.returncode == 1 and "FIFO" in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_record_swapped_for_a_fifo_fails_fast_everywhere(small, tmp_path, mounts):
    """A record that becomes a FIFO after the store was opened: its files fail at once (no
    blocking open, no lock held across one), every other file keeps being served."""
    with open_store(small) as s:
        first = int(s.index.records[1]["first_image"])
        bad, good = s.path(first), s.path(0)
        want = s.read(0, s.num_groups)
        _fifo_in_place_of(small, fmt.record_name(1))
        # the reader API: in a thread, so a regression fails the test instead of hanging it
        result: list = []
        t = threading.Thread(target=lambda: result.append(_try(lambda: s.read(first, 1))), daemon=True)
        t.start()
        t.join(QUICK)
        assert not t.is_alive(), "a read of a FIFO record blocked"
        assert isinstance(result[0], CorruptData) and "FIFO" in str(result[0])
        assert s.read(0, s.num_groups) == want
    if fuse_unavailable() is not None:
        return
    os.unlink(small / fmt.record_name(1))
    tiny_store(tmp_path / "again.pcr", class_names(12), per_record=4)
    shutil.copy(tmp_path / "again.pcr" / fmt.record_name(1), small / fmt.record_name(1))
    info = mounts.mount(small, "fifo", cache_size=0)
    _fifo_in_place_of(small, fmt.record_name(1))
    mnt = Path(info.mountpoint)
    # in a child with a timeout: on a regression the read would block in the kernel
    code = f"""
import errno
for _ in range(3):
    try:
        open({str(mnt / 'full' / bad)!r}, 'rb').read()
        raise SystemExit('served a FIFO record')
    except OSError as e:
        assert e.errno == errno.EIO, e
print(len(open({str(mnt / 'full' / good)!r}, 'rb').read()))
"""
    res = py(code)
    assert res.returncode == 0 and int(res.stdout) == len(want), res.stderr[-2000:]


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


def test_fifo_adaptive_index_fails_fast(small):
    rel = _with_adaptive_index(small)
    _fifo_in_place_of(small, rel)
    code = f"""
from pcrfs.store.format import adaptiveindex as adaptive
from pcrfs.store.write import install
from pcrfs.store.read.reader import open_store
s = open_store({str(small)!r})
try:
    adaptive.load(s)
except adaptive.AdaptiveIndexError as e:
    print(e)
"""
    res = py(code)
    assert res.returncode == 0 and "FIFO" in res.stdout, res.stdout + res.stderr


@needs_fuse
def test_fifo_adaptive_index_mounts_at_once_without_its_views(small, mounts, tmp_path):
    """The mount comes up (at once: mount waits for it, so a hang would fail this test),
    serves the fixed views, and its log says why there are no adaptive ones."""
    rel = _with_adaptive_index(small)
    _fifo_in_place_of(small, rel)
    info = mounts.mount(small, "adaptive", timeout=QUICK)
    names = os.listdir(info.mountpoint)
    assert "full" in names and not any(n.startswith("ssim") for n in names), names
    assert "FIFO" in Path(info.log_file).read_text()


# ---- 4, 7. bounded memory and time ---------------------------------------------------------------

MEMORY = 1 << 30  # address space for a child that must not read a crafted file whole


def test_huge_manifest_is_refused_unread(small):
    p = small / fmt.MANIFEST
    with open(p, "ab") as f:
        f.truncate(8 << 30)  # sparse: costs no disk, would cost 8 GB of memory read whole
    res = run_limited(pcrfs_argv("info", small), timeout=QUICK, as_bytes=MEMORY)
    assert res.returncode == 1 and "more than" in res.stderr and "Traceback" not in res.stderr, res.stderr[-1000:]


@pytest.mark.parametrize("name", ["paths.bin", "group_crc32.npy", "dirs.bin"])
def test_huge_sparse_index_file_is_refused_before_any_crc(small, name):
    """A 200 GB sparse index file, the manifest's size set to match: refused by its size
    against the manifest's counts at once, for every command."""
    p = small / fmt.INDEX_DIR / name
    with open(p, "ab") as f:
        f.truncate(200 << 30)
    m = manifest(small)
    m["index_files"][name]["size"] = 200 << 30
    write_manifest(small, m)
    for args in (["info", small], ["verify", "-q", small]):
        res = run_limited(pcrfs_argv(*args), timeout=QUICK, as_bytes=MEMORY)
        assert res.returncode == 1 and "more than" in res.stderr and "Traceback" not in res.stderr, res.stderr


def _one_large_group(root: Path, length: int) -> bytes:
    """Make image 0 of a one-image store a single group of ``length`` zero bytes in a sparse
    record, checksums and all (a store that verifies). Returns the group's first bytes."""
    rec = root / fmt.record_name(0)
    with open(rec, "r+b") as f:
        f.truncate(fmt.RECORD_HEADER_SIZE)
        f.truncate(fmt.RECORD_HEADER_SIZE + length)
    crc, zeros = 0, bytes(1 << 20)
    for pos in range(0, length, len(zeros)):
        crc = zlib.crc32(zeros[:min(len(zeros), length - pos)], crc)
    records = index_array(root, "records.npy")
    records["size"] = fmt.RECORD_HEADER_SIZE + length
    replace_index_file(root, "group_lengths.npy", np.array([[length]], dtype=fmt.GROUP_LENGTH_DTYPE))
    replace_index_file(root, "group_crc32.npy", np.array([[crc]], dtype=fmt.GROUP_CRC_DTYPE))
    replace_index_file(root, "records.npy", records)
    m = manifest(root)
    m["total_bytes"] = length
    write_manifest(root, m)
    return bytes(16)


@pytest.fixture
def large_group(tmp_path) -> tuple[Path, int]:
    length = 64 << 20
    root = tiny_store(tmp_path / "large.pcr", ["c/big.jpg"], groups=1)
    _one_large_group(root, length)
    return root, length


def test_verify_reads_a_large_record_in_bounded_pieces(large_group):
    """verify's peak memory on a store whose one group is 64 MiB exceeds that on a tiny
    store by far less than the group."""
    root, length = large_group
    tiny = tiny_store(root.parent / "tiny.pcr", ["c/a.jpg"])
    peaks = []
    for store in (tiny, root):
        code = f"""
import resource, subprocess, sys
r = subprocess.run({pcrfs_argv("verify", "-q", store)!r}, capture_output=True, text=True, timeout={QUICK * 2})
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
        res = py(code, timeout=QUICK * 3)
        rc, peak_kib = map(int, res.stdout.split())
        assert rc == 0, res.stderr
        peaks.append(peak_kib * 1024)
    assert peaks[1] - peaks[0] < length // 4, peaks


def test_verify_checks_a_record_size_before_reading_it(large_group):
    root, length = large_group
    with open(root / fmt.record_name(0), "ab") as f:
        f.truncate(100 << 30)  # a record grown to 100 GB (sparse)
    res = run_limited(pcrfs_argv("verify", "-q", root), timeout=QUICK, as_bytes=MEMORY)
    assert res.returncode == 1 and "bytes, index says" in res.stdout, res.stdout + res.stderr[-1000:]


def test_large_group_is_read_by_range_not_whole_per_read(large_group):
    """Reading a 64 MiB group in 128 KiB pieces (as the kernel does) with no cache reads
    it about twice in all (one CRC pass, then the ranges), not 64 MiB per piece."""
    root, length = large_group
    piece = 128 << 10
    with open_store(root) as s:
        size = s.size(0, 1)
        offsets = list(range(0, 64 * piece, piece)) + [size - piece]
        got = [s.read_at(0, 1, off, piece) for off in offsets]
        assert all(g == bytes(piece) for g in got[:-1]) and got[-1] == bytes(piece - 2) + b"\xff\xd9"
        assert s.records.bytes_read <= length + len(offsets) * piece, s.records.bytes_read


def test_large_group_with_damage_is_never_served(large_group):
    root, length = large_group
    with open(root / fmt.record_name(0), "r+b") as f:
        f.seek(fmt.RECORD_HEADER_SIZE + length - 5)
        f.write(b"X")
    with open_store(root) as s:
        for off in (0, length // 2, length - 4096):
            with pytest.raises(CorruptData, match="CRC-32"):
                s.read_at(0, 1, off, 4096)


@needs_fuse
def test_mount_serves_a_large_group_in_bounded_memory_and_reads(large_group, mounts):
    """Six concurrent 4 KiB reads of a 64 MiB group, then the whole file in kernel pieces
    with no cache: the daemon's peak memory grows by far less than the group, and it reads
    the group about twice, not once per kernel read."""
    root, length = large_group
    info = mounts.mount(root, "large", cache_size=0)
    mnt = Path(info.mountpoint)
    def hwm() -> int:
        status = Path(f"/proc/{info.pid}/status").read_text().splitlines()
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM")))

    before = hwm()
    path = mnt / "full" / "c" / "big.jpg"

    def read4k(off: int) -> None:
        with open(path, "rb", buffering=0) as f:
            f.seek(off)
            assert f.read(4096) == bytes(4096)

    threads = [threading.Thread(target=read4k, args=(off,)) for off in range(4096, length, length // 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (hwm() - before) * 1024 < length // 4, (before, hwm())
    res = run_limited([sys.executable, "-c", f"import sys; print(len(open({str(path)!r}, 'rb').read()))"],
                      timeout=60)
    assert res.returncode == 0 and int(res.stdout) == length + 2, res.stderr
    assert daemon_stats(mnt)["store_reads"]["bytes"] <= 3 * length


# ---- 4, 9. absurd shapes and wrong types, refused at open --------------------------------------

def test_group_columns_beyond_u1_are_refused(small):
    m = manifest(small)
    n, g = m["num_images"], m["num_groups"]
    m["num_groups"] = 300
    write_manifest(small, m)
    with pytest.raises(StoreError, match="num_groups"):
        open_store(small)
    m["num_groups"] = g
    write_manifest(small, m)
    lengths = index_array(small, "group_lengths.npy")
    wide = np.zeros((n, 300), dtype=lengths.dtype)
    wide[:, :g] = lengths
    replace_index_file(small, "group_lengths.npy", wide)
    replace_index_file(small, "group_crc32.npy", np.zeros((n, 300), dtype=fmt.GROUP_CRC_DTYPE))
    with pytest.raises(StoreError, match="disagree"):
        open_store(small)


@pytest.mark.parametrize("edit,key", [
    (lambda m: m.update(classes=5), "classes"),
    (lambda m: m.update(classes=[1, 2]), "classes"),
    (lambda m: m.update(total_bytes="lots"), "total_bytes"),
    (lambda m: m.update(total_bytes=-1), "total_bytes"),
    (lambda m: m.update(num_images=2.5), "num_images"),
    (lambda m: m.update(num_records=True), "num_records"),
    (lambda m: m.update(options=[1]), "options"),
    (lambda m: m.update(record_target_bytes="64M"), "record_target_bytes"),
])
def test_manifest_values_of_the_wrong_type_are_named(small, edit, key):
    m = manifest(small)
    edit(m)
    write_manifest(small, m)
    with pytest.raises(StoreError, match=key):
        open_store(small)
    assert_clean_cli_error(["info", small], key)
    assert_clean_cli_error(["verify", "-q", small], key)


def test_deeply_nested_manifest_is_a_clear_error(small, tmp_path):
    text = (small / fmt.MANIFEST).read_text()
    (small / fmt.MANIFEST).write_text(text + "deep: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(StoreError, match="nested too deeply"):
        open_store(small)
    for args in (["info", small], ["verify", "-q", small], ["mount", small, tmp_path]):
        assert_clean_cli_error(args, "nested too deeply")


def _dir_table(root: Path, names: list[str], ranges: list[tuple[int, int]]) -> None:
    blob = b"".join(fmt.encode_path(d) for d in names)
    offsets = np.zeros(len(names) + 1, dtype=fmt.OFFSET_DTYPE)
    np.cumsum([len(fmt.encode_path(d)) for d in names], out=offsets[1:])
    replace_index_file(root, "dirs.bin", blob)
    replace_index_file(root, "dir_offsets.npy", offsets)
    replace_index_file(root, "dir_ranges.npy", np.array(ranges, dtype=fmt.OFFSET_DTYPE).reshape(-1, 2))


@pytest.mark.parametrize("drop", ["", "a"])
def test_directory_table_missing_root_or_parent_is_refused(tmp_path, drop):
    root = tiny_store(tmp_path / "s.pcr", ["a/b/x.jpg", "a/b/y.jpg", "c/z.jpg"])
    names = ["", "a", "a/b", "c"]
    ranges = [(0, 3), (0, 2), (0, 2), (2, 3)]
    keep = [i for i, d in enumerate(names) if d != drop]
    _dir_table(root, [names[i] for i in keep], [ranges[i] for i in keep])
    with pytest.raises(StoreError, match="root" if drop == "" else "parent"):
        open_store(root)
    if fuse_unavailable() is None:
        (tmp_path / "mnt").mkdir()
        assert_clean_cli_error(["mount", root, tmp_path / "mnt"], "root" if drop == "" else "parent")


@pytest.mark.parametrize("names,ranges,needle", [
    (["", "a", "a/b", "c", "c/w"], [(0, 4), (0, 2), (0, 2), (2, 4), (0, 1)], "range does not match"),
    (["", "a", "a/b", "c", "c/w"], [(0, 4), (0, 2), (0, 2), (2, 4), (3, 3)], "range does not match"),
    (["", "a", "a/b", "c", "c", "c/w"], [(0, 4), (0, 2), (0, 2), (2, 4), (2, 4), (2, 3)], "twice"),
])
def test_directory_ranges_that_contradict_the_names_are_refused(tmp_path, names, ranges, needle):
    """Listings come from the directory table: one whose ranges hold other directories'
    images (a listing would show 'w/q.jpg' in c, or x.jpg in c/w) is refused at open."""
    root = tiny_store(tmp_path / "s.pcr", ["a/b/x.jpg", "a/b/y.jpg", "c/w/q.jpg", "c/z.jpg"])
    _dir_table(root, names, ranges)
    with pytest.raises(StoreError, match=needle):
        open_store(root)


@pytest.mark.parametrize("dtype,value", [("<f4", 1.5), ("<i4", -5), ("<u8", 7)])
def test_group_lengths_of_another_type_are_refused(small, tmp_path, dtype, value):
    lengths = index_array(small, "group_lengths.npy").astype(dtype)
    lengths[0, 0] = value
    replace_index_file(small, "group_lengths.npy", lengths)
    with pytest.raises(StoreError, match="group_lengths.npy"):
        open_store(small)
    assert_clean_cli_error(["verify", "-q", small], "group_lengths.npy")
    assert_clean_cli_error(["get", small, "c0/img00000.jpg", "-o", tmp_path / "o"], "group_lengths.npy")


# ---- 10. every name component is checked at open -------------------------------------------------

@pytest.mark.parametrize("name", [
    "../x.jpg", "c1//a.jpg", "c1/./a.jpg", "c1/../a.jpg", "c1/a.jpg/", "c1/.", "./a.jpg", "..",
    "c1/" + "n" * 256 + ".jpg",                 # a component longer than NAME_MAX
    "/".join(["d" * 200] * 21) + "/x.jpg",      # a path longer than PATH_MAX, every component fine
    "c1/a\0.jpg",
])
def test_non_canonical_or_overlong_names_are_refused_at_open(tmp_path, name):
    root = tiny_store(tmp_path / "s.pcr", ["c1/ok.jpg", name, "c2/ok.jpg"])
    with pytest.raises(StoreError) as e:
        open_store(root)
    msg = str(e.value)
    assert any(s in msg for s in ("canonical relative path", "longer than", "NUL")), msg
    if "\0" not in name and len(name) < 200:
        assert repr(name)[1:-1] in msg or repr(name.rstrip("/"))[1:-1] in msg, msg
    assert_clean_cli_error(["verify", "-q", root])


def test_names_at_the_limits_are_served(tmp_path, mounts):
    """A 255-byte component in a path just under PATH_MAX is fine: opened, verified, mounted."""
    long_name = "c/" + "n" * 251 + ".jpg"
    deep = "/".join(["d" * 254] * 15) + "/x.jpg"
    assert len(deep.encode()) <= fmt.MAX_PATH_BYTES
    root = tiny_store(tmp_path / "s.pcr", [long_name, "c/short.jpg", deep])
    with open_store(root) as s:
        assert verify_store(s) == []
        assert s.find(long_name) >= 0
        want = s.read(long_name, 1)
    if fuse_unavailable() is None:
        info = mounts.mount(root, "long", cache_size=0)
        assert (Path(info.mountpoint) / "scan1" / long_name).read_bytes() == want
        assert sorted(os.listdir(Path(info.mountpoint) / "scan1" / "c")) == sorted(["n" * 251 + ".jpg", "short.jpg"])


# ---- the vectorized name check agrees with the obvious one ---------------------------------------

def _canonical_reference(name: bytes) -> bool:
    if not name or len(name) > fmt.MAX_PATH_BYTES or b"\0" in name:
        return False
    return all(part not in (b"", b".", b"..") and len(part) <= fmt.MAX_NAME_BYTES for part in name.split(b"/"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="a./\0", max_size=7).map(str.encode), max_size=6))
def test_vectorized_name_check_matches_a_per_name_check(names):
    from pcrfs.store.format.index import _bad_name

    offsets = np.zeros(len(names) + 1, dtype=fmt.OFFSET_DTYPE)
    np.cumsum([len(n) for n in names], out=offsets[1:])
    bad = _bad_name(b"".join(names), offsets, "image path")
    assert (bad is None) == all(_canonical_reference(n) for n in names), (names, bad)
    if bad is not None and b"\0" not in b"".join(names):
        first_bad = next(n for n in names if not _canonical_reference(n))
        assert repr(fmt.decode_path(first_bad)) in bad, (names, bad)


def test_an_image_named_like_a_directory_is_refused(tmp_path):
    """'a' and 'a/x.jpg' both stored: the mount would list 'a' twice (file and directory)
    and `ls` failed, though `verify` said OK (issue 26 item 8). Refused at open (so by verify too)."""
    root = tiny_store(tmp_path / "s.pcr", ["a", "a/x.jpg", "c/z.jpg"])
    with pytest.raises(StoreError, match="both an image and a directory"):
        open_store(root)
    assert_clean_cli_error(["verify", "-q", root], "both an image and a directory")


def test_an_unsorted_index_is_refused_at_open(tmp_path):
    """Two names swapped in the path table (CRCs made to match): the mount listed both while
    `get` bisected and missed one (issue 26 item 8). Refused at open, naming the pair, so no
    door serves it (verify included)."""
    root = tiny_store(tmp_path / "s.pcr", ["c/a.jpg", "c/b.jpg", "d/z.jpg"])
    blob = (root / fmt.INDEX_DIR / "paths.bin").read_bytes()
    assert blob.startswith(b"c/a.jpgc/b.jpg")
    replace_index_file(root, "paths.bin", b"c/b.jpgc/a.jpg" + blob[14:])
    with pytest.raises(StoreError, match="not sorted and unique: 'c/b.jpg' comes before 'c/a.jpg'"):
        open_store(root)
    assert_clean_cli_error(["get", root, "c/a.jpg", "-o", str(tmp_path / "x.jpg")], "not sorted")
    assert_clean_cli_error(["verify", "-q", root], "not sorted")
    # a duplicate name is refused the same way
    root2 = tiny_store(tmp_path / "t.pcr", ["c/a.jpg", "c/b.jpg"])
    replace_index_file(root2, "paths.bin", b"c/a.jpgc/a.jpg")
    with pytest.raises(StoreError, match="not sorted and unique"):
        open_store(root2)


def _sorted_reference(names: list[bytes]) -> int | None:
    keys = [tuple(n.split(b"/")) for n in names]
    return next((i for i in range(len(keys) - 1) if keys[i] >= keys[i + 1]), None)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "ab", "a-b", "a.", "\u00e9", "abcdefgh", "abcdefg", "x" * 9]),
                         min_size=1, max_size=3).map(lambda parts: "/".join(parts).encode()), max_size=7),
       st.booleans())
def test_vectorized_order_check_matches_a_per_name_check(names, sort):
    from pcrfs.store.format.index import _first_unsorted

    if sort:
        names = sorted(set(names), key=lambda n: tuple(n.split(b"/")))
    offsets = np.zeros(len(names) + 1, dtype=fmt.OFFSET_DTYPE)
    np.cumsum([len(n) for n in names], out=offsets[1:])
    assert _first_unsorted(b"".join(names), offsets) == _sorted_reference(names), names


@pytest.mark.slow
def test_get_of_a_group_over_2_gib_is_whole_and_in_bounded_memory(tmp_path):
    """One pread returns at most 0x7ffff000 bytes: a 2.1 GB group looked truncated to `get`
    (after 2.1 GB of RSS). Now it is read in pieces, each checked, in bounded memory
    (issue 26 item 6). The group is zeros in a sparse record, checksums and all."""
    length = (2 << 30) + (5 << 20)
    root = tiny_store(tmp_path / "huge.pcr", ["c/big.jpg"], groups=1)
    _one_large_group(root, length)
    out = tmp_path / "big.jpg"
    code = f"""
import resource, subprocess, sys
r = subprocess.run({pcrfs_argv("get", root, "c/big.jpg", "-o", out)!r}, capture_output=True, text=True)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, repr(r.stderr))
"""
    res = py(code, timeout=600)
    rc, peak_kib, err = res.stdout.split(maxsplit=2)
    assert int(rc) == 0, err
    assert int(peak_kib) * 1024 < 512 << 20, peak_kib
    assert out.stat().st_size == length + 2
    with open(out, "rb") as f:
        f.seek(length)
        assert f.read() == b"\xff\xd9"
    with open_store(root) as s:  # the store API's own pieces: past the 2 GiB mark, right
        assert s.read_at(0, 1, length - 10, 12) == bytes(10) + b"\xff\xd9"
