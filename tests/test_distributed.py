"""`pcrfs convert` on a Dask cluster: a LocalCluster of 2 worker processes on this machine.

The result must be the store a local conversion writes (byte for byte, manifest
creation time aside) to a directory and to S3 (moto's server on loopback), survive
a worker killed mid-run, and resume after an interrupted run. Every local
reference is converted here, in the same run, never a stored golden.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pcrfs.cli import main
from pcrfs.convert import convert, list_sources, plan_batches
from pcrfs.remote.fs import RemoteOptions, filesystem
from pcrfs.store import format as fmt
from pcrfs.store.read.reader import ReadOptions, StoreError, open_store
from pcrfs.store.read.verify import verify_store

from s3util import MotoServer, s3_available, s3_environment


def _dask_missing() -> str | None:
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        return f"dask.distributed not installed ({e}); pip install -e '.[test]' (it includes pcrfs[dask])"
    return None


needs_dask = pytest.mark.skipif(_dask_missing() is not None, reason=str(_dask_missing()))
needs_s3 = pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))

RECORD = 256 * 1024  # the demo set (96 photos, ~3.9 MiB) in 15 batches: plenty of tasks
BUCKET = "pcrfs-dask"


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Credentials for moto and a private cache directory, set before the cluster starts so
    that its worker processes inherit them (as workers of a real cluster have their own)."""
    with s3_environment(tmp_path_factory.mktemp("xdg-cache")):
        yield


@pytest.fixture(scope="module")
def cluster(env):
    from distributed import LocalCluster

    c = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0")
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def local_ref(demo_src, tmp_path_factory) -> Path:
    """The local conversion every Dask result must equal."""
    store = tmp_path_factory.mktemp("local") / "local.pcr"
    convert(demo_src, store, record_bytes=RECORD, workers=2)
    return store


