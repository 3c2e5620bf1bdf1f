"""Corrupt stores: damage is found exactly, refused cleanly, and never served as data.

test_store.py / test_cli.py / test_mount.py check single damaged groups and records
one at a time. Here the damage is combined and random, and the outcome is checked
against a prediction computed from the intact index:

* ``verify`` names exactly the damaged groups, headers and records;
* the reader raises CorruptData for exactly the (image, fidelity) pairs that need a
  damaged group, and returns the intact bytes for every other;
* a mount serves EIO for exactly those files -- every file of every view is read --
  and the intact bytes for all others, also when the damage happens while mounted;
* a damaged index or manifest makes ``pcrfs mount`` refuse with a clear message.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pcrfs
from mountutil import fuse_unavailable
from pcrfs.fuse import mounting
from pcrfs.store import format as fmt
from pcrfs.store.format.index import file_crc32
from pcrfs.store.read.reader import CorruptData, StoreError, open_store
from pcrfs.store.read.verify import verify_store
from reliability import budget, figures, pcrfs_argv, read_all_files, run_limited, views  # noqa: F401

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


@pytest.fixture(scope="module")
def intact(demo_store):
    s = open_store(demo_store)
    yield s
    s.close()


# ---- damage and its prediction ---------------------------------------------------------------------

@dataclass
class Damage:
    """Damage to a store's records, and what it must do (computed from the intact index)."""
    flips: list[tuple[int, int]] = field(default_factory=list)   # (record, offset) of each flipped byte
    truncated: dict[int, int] = field(default_factory=dict)      # record -> bytes cut off its end
    deleted: set[int] = field(default_factory=set)

    def apply(self, root: Path) -> None:
        for r, off in self.flips:
            flip_byte(root / fmt.record_name(r), off)
        for r, cut in self.truncated.items():
            p = root / fmt.record_name(r)
            os.truncate(p, p.stat().st_size - cut)
        for r in self.deleted:
            (root / fmt.record_name(r)).unlink()

    def broken_records(self) -> set[int]:
        return set(self.truncated) | self.deleted

    def damaged_groups(self, intact) -> set[tuple[int, int]]:
        """(image, 1-based group) of every flipped byte inside a scan group of an intact record."""
        out = set()
        for r, off in self.flips:
            if r not in self.broken_records() | self.header_damage() and off >= fmt.RECORD_HEADER_SIZE:
                out.add(group_at(intact, r, off))
        return out

    def header_damage(self) -> set[int]:
        """Records whose 16-byte header was hit (and whose size is intact: a record's size is
        checked first). Such a record is not a record of this store as far as a reader can
        tell, so none of its images is served, and verify says why."""
        return {r for r, off in self.flips if off < fmt.RECORD_HEADER_SIZE and r not in self.broken_records()}

    def unreadable(self, intact) -> set[tuple[int, str]]:
        """(image, view) of every file that must read as EIO."""
        bad_groups = self.damaged_groups(intact)
        out = set()
        for i in range(intact.num_images):
            in_broken = intact.index.record_of(i) in self.broken_records() | self.header_damage()
            first_bad = min((g for j, g in bad_groups if j == i), default=None)
            for view, k in views(intact):
                if in_broken or (first_bad is not None and first_bad <= min(k, intact.n_groups(i))):
                    out.add((i, view))
        return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xA5]))


def group_at(intact, r: int, offset: int) -> tuple[int, int]:
    """The (image, 1-based group) whose stored bytes include ``offset`` of record ``r``."""
    images = intact.index.record_images(r)  # in the record's storage order
    starts = intact.index.record_offsets(r)
    lengths = intact.index.group_lengths[images]
    hit = np.argwhere((starts <= offset) & (offset < starts + lengths))
    assert len(hit) == 1, (r, offset)
    j, g = hit[0]
    return int(images[j]), int(g) + 1


def record_size(intact, r: int) -> int:
    return int(intact.index.records[r]["size"])


