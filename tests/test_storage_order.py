"""The storage order (format version 2, issue 24): records that mix the dataset, written
deterministically, read by the same code as version-1 stores; stores copied into a new
layout without their source."""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcrfs.convert import convert
from pcrfs.convert.migrate import migrate
from pcrfs.store.format import adaptiveindex as adaptive
from pcrfs.store.write import install
from pcrfs.store import format as fmt
from pcrfs.store.read.reader import StoreError, open_store
from pcrfs.store.read.verify import verify_store

DATA = Path(__file__).parent / "data"
V1_STORE = DATA / "v1-store"     # written by pcrfs at dc00721 (format version 1), never rewritten
V1_PHOTOS = DATA / "v1-photos"   # its source photos


def views_of(s) -> list[int]:
    return list(range(1, s.num_groups + 1))


def assert_same_views(a, b) -> None:
    """Every file of every view: the same names, sizes and bytes."""
    assert [a.path(i) for i in range(a.num_images)] == [b.path(i) for i in range(b.num_images)]
    for i in range(a.num_images):
        for k in views_of(a):
            assert a.size(i, k) == b.size(i, k)
            assert a.read(i, k) == b.read(i, k), (a.path(i), k)


def classes_per_record(s) -> list[int]:
    return [len({s.path(int(i)).split("/")[0] for i in s.index.record_images(r)})
            for r in range(len(s.index.records)) if s.index.records[r]["n_images"]]


def test_a_shuffled_store_mixes_the_classes_and_serves_what_a_source_ordered_one_does(demo_store, source_store):
    with open_store(demo_store) as shuffled, open_store(source_store) as source:
        assert shuffled.manifest["format_version"] == 2 and shuffled.manifest["order"] == "shuffled"
        assert source.manifest["format_version"] == 1 and source.manifest["order"] == "source"
        assert shuffled.index.shuffled and not source.index.shuffled
        assert_same_views(shuffled, source)
        for i in range(shuffled.num_images):  # labels and lookups are by path, as before
            assert shuffled.label(i) == source.label(i) and shuffled.find(shuffled.path(i)) == i
        mixed, runs = classes_per_record(shuffled), classes_per_record(source)
        assert np.mean(mixed) > 2 * np.mean(runs), (mixed, runs)
        # every image is in exactly one record, at the position the index says
        seen = np.concatenate([shuffled.index.record_images(r) for r in range(len(shuffled.index.records))])
        assert sorted(seen.tolist()) == list(range(shuffled.num_images))
        assert all(shuffled.index.record_of(int(i)) == r for r in range(len(shuffled.index.records))
                   for i in shuffled.index.record_images(r))
    with open_store(demo_store) as s:
        assert verify_store(s) == []


def _store_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (fmt.MANIFEST, fmt.REPORT)}


def test_the_same_source_and_seed_give_the_same_store_and_another_seed_another_order(demo_src, tmp_path):
    a, b, c = tmp_path / "a.pcr", tmp_path / "b.pcr", tmp_path / "c.pcr"
    for store, seed in ((a, 5), (b, 5), (c, 6)):
        convert(demo_src, store, record_bytes=256 * 1024, workers=2, seed=seed)
    assert _store_files(a) == _store_files(b)  # records and index, byte for byte
    with open_store(a) as sa, open_store(c) as sc:
        assert sa.manifest["seed"] == 5 and sc.manifest["seed"] == 6
        assert not np.array_equal(sa.index.storage_order, sc.index.storage_order)
        assert_same_views(sa, sc)


def test_a_version_1_store_written_by_an_older_pcrfs_reads_and_verifies(tmp_path):
    """A store written before format version 2 existed: read by the same code, every view
    the bytes a conversion of its photos in source order gives today."""
    with open_store(V1_STORE) as old:
        assert old.manifest["format_version"] == 1 and not old.index.shuffled
        assert "order" not in old.manifest  # older pcrfs did not record it
        assert verify_store(old) == []
        convert(V1_PHOTOS, tmp_path / "now.pcr", record_bytes=40 * 1024, workers=1, order="source")
        with open_store(tmp_path / "now.pcr") as now:
            assert now.manifest["format_version"] == 1
            assert_same_views(old, now)
            # the same records, byte for byte: version 1 is still written as it was
            for r in range(len(old.index.records)):
                assert filecmp.cmp(V1_STORE / fmt.record_name(r), tmp_path / "now.pcr" / fmt.record_name(r),
                                   shallow=False)
    out = subprocess.run([sys.executable, "-m", "pcrfs.cli", "info", str(V1_STORE)], capture_output=True, text=True)
    assert out.returncode == 0 and "order        source (format version 1)" in out.stdout


