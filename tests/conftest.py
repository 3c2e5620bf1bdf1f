"""Shared fixtures: the demo photos converted once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/corpus.py helpers

from pcrfs.convert import convert  # noqa: E402
from pcrfs.demo import make_demo  # noqa: E402


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
