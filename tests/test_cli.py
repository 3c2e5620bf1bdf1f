"""`pcrfs info`, `pcrfs verify`, `pcrfs get` and the CLI's error reporting."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcrfs.cli import main
from pcrfs.store import format as fmt
from pcrfs.store.read.reader import open_store


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_clean_error(r, *needles, code=1):
    """Failed with ``code``, said why on stderr, and no Python exception escaped."""
    assert r.exit_code == code, (r.exit_code, r.output, r.stderr)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output + r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    dst = tmp_path / "copy.pcr"
    shutil.copytree(demo_store, dst)
    return dst


# ----------------------------------------------------------------- info


def test_info_text(demo_store):
    r = run("info", demo_store)
    assert r.exit_code == 0, r.output
    assert "96 in 8 classes" in r.output
    assert "scan1" in r.output and "scan10" in r.output
    assert "100.0%" in r.output


def test_info_json(demo_store):
    r = run("info", demo_store, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    with open_store(demo_store) as s:
        assert info["images"] == len(s) == 96
        assert info["classes"] == 8
        assert info["scan_groups"] == s.num_groups == 10
        assert info["records"] == len(s.index.records)
        assert info["reencoded"] == 0
        views = info["views"]
        assert [v["k"] for v in views] == list(range(1, 11))
        fractions = [v["fraction"] for v in views]
        assert all(0 < a < b for a, b in zip(fractions, fractions[1:]))
        assert fractions[-1] == pytest.approx(1.0)
        # each view's bytes are what the reader serves for that view
        for v in views:
            assert v["bytes"] == sum(s.size(i, v["k"]) for i in range(len(s)))
        assert info["stored_bytes"] == int(s.index.group_lengths.sum())


# ----------------------------------------------------------------- verify


def test_verify_ok(demo_store):
    r = run("verify", demo_store, "-q")
    assert r.exit_code == 0, r.output
    assert "OK" in r.stderr and "96 images" in r.stderr
    assert "DAMAGED" not in r.output


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("image, group", [(0, 1), (33, 6), (95, 10)])
def test_verify_names_the_damaged_group(store_copy, image, group):
    with open_store(store_copy) as s:
        if group > s.n_groups(image):
            group = s.n_groups(image)
        path = s.path(image)
        rng = s.ranges(image, group)[-1]
    _flip(store_copy / fmt.record_name(rng.record), rng.offset + rng.length - 1)
    r = run("verify", store_copy, "-q")
    assert_clean_error(r, "1 problem")
    damaged = [line for line in r.output.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1, r.output
    assert path in damaged[0] and f"scan group {group}" in damaged[0] and f"record {rng.record}" in damaged[0]


def test_verify_reports_truncated_and_missing_records(store_copy):
    with open_store(store_copy) as s:
        n_records = len(s.index.records)
    rec1 = store_copy / fmt.record_name(1)
    rec1.write_bytes(rec1.read_bytes()[:-10])
    (store_copy / fmt.record_name(n_records - 1)).unlink()
    r = run("verify", store_copy, "-q")
    assert_clean_error(r)
    assert "record 1" in r.output and f"record {n_records - 1}" in r.output


def test_verify_reports_damaged_record_header(store_copy):
    _flip(store_copy / fmt.record_name(0), 3)
    r = run("verify", store_copy, "-q")
    assert_clean_error(r)
    assert "record 0" in r.output and "header" in r.output


# ----------------------------------------------------------------- get


def test_get_matches_reader(demo_store, tmp_path):
    with open_store(demo_store) as s:
        for i in (0, 17, 95):
            path = s.path(i)
            for k in (1, 4, None):
                want = s.read(i, k or s.num_groups)
                out = tmp_path / f"{i}_{k}.jpg"
                args = ["get", demo_store, path, "-o", out] + (["--scan", k] if k else [])
                r = run(*args)
                assert r.exit_code == 0, r.output
                assert out.read_bytes() == want
                # and to a pipe
                r = run(*args[:3], *(["--scan", k] if k else []))
                assert r.exit_code == 0
                assert r.stdout_bytes == want


def test_get_via_subprocess_pipe(demo_store):
    with open_store(demo_store) as s:
        path = s.path(40)
        want = s.read(40, 3)
    p = subprocess.run([sys.executable, "-m", "pcrfs.cli", "get", str(demo_store), path, "--scan", "3"],
                       capture_output=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want


# ----------------------------------------------------------------- errors


def test_missing_store(tmp_path):
    for cmd in (["info"], ["verify", "-q"], ["get"]):
        args = cmd + [tmp_path / "absent.pcr"] + (["a.jpg"] if cmd == ["get"] else [])
        r = run(*args)
        assert_clean_error(r, "pcrfs: error:", "no such store")


def test_missing_store_subprocess(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pcrfs.cli", "info", str(tmp_path / "absent.pcr")],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.startswith("pcrfs: error:") and "Traceback" not in p.stderr


def test_not_a_store(tmp_path):
    r = run("verify", tmp_path)
    assert_clean_error(r, "not a PCR store")


def test_unfinished_store(store_copy):
    (store_copy / fmt.MANIFEST).unlink()
    (store_copy / fmt.PARTIAL_DIR).mkdir()
    r = run("info", store_copy)
    assert_clean_error(r, "unfinished")


def test_bad_scan(demo_store):
    with open_store(demo_store) as s:
        path = s.path(0)
    r = run("get", demo_store, path, "--scan", "11")
    assert_clean_error(r, "--scan must be at most 10")
    for bad in ("0", "-1", "abc"):
        r = run("get", demo_store, path, "--scan", bad)
        assert r.exit_code == 2 and "Traceback" not in r.output + r.stderr
        assert "--scan" in r.stderr


def test_missing_path(demo_store):
    r = run("get", demo_store, "cat/nope.jpg")
    assert_clean_error(r, "no image", "cat/nope.jpg")
    r = run("get", demo_store, "cat")  # a directory is not an image
    assert_clean_error(r, "no image")


def test_get_damaged_group(store_copy, tmp_path):
    with open_store(store_copy) as s:
        path = s.path(8)
        rng = s.ranges(8, 2)[-1]
    _flip(store_copy / fmt.record_name(rng.record), rng.offset)
    r = run("get", store_copy, path, "--scan", "1", "-o", tmp_path / "ok.jpg")
    assert r.exit_code == 0
    r = run("get", store_copy, path, "--scan", "2", "-o", tmp_path / "bad.jpg")
    assert_clean_error(r, "CRC-32", path)
    assert not (tmp_path / "bad.jpg").exists()


def test_damaged_index_is_a_clean_error(store_copy):
    p = store_copy / fmt.INDEX_DIR / "group_lengths.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    for cmd in ("info", "verify"):
        assert_clean_error(run(cmd, store_copy), "CRC-32 mismatch", "group_lengths.npy")


def test_damaged_manifest_is_a_clean_error(store_copy):
    """BUG (pcrfs/store/read/reader.py): a manifest whose index_files entry has the wrong shape
    escapes open_store as AttributeError, and the CLI prints a traceback."""
    m = (store_copy / fmt.MANIFEST).read_text()
    (store_copy / fmt.MANIFEST).write_text(m.replace("index_files:\n", "index_files: []\nold_index_files:\n"))
    assert_clean_error(run("info", store_copy), "pcrfs: error:")
    (store_copy / fmt.MANIFEST).write_text("format: [pcr\n")
    assert_clean_error(run("info", store_copy), "damaged")