def test_a_reader_of_version_1_refuses_a_version_2_store_clearly(demo_store, monkeypatch):
    monkeypatch.setattr(fmt, "READ_VERSIONS", (1,))
    with pytest.raises(StoreError, match="format version 2 is not supported.*upgrade pcrfs"):
        open_store(demo_store)


def test_a_storage_order_that_is_not_a_permutation_is_refused(demo_store, tmp_path):
    import yaml

    from pcrfs.store.format.index import file_crc32

    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    path = root / fmt.INDEX_DIR / fmt.STORAGE_ORDER
    order = np.load(path)
    order[1] = order[0]  # one image twice, one never
    np.save(path, order)
    m = yaml.safe_load((root / fmt.MANIFEST).read_text())
    m["index_files"][fmt.STORAGE_ORDER] = {"size": path.stat().st_size, "crc32": file_crc32(path)}
    (root / fmt.MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    with pytest.raises(StoreError, match="not a permutation"):
        open_store(root)


# ---- copying a store into a new layout ----------------------------------------------------------

def test_a_store_copied_into_the_shuffled_order_serves_every_view_byte_identical(source_store, tmp_path):
    with open_store(source_store) as old:
        ks = np.stack([np.full(old.num_images, 2 + t, dtype=np.uint8) for t in range(3)], axis=1)
        ks[::5] = [3, 5, 9]
    src = tmp_path / "old.pcr"
    shutil.copytree(source_store, src)
    install.adaptive_index(src, ks)
    res = migrate(src, tmp_path / "new.pcr", order="shuffled", seed=3, record_bytes=200 * 1024)
    assert res.images == len(ks) and res.bad == []
    with open_store(src) as old, open_store(tmp_path / "new.pcr") as new:
        assert new.index.shuffled and new.manifest["migrated_from"]["order"] == "source"
        assert_same_views(old, new)
        carried = adaptive.load(new)
        assert carried is not None and np.array_equal(carried.ks, ks)
        assert np.mean(classes_per_record(new)) > np.mean(classes_per_record(old))


def test_copying_a_damaged_store_names_the_damaged_images_and_writes_nothing_wrong(source_store, tmp_path):
    src = tmp_path / "old.pcr"
    shutil.copytree(source_store, src)
    with open_store(src) as s:
        victim = 7
        rng = s.ranges(victim, 3)[-1]
        victim_path = s.path(victim)
    with open(src / fmt.record_name(rng.record), "r+b") as f:
        f.seek(rng.offset + rng.length // 2)
        b = f.read(1)
        f.seek(rng.offset + rng.length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    out = subprocess.run([sys.executable, "-m", "pcrfs.cli", "convert", str(src), str(tmp_path / "new.pcr"), "-q"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and victim_path in out.stderr and "--skip-bad" in out.stderr
    with open_store(source_store) as intact, open_store(tmp_path / "new.pcr") as new:
        assert new.num_images == intact.num_images - 1
        assert victim_path not in [new.path(i) for i in range(new.num_images)]
        for i in range(new.num_images):
            j = intact.find(new.path(i))
            assert new.read(i, new.num_groups) == intact.read(j, intact.num_groups)


def test_copying_to_s3_serves_the_same_views(source_store, tmp_path):
    from s3util import MotoServer, s3_environment

    from pcrfs.remote.fs import RemoteOptions, filesystem
    from pcrfs.store.read.reader import ReadOptions

    with s3_environment(tmp_path / "xdg"):
        server = MotoServer(tmp_path / "moto.log")
        try:
            remote = RemoteOptions(endpoint_url=server.endpoint)
            filesystem("s3://mig", remote).mkdir("mig")
            res = migrate(source_store, "s3://mig/new.pcr", order="shuffled", record_bytes=200 * 1024, remote=remote,
                          staging_dir=tmp_path / "staging")
            assert res.bad == []
            with open_store(source_store) as old, \
                    open_store("s3://mig/new.pcr", options=ReadOptions(remote=remote)) as new:
                assert new.index.shuffled
                assert_same_views(old, new)
        finally:
            server.stop()


def test_convert_refuses_an_image_tree_as_the_new_store_of_a_copy(source_store, demo_src, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(demo_src, tree)
    out = subprocess.run([sys.executable, "-m", "pcrfs.cli", "convert", str(source_store), str(tree)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "swapped" in out.stderr
    assert sorted(p.name for p in tree.rglob("*")) == sorted(p.name for p in demo_src.rglob("*"))


@pytest.mark.parametrize("args, message", [(["--order", "random"], "random"), (["--seed", "x"], "x")])
def test_convert_refuses_an_unknown_order_or_a_seed_that_is_not_an_integer(demo_src, tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "pcrfs.cli", "convert", str(demo_src), str(tmp_path / "s.pcr"), *args],
                         capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "s.pcr").exists()
