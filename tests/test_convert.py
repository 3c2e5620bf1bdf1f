"""`pcrfs convert` end to end: what goes in, what comes out, what is refused, resuming."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from corpus import JPEG_KEYS, NON_JPEG_KEYS, make_bad_files, make_edge_cases
from pcrfs.cli import main
from pcrfs.convert import StoreExists, convert
from pcrfs.store import format as fmt
from pcrfs.store.read.reader import StoreError, open_store
from pcrfs.store.write.writer import ResumeMismatch

# ----------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Everything observable about a tree: every entry's type, size, mtime, mode, and content hash."""
    out = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, broot)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


def tree_bytes(root: Path, sub: str) -> dict[str, bytes]:
    d = root / sub
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def store_files(store: Path) -> dict[str, bytes]:
    """records/* and index/* and report.json: everything but the manifest."""
    out = {}
    for sub in (fmt.RECORDS_DIR, fmt.INDEX_DIR):
        for name, data in tree_bytes(store, sub).items():
            out[f"{sub}/{name}"] = data
    out[fmt.REPORT] = (store / fmt.REPORT).read_bytes()
    return out


def manifest(store: Path) -> dict:
    m = yaml.safe_load((store / fmt.MANIFEST).read_text())
    m.pop("created")
    return m


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def copy_classes(demo_src: Path, dest: Path, classes=("cat", "space"), per_class: int = 12) -> None:
    for cls in classes:
        (dest / cls).mkdir(parents=True)
        for p in sorted((demo_src / cls).iterdir())[:per_class]:
            shutil.copy2(p, dest / cls / p.name)


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


# ----------------------------------------------------------------- a mixed conversion


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, demo_src):
    """demo classes + edge cases + bad files, converted once; the source snapshot is taken first."""
    root = tmp_path_factory.mktemp("mixed")
    src = root / "src"
    copy_classes(demo_src, src)
    edge = make_edge_cases(src / "edge")
    bad = make_bad_files(src / "broken")
    before = snapshot(src)
    result = convert(src, root / "out.pcr", record_bytes=128 * 1024, workers=2)
    return {"src": src, "store": root / "out.pcr", "edge": edge, "bad": bad, "before": before,
            "result": result}


def _rel(src: Path, p: Path) -> str:
    return p.relative_to(src).as_posix()


def test_mixed_conversion_contents(mixed):
    src, edge, bad = mixed["src"], mixed["edge"], mixed["bad"]
    good = {_rel(src, p) for p in (src / "cat").iterdir()} | {_rel(src, p) for p in (src / "space").iterdir()}
    good |= {_rel(src, p) for p in edge.values()}
    with open_store(mixed["store"]) as s:
        assert set(s.paths()) == good
        assert len(s) == len(good) == mixed["result"].images
        assert s.classes == ["cat", "edge", "space"]  # "broken" holds no convertible image
        for key, p in edge.items():
            i = s.find(_rel(src, p))
            assert s.is_reencoded(i) == (key in NON_JPEG_KEYS), key
            assert s.path(i) == _rel(src, p)
        # lossless end to end for every stored JPEG
        for key in JPEG_KEYS & edge.keys():
            p = edge[key]
            assert np.array_equal(decode(s.read(_rel(src, p), s.num_groups)), decode(p.read_bytes())), key
        for p in (src / "cat").iterdir():
            assert np.array_equal(decode(s.read(_rel(src, p), s.num_groups)), decode(p.read_bytes()))
    assert mixed["result"].reencoded == len(NON_JPEG_KEYS & edge.keys())


def test_mixed_report_lists_bad_files(mixed):
    report = json.loads((mixed["store"] / fmt.REPORT).read_text())
    src = mixed["src"]
    bad_paths = {b["path"]: b["reason"] for b in report["bad"]}
    assert set(bad_paths) == {_rel(src, p) for p in mixed["bad"].values()}
    assert all(reason.strip() for reason in bad_paths.values())
    assert "empty" in bad_paths[_rel(src, mixed["bad"]["zero_byte"])]
    assert "max-pixels" in bad_paths[_rel(src, mixed["bad"]["absurd_dims"])]
    assert report["skipped"] == []
    assert report["images"] == mixed["result"].images
    assert report["reencoded"] == mixed["result"].reencoded
    assert [b["path"] for b in mixed["result"].bad] == [b["path"] for b in report["bad"]]


def test_source_untouched(mixed):
    after = snapshot(mixed["src"])
    assert after == mixed["before"]


