"""Shared fixtures: the demo photos converted once per test session."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/corpus.py helpers

import pcrfs  # noqa: E402
from mountutil import Mounts  # noqa: E402
from pcrfs.convert import convert  # noqa: E402
from pcrfs.demo import make_demo  # noqa: E402


SYSTEM_RUNTIME_DIR = Path("/run/pcrfs")


def _listing(d: Path) -> set[str]:
    return set(os.listdir(d)) if d.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir():
    """Pid files and default daemon logs of every mount the tests make (also through the CLI,
    in subprocesses) go to a private directory, removed at the end: the test run leaves
    nothing in /run/pcrfs. The teardown checks that, so a regression shows as an error."""
    before = _listing(SYSTEM_RUNTIME_DIR)
    d = Path(tempfile.mkdtemp(prefix="pcrfs-test-run-"))
    old = os.environ.get("PCRFS_RUNTIME_DIR")
    os.environ["PCRFS_RUNTIME_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("PCRFS_RUNTIME_DIR", None)
    else:
        os.environ["PCRFS_RUNTIME_DIR"] = old
    shutil.rmtree(d, ignore_errors=True)
    left = sorted(_listing(SYSTEM_RUNTIME_DIR) - before)
    assert not left, f"the test run left files in {SYSTEM_RUNTIME_DIR}: {left[:5]}"


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """A small demo dataset (real photographs, ImageFolder layout). Never modify it."""
    dest = tmp_path_factory.mktemp("demo") / "photos"
    make_demo(dest, per_class=12, seed=1)
    return dest


@pytest.fixture(scope="session")
def demo_store(demo_src, tmp_path_factory) -> Path:
    """``demo_src`` converted with small records (so there are several). Read-only by convention."""
    store = tmp_path_factory.mktemp("store") / "demo.pcr"
    convert(demo_src, store, record_bytes=256 * 1024, workers=2)
    return store


@pytest.fixture(scope="session")
def source_store(demo_src, tmp_path_factory) -> Path:
    """``demo_src`` in path order (``--order source``, a format-version-1 store): records of
    consecutive images, for tests of what depends on that layout. Read-only by convention."""
    store = tmp_path_factory.mktemp("store") / "source.pcr"
    convert(demo_src, store, record_bytes=256 * 1024, workers=2, order="source")
    return store


@pytest.fixture(scope="module")
def reader(demo_store):
    """The reader API on ``demo_store`` (what the mount's bytes are compared with)."""
    s = pcrfs.open_store(demo_store)
    yield s
    s.close()


@pytest.fixture
def mounts(tmp_path):
    """Fresh mounts for one test (a cold page cache, counters from zero); every one is
    unmounted and its daemon killed when the test ends, even on failure."""
    m = Mounts(tmp_path / "mounts")
    yield m
    m.cleanup()
