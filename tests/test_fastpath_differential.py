"""The compiled read path against the Python read, without FUSE (issue 28).

``_fastpath``'s ``State.read_for_test(path, size, offset)`` runs the read callback's own
code -- resolve the path through its hash table, find the record, serve from the record's
descriptor with a CRC-32 per group -- and answers the bytes it served or why it would have
asked Python (``FELL_BACK_*``). Here that is compared with what the mount's Python read
serves (``ViewTree.read``: ``Store.read_at``) at offsets and sizes chosen around group
boundaries and the file's end, in every view (scanK, full, the adaptive ssimNN views), on
stores of both format versions, and on crafted stores: a damaged group, a record cut short
after the compiled path took its descriptor or before, a group larger than the large-group
cut. The rule: bytes served in C are the Python read's bytes; where Python fails the C
path fails too (and falls back), for exactly the files and ranges that touch the damage.
``stat_for_test`` does the same for the getattr callback.

Also the State's life (one per mount: releasing one leaves another serving; one installed
per process) and the contract (an array or constant that is not what C reads is refused
by ``configure`` with a message naming it; the mount then serves in Python and says why).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pcrfs.convert import convert
from pcrfs.fuse import fastpath
from pcrfs.jpeg.scans import EOI_BYTES
from pcrfs.store.format import adaptiveindex as adaptive
from pcrfs.store.write import install
from pcrfs.store import format as fmt
from pcrfs.store.read.largegroups import RANGE_GROUP_BYTES
from pcrfs.store.read.reader import open_store
from pcrfs.access.views import FileNode, ViewTree

OWNER = (os.getuid(), os.getgid())


@pytest.fixture(scope="module")
def module():
    mod, why = fastpath.load()
    if mod is None:
        pytest.skip(f"compiled path unavailable: {why}")
    return mod


@dataclass
class File:
    path: str           # in the mount: /view/rel/path
    image: int
    view: str
    size: int           # of the file (groups served + EOI)
    bounds: list[int]   # where each served group starts, and the EOI


class Pair:
    """One store opened twice over: the Python read (a ViewTree) and a compiled State on it."""

    def __init__(self, module, root: Path) -> None:
        self.module = module
        self.store = open_store(root)
        self.tree = ViewTree(self.store)
        self.fast = fastpath.FastPath(module, self.tree, OWNER)
        self.state = self.fast.state
        assert self.fast.reads, "a local store is read in C"
        self.files: list[File] = []
        lengths = self.store.index.group_lengths
        for name, view in self.tree.views.items():
            for i in range(self.store.num_images):
                kk = self.store.groups.groups_for(i, view.k_of(i))
                starts = np.concatenate([[0], np.cumsum(lengths[i, :kk], dtype=np.int64)]).tolist()
                self.files.append(File(f"/{name}/{self.store.path(i)}", i, name, starts[-1] + len(EOI_BYTES), starts))
        self.outcomes: dict[str, int] = {}

    def python(self, f: File, offset: int, size: int) -> bytes | OSError:
        node = self.tree.resolve(f.path)
        assert isinstance(node, FileNode) and node.image == f.image
        try:
            return self.tree.read(node, offset, size)
        except OSError as e:  # CorruptData: EIO on the mount
            return e

    def compiled(self, f: File, offset: int, size: int) -> bytes | int:
        """The C read as the mount does it: a record without a descriptor is offered one
        (what the mount does after Python served a read of it) and read again."""
        got = self.state.read_for_test(os.fsencode(f.path), size, offset)
        if got == self.module.FELL_BACK_NO_HOLDER:
            self.fast.offer_record(f.image)
            got = self.state.read_for_test(os.fsencode(f.path), size, offset)
        return got

    def check(self, f: File, offset: int, size: int, damaged: set[tuple[int, int]] = frozenset()) -> bytes | int:
        """C against Python for one request; ``damaged``: (image, 0-based group) whose bytes
        are bad. Returns what C answered."""
        want = self.python(f, offset, size)
        got = self.compiled(f, offset, size)
        where = f"{f.path} [{offset}, +{size}) of {f.size}"
        touched = overlapped(f, offset, size)
        key = "bytes" if isinstance(got, bytes) else str(got)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if isinstance(got, bytes):
            assert not isinstance(want, Exception), f"C served {len(got)} bytes of {where}; Python: {want}"
            assert got == want, f"C and Python differ on {where}"
            assert not any((f.image, g) in damaged for g, _ in touched), f"C served damaged bytes of {where}"
        elif got == self.module.FELL_BACK_DECLINED:  # only a large group the request cuts
            assert any(cut and f.bounds[g + 1] - f.bounds[g] > RANGE_GROUP_BYTES for g, cut in touched), where
        else:
            assert got == self.module.FELL_BACK_FAILED, f"{where}: C fell back ({got}) on a record it holds"
            assert isinstance(want, Exception), f"C failed on {where}, Python served it"
        if isinstance(want, Exception):
            assert not isinstance(got, bytes)
        return got

    def close(self) -> None:
        if self.store is not None:
            self.fast.release()
            self.store.close()
            self.store = None


def overlapped(f: File, offset: int, size: int) -> list[tuple[int, bool]]:
    """(0-based group, whether the request cuts it) of every group [offset, offset + size) overlaps."""
    end = min(offset + size, f.size)
    out = []
    for g in range(len(f.bounds) - 1):
        a, b = f.bounds[g], f.bounds[g + 1]
        if a < end and b > offset and b > a:
            out.append((g, not (offset <= a and b <= end)))
    return out


def kernel_like(f: File, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Requests of one file: whole, in pages, in the kernel's 128 KiB pieces, and random."""
    out = [(0, f.size), (0, f.size + 4096), (0, 131072), (f.size, 10), (f.size - 1, 5), (0, 0)]
    out += [(p, 4096) for p in range(0, f.size, 4096)]
    for g in f.bounds:  # around each group boundary
        out += [(max(0, g - 1), 2), (g, 1), (max(0, g - 3), 7)]
    for _ in range(4):
        a = int(rng.integers(0, f.size + 1))
        out.append((a, int(rng.integers(0, f.size - a + 8))))
    return out