def test_awkward_names_preserved(mixed):
    src, edge = mixed["src"], mixed["edge"]
    with open_store(mixed["store"]) as s:
        for key in ("unicode_name", "space_name", "bad_utf8_name"):
            if key not in edge:
                continue
            rel = _rel(src, edge[key])
            i = s.find(rel)
            assert s.path(i) == rel
            # the stored name has exactly the bytes of the name on disk
            assert fmt.encode_path(s.path(i)) == os.fsencode(rel)
            assert np.array_equal(decode(s.read(i, s.num_groups)), decode(edge[key].read_bytes()))


def test_cli_exit_codes_for_bad_files(tmp_path, mixed):
    src = mixed["src"]
    r = run_cli("convert", src, tmp_path / "a.pcr", "-q", "-j", "2", "--record-size", "1M")
    assert r.exit_code == 1, r.output
    assert "could not be converted" in r.stderr and "--skip-bad" in r.stderr
    assert "Traceback" not in r.output + r.stderr
    assert (tmp_path / "a.pcr" / fmt.MANIFEST).exists()  # the others are stored anyway
    r = run_cli("convert", src, tmp_path / "b.pcr", "-q", "-j", "2", "--record-size", "1M", "--skip-bad")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.pcr" / fmt.REPORT).read_text())["bad"]


def test_clean_source_exits_zero(tmp_path, demo_src):
    src = tmp_path / "src"
    copy_classes(demo_src, src, per_class=3)
    r = run_cli("convert", src, tmp_path / "s.pcr", "-q")
    assert r.exit_code == 0, r.output
    assert "6 images" in r.stderr


def test_non_jpeg_policies(tmp_path):
    src = tmp_path / "src"
    edge = make_edge_cases(src / "e")
    n_other = len(NON_JPEG_KEYS & edge.keys())
    res = convert(src, tmp_path / "skip.pcr", opts=_opts(non_jpeg="skip"), workers=1)
    assert len(res.skipped) == n_other and not res.bad and res.reencoded == 0
    assert all("skipped" in p["reason"] for p in res.skipped)
    res = convert(src, tmp_path / "fail.pcr", opts=_opts(non_jpeg="fail"), workers=1)
    assert len(res.bad) == n_other and res.reencoded == 0
    r = run_cli("convert", src, tmp_path / "cli.pcr", "-q", "--non-jpeg", "skip")
    assert r.exit_code == 0, r.output  # skipped is not bad


def _opts(**kw):
    from pcrfs.jpeg.transcode import TranscodeOptions
    return TranscodeOptions(**kw)


def test_bad_file_with_invalid_utf8_name_is_reported(tmp_path, demo_src):
    """BUG (pcrfs/store/write/writer.py, finalize): report.json is written with
    ``json.dumps(..., ensure_ascii=False).encode()``; a bad (or skipped) file whose name is
    not valid UTF-8 (surrogate-escaped str) makes ``.encode()`` raise UnicodeEncodeError, so
    the conversion can never finish (every re-run fails the same way)."""
    src = tmp_path / "src"
    copy_classes(demo_src, src, classes=("cat",), per_class=2)
    raw = os.fsencode(src / "cat") + b"/broken\xff.jpg"
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        pytest.skip("filesystem refuses non-UTF-8 names")
    os.write(fd, b"not a jpeg at all")
    os.close(fd)
    res = convert(src, tmp_path / "s.pcr", workers=1)
    assert res.images == 2
    assert [b["path"] for b in res.bad] == [os.fsdecode(b"cat/broken\xff.jpg")]
    report = json.loads((tmp_path / "s.pcr" / fmt.REPORT).read_text(encoding="utf-8"))
    assert len(report["bad"]) == 1


def test_one_corrupt_header_does_not_spoil_the_rest(tmp_path, demo_src):
    """BUG (pcrfs/jpeg/turbojpeg.py, read_header): after tjDecompressHeader3 fails on one
    file, the worker thread's handle is left mid-header and every later JPEG on that thread
    fails ("Bogus DQT index ..."), so one bad file loses the rest of a class."""
    src = tmp_path / "src"
    copy_classes(demo_src, src, classes=("cat",), per_class=5)
    good = (src / "cat" / "cat_0000.jpg").read_bytes()
    i = good.find(b"\xff\xdb")
    broken = bytearray(good)
    broken[i + 2:i + 4] = struct.pack(">H", 5)
    (src / "cat" / "a_broken.jpg").write_bytes(bytes(broken))  # sorts first
    res = convert(src, tmp_path / "s.pcr", workers=1)
    assert [b["path"] for b in res.bad] == ["cat/a_broken.jpg"], res.bad
    assert res.images == 5 and res.reencoded == 0


