"""The adaptive index built from parts: `convert --quality-index`, `quality --write-index`,
both on Dask, resuming after interruptions, and `pcrfs info`'s view of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import pcrfs
from pcrfs.cli import main
from pcrfs.convert import convert
from pcrfs.quality import build, scoring
from pcrfs.store.format import adaptiveindex as adaptive
from pcrfs.store.write import install
from pcrfs.store import format as fmt

RECORD = 256 * 1024  # the demo set in ~15 records


def _dask_missing() -> str | None:
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        return f"dask.distributed not installed ({e})"
    return None


needs_dask = pytest.mark.skipif(_dask_missing() is not None, reason=str(_dask_missing()))


def index_bytes(store: Path) -> bytes:
    (path,) = (store / fmt.INDEX_DIR).glob(f"{adaptive.FILE_PREFIX}*.npy")
    return path.read_bytes()


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def reference(demo_store, tmp_path_factory) -> Path:
    """The demo store with the index `pcrfs quality --write-index` writes (one process)."""
    store = tmp_path_factory.mktemp("ref") / "ref.pcr"
    shutil.copytree(demo_store, store)
    r = run_cli("quality", str(store), "--write-index", "-j", "1", "-q")
    assert r.exit_code == 0, r.output
    assert not (store / build.RESUME_DIR).exists()  # the kept parts go once the index is in
    return store


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    copy = tmp_path / "copy.pcr"
    shutil.copytree(demo_store, copy)
    return copy


def test_reference_index_is_the_exhaustive_one(reference):
    with pcrfs.open_store(reference) as s:
        exhaustive, _ = scoring.compute_exhaustive(s)
        assert np.array_equal(adaptive.load(s).ks, exhaustive)


def test_parts_cover_every_image_once(reader):
    parts = build.parts_of(reader)
    firsts = [first for _r, _p, first, _c in parts]
    assert firsts == sorted(firsts) and sum(c for *_x, c in parts) == reader.num_images
    assert all(0 < c <= build.PART_IMAGES for *_x, c in parts)


def test_write_index_with_worker_processes_is_the_same(store_copy, reference):
    r = run_cli("quality", str(store_copy), "--write-index", "-j", "2", "-q")
    assert r.exit_code == 0, r.output
    assert index_bytes(store_copy) == index_bytes(reference)


# ---- convert --quality-index --------------------------------------------------------------------

def test_convert_quality_index_equals_write_index(demo_src, reference, tmp_path):
    store = tmp_path / "c.pcr"
    res = convert(demo_src, store, record_bytes=RECORD, workers=2, quality_index=True)
    built, entry = res.adaptive
    assert index_bytes(store) == index_bytes(reference)
    assert built.resumed == res.images  # every part was scored during the conversion, none after it
    assert sorted(p.name for p in store.iterdir()) == ["index", "pcr.yaml", "records", "report.json"]


def test_convert_cli_quality_index(demo_src, reference, tmp_path):
    store = tmp_path / "cli.pcr"
    r = run_cli("convert", str(demo_src), str(store), "--record-size", "256K", "-j", "2", "-q",
                "--quality-index")
    assert r.exit_code == 0, r.output
    assert "the mount now shows ssim90, ssim95, ssim98" in r.output
    assert index_bytes(store) == index_bytes(reference)


def test_interrupted_convert_resumes_without_rescoring(demo_src, reference, tmp_path, monkeypatch):
    store = tmp_path / "r.pcr"
    done = 0

    def stop_after_four(n: int, nbytes: int) -> None:
        nonlocal done
        done += 1
        if done == 40:
            raise _Stop

    with pytest.raises(_Stop):
        convert(demo_src, store, record_bytes=RECORD, workers=1, quality_index=True, on_progress=stop_after_four)
    kept = sorted((store / build.RESUME_DIR).glob("*.npz"))
    assert kept  # finished records' ks survive the interruption
    scored = []
    real = build.score_entry
    monkeypatch.setattr(build, "score_entry", lambda groups, t, *rest: scored.append(1) or real(groups, t, *rest))
    res = convert(demo_src, store, record_bytes=RECORD, workers=1, quality_index=True)
    assert 0 < len(scored) < res.images  # only the records not finished before
    assert index_bytes(store) == index_bytes(reference)


def test_killed_between_manifest_and_index(demo_src, reference, tmp_path, monkeypatch):
    """The store is finished, the index not yet written: `quality --write-index` finishes it
    from the kept parts without scoring anything again."""
    store = tmp_path / "k.pcr"

    def crash(*a, **k):
        raise _Stop

    with monkeypatch.context() as m:
        m.setattr(install, "adaptive_index", crash)
        with pytest.raises(_Stop):
            convert(demo_src, store, record_bytes=RECORD, workers=2, quality_index=True)
    assert (store / fmt.MANIFEST).exists() and (store / build.RESUME_DIR).is_dir()
    monkeypatch.setattr(build, "score_part", lambda *a, **k: pytest.fail("a kept part was scored again"))
    r = run_cli("quality", str(store), "--write-index", "-j", "1", "-q")
    assert r.exit_code == 0, r.output
    assert index_bytes(store) == index_bytes(reference)


# ---- quality --write-index, resumed ----------------------------------------------------------------

def test_interrupted_write_index_resumes(store_copy, reference, monkeypatch):
    calls = []
    real = build.score_part

    def stop_on_the_fifth(*args):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(build, "score_part", stop_on_the_fifth)
    r = run_cli("quality", str(store_copy), "--write-index", "-j", "1", "-q")
    assert r.exit_code == 130 and "resume" in r.output
    assert adaptive.MANIFEST_KEY not in (store_copy / fmt.MANIFEST).read_text()
    assert len(list((store_copy / build.RESUME_DIR).glob("*.npz"))) == 4
    calls.clear()
    monkeypatch.setattr(build, "score_part", lambda *a: calls.append(a) or real(*a))
    r = run_cli("quality", str(store_copy), "--write-index", "-j", "1", "--json")
    assert r.exit_code == 0, r.output
    with pcrfs.open_store(store_copy) as s:
        assert len(calls) == len(build.parts_of(s)) - 4
    assert json.loads(r.output[r.output.index("{"):])["resumed"] > 0
    assert index_bytes(store_copy) == index_bytes(reference)


def test_a_kept_part_of_other_contents_is_scored_again(store_copy, reference):
    with pcrfs.open_store(store_copy) as s:
        parts = build.Parts(build.resume_dir(str(store_copy)), adaptive.THRESHOLDS)
        parts.open()
        r, p, first, count = build.parts_of(s)[0]
        wrong = np.full((count, 3), 1, dtype=adaptive.DTYPE)
        parts.save(build.PartResult(r, p, wrong), crc=build.store_part_crc(s, first, count) ^ 1)
        built = build.build(s)
    assert built.resumed == 0
    with pcrfs.open_store(reference) as ref:
        assert np.array_equal(built.ks, adaptive.load(ref).ks)


def test_parts_for_other_thresholds_are_dropped(store_copy):
    d = build.resume_dir(str(store_copy))
    build.Parts(d, (0.5,)).open()
    (d / "00000-0000.npz").write_bytes(b"old")
    build.Parts(d, adaptive.THRESHOLDS).open()
    assert not (d / "00000-0000.npz").exists()


def test_dask_options_need_write_index(demo_store):
    r = run_cli("quality", str(demo_store), "--dask")
    assert r.exit_code == 2 and "--write-index" in r.output
    r = run_cli("quality", str(demo_store), "--write-index", "--dask", "--scheduler", "tcp://x:1")
    assert r.exit_code == 2 and "mutually exclusive" in r.output


# ---- pcrfs info -----------------------------------------------------------------------------------

def test_info_lists_the_adaptive_views(reference, demo_store):
    r = run_cli("info", str(reference), "--json")
    views = json.loads(r.output)["adaptive_views"]
    assert [v["view"] for v in views] == ["ssim90", "ssim95", "ssim98"]
    fractions = [v["fraction"] for v in views]
    assert 0 < fractions[0] <= fractions[1] <= fractions[2] < 1
    text = run_cli("info", str(reference)).output
    assert "ssim95" in text and "MS-SSIM >= 0.95" in text
    assert json.loads(run_cli("info", str(demo_store), "--json").output)["adaptive_views"] == []


# ---- on Dask ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0")
    with Client(cluster) as c:
        yield c
    cluster.close()


@needs_dask
def test_write_index_on_dask_equals_local(client, store_copy, reference):
    with pcrfs.open_store(store_copy) as s:
        built, _entry = build.build_and_write(s, client=client)
    assert built.resumed == 0 and not built.failures
    assert index_bytes(store_copy) == index_bytes(reference)


@needs_dask
def test_convert_quality_index_on_dask_equals_local(client, demo_src, reference, tmp_path):
    store = tmp_path / "d.pcr"
    res = convert(demo_src, store, record_bytes=RECORD, client=client, quality_index=True)
    assert res.adaptive[0].resumed == res.images
    assert index_bytes(store) == index_bytes(reference)


@needs_dask
def test_interrupted_dask_write_index_resumes(client, store_copy, reference):
    with pcrfs.open_store(store_copy) as s:
        seen = 0

        def stop_after_three(n: int) -> None:
            nonlocal seen
            seen += 1
            if seen == 3:
                raise _Stop

        with pytest.raises(_Stop):
            build.build(s, client=client, on_done=stop_after_three)
        built, _ = build.build_and_write(s, client=client)
    assert built.resumed >= 3
    assert index_bytes(store_copy) == index_bytes(reference)


def test_kill_9_during_write_index_then_resume(store_copy, reference):
    """A real SIGKILL mid-run (no handler runs): the rerun keeps the parts scored before it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "pcrfs.cli", "quality", str(store_copy), "--write-index", "-j", "1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kept = store_copy / build.RESUME_DIR
    try:
        deadline = time.monotonic() + 120
        while len(list(kept.glob("*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert len(list(kept.glob("*.npz"))) >= 3
    r = run_cli("quality", str(store_copy), "--write-index", "-j", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["resumed"] >= 3
    assert index_bytes(store_copy) == index_bytes(reference)


def test_convert_quality_index_to_s3(demo_src, reference, tmp_path):
    """A store at a URL: the parts wait in the local cache directory, the index is uploaded."""
    from s3util import MotoServer, s3_available, s3_environment

    from pcrfs.remote.fs import RemoteOptions, filesystem
    from pcrfs.store.read.reader import ReadOptions, open_store

    if s3_available() is not None:
        pytest.skip(str(s3_available()))
    with s3_environment(tmp_path / "cache"):
        server = MotoServer(tmp_path / "moto.log")
        try:
            remote = RemoteOptions(endpoint_url=server.endpoint)
            filesystem("s3://qidx", remote).mkdir("qidx")
            url = "s3://qidx/demo.pcr"
            res = convert(demo_src, url, record_bytes=RECORD, workers=2, remote=remote, quality_index=True)
            assert res.adaptive[0].resumed == res.images
            assert not build.resume_dir(url).exists()
            with open_store(url, options=ReadOptions(remote=remote)) as s, pcrfs.open_store(reference) as ref:
                assert np.array_equal(adaptive.load(s).ks, adaptive.load(ref).ks)
        finally:
            server.stop()
