"""The mfusepy internals pcrfs uses (pcrfs/fuse/mfuse_compat.py) are checked when a mount starts."""
from __future__ import annotations

import logging

import pytest

try:
    from pcrfs.fuse import mfuse_compat
except (ImportError, OSError) as e:  # no libfuse here
    pytest.skip(f"mfusepy unavailable: {e}", allow_module_level=True)


def test_the_installed_mfusepy_has_everything():
    assert mfuse_compat.problems() == []
    mfuse_compat.check()


def test_a_changed_internal_stops_the_mount_naming_it(monkeypatch):
    def getattr_fuse_3(self, path, buf):  # a parameter gone
        return 0

    monkeypatch.setattr(mfuse_compat.mf.FUSE, "getattr_fuse_3", getattr_fuse_3)
    monkeypatch.delattr(mfuse_compat.mf, "fuse_main_real")
    with pytest.raises(RuntimeError) as e:
        mfuse_compat.check()
    assert "FUSE.getattr_fuse_3('self', 'path', 'buf')" in str(e.value)
    assert "fuse_main_real is gone" in str(e.value) and "mfusepy>=3.1.1,<3.2" in str(e.value)


@pytest.mark.parametrize("version", ["3.2.0", "3.1.0", "4.0"])
def test_an_unpinned_version_is_served_with_a_warning(monkeypatch, caplog, version):
    monkeypatch.setattr(mfuse_compat, "version", lambda: version)
    with caplog.at_level(logging.WARNING, logger="pcrfs.fuse"):
        mfuse_compat.check()
    assert f"mfusepy {version}" in caplog.text


def test_the_pinned_range_is_pyprojects():
    from pathlib import Path
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"mfusepy>=3.1.1,<3.2"' in text and mfuse_compat.SUPPORTED == ((3, 1, 1), (3, 2))
