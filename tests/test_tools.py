"""The benchmark tools under tools/ still start (every one answers --help) and the shared
bench library (tools/benchlib) keeps its promises: CPU from /proc, JSON results that keep
what they should, mounts that are always unmounted. No timings are asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mountutil import force_unmount, fuse_unavailable, kill_daemon

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(TOOLS))

from benchlib import mounts, proc, reads, results  # noqa: E402

SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py") if p.name != "machine.py")


def test_every_tool_is_listed():
    # a tool added or renamed must show up here (and so be run with --help below)
    assert {"bench_read.py", "profile_read.py", "bench_remote_epoch.py", "bench_epoch.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_tool_help(script):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(TOOLS / script), "--help"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_bench_read_kernel_help():
    r = subprocess.run([sys.executable, str(TOOLS / "bench_read.py"), "kernel", "--help"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120, cwd=REPO)
    assert r.returncode == 0 and "--python-path" in r.stdout, r.stderr[-2000:]


def test_cpu_of_a_busy_child_is_counted():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\nimport sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while proc.threads_cpu_s(child.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.threads_cpu_s(child.pid) >= 0.3
        assert proc.cpu_s(child.pid) >= 0.2  # 10 ms ticks
    finally:
        child.stdin.close()
        child.wait(10)
    assert proc.cpu_s(None) == proc.threads_cpu_s(None) == 0.0
    assert proc.cpu_s(child.pid) == 0.0  # gone: unknown, not an error


def test_meter_counts_own_cpu_per_item():
    with proc.Meter() as m:
        t = time.process_time()
        while time.process_time() - t < 0.2:
            pass
    r = m.per_item(100)
    assert r["items"] == 100 and r["self_us_per_item"] >= 1500  # 0.2 s over 100 items
    assert "daemon_us_per_item" not in r
    assert len(proc.loadavg()) == 3


def test_write_json_key_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("r") / "bench.json"  # relative, as on a tool's command line
    results.write_json(out, {"summary": 1, "kernel_speed": {"old": True}})
    results.write_json(out, {"new": True}, key="kernel_speed")
    assert json.loads(out.read_text()) == {"summary": 1, "kernel_speed": {"new": True}}


def test_run_doc_records_machine_and_load():
    doc = results.Run("tools/x.py", ["--a", "1"], packages=("numpy",)).doc(rows=[1])
    assert doc["command"] == "python tools/x.py --a 1" and doc["rows"] == [1]
    m = doc["machine"]
    assert m["cores"] == os.cpu_count() and m["python"] and m["kernel"] and m["packages"]["numpy"]
    assert len(doc["loadavg_before"]) == len(doc["loadavg_after"]) == 3


def test_walk_sample_and_read_pass(tmp_path):
    for rel in ("b/2.jpg", "a/1.jpg", "a/0.jpg", "top"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    rel = reads.walk(tmp_path)
    assert rel == ["a/0.jpg", "a/1.jpg", "b/2.jpg", "top"]
    paths = [str(tmp_path / r) for r in rel]
    assert reads.read_pass(paths)[1] == reads.read_pass_os(paths)[1] == sum(len(r) for r in rel)
    assert reads.sample(rel, 2) == ["a/0.jpg", "b/2.jpg"] and reads.sample(rel, 9) == rel


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
def test_pcrfs_mount_is_always_unmounted(demo_store, tmp_path):
    mp = tmp_path / "mnt"
    pid = None
    env_before = os.environ.get("PCRFS_NO_FASTPATH")
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with mounts.PcrfsMount(demo_store, mp, tmp_path / "m.log", env={"PCRFS_NO_FASTPATH": "1" if env_before is None else None}) as m:
                pid = m.pid
                assert mounts.is_mounted(mp)
                assert m.stats()["views"]  # the daemon's counters
                assert reads.walk(mp / "full")
                raise RuntimeError("boom")
        assert not mounts.is_mounted(mp)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{pid}"), "the daemon outlived its unmount"
        assert pid not in mounts.CLEANUP.pids
        assert os.environ.get("PCRFS_NO_FASTPATH") == env_before  # set for the daemon only
    finally:
        if pid is not None:
            kill_daemon(pid)
        force_unmount(mp)