# ----------------------------------------------------------------- determinism and resume


def test_worker_count_does_not_change_the_store(tmp_path, demo_src):
    a = convert(demo_src, tmp_path / "w1.pcr", record_bytes=64 * 1024, workers=1)
    b = convert(demo_src, tmp_path / "w2.pcr", record_bytes=64 * 1024, workers=2)
    assert a.manifest["num_records"] > 10
    fa, fb = store_files(tmp_path / "w1.pcr"), store_files(tmp_path / "w2.pcr")
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], name
    assert manifest(tmp_path / "w1.pcr") == manifest(tmp_path / "w2.pcr")


class _Stop(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("stop_after", [7, 60])
def test_resume_after_interrupt_in_process(tmp_path, demo_src, stop_after):
    ref = tmp_path / "ref.pcr"
    convert(demo_src, ref, record_bytes=48 * 1024, workers=2)
    out = tmp_path / "int.pcr"
    seen = 0

    def bomb(n, nbytes):
        nonlocal seen
        seen += n
        if seen == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        convert(demo_src, out, record_bytes=48 * 1024, workers=2, on_progress=bomb)
    assert not (out / fmt.MANIFEST).exists() and (out / fmt.PARTIAL_DIR).is_dir()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(out)
    res = convert(demo_src, out, record_bytes=48 * 1024, workers=1)
    assert 0 < res.resumed_from <= stop_after
    assert store_files(out) == store_files(ref)
    assert manifest(out) == manifest(ref)
    assert not (out / fmt.PARTIAL_DIR).exists()


_SLOW_CLI = (
    "import sys, time, pcrfs.convert.local as c\n"
    "orig = c.transcode_source\n"
    "def slow(*a):\n"
    "    time.sleep(0.01)\n"
    "    return orig(*a)\n"
    "c.transcode_source = slow\n"
    "from pcrfs.cli import main\n"
    "sys.exit(main())\n"
)


def test_resume_after_kill_9(tmp_path, demo_src):
    """kill -9 a real `pcrfs convert` once records are finished, run it again, and get the
    store an uninterrupted run writes. (The child sleeps 10 ms per image so the kill reliably
    lands mid-run; everything else is the unmodified CLI.)"""
    store = tmp_path / "killed.pcr"
    args = ["convert", str(demo_src), str(store), "--record-size", "32K", "-j", "1", "-q"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = store / fmt.PARTIAL_DIR
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (partial / "00002.json").exists():
                break
            time.sleep(0.002)
        assert proc.poll() is None, "conversion finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (store / fmt.MANIFEST).exists()
    assert partial.is_dir()
    done = sorted(p.name for p in partial.glob("[0-9]*.json"))
    assert len(done) >= 3
    with pytest.raises(StoreError, match="unfinished"):
        open_store(store)
    # refuses to resume with other options
    with pytest.raises(ResumeMismatch):
        convert(demo_src, store, record_bytes=64 * 1024)
    r = run_cli("convert", demo_src, store, "--record-size", "64K", "-q")
    assert r.exit_code == 1 and "different" in r.stderr
    # resume with the same command
    p = subprocess.run([sys.executable, "-m", "pcrfs.cli", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Resuming" in p.stderr
    ref = tmp_path / "ref.pcr"
    convert(demo_src, ref, record_bytes=32 * 1024, workers=2)
    a, b = store_files(store), store_files(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    ma, mb = yaml.safe_load((store / fmt.MANIFEST).read_text()), yaml.safe_load((ref / fmt.MANIFEST).read_text())
    assert {k for k in ma if ma[k] != mb.get(k)} <= {"created"}
    assert not partial.exists()
    with open_store(store) as s:
        assert len(s) == 96


# ----------------------------------------------------------------- the batch plan


def test_plan_batches_cuts_by_source_bytes():
    from pcrfs.convert import SourceFile, plan_batches

    sizes = [50, 60, 10, 200, 5, 5, 5, 99, 1]
    files = [SourceFile(f"c/{i:02d}.jpg", f"/x/c/{i:02d}.jpg", n, 0) for i, n in enumerate(sizes)]
    plan = plan_batches(files, 100)
    assert [(b.start, b.end) for b in plan] == [(0, 2), (2, 4), (4, 8), (8, 9)]
    assert [b.record for b in plan] == [0, 1, 2, 3]
    assert [b.nbytes for b in plan] == [110, 210, 114, 1]
    for b in plan[:-1]:  # every batch but the last reaches the target, and only at its last file
        assert sum(sizes[b.start:b.end]) >= 100 > sum(sizes[b.start:b.end - 1])
    assert len(plan_batches(files, 1)) == len(files)  # at least one file per batch
    assert plan_batches([], 100) == []


@pytest.mark.parametrize("order", ["shuffled", "source"])
def test_local_records_follow_the_batch_plan(tmp_path, demo_src, order):
    """Record r holds exactly batch r's files, in the listing's storage order: the records
    a Dask run writes are the same."""
    from pcrfs.convert import list_sources, plan_batches
    from pcrfs.convert.plan import storage_order

    files = storage_order(list_sources(demo_src), order, 7).files
    plan = plan_batches(files, 64 * 1024)
    convert(demo_src, tmp_path / "s.pcr", record_bytes=64 * 1024, workers=2, order=order, seed=7)
    with open_store(tmp_path / "s.pcr") as s:
        records = s.index.records
        assert s.manifest["format_version"] == (2 if order == "shuffled" else 1)
        assert len(records) == len(plan) > 10
        for b, rec in zip(plan, records):
            assert int(rec["first_image"]) == b.start and int(rec["n_images"]) == b.count
            assert [s.path(int(i)) for i in s.index.record_images(b.record)] == [f.rel for f in files[b.start:b.end]]
            data = (tmp_path / "s.pcr" / fmt.record_name(b.record)).read_bytes()
            assert data[:fmt.RECORD_HEADER_SIZE] == fmt.record_header(b.record) and len(data) == rec["size"]


def test_batch_of_bad_files_only_is_an_empty_record(tmp_path, demo_src):
    """A batch with no convertible file still becomes its record (0 images): record r stays
    batch r, and readers and `verify` accept the empty record between full ones."""
    from pcrfs.store.read.verify import verify_store

    src = tmp_path / "src"
    copy_classes(demo_src, src, classes=("cat",), per_class=3)
    (src / "cat" / "cat_0000b.jpg").write_bytes(b"not a jpeg" * 1000)  # sorts second
    res = convert(src, tmp_path / "s.pcr", record_bytes=1, workers=2, order="source")  # one file per batch, in path order
    assert res.images == 3 and [b["path"] for b in res.bad] == ["cat/cat_0000b.jpg"]
    with open_store(tmp_path / "s.pcr") as s:
        assert [int(r["n_images"]) for r in s.index.records] == [1, 0, 1, 1]
        assert int(s.index.records[1]["size"]) == fmt.RECORD_HEADER_SIZE
        assert verify_store(s) == []
        assert s.read("cat/cat_0001.jpg", s.num_groups) == s.read(1, s.num_groups)
    r = run_cli("verify", "-q", tmp_path / "s.pcr")
    assert r.exit_code == 0, r.output


def test_resume_counts_finished_records_in_any_order(tmp_path, demo_src):
    """Records need not finish in order (a Dask run does not): every record with a valid
    description and its file in place is kept; the gaps are converted."""
    ref = tmp_path / "ref.pcr"
    convert(demo_src, ref, record_bytes=128 * 1024, workers=2)
    out = tmp_path / "gaps.pcr"
    seen = 0

    def bomb(n, nbytes):
        nonlocal seen
        seen += n
        if seen == 40:
            raise _Stop

    with pytest.raises(_Stop):
        convert(demo_src, out, record_bytes=128 * 1024, workers=2, on_progress=bomb)
    partial = out / fmt.PARTIAL_DIR
    described = sorted(int(p.stem) for p in partial.glob("[0-9]*.json"))
    assert len(described) >= 3
    (partial / "00001.json").unlink()                        # a hole: record 1 is redone
    (out / fmt.record_name(described[-1])).write_bytes(b"x")  # wrong size: redone
    kept = [json.loads((partial / f"{r:05d}.json").read_text()) for r in described if r not in (1, described[-1])]
    res = convert(demo_src, out, record_bytes=128 * 1024, workers=1)
    assert res.resumed_from == sum(d["sources"][1] - d["sources"][0] for d in kept) > 0
    assert store_files(out) == store_files(ref)
    assert manifest(out) == manifest(ref)


# ----------------------------------------------------------------- refusals


def test_refuses_non_empty_non_store_dir(tmp_path, demo_src):
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(StoreExists, match="not empty"):
        convert(demo_src, target)
    r = run_cli("convert", demo_src, target, "-q", "--overwrite")
    assert r.exit_code == 1 and "not a PCR store" in r.stderr
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert (target / "precious.txt").read_text() == "keep me"


def test_refuses_finished_store_without_overwrite(tmp_path, demo_src):
    src = tmp_path / "src"
    copy_classes(demo_src, src, per_class=2)
    store = tmp_path / "s.pcr"
    convert(src, store)
    before = store_files(store)
    r = run_cli("convert", src, store, "-q")
    assert r.exit_code == 1 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert store_files(store) == before
    copy_classes(demo_src, src, classes=("rocket",), per_class=2)
    r = run_cli("convert", src, store, "-q", "--overwrite")
    assert r.exit_code == 0, r.stderr
    with open_store(store) as s:
        assert len(s) == 6 and "rocket" in s.classes


def test_refuses_store_inside_source(tmp_path, demo_src):
    src = tmp_path / "src"
    copy_classes(demo_src, src, per_class=2)
    before = snapshot(src)
    for target in (src / "out.pcr", src / "cat" / "x.pcr", src):
        with pytest.raises(ValueError, match="inside the source"):
            convert(src, target)
        r = run_cli("convert", src, target, "-q")
        assert r.exit_code == 1 and "inside the source" in r.stderr
    assert snapshot(src) == before


def test_refuses_store_inside_source_through_symlink(tmp_path, demo_src):
    src = tmp_path / "src"
    copy_classes(demo_src, src, per_class=1)
    (tmp_path / "alias").symlink_to(src)
    with pytest.raises(ValueError, match="inside the source"):
        convert(src, tmp_path / "alias" / "out.pcr")
    assert not (src / "out.pcr").exists()


def test_missing_source(tmp_path):
    r = run_cli("convert", tmp_path / "nope", tmp_path / "s.pcr")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "nope", tmp_path / "s.pcr")


# ----------------------------------------------------------------- symlinks


def test_symlink_policy(tmp_path, demo_src):
    src = tmp_path / "src"
    copy_classes(demo_src, src, classes=("cat",), per_class=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(src / "cat" / "cat_0000.jpg", outside / "secret.jpg")
    (src / "cat" / "link_rel.jpg").symlink_to("cat_0000.jpg")
    (src / "cat" / "link_abs.jpg").symlink_to(src / "cat" / "cat_0001.jpg")
    (src / "cat" / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (src / "cat" / "link_dangling.jpg").symlink_to(src / "cat" / "missing.jpg")
    (src / "dirlink").symlink_to(src / "cat", target_is_directory=True)
    (src / "dirlink_out").symlink_to(outside, target_is_directory=True)
    before = snapshot(src)

    res = convert(src, tmp_path / "s.pcr", workers=1)
    with open_store(tmp_path / "s.pcr") as s:
        assert sorted(s.paths()) == ["cat/cat_0000.jpg", "cat/cat_0001.jpg", "cat/link_abs.jpg", "cat/link_rel.jpg"]
        assert s.read("cat/link_rel.jpg", 10) == s.read("cat/cat_0000.jpg", 10)
        assert s.read("cat/link_abs.jpg", 10) == s.read("cat/cat_0001.jpg", 10)
        assert s.classes == ["cat"]
    bad = {b["path"]: b["reason"] for b in res.bad}
    skipped = {b["path"]: b["reason"] for b in res.skipped}
    assert "outside" in bad["cat/link_out.jpg"]
    assert "cat/link_dangling.jpg" in bad
    assert set(skipped) == {"dirlink", "dirlink_out"}
    assert all("symlink" in r for r in skipped.values())
    assert snapshot(src) == before
    r = run_cli("convert", src, tmp_path / "cli.pcr", "-q")
    assert r.exit_code == 1 and "link_out.jpg" in r.stderr


def test_symlinked_source_root(tmp_path, demo_src):
    real = tmp_path / "real"
    copy_classes(demo_src, real, classes=("cat",), per_class=1)
    (real / "cat" / "alias.jpg").symlink_to("cat_0000.jpg")
    (tmp_path / "root_link").symlink_to(real, target_is_directory=True)
    res = convert(tmp_path / "root_link", tmp_path / "s.pcr")
    assert res.images == 2 and not res.bad