@pytest.fixture(scope="module")
def moto(env, tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    filesystem(f"s3://{BUCKET}", RemoteOptions(endpoint_url=server.endpoint)).mkdir(BUCKET)
    yield server
    server.stop()


# ---- helpers -----------------------------------------------------------------------------------

STORE_FILES = re.compile(r"^(records/\d{5}\.pcr|index/[^/]+|report\.json|pcr\.yaml)$")


def files_of(store: Path) -> dict[str, bytes]:
    """Every file of a finished store by relative name, the manifest without its creation time."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.is_file():
            out[p.relative_to(store).as_posix()] = p.read_bytes()
    out[fmt.MANIFEST] = _manifest_sans_created(out[fmt.MANIFEST])
    return out


def _manifest_sans_created(raw: bytes) -> bytes:
    m = yaml.safe_load(raw)
    m.pop("created")
    return yaml.safe_dump(m).encode()


def assert_same_store(store: Path, reference: Path) -> None:
    got, want = files_of(store), files_of(reference)
    assert sorted(got) == sorted(want)  # nothing left over: no .partial, no temporary files
    assert all(STORE_FILES.match(name) for name in got), sorted(got)
    for name in want:
        assert got[name] == want[name], name
    with open_store(store) as s:
        assert verify_store(s) == []


def n_batches(demo_src: Path) -> int:
    """Records of a conversion at the defaults (the shuffled storage order, seed 0)."""
    from pcrfs.convert.plan import storage_order

    return len(plan_batches(storage_order(list_sources(demo_src), "shuffled", 0).files, RECORD))


class _Stop(Exception):
    pass


# ---- to a directory ----------------------------------------------------------------------------

@needs_dask
def test_dask_conversion_equals_the_local_one(client, demo_src, local_ref, tmp_path):
    assert n_batches(demo_src) >= 10
    store = tmp_path / "dask.pcr"
    res = convert(demo_src, store, record_bytes=RECORD, client=client)
    assert res.images == 96 and not res.bad and res.resumed_from == 0
    assert res.manifest["num_records"] == n_batches(demo_src)
    assert_same_store(store, local_ref)


@needs_dask
def test_worker_killed_mid_run(client, demo_src, local_ref, tmp_path):
    """SIGKILL one worker process as soon as the first record is in: the tasks it held are
    run again elsewhere and the store is complete, verified and the same as a local one's."""
    pids = client.run(os.getpid)  # worker address -> pid
    victim = sorted(pids)[0]
    lost: list[str] = []

    def kill_once(n: int, nbytes: int) -> None:
        if not lost:
            lost.extend(client.processing(workers=[victim])[victim])  # its tasks, running or queued
            os.kill(pids[victim], signal.SIGKILL)

    store = tmp_path / "killed.pcr"
    res = convert(demo_src, store, record_bytes=RECORD, client=client, on_progress=kill_once)
    assert lost, "the killed worker held no task: the kill did not land mid-run"
    assert res.images == 96
    assert_same_store(store, local_ref)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for the tests after this one
    assert pids[victim] not in client.run(os.getpid).values()


@needs_dask
def test_interrupted_dask_run_resumes(client, demo_src, local_ref, tmp_path):
    store = tmp_path / "resumed.pcr"
    done = 0

    def stop_after_three(n: int, nbytes: int) -> None:
        nonlocal done
        done += 1
        if done == 3:
            raise _Stop  # as Ctrl-C would, from the client's loop: outstanding tasks are cancelled

    with pytest.raises(_Stop):
        convert(demo_src, store, record_bytes=RECORD, client=client, on_progress=stop_after_three)
    assert not (store / fmt.MANIFEST).exists()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(store)
    described = {int(p.stem) for p in (store / fmt.PARTIAL_DIR).glob("[0-9]*.json")}
    assert len(described) >= 3
    # what a worker killed mid-write and a client killed before describing would leave
    undescribed = min(set(range(n_batches(demo_src))) - described)
    (store / fmt.record_name(undescribed)).write_bytes(b"written, never described")
    (store / fmt.RECORDS_DIR / "00001.pcr.4242-0badf00d.tmp").write_bytes(b"torn")
    res = convert(demo_src, store, record_bytes=RECORD, client=client)
    assert 0 < res.resumed_from < 96
    assert_same_store(store, local_ref)


# ---- to S3 -------------------------------------------------------------------------------------

@needs_dask
@needs_s3
def test_dask_conversion_to_s3(client, moto, demo_src, local_ref, tmp_path):
    """Workers PUT their records straight to the bucket; the client uploads index, report
    and manifest (last). Every object equals the local conversion's file."""
    remote = RemoteOptions(endpoint_url=moto.endpoint)
    url = f"s3://{BUCKET}/dask.pcr"
    staging = tmp_path / "staging"
    res = convert(demo_src, url, record_bytes=RECORD, client=client, remote=remote, staging_dir=staging)
    assert res.images == 96
    assert not staging.exists() or not any(staging.rglob("*.json"))  # resume state dropped when done
    fs = filesystem(url, remote)
    base = f"{BUCKET}/dask.pcr"
    objects = {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}
    objects[fmt.MANIFEST] = _manifest_sans_created(objects[fmt.MANIFEST])
    want = files_of(local_ref)
    assert sorted(objects) == sorted(want)
    for name in want:
        assert objects[name] == want[name], name
    with open_store(url, options=ReadOptions(remote=remote)) as s:
        assert verify_store(s) == []


# ---- the command line --------------------------------------------------------------------------

def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@needs_dask
def test_cli_dask_local_cluster(demo_src, local_ref, tmp_path, monkeypatch):
    # a relative SRC and STORE: workers must get absolute paths from the client
    monkeypatch.chdir(demo_src.parent)
    store = tmp_path / "cli.pcr"
    r = _cli("convert", demo_src.name, store, "--dask", "-j", "1", "--record-size", "256K", "-q")
    assert r.exit_code == 0, r.stderr
    assert "Dask cluster at tcp://" in r.stderr and "1 workers" in r.stderr
    assert "Dask dashboard: http" in r.stderr
    assert_same_store(store, local_ref)


@needs_dask
def test_cli_dask_scheduler_address(cluster, demo_src, local_ref, tmp_path):
    store = tmp_path / "sched.pcr"
    r = _cli("convert", demo_src, store, "--scheduler", cluster.scheduler_address, "--record-size", "256K", "-q")
    assert r.exit_code == 0, r.stderr
    assert f"Dask cluster at {cluster.scheduler_address}: 2 workers" in r.stderr
    assert_same_store(store, local_ref)


def test_cli_dask_options_are_exclusive(demo_src, tmp_path):
    r = _cli("convert", demo_src, tmp_path / "x.pcr", "--dask", "--scheduler", "tcp://127.0.0.1:8786")
    assert r.exit_code == 2 and "mutually exclusive" in r.stderr
    assert not (tmp_path / "x.pcr").exists()


def test_cli_without_dask_says_what_to_install(demo_src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails
    for option in (["--dask"], ["--scheduler", "tcp://127.0.0.1:8786"]):
        r = _cli("convert", demo_src, tmp_path / "x.pcr", *option)
        assert r.exit_code == 1, r.output
        assert "pip install 'pcrfs[dask]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pcr").exists()