def combined_damage(intact) -> Damage:
    """One of every kind, at the awkward places: a record's first and last stored byte, a
    header, a middle group, a record cut short by one byte, a deleted record."""
    n_rec = len(intact.index.records)
    assert n_rec >= 6
    mid_image = intact.num_images // 2
    r_mid = intact.index.record_of(mid_image)
    g3 = intact.ranges(mid_image, 3)[-1]
    return Damage(
        flips=[(0, fmt.RECORD_HEADER_SIZE),                       # first byte of record 0's first group 1
               (r_mid, g3.offset + g3.length // 2),               # inside group 3 of a middle image
               (n_rec - 1, record_size(intact, n_rec - 1) - 1),   # the very last stored byte
               (2, 5)],                                           # record 2's header
        truncated={3: 1},
        deleted={n_rec - 2},
    )


def random_damage(intact, rng: random.Random) -> Damage:
    n_rec = len(intact.index.records)
    d = Damage()
    for _ in range(rng.randint(1, 6)):
        r = rng.randrange(n_rec)
        d.flips.append((r, rng.randrange(record_size(intact, r))))
    d.flips = list(dict.fromkeys(d.flips))  # a byte flipped twice would be intact again
    if rng.random() < 0.5:
        d.truncated[rng.randrange(n_rec)] = rng.choice([1, 2, 100])
    if rng.random() < 0.3:
        d.deleted.add(rng.randrange(n_rec))
    for r in d.deleted:
        d.truncated.pop(r, None)
    return d


def check_verify(store_dir: Path, intact, damage: Damage) -> None:
    """verify_store names every damaged group, header and record, and nothing else."""
    with open_store(store_dir) as s:
        found = verify_store(s)
    groups = {(intact.find(d.image), d.group) for d in found if d.image is not None and d.record not in
              damage.broken_records()}
    assert groups == damage.damaged_groups(intact), found
    assert {d.record for d in found if d.image is None and "header" in d.reason} == damage.header_damage()
    assert {d.record for d in found} == damage.broken_records() | damage.header_damage() | {
        intact.index.record_of(i) for i, _ in damage.damaged_groups(intact)}
    for r in damage.deleted:
        assert any(d.record == r and "unreadable" in d.reason for d in found)
    for r in damage.truncated:
        assert any(d.record == r and "bytes, index says" in d.reason for d in found)


def check_reader(store_dir: Path, intact, damage: Damage) -> None:
    """The reader raises CorruptData exactly where a damaged group is needed."""
    bad = damage.unreadable(intact)
    with open_store(store_dir) as s:
        for i in range(intact.num_images):
            for view, k in views(intact):
                if (i, view) in bad:
                    with pytest.raises(CorruptData):
                        s.read(i, k)
                else:
                    assert s.read(i, k) == intact.read(i, k)


# ---- tests -------------------------------------------------------------------------------------------

def _examples(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@budget(fast=15, slow=400)
def test_random_record_damage_is_named_exactly(demo_store, intact, tmp_path, figures, budget):
    """Random flips, truncations and deletions: verify and the reader agree with the prediction."""
    tried = [0]

    @_examples(budget)
    @given(seed=st.integers(0, 2**32 - 1))
    def case(seed):
        root = tmp_path / "s.pcr"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(demo_store, root)
        damage = random_damage(intact, random.Random(seed))
        damage.apply(root)
        check_verify(root, intact, damage)
        check_reader(root, intact, damage)
        tried[0] += 1

    try:
        case()
    finally:
        figures.add("corrupt", random_damage_cases=tried[0])


@needs_fuse
@budget(fast=1, slow=12)
def test_mount_serves_eio_for_exactly_the_damaged_files(demo_store, intact, mounts, tmp_path, figures, budget):
    """Scenario 0 combines every kind of damage at awkward places; the slow run adds random ones.
    Every file of every view is read through the mount each time."""
    for scenario in range(budget):
        root = tmp_path / f"s{scenario}.pcr"
        shutil.copytree(demo_store, root)
        damage = combined_damage(intact) if scenario == 0 else random_damage(intact, random.Random(scenario))
        damage.apply(root)
        check_verify(root, intact, damage)
        info = mounts.mount(root, f"m{scenario}", cache_size="1M")
        seen = read_all_files(Path(info.mountpoint), intact)
        expected_eio = damage.unreadable(intact)
        figures.add("corrupt", scenarios=1, damages_injected=len(damage.flips) + len(damage.truncated)
                    + len(damage.deleted), files_read=seen["ok"] + len(seen["eio"]),
                    files_eio=len(seen["eio"]), bytes_read=seen["bytes"], bytes_wrong_files=len(seen["wrong"]))
        assert seen["wrong"] == [] and seen["other_errors"] == []
        assert seen["eio"] == expected_eio
        assert seen["ok"] == intact.num_images * len(views(intact)) - len(expected_eio)
        assert mounting.daemon_alive(info.pid)
        if scenario == 0:
            assert expected_eio and len(expected_eio) < intact.num_images * len(views(intact)) // 2
            log = Path(info.log_file).read_text(errors="replace")
            assert "EIO" in log and intact.path(intact.num_images // 2) in log
        mounting.umount(info.mountpoint, echo=lambda _m: None)
        shutil.rmtree(root)


@needs_fuse
@budget(fast=1, slow=6)
def test_damage_while_mounted_is_eio_never_wrong_bytes(demo_store, intact, mounts, tmp_path, figures, budget):
    """The store is damaged under a live mount (bytes flipped, a record truncated in place, a
    record replaced by garbage of the same size): whatever the daemon had already verified may
    still be served, everything else is EIO -- no file ever returns other bytes."""
    for round_ in range(budget):
        _damage_while_mounted(demo_store, intact, mounts, tmp_path / f"r{round_}", figures, round_)


def _damage_while_mounted(demo_store, intact, mounts, work: Path, figures, seed: int) -> None:
    root = work / "live.pcr"
    shutil.copytree(demo_store, root)
    info = mounts.mount(root, f"live{seed}", cache_size="1M")
    mnt = Path(info.mountpoint)
    rng = random.Random(seed)
    for i in range(0, intact.num_images, 3):  # warm some files into the page cache and the group cache
        (mnt / rng.choice(views(intact))[0] / intact.path(i)).read_bytes()
    n_rec = len(intact.index.records)
    for _ in range(8):
        r = rng.randrange(n_rec)
        flip_byte(root / fmt.record_name(r), rng.randrange(fmt.RECORD_HEADER_SIZE, record_size(intact, r)))
    r_cut, r_garbage = rng.sample(range(n_rec), 2)
    os.truncate(root / fmt.record_name(r_cut), record_size(intact, r_cut) // 2)
    garbage = root / fmt.record_name(r_garbage)
    tmp = garbage.with_suffix(".new")
    tmp.write_bytes(os.urandom(record_size(intact, r_garbage)))
    os.replace(tmp, garbage)
    seen = read_all_files(mnt, intact)
    figures.add("corrupt", live_damage_files_read=seen["ok"] + len(seen["eio"]), live_damage_eio=len(seen["eio"]),
                bytes_wrong_files=len(seen["wrong"]))
    assert seen["wrong"] == [] and seen["other_errors"] == []
    assert seen["eio"]  # the damage was seen
    assert mounting.daemon_alive(info.pid)
    mounting.umount(info.mountpoint, echo=lambda _m: None)
    shutil.rmtree(work)


def _rewrite_manifest(root: Path, edit) -> None:
    m = yaml.safe_load((root / fmt.MANIFEST).read_text())
    edit(m)
    (root / fmt.MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))


def _flip_index(root: Path, name: str) -> None:
    flip_byte(root / fmt.INDEX_DIR / name, (root / fmt.INDEX_DIR / name).stat().st_size // 2)


DAMAGED_METADATA = {
    "index byte flipped": (lambda r: _flip_index(r, "group_crc32.npy"), "group_crc32.npy"),
    "index file truncated": (lambda r: os.truncate(r / fmt.INDEX_DIR / "paths.bin", 10), "paths.bin"),
    "index file missing": (lambda r: (r / fmt.INDEX_DIR / "records.npy").unlink(), "records.npy"),
    "manifest not YAML": (lambda r: (r / fmt.MANIFEST).write_text("format: [pcr\n"), "damaged"),
    "manifest truncated": (lambda r: (r / fmt.MANIFEST).write_bytes((r / fmt.MANIFEST).read_bytes()[:100]), "pcr.yaml"),
    "manifest wrong counts": (lambda r: _rewrite_manifest(r, lambda m: m.update(num_images=3)), "disagree"),
    "manifest gone, conversion unfinished": (lambda r: ((r / fmt.MANIFEST).unlink(), (r / fmt.PARTIAL_DIR).mkdir()),
                                             "unfinished"),
}


@needs_fuse
@pytest.mark.parametrize("what", sorted(DAMAGED_METADATA))
def test_mount_refuses_damaged_index_or_manifest(demo_store, mounts, tmp_path, what):
    damage, needle = DAMAGED_METADATA[what]
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    damage(root)
    with pytest.raises(StoreError, match=needle.replace(".", r"\.")):
        open_store(root)
    mnt = mounts.point("m")
    res = run_limited(pcrfs_argv("mount", root, mnt, "--log-file", tmp_path / "log"), timeout=60)
    mounts.track(mnt)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("pcrfs: error:") and needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert mounting.mount_entry(str(mnt)) is None
    assert mounting.read_pid(str(mnt)) is None


# ---- an index that is damaged but carries matching checksums -----------------------------------------

INDEX_ARRAYS = ("images.npy", "group_lengths.npy", "group_crc32.npy", "records.npy", "record_group_offsets.npy",
                "path_offsets.npy", "dir_offsets.npy", "dir_ranges.npy")


@st.composite
def index_edits(draw):
    """One element of one index array (or one byte of a name blob) changed to an awkward value."""
    name = draw(st.sampled_from(INDEX_ARRAYS + ("paths.bin", "dirs.bin")))
    return name, draw(st.integers(0, 2**31)), draw(st.sampled_from(
        ["zero", "one", "plus_one", "minus_one", "huge", "max", "random"]))


def _apply_index_edit(root: Path, name: str, pos: int, how: str) -> None:
    """Change the index as a buggy writer (or a hostile store) would, then recompute the manifest's
    checksums so that open_store's CRC check cannot be what catches it."""
    p = root / fmt.INDEX_DIR / name
    if name.endswith(".bin"):
        blob = bytearray(p.read_bytes())
        blob[pos % len(blob)] = {"zero": 0, "one": ord("/"), "plus_one": ord("."), "minus_one": 0xFF}.get(how, 0x80)
        p.write_bytes(bytes(blob))
    else:
        arr = np.load(p).copy()
        flat = arr.view(np.uint8).reshape(-1) if arr.dtype.names else arr.reshape(-1)
        i = pos % len(flat)
        old = int(flat[i])
        limit = np.iinfo(flat.dtype).max
        flat[i] = {"zero": 0, "one": 1, "plus_one": min(old + 1, limit), "minus_one": max(old - 1, 0),
                   "huge": min(2**40, limit), "max": limit, "random": (pos * 2654435761) % (limit + 1)}[how]
        np.save(p, arr, allow_pickle=False)
    _rewrite_manifest(root, lambda m: m["index_files"].__setitem__(
        name, {"size": p.stat().st_size, "crc32": file_crc32(p)}))


@pytest.fixture(scope="module")
def index_scratch(demo_store, tmp_path_factory):
    """A copy whose index the next tests rewrite (the records are shared, read-only, via a link)."""
    root = tmp_path_factory.mktemp("idx") / "s.pcr"
    root.mkdir()
    (root / fmt.RECORDS_DIR).symlink_to(demo_store / fmt.RECORDS_DIR)
    return root


def _fresh_index(demo_store: Path, root: Path) -> None:
    shutil.rmtree(root / fmt.INDEX_DIR, ignore_errors=True)
    shutil.copytree(demo_store / fmt.INDEX_DIR, root / fmt.INDEX_DIR)
    shutil.copy(demo_store / fmt.MANIFEST, root / fmt.MANIFEST)


def test_inconsistent_index_is_refused_or_read_as_corrupt(demo_store, index_scratch):
    rng = random.Random(0)
    hows = ["zero", "one", "plus_one", "minus_one", "huge", "max", "random"]
    known = [("record_group_offsets.npy", 5, "max"), ("records.npy", 121, "one"), ("dir_ranges.npy", 1, "plus_one")]
    for edit in known + [(rng.choice(INDEX_ARRAYS + ("paths.bin", "dirs.bin")), rng.randrange(2**31),
                          rng.choice(hows)) for _ in range(60)]:
        _fresh_index(demo_store, index_scratch)
        _apply_index_edit(index_scratch, *edit)
        try:
            s = open_store(index_scratch)
        except StoreError:
            continue
        with s:
            for i in range(s.num_images):
                s.path(i)
                for k in range(1, s.num_groups + 1):
                    try:
                        data = s.read(i, k)
                    except CorruptData:
                        continue
                    assert len(data) == s.size(i, k), edit


def _tree_listing(store) -> list:
    from pcrfs.access.views import ViewTree

    tree, out = ViewTree(store), []

    def walk(path: str) -> None:  # the shape of the tree: a byte of a name can change undetectably
        for name, attr in tree.readdir(path):
            out.append((path.count("/"), attr.is_dir, attr.size))
            if attr.is_dir:
                walk(f"{path}/{name}")

    walk("/scan1")
    return out


@budget(fast=30, slow=600)
def test_verify_names_every_harmful_index_inconsistency(demo_store, intact, index_scratch, figures, budget):
    """`pcrfs verify` on an index that passes its checksums but not its own structure (a buggy
    writer, a hostile store): it never crashes, and when it finds nothing, the store serves
    exactly what the intact one does -- every image at every fidelity, every directory. (A name
    changed into another valid name is the one edit only the manifest's CRC can catch.)"""
    found = [0, 0]

    @_examples(budget)
    @given(edit=index_edits())
    def case(edit):
        _fresh_index(demo_store, index_scratch)
        _apply_index_edit(index_scratch, *edit)
        found[0] += 1
        try:
            s = pcrfs.open_store(index_scratch)
        except (StoreError, OverflowError, ValueError, IndexError):
            return  # open_store's side: see the xfail above
        with s:
            if verify_store(s):
                found[1] += 1
                return
            for i in range(s.num_images):
                assert s.find(s.path(i)) == i
                for k in range(1, s.num_groups + 1):
                    assert s.read(i, k) == intact.read(i, k), (i, k)
            assert _tree_listing(s) == _tree_listing(intact)

    try:
        case()
    finally:
        figures.add("corrupt", index_edits=found[0], index_edits_named_by_verify=found[1])