def with_adaptive(src: Path, dest: Path, seed: int) -> Path:
    """A copy of ``src`` with an adaptive index (ssimNN views, k in 0..G; 0 means all groups)."""
    shutil.copytree(src, dest)
    with open_store(dest) as s:
        n, g = s.num_images, s.num_groups
    rng = np.random.default_rng(seed)
    install.adaptive_index(dest, rng.integers(0, g + 1, size=(n, len(adaptive.THRESHOLDS)), dtype=np.uint8))
    return dest


@pytest.fixture(scope="module", params=["v2-shuffled", "v1-source"])
def pair(request, module, demo_store, source_store, tmp_path_factory):
    src = demo_store if request.param.startswith("v2") else source_store
    root = with_adaptive(src, tmp_path_factory.mktemp("diff") / "store.pcr", seed=len(request.param))
    p = Pair(module, root)
    assert p.store.index.shuffled == request.param.startswith("v2")
    assert {v for v in p.tree.views if v.startswith("ssim")}, "adaptive views"
    yield p
    p.close()


# ---- normal stores ------------------------------------------------------------------------

def test_every_file_of_every_view_reads_as_in_python(pair):
    rng = np.random.default_rng(28)
    n = 0
    for f in pair.files:
        for offset, size in kernel_like(f, rng):
            assert isinstance(pair.check(f, offset, size), bytes)
            n += 1
    views = {f.view for f in pair.files}
    assert {"full", "scan1", "ssim90"} <= views and n > 20_000, (sorted(views), n)
    assert pair.state.counters()["fast_reads"] > 0


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_ranges_read_as_in_python(pair, data):
    f = data.draw(st.sampled_from(pair.files), label="file")
    anchor = data.draw(st.sampled_from(f.bounds + [0, f.size]), label="anchor")
    offset = data.draw(st.one_of(st.integers(0, f.size + 16),
                                 st.integers(-4, 4).map(lambda d: max(0, anchor + d))), label="offset")
    size = data.draw(st.one_of(st.integers(0, f.size + 16), st.sampled_from([1, 2, 4096, 131072]),
                               st.integers(0, 8)), label="size")
    assert isinstance(pair.check(f, offset, size), bytes)


