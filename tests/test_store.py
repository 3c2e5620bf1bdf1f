"""The reader API (pcrfs.store.read.reader) on the converted demo store, and its refusals.

Everything that damages a store works on a copy in tmp_path; the session
fixture ``demo_store`` is only ever read.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pcrfs.jpeg.scans import EOI_BYTES, split_groups
from pcrfs.store import format as fmt
from pcrfs.store.read.reader import CorruptData, StoreError, open_store


@pytest.fixture(scope="module")
def store(demo_store):
    s = open_store(demo_store)
    yield s
    s.close()


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    dst = tmp_path / "copy.pcr"
    shutil.copytree(demo_store, dst)
    return dst


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def imagefolder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision.datasets.ImageFolder's convention, without importing torch: classes are the
    sorted top-level directory names, samples are walked class by class in sorted order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = []
    for idx, cls in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(root / cls, followlinks=True)):
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                samples.append((rel, idx))
    return classes, samples


# ----------------------------------------------------------------- catalogue


def test_catalogue(store, demo_src):
    files = sorted(p.relative_to(demo_src).as_posix() for p in demo_src.rglob("*.jpg"))
    assert store.num_images == len(store) == len(files) == 96
    assert sorted(store.paths()) == files
    assert store.num_groups == 10  # the demo has colour images
    assert store.manifest["num_images"] == 96
    assert len(store.index.records) == store.manifest["num_records"] > 1  # small records: several
    for i in range(len(store)):
        assert store.n_groups(i) in (6, 10)
        assert not store.is_reencoded(i)
        st_ = (demo_src / store.path(i)).stat()
        assert store.source_mtime_ns(i) == st_.st_mtime_ns
        assert int(store.index.images[i]["src_size"]) == st_.st_size


def test_labels_follow_imagefolder(store, demo_src):
    classes, samples = imagefolder(demo_src)
    assert store.classes == classes
    assert list(store.paths()) == [p for p, _ in samples]  # same sample order
    for i, (path, label) in enumerate(samples):
        assert store.path(i) == path
        assert store.label(i) == label


def test_labels_match_torchvision(store, demo_src):
    """Cross-check against the real ImageFolder where torchvision is installed (slow import)."""
    folder = pytest.importorskip("torchvision.datasets.folder")
    ds = folder.ImageFolder(str(demo_src))
    assert store.classes == ds.classes
    got = [(str(demo_src / store.path(i)), store.label(i)) for i in range(len(store))]
    assert got == [(p, c) for p, c in ds.samples]


def test_find_every_path(store):
    for i, path in enumerate(store.paths()):
        assert store.find(path) == i
        assert store.find("/" + path) == i
    for missing in ("nope.jpg", "cat/nope.jpg", "cat", "", "cat/cat_0000.jpg/x", "zzz/a.jpg"):
        with pytest.raises(KeyError):
            store.find(missing)


def test_string_and_index_refs_agree(store):
    path = store.path(5)
    assert store.read(path, 3) == store.read(5, 3)
    assert store.size(path, 3) == store.size(5, 3)
    with pytest.raises(IndexError):
        store.read(len(store), 1)
    with pytest.raises(KeyError):
        store.read("no/such.jpg", 1)
    for bad_k in (0, store.num_groups + 1):
        with pytest.raises(ValueError):
            store.read(0, bad_k)


# ----------------------------------------------------------------- sizes and ranges


def test_size_equals_len_read(store):
    for i in range(len(store)):
        for k in range(1, store.num_groups + 1):
            assert store.size(i, k) == len(store.read(i, k))


def test_sizes_increase_then_stay(store):
    for i in range(len(store)):
        n = store.n_groups(i)
        sizes = [store.size(i, k) for k in range(1, store.num_groups + 1)]
        assert all(a < b for a, b in zip(sizes[:n - 1], sizes[1:n])), (i, sizes)
        assert all(s == sizes[n - 1] for s in sizes[n - 1:]), (i, sizes)
        assert store.read(i, n) == store.read(i, store.num_groups)


def test_ranges_cover_only_the_needed_groups(store):
    for i in range(0, len(store), 7):
        n = store.n_groups(i)
        record = store.index.record_of(i)
        for k in range(1, store.num_groups + 1):
            rngs = store.ranges(i, k)
            assert [r.group for r in rngs] == list(range(1, min(k, n) + 1))
            assert sum(r.length for r in rngs) + len(EOI_BYTES) == store.size(i, k)
            rec_size = int(store.index.records[record]["size"])
            for r in rngs:
                assert r.record == record
                assert fmt.RECORD_HEADER_SIZE <= r.offset and r.offset + r.length <= rec_size
        # group-major layout: group g+1 of an image lies after group g of every image in its record
        rngs = store.ranges(i, store.num_groups)
        assert all(a.offset < b.offset for a, b in zip(rngs, rngs[1:]))


def test_ranges_point_at_the_stored_bytes(store, demo_store):
    for i in (0, 13, 50, 95):
        full = store.read(i, store.num_groups)
        groups = split_groups(full)
        rngs = store.ranges(i, store.num_groups)
        assert len(groups) == len(rngs) == store.n_groups(i)
        with open(demo_store / fmt.record_name(rngs[0].record), "rb") as f:
            for g, r in zip(groups, rngs):
                f.seek(r.offset)
                raw = f.read(r.length)
                assert raw == bytes(g)
                assert zlib.crc32(raw) == r.crc32


def test_reads_only_the_needed_ranges(demo_store):
    with open_store(demo_store) as s:  # no cache: every group is read from disk
        for i in (0, 1, 40, 95):
            for k in (1, 2, 5, s.num_groups):
                before_bytes, before_req = s.records.bytes_read, s.records.requests
                data = s.read(i, k)
                kk = min(k, s.n_groups(i))
                want = int(s.index.group_lengths[i, :kk].sum())
                assert s.records.bytes_read - before_bytes == want == len(data) - 2
                assert s.records.requests - before_req == kk


def test_read_at_only_reads_overlapping_groups(demo_store):
    with open_store(demo_store) as s:
        i = 3
        rngs = s.ranges(i, s.num_groups)
        # a read inside group 1 touches group 1 only
        before = s.records.bytes_read
        s.read_at(i, s.num_groups, 0, 10)
        assert s.records.bytes_read - before == rngs[0].length
        # a read of the EOI only touches nothing
        before = s.records.bytes_read
        assert s.read_at(i, s.num_groups, s.size(i, s.num_groups) - 2, 2) == EOI_BYTES
        assert s.records.bytes_read - before == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_at_matches_read(store, data):
    i = data.draw(st.integers(0, len(store) - 1))
    k = data.draw(st.integers(1, store.num_groups))
    whole = store.read(i, k)
    n = len(whole)
    offset = data.draw(st.one_of(st.integers(0, n + 10), st.sampled_from([0, n - 2, n - 1, n])))
    size = data.draw(st.one_of(st.integers(0, n + 10), st.integers(0, 16)))
    assert store.read_at(i, k, offset, size) == whole[offset:offset + size]


# ----------------------------------------------------------------- decoding


def test_every_prefix_decodes_with_pillow(store, demo_src):
    for i in range(len(store)):
        src = decode((demo_src / store.path(i)).read_bytes())
        for k in range(1, store.n_groups(i) + 1):
            img = decode(store.read(i, k))
            assert img.shape == src.shape
        assert np.array_equal(img, src), store.path(i)  # full fidelity is lossless


@pytest.mark.skipif(shutil.which("djpeg") is None, reason="djpeg not installed")
def test_every_prefix_decodes_with_djpeg(store):
    for i in range(len(store)):
        for k in range(1, store.n_groups(i) + 1):
            data = store.read(i, k)
            p = subprocess.run(["djpeg", "-outfile", os.devnull], input=data, capture_output=True)
            assert p.returncode == 0, (store.path(i), k, p.stderr)
            assert p.stderr == b"", (store.path(i), k, p.stderr)  # libjpeg warnings go to stderr


# ----------------------------------------------------------------- open_store refusals


def test_open_missing(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "absent.pcr")
    with pytest.raises(StoreError, match="not a PCR store"):
        open_store(tmp_path)


def test_refuses_missing_manifest(store_copy):
    (store_copy / fmt.MANIFEST).unlink()
    with pytest.raises(StoreError, match="not a PCR store"):
        open_store(store_copy)


def test_refuses_unfinished_conversion(store_copy):
    (store_copy / fmt.MANIFEST).unlink()
    (store_copy / fmt.PARTIAL_DIR).mkdir()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(store_copy)


@pytest.mark.parametrize("text", [
    "format: pcr\nformat_version: [1\n",          # YAML syntax error
    "\x00\x01\x02 binary junk",
    "just a string\n",
    "- a\n- list\n",
    "",
    "format: other\nformat_version: 1\n",
])
def test_refuses_damaged_manifest(store_copy, text):
    (store_copy / fmt.MANIFEST).write_text(text)
    with pytest.raises(StoreError):
        open_store(store_copy)


def test_refuses_invalid_utf8_manifest(store_copy):
    (store_copy / fmt.MANIFEST).write_bytes(b"format: pcr\nname: \xff\xfe\n")
    with pytest.raises(StoreError):
        open_store(store_copy)


def _edit_manifest(root: Path, edit) -> None:
    m = yaml.safe_load((root / fmt.MANIFEST).read_text())
    edit(m)
    (root / fmt.MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))


@pytest.mark.parametrize("version", [0, 3, 99, "1", None])
def test_refuses_wrong_format_version(store_copy, version):
    _edit_manifest(store_copy, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(StoreError, match="version"):
        open_store(store_copy)


@pytest.mark.parametrize("key", ["num_images", "num_groups", "num_records", "index_files"])
def test_refuses_manifest_missing_key(store_copy, key):
    _edit_manifest(store_copy, lambda m: m.pop(key))
    with pytest.raises(StoreError, match=key):
        open_store(store_copy)


@pytest.mark.parametrize("damage", [
    "index_files: []",
    "index_files: 7",
    "index_files.images.npy: 5",
    "index_files.images.npy: no size",
    "index_files.images.npy: list",
    "num_images: string",
])
def test_refuses_structurally_damaged_manifest(store_copy, damage):
    """BUG (pcrfs/store/read/reader.py, read_manifest/open_store): a manifest that parses as YAML
    but has the wrong shape escapes as AttributeError/TypeError/KeyError instead of
    StoreError, so `pcrfs info/verify/get/mount` die with a traceback."""
    def edit(m):
        if damage == "index_files: []":
            m["index_files"] = []
        elif damage == "index_files: 7":
            m["index_files"] = 7
        elif damage == "index_files.images.npy: 5":
            m["index_files"]["images.npy"] = 5
        elif damage == "index_files.images.npy: no size":
            m["index_files"]["images.npy"] = {"sise": 1, "crc32": 2}
        elif damage == "index_files.images.npy: list":
            m["index_files"]["images.npy"] = [1, 2]
        elif damage == "num_images: string":
            m["num_images"] = "ninety-six"
    _edit_manifest(store_copy, edit)
    with pytest.raises(StoreError):
        open_store(store_copy)


@pytest.fixture(scope="module")
def manifest_scratch(demo_store, tmp_path_factory):
    """A store copy whose manifest the next test rewrites; index and records are links."""
    root = tmp_path_factory.mktemp("mfuzz") / "s.pcr"
    root.mkdir()
    (root / fmt.INDEX_DIR).symlink_to(demo_store / fmt.INDEX_DIR)
    (root / fmt.RECORDS_DIR).symlink_to(demo_store / fmt.RECORDS_DIR)
    return root, (demo_store / fmt.MANIFEST).read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damaged_manifest_byte_is_store_error(manifest_scratch, data):
    """One damaged byte anywhere in pcr.yaml: open_store succeeds or raises StoreError, never
    anything else (see test_refuses_structurally_damaged_manifest for the bug this finds)."""
    root, original = manifest_scratch
    pos = data.draw(st.integers(0, len(original) - 1))
    new = data.draw(st.one_of(st.sampled_from(b" -:[{!&*\n0x"), st.integers(0, 255)))
    damaged = original[:pos] + bytes([new]) + original[pos + 1:]
    (root / fmt.MANIFEST).write_bytes(damaged)
    try:
        open_store(root).close()
    except StoreError:
        pass


@pytest.mark.parametrize("name", fmt.index_files(2))
def test_refuses_flipped_byte_in_index_file(store_copy, name):
    p = store_copy / fmt.INDEX_DIR / name
    data = bytearray(p.read_bytes())
    assert data, name
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="CRC-32 mismatch"):
        open_store(store_copy)


@pytest.mark.parametrize("name", ["images.npy", "group_lengths.npy", "paths.bin", "records.npy"])
def test_refuses_truncated_index_file(store_copy, name):
    p = store_copy / fmt.INDEX_DIR / name
    data = p.read_bytes()
    p.write_bytes(data[:len(data) - 3])
    with pytest.raises(StoreError, match="manifest says"):
        open_store(store_copy)


def test_refuses_missing_index_file(store_copy):
    (store_copy / fmt.INDEX_DIR / "group_crc32.npy").unlink()
    with pytest.raises(StoreError, match="missing"):
        open_store(store_copy)


# ----------------------------------------------------------------- damaged records


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_in_record_is_corrupt_data(store_copy):
    with open_store(store_copy) as s:
        i = 10
        g = 4
        rng = s.ranges(i, g)[-1]
        before = {j: s.read(j, s.num_groups) for j in range(len(s)) if j != i}
    _flip(store_copy / fmt.record_name(rng.record), rng.offset + rng.length // 2)
    with open_store(store_copy) as s:
        assert len(s.read(i, g - 1)) == s.size(i, g - 1)  # groups before the damage are fine
        for k in range(g, s.num_groups + 1):
            with pytest.raises(CorruptData) as exc:
                s.read(i, k)
            assert exc.value.errno == 5  # EIO
            assert s.path(i) in str(exc.value) and f"scan group {g}" in str(exc.value)
        with pytest.raises(CorruptData):
            s.read_at(i, s.num_groups, s.size(i, g - 1), 100)
        # other images, even in the same record, are untouched
        for j, data in before.items():
            assert s.read(j, s.num_groups) == data
        assert s.verify_image(i) and not s.verify_image(i + 1)


def test_truncated_record_is_corrupt_data(store_copy):
    with open_store(store_copy) as s:
        r = s.index.record_of(20)
        members = [j for j in range(len(s)) if s.index.record_of(j) == r]
        other = next(j for j in range(len(s)) if s.index.record_of(j) != r)
    p = store_copy / fmt.record_name(r)
    data = p.read_bytes()
    p.write_bytes(data[:-1])
    with open_store(store_copy) as s:
        for j in members:
            with pytest.raises(CorruptData, match="bytes"):
                s.read(j, 1)
        s.read(other, s.num_groups)


def test_deleted_record_is_corrupt_data(store_copy):
    with open_store(store_copy) as s:
        r = s.index.record_of(60)
        other = next(j for j in range(len(s)) if s.index.record_of(j) != r)
    (store_copy / fmt.record_name(r)).unlink()
    with open_store(store_copy) as s:
        with pytest.raises(CorruptData, match="cannot be opened"):
            s.read(60, 1)
        with pytest.raises(CorruptData):
            s.read_at(60, 1, 0, 10)
        s.read(other, 3)


def test_cache_serves_verified_groups(demo_store):
    with open_store(demo_store, cache_bytes=1 << 20) as s:
        first = s.read(7, 5)
        before = s.records.bytes_read
        assert s.read(7, 3) == first[:s.size(7, 3) - 2] + EOI_BYTES
        assert s.records.bytes_read == before  # all from the cache


# ---- the read side's structure ----------------------------------------------------------------------

PKG = Path(__file__).resolve().parents[1] / "pcrfs"


def _modules():
    import ast
    for path in sorted(PKG.rglob("*.py")):
        yield path.relative_to(PKG).as_posix(), ast.parse(path.read_text(), str(path))


def test_only_the_location_code_tells_local_from_remote():
    """Local and remote stores differ behind StoreLocation alone: nothing else asks which
    kind it has (it asks the location: read_defaults, describe, writer_lock)."""
    import ast
    kinds = {"LocalLocation", "RemoteLocation"}
    found = []
    for name, tree in _modules():
        if name == "store/sources/location.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                named = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None) for n in ast.walk(node.args[1])}
                if named & kinds:
                    found.append(f"{name}:{node.lineno}")
    assert not found, found


def test_the_fetchers_never_reach_back_into_the_store():
    """The store builds its fetchers and hands them a group table and a record source; the
    fetchers (and what they stand on) never import the store, so the dependency runs one way."""
    import ast
    found = []
    for name, tree in _modules():
        if name not in ("store/read/fetch.py", "store/read/prefixtier.py", "store/format/groups.py", "store/read/tiers.py",
                        "store/read/pread.py", "store/read/largegroups.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in ("reader", "location"):
                found.append(f"{name}:{node.lineno} imports {node.module}")
    assert not found, found


def test_the_adaptive_index_format_lives_in_the_store():
    """The mount's view layer loads the adaptive index from beside the store's index, never from
    pcrfs.quality (which decodes and scores: the format must not depend on it)."""
    import ast
    found = []
    for name, tree in _modules():
        if not (name.startswith("store/") or name.startswith("access/")):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and "quality" in (node.module or ""):
                found.append(f"{name}:{node.lineno} imports {node.module}")
    assert not found, found
