"""A mount opens its store once: the daemon opens it (reading and checking the whole
index, ~0.9 s at ImageNet scale) and tells ``mount()`` over its start-up pipe what the
user should hear and the error that stops it, which ``mount()`` raises as it would
have had it opened the store itself."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mountutil import Mounts, fuse_unavailable
from pcrfs.fuse import mounting
from pcrfs.fuse.mounting import MountError, StartupReport, _wait_checked

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


class _Daemon:
    """Stands in for the daemon's Popen in _wait_checked."""

    def __init__(self) -> None:
        self.pid, self.terminated, self.waited = -1, False, False

    def terminate(self) -> None:
        self.terminated = True

    def wait(self, timeout=None) -> int:
        self.waited = True
        return 1


def _report(*steps) -> tuple[int, list[str]]:
    """A pipe holding what a daemon's StartupReport said (``steps``: (method, text) pairs)."""
    r, w = os.pipe()
    report = StartupReport(w)
    for method, *text in steps:
        getattr(report, method)(*text)
    report.close()
    return r, []


def test_report_relays_echo_lines_then_returns_when_checked():
    r, said = _report(("echo", "pcrfs: a stale mount; unmounting it"), ("echo", "é \udcff line\nbreak"), ("checked",))
    daemon = _Daemon()
    _wait_checked(daemon, r, said.append)
    assert said == ["pcrfs: a stale mount; unmounting it", "é \udcff line\nbreak"]
    assert not daemon.terminated


def test_report_error_is_the_mount_error_word_for_word():
    text = "mount point /m is not empty; pcrfs mounts on an empty directory\n(second line)"
    r, said = _report(("echo", "first"), ("error", text))
    daemon = _Daemon()
    with pytest.raises(MountError) as e:
        _wait_checked(daemon, r, said.append)
    assert str(e.value) == text and said == ["first"]
    assert daemon.waited and not daemon.terminated  # it exits by itself after an error


def test_report_that_ends_early_leaves_the_rest_to_the_wait_for_the_mount():
    r, said = _report(("echo", "x"))  # the daemon died before "checked"
    _wait_checked(_Daemon(), r, said.append)
    assert said == ["x"]


def test_nothing_is_said_after_checked_or_to_a_caller_that_left():
    r, w = os.pipe()
    report = StartupReport(w)
    report.checked()
    report.error("too late")  # after the checks: the daemon's own log has it, mount() does not wait
    report.echo("nor this")
    with os.fdopen(r, "rb") as f:
        assert f.read() == b'{"checked": true}\n'
    r, w = os.pipe()
    os.close(r)
    report = StartupReport(w)
    report.echo("nobody reads this")  # EPIPE: not an error for the daemon
    report.checked()


def test_an_interrupt_while_waiting_stops_the_daemon():
    r, w = os.pipe()
    daemon = _Daemon()

    def interrupted(_text):
        raise KeyboardInterrupt

    report = StartupReport(w)
    report.echo("x")
    report.close()
    with pytest.raises(KeyboardInterrupt):
        _wait_checked(daemon, r, interrupted)
    assert daemon.terminated and daemon.waited


def test_the_report_descriptor_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(mounting.STATUS_FD_ENV, raising=False)
    assert StartupReport.from_environment() is None
    monkeypatch.setenv(mounting.STATUS_FD_ENV, "not a number")
    assert StartupReport.from_environment() is None
    assert mounting.STATUS_FD_ENV not in os.environ  # taken out: no child of the daemon inherits it


@needs_fuse
def test_mount_does_not_open_the_store_in_the_calling_process(demo_store, tmp_path, monkeypatch):
    import pcrfs.store.read.reader as reader

    def refuse(*args, **kwargs):
        raise AssertionError("the caller opened the store")

    monkeypatch.setattr(reader, "open_store", refuse)
    mounts = Mounts(tmp_path)
    try:
        info = mounts.mount(demo_store, "m")
        assert (Path(info.mountpoint) / "full").is_dir()
    finally:
        mounts.cleanup()


@needs_fuse
def test_store_and_mount_point_errors_are_those_of_the_checks_themselves(demo_store, tmp_path):
    """What mount() raises is what open_store_checked / prepare_mountpoint raise in this
    process (the messages `pcrfs mount` printed when it checked before starting the daemon),
    in the same order: the store first."""
    not_a_store = tmp_path / "plain"
    not_a_store.mkdir()
    (not_a_store / "x.txt").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for store, mnt in ((not_a_store, empty), (not_a_store, tmp_path / "missing"), (demo_store, full),
                       (demo_store, tmp_path / "missing")):
        with pytest.raises(MountError) as expected:
            mounting.open_store_checked(str(store), 0).close()
            mounting.prepare_mountpoint(str(mnt))
        with pytest.raises(MountError) as got:
            mounting.mount(store, mnt, log_file=tmp_path / "m.log")
        assert str(got.value) == str(expected.value)
        assert mounting.mount_entry(str(mnt)) is None


@needs_fuse
def test_cli_mount_reports_the_store_error_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-m", "pcrfs.cli", "mount", str(tmp_path / "nothing"), str(empty)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("pcrfs: error: ")
    with pytest.raises(MountError) as expected:
        mounting.open_store_checked(str(tmp_path / "nothing"), 0)
    assert res.stderr == f"pcrfs: error: {expected.value}\n"


@needs_fuse
def test_a_mount_that_fails_its_checks_leaves_no_default_log(demo_store, tmp_path):
    """Without --log-file the daemon logs to the runtime directory; a mount refused at its
    checks leaves nothing there (as when the caller ran the checks before starting it)."""
    runtime = mounting.runtime_dir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    before = set(os.listdir(runtime))
    for store, mnt in ((tmp_path / "nothing", tmp_path), (demo_store, full)):
        with pytest.raises(MountError):
            mounting.mount(store, mnt)
    assert set(os.listdir(runtime)) == before
    log = tmp_path / "given.log"
    with pytest.raises(MountError) as e:
        mounting.mount(demo_store, full, log_file=log)
    assert "not empty" in log.read_text() and "not empty" in str(e.value)  # a log asked for keeps the error