def test_attributes_are_pythons(pair):
    for f in pair.files:
        got = pair.state.stat_for_test(os.fsencode(f.path))
        a = pair.tree.getattr(f.path)
        assert isinstance(got, dict), f.path
        assert (got["mode"], got["size"], got["mtime"], got["ino"], got["nlink"]) == \
               (a.mode, a.size, divmod(a.mtime_ns, 10**9), a.ino, a.nlink), f.path
        assert got["atime"] == got["ctime"] == got["mtime"]
        assert (got["uid"], got["gid"], got["blocks"]) == (*OWNER, (a.size + 511) // 512)


def test_what_is_not_an_image_file_goes_to_python(pair, module):
    f = pair.files[0]
    rel = f.path.split("/", 2)[2]
    others = ["/", "/full", "/full/", f"/{f.view}", f"/.pcrfs/stats", "/.pcrfs", "/nosuchview/" + rel,
              f"/{f.view}/{rel}x", f"/{f.view}/{rel}/", f"/{f.view}/" + rel.rsplit("/", 1)[0], "full/" + rel, ""]
    for path in others:
        assert pair.state.read_for_test(path.encode(), 4096, 0) == module.FELL_BACK_UNRESOLVED, path
        assert pair.state.stat_for_test(path.encode()) == module.FELL_BACK_UNRESOLVED, path
    assert pair.state.read_for_test(f.path.encode(), 10, -1) == module.FELL_BACK_UNRESOLVED


# ---- crafted stores ------------------------------------------------------------------------

def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("which", ["v2-shuffled", "v1-source"])
def test_a_damaged_group_fails_exactly_where_it_is_read(module, demo_store, source_store, tmp_path, which):
    root = with_adaptive(demo_store if which.startswith("v2") else source_store, tmp_path / "s.pcr", seed=5)
    with open_store(root) as s:
        victim = next(i for i in range(s.num_images) if s.n_groups(i) >= 4)
        g = 2  # 0-based: the third group
        rng = s.ranges(victim, s.num_groups)[g]
        _flip(s.records.describe(rng.record), rng.offset + rng.length // 2)
        r = rng.record
    p = Pair(module, root)
    try:
        rand = np.random.default_rng(1)
        failed = served_victim = 0
        for f in p.files:
            if p.store.index.record_of(f.image) != r:
                continue
            for offset, size in kernel_like(f, rand):
                got = p.check(f, offset, size, damaged={(victim, g)})
                if f.image == victim:
                    hits = any(gg == g for gg, _ in overlapped(f, offset, size))
                    assert isinstance(got, bytes) != hits, (f.path, offset, size, got)
                    failed += hits
                    served_victim += not hits
                else:
                    assert isinstance(got, bytes), (f.path, offset, size, got)
        assert failed > 50 and served_victim > 50, (failed, served_victim)
        assert p.state.counters()["fast_reads"] > 0
    finally:
        p.close()


def test_a_record_cut_short_under_the_compiled_path(module, demo_store, tmp_path):
    root = with_adaptive(demo_store, tmp_path / "s.pcr", seed=6)
    p = Pair(module, root)
    try:
        r = 1
        in_r = [f for f in p.files if p.store.index.record_of(f.image) == r]
        p.fast.offer_record(in_r[0].image)  # descriptors taken (LocalRecords' and C's), then the file is cut
        size = int(p.store.index.records["size"][r])
        os.truncate(p.store.records.describe(r), size - size // 3)
        rand = np.random.default_rng(2)
        outcomes = {"bytes": 0, "failed": 0}
        for f in in_r:
            for offset, n in kernel_like(f, rand):
                got = p.check(f, offset, n)
                outcomes["bytes" if isinstance(got, bytes) else "failed"] += 1
        assert outcomes["bytes"] > 100 and outcomes["failed"] > 100, outcomes
    finally:
        p.close()


def test_a_record_cut_short_before_it_was_opened(module, demo_store, tmp_path):
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    with open_store(root) as s:
        size = int(s.index.records["size"][2])
        os.truncate(s.records.describe(2), size - 1)
    p = Pair(module, root)
    try:
        for f in [f for f in p.files if p.store.index.record_of(f.image) == 2][:40]:
            assert isinstance(p.python(f, 0, f.size), OSError)
            with pytest.raises(OSError):  # LocalRecords refuses it: no descriptor for the compiled path
                p.fast.offer_record(f.image)
            assert p.state.read_for_test(f.path.encode(), f.size, 0) == module.FELL_BACK_NO_HOLDER
    finally:
        p.close()


@pytest.fixture(scope="module")
def large_group_store(tmp_path_factory) -> Path:
    """One photo-sized noise JPEG (groups over RANGE_GROUP_BYTES) among small ones."""
    from PIL import Image
    d = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    (d / "src" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)).save(d / "src" / "a" / "big.jpg",
                                                                               quality=95)
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "src" / "a" / f"s{j}.jpg")
    # mtimes before 1970, with and without a whole second (the stat's floor division)
    os.utime(d / "src" / "a" / "s0.jpg", ns=(0, -1_500_000_001))
    os.utime(d / "src" / "a" / "s1.jpg", ns=(0, -3_000_000_000))
    convert(d / "src", d / "s.pcr", record_bytes=256 * 1024, workers=1)
    return d / "s.pcr"


def test_a_large_group_cut_by_a_read_goes_to_python(module, large_group_store, monkeypatch):
    from pcrfs.fuse import fastpath as fastpath_mod

    # the compiled path keeps groups up to largegroups.KEEP_GROUP_BYTES that reads cut; with the
    # cut at RANGE_GROUP_BYTES this photo's large groups are over it
    monkeypatch.setattr(fastpath_mod, "KEEP_GROUP_BYTES", RANGE_GROUP_BYTES)
    p = Pair(module, large_group_store)
    try:
        big = [f for f in p.files if np.diff(f.bounds).max() > RANGE_GROUP_BYTES]
        assert big, "a group over the large-group cut"
        rand = np.random.default_rng(3)
        for f in p.files:
            for offset, size in kernel_like(f, rand)[:40] + [(o, 131072) for o in range(0, f.size, 131072)]:
                p.check(f, offset, size)
        assert p.outcomes.get(str(module.FELL_BACK_DECLINED), 0) > 0 and p.outcomes["bytes"] > 0, p.outcomes
    finally:
        p.close()


def test_attributes_before_1970_are_pythons(module, large_group_store):
    p = Pair(module, large_group_store)
    try:
        assert (p.store.index.images["src_mtime_ns"] < 0).sum() == 2
        for f in p.files:
            got, a = p.state.stat_for_test(os.fsencode(f.path)), p.tree.getattr(f.path)
            # a struct timespec's tv_nsec is 0..999,999,999: seconds are floored, as divmod does
            assert (got["size"], got["mtime"], got["ino"]) == (a.size, divmod(a.mtime_ns, 10**9), a.ino), f.path
    finally:
        p.close()


# ---- concurrency ---------------------------------------------------------------------------

def test_reads_at_random_offsets_from_several_threads(module, demo_store):
    """Readers at random offsets and sizes while another thread takes the records' holders
    back and hands them over again (descriptors and buffers): every answer is the exact
    bytes or "no holder", never another failure, never other bytes."""
    p = Pair(module, demo_store)
    try:
        files = [f for f in p.files if f.view in ("scan1", "scan2", "scan3", "full")][::3]
        whole = {f.path: p.python(f, 0, f.size) for f in files}
        records = sorted({p.store.index.record_of(f.image) for f in files})
        raw = {r: p.store.read_record(r) for r in records}
        G = p.store.num_groups
        stop = threading.Event()
        errors: list[str] = []
        counts = {"bytes": 0, "no_holder": 0}
        lock = threading.Lock()

        def holders() -> None:
            # Once revoke returns no read may use what it took back: a buffer is scribbled
            # over and descriptor numbers go round to other records, so a read still using
            # either would fail its CRC check or serve other bytes.
            turn = 0
            buffers: dict[int, bytearray] = {}
            while not stop.is_set():
                for r in records:
                    p.state.revoke(r)
                    if r in buffers:
                        buffers.pop(r)[:] = bytes(len(raw[r]))
                for r in records[::1 if turn % 4 else -1]:
                    if turn % 2:
                        buffers[r] = bytearray(raw[r])
                        p.state.adopt(r, buffers[r], 0, G, True)
                    else:
                        fd = os.open(p.store.records.describe(r), os.O_RDONLY)
                        if not p.state.adopt(r, fd, 0, G, False):
                            os.close(fd)
                turn += 1

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            mine = {"bytes": 0, "no_holder": 0}
            for _ in range(10_000):
                f = files[int(rng.integers(len(files)))]
                offset = int(rng.integers(0, f.size + 2))
                size = int(rng.choice([1, 4096, 131072, int(rng.integers(0, f.size + 2))]))
                got = p.state.read_for_test(f.path.encode(), size, offset)
                if got == module.FELL_BACK_NO_HOLDER:
                    mine["no_holder"] += 1
                    continue
                if got != whole[f.path][offset:offset + size]:
                    errors.append(f"{f.path} [{offset}, +{size}): {got if isinstance(got, int) else len(got)}")
                    return
                mine["bytes"] += 1
            with lock:
                for k, v in mine.items():
                    counts[k] += v

        changer = threading.Thread(target=holders)
        changer.start()
        readers = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        stop.set()
        changer.join()
        assert not errors, errors[:5]
        assert counts["bytes"] > 100 and counts["no_holder"] > 0, counts  # both sides of the race ran
    finally:
        p.close()


# ---- the State's life --------------------------------------------------------------------------

def test_each_mount_has_its_own_state(module, demo_store):
    a, b = Pair(module, demo_store), Pair(module, demo_store)
    try:
        f = b.files[len(b.files) // 2]
        want = b.python(f, 0, f.size)
        assert a.compiled(f, 0, f.size) == want and b.compiled(f, 0, f.size) == want
        a.close()  # another configure, another release: b serves on
        assert b.state.read_for_test(f.path.encode(), f.size, 0) == want
        with pytest.raises(RuntimeError, match="released"):
            a.state.read_for_test(f.path.encode(), f.size, 0)
        assert a.state.counters()["fast_reads"] >= 1  # the counters outlive the tables
        assert not a.state.has_fd(0) and not a.state.adopt(0, b"x")
    finally:
        b.close()


def test_one_state_installed_at_a_time(module, demo_store):
    a, b = Pair(module, demo_store), Pair(module, demo_store)
    try:
        a.state.install(1, 1, 1)  # stand-ins: nothing calls the callbacks here
        with pytest.raises(RuntimeError, match="another mount"):
            b.state.install(1, 1, 1)
        with pytest.raises(RuntimeError, match="already installed"):
            a.state.install(1, 1, 1)
        assert a.state.uninstall() and not a.state.uninstall()
        b.state.install(1, 1, 1)
        b.close()  # release uninstalls
        a.state.install(1, 1, 1)
    finally:
        a.close()
        b.close()


def test_release_waits_for_reads_in_flight(module, demo_store):
    p = Pair(module, demo_store)
    files = p.files[-40:]
    want = {f.path: p.compiled(f, 0, f.size) for f in files}  # every record held
    assert all(isinstance(w, bytes) for w in want.values())
    results: list[str] = []
    running = threading.Barrier(4)

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        n = 0
        while True:
            f = files[int(rng.integers(len(files)))]
            offset = int(rng.integers(0, f.size))
            try:
                got = p.state.read_for_test(f.path.encode(), 65536, offset)
            except RuntimeError:
                results.append("released")
                return
            if got != want[f.path][offset:offset + 65536]:
                results.append(f"{f.path} [{offset}, +65536): {got if isinstance(got, int) else len(got)}")
                return
            n += 1
            if n == 200:
                running.wait()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    running.wait()  # every reader is reading: the release comes with reads in flight
    p.close()
    for t in threads:
        t.join()
    assert results == ["released"] * 3, results


# ---- the contract --------------------------------------------------------------------------

@pytest.fixture
def args_of(demo_store):
    stores = []

    def make() -> dict:
        s = open_store(demo_store)
        stores.append(s)
        return fastpath.configure_args(ViewTree(s), OWNER, True)
    yield make
    for s in stores:
        s.close()


def _image_dtype(**changed: str) -> np.dtype:
    return np.dtype([(name, changed.get(name, fmt.IMAGE_DTYPE.fields[name][0].str)) for name in fmt.IMAGE_DTYPE.names])


def _with_images(args: dict, dtype: np.dtype) -> None:
    args["images"] = args["images"].astype(dtype)
    args["image_fields"] = fastpath._fields(dtype)


def _with_records(args: dict, dtype: np.dtype) -> None:
    args["records"] = args["records"].astype(dtype)
    args["record_fields"] = fastpath._fields(dtype)


def _bump(args: dict, name: str, field: str, value) -> None:
    a = np.array(args[name])
    a[field][0] = value
    args[name] = a


def _set(args: dict, name: str, value) -> None:
    args[name] = value


MISMATCHES = {
    "lengths u8": (lambda a: _set(a, "lengths", a["lengths"].astype("<u8")), "group lengths holds 'L'"),
    "crcs big-endian": (lambda a: _set(a, "crcs", a["crcs"].astype(">u4")), "group CRC-32s holds '>I'"),
    "lengths short": (lambda a: _set(a, "lengths", a["lengths"][:-1]), "group lengths holds"),
    "lengths not an array": (lambda a: _set(a, "lengths", [1, 2, 3]), "group lengths: <class 'list'>"),
    "group offsets u4": (lambda a: _set(a, "group_offsets", a["group_offsets"].astype("<u4")),
                         "record group offsets holds 'I'"),
    "path offsets i8": (lambda a: _set(a, "path_offsets", a["path_offsets"].astype("<i8")), "path offsets holds 'l'"),
    "n_groups u2": (lambda a: _with_images(a, _image_dtype(n_groups="<u2")), "images.n_groups is <u2"),
    "mtime f8": (lambda a: _with_images(a, _image_dtype(src_mtime_ns="<f8")), "images.src_mtime_ns is <f8"),
    "no n_groups": (lambda a: a["image_fields"].pop("n_groups"), "images has no field n_groups"),
    "a field past the item": (lambda a: a["image_fields"].update(n_groups=("|u1", 18)),
                              "images.n_groups at offset 18 does not fit"),
    "first_image i8": (lambda a: _with_records(a, np.dtype([("first_image", "<i8"), ("n_images", "<u8"),
                                                            ("size", "<u8")])), "records.first_image is <i8"),
    "positions i4": (lambda a: _set(a, "positions", a["positions"].astype("<i4")), "positions holds 'i'"),
    "storage alone": (lambda a: _set(a, "positions", None), "go together"),
    "ks u2": (lambda a: a["views"].append((b"ssimXX", 3, np.ones(a["n_images"], "<u2"), 1 << 40)),
              "an adaptive view's ks holds 'H'"),
    "eoi": (lambda a: _set(a, "eoi", b"\xff\xd8"), "EOI marker"),
    "cut": (lambda a: _set(a, "cut_group_limit", 0), "large-group cut"),
    "path offsets past the blob": (lambda a: _set(a, "blob", bytes(a["blob"])[:-1]), "past the path blob"),
    "more groups than the store": (lambda a: _bump(a, "images", "n_groups", 11), "more groups than the store"),
    "first record not at 0": (lambda a: _bump(a, "records", "first_image", 1), "does not start at position 0"),
    "storage not a permutation": (lambda a: _set(a, "storage", np.zeros_like(a["storage"])), "not the inverse"),
    "storage past the images": (lambda a: _set(a, "storage", a["storage"] + 1), "names an image"),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_configure_refuses_what_it_would_misread(module, args_of, name):
    args = args_of()
    assert args["positions"] is not None and args["n_groups"] == 10  # demo_store: version 2, 10 groups
    state = module.configure(**args)  # as it comes: accepted
    state.release()
    change, message = MISMATCHES[name]
    args = args_of()
    change(args)
    with pytest.raises(module.ContractError, match=None) as e:
        module.configure(**args)
    assert message in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_mismatch_turns_the_compiled_path_off_and_says_why(module, demo_store, caplog):
    try:
        from pcrfs.fuse import ops
    except (ImportError, OSError) as e:
        pytest.skip(f"no libfuse: {e}")
    with open_store(demo_store) as s:
        tree = ViewTree(s)
        s.index.images = s.index.images.astype(_image_dtype(n_groups="<u2"))  # the format drifted, C did not
        with caplog.at_level(logging.INFO, logger="pcrfs.fuse"):
            assert ops._compiled_path(ops.PcrfsOperations(tree)) is None
    assert "compiled path off" in caplog.text and "images.n_groups is <u2" in caplog.text, caplog.text


def test_a_module_built_from_another_contract_is_not_loaded(module, monkeypatch):
    monkeypatch.setattr(module, "CONTRACT", fastpath.CONTRACT - 1)
    mod, why = fastpath.load()
    assert mod is None and "another version of _fastpath.c" in why
