"""The capabilities callers ask instead of a store's kind (issue 28): each answered by the
location (pcrfs.store.sources.location), the sink (pcrfs.store.write.sink) or the record source
(pcrfs.store.sources.backends), with the answers the kind checks they replace used to give."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pcrfs.convert import target as target_mod
from pcrfs.fuse.mounting import store_location
from pcrfs.quality.build import RESUME_DIR, resume_dir
from pcrfs.store import format as fmt
from pcrfs.store.sources.backends import FsspecRecords, LocalRecords
from pcrfs.store.sources.location import (LocalLocation, RemoteLocation, absolute_location, canonical_location,
                                  image_tree_example, join_location, local_directory, local_work_dir,
                                  names_a_store, open_location)
from pcrfs.store.write.sink import LocalSink, ObjectSink, open_sink, staging_path

URL = "memory://bucket/some/store"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pcrfs"


def test_workers_reopen_a_local_store_but_not_one_at_a_url(tmp_path, cache):
    assert open_location(tmp_path).workers_can_reopen()
    assert open_location(f"file://{tmp_path}").workers_can_reopen()
    remote = open_location(URL)
    assert isinstance(remote, RemoteLocation) and not remote.workers_can_reopen()


def test_only_local_record_files_offer_descriptors(tmp_path):
    local = LocalRecords(tmp_path, np.zeros(0, dtype=np.int64))
    remote = FsspecRecords(object(), "bucket/store", URL)
    try:
        assert local.offers_descriptors() and not remote.offers_descriptors()
    finally:
        local.close()
        remote.close()


def test_a_writer_stages_only_for_a_store_at_a_url(tmp_path, cache):
    assert LocalSink(tmp_path).staging_dir() is None
    assert LocalSink(tmp_path).staging_dir(tmp_path / "elsewhere") is None
    sink = open_sink(URL + "/")
    assert isinstance(sink, ObjectSink)
    assert sink.staging_dir(tmp_path / "c") == staging_path(URL, tmp_path / "c")
    assert sink.staging_dir() == staging_path(URL) and staging_path(URL).parent == cache / "staging"
    assert target_mod.staging_path is staging_path  # still importable from where it was


@pytest.mark.parametrize("store", ["out", Path("out")])
def test_the_conversion_target_works_in_a_local_store_itself(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from pcrfs.remote.fs import RemoteOptions

    t = target_mod.StoreTarget.for_store(store, RemoteOptions(), tmp_path / "staging")
    assert (t.location, t.work_dir, t.staged) == ("out", Path("out"), False)
    assert isinstance(t.sink, LocalSink) and t.sink.root == Path("out")


def test_the_conversion_target_stages_a_store_at_a_url(tmp_path):
    from pcrfs.remote.fs import RemoteOptions

    t = target_mod.StoreTarget.for_store(URL + "/", RemoteOptions(), tmp_path / "staging")
    assert (t.location, t.work_dir, t.staged) == (URL, staging_path(URL, tmp_path / "staging"), True)
    assert isinstance(t.sink, ObjectSink)


def test_what_names_a_store(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / fmt.MANIFEST).write_text("x")
    assert names_a_store(URL) and names_a_store("s3://b/p")
    assert names_a_store(tmp_path / "store") and names_a_store(str(tmp_path / "store"))
    assert not names_a_store(tmp_path / "tree") and not names_a_store(tmp_path / "missing")


def test_local_directory_is_the_path_as_given_and_none_for_a_url():
    assert local_directory("a/b/") == Path("a/b") and local_directory(Path("/x")) == Path("/x")
    assert local_directory(URL) is None and local_directory("S3://b/p") is None
    assert local_directory("file:///x") == Path("file:///x")  # as the writer has always taken it


def test_an_image_tree_where_a_store_was_expected(tmp_path):
    tree = tmp_path / "tree"
    (tree / "cls").mkdir(parents=True)
    (tree / "cls" / "a.jpg").write_bytes(b"")
    assert image_tree_example(tree) == os.path.join("cls", "a.jpg")
    (tree / fmt.MANIFEST).write_text("x")
    assert image_tree_example(tree) is None          # a store, whatever else it holds
    assert image_tree_example(tmp_path / "missing") is None
    assert image_tree_example(URL) is None
    assert image_tree_example("") is None            # not the working directory


def test_locations_named_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_location("out") == str(tmp_path / "out")
    assert absolute_location(URL + "/") == URL + "/"      # convert --dask passes a URL on as given
    assert canonical_location(URL + "/") == URL          # a mount is recorded without the slash
    assert canonical_location("out", lambda p: "/abs/" + p) == "/abs/out"
    assert store_location(URL + "//") == URL
    assert store_location("out") == os.path.join(os.path.realpath(tmp_path), "out")


def test_a_file_of_a_store_as_a_user_finds_it():
    assert join_location(URL + "/", fmt.REPORT) == f"{URL}/report.json"
    assert join_location("out/", fmt.REPORT) == str(Path("out") / "report.json")
    assert join_location(Path("/s"), fmt.REPORT) == "/s/report.json"
    assert join_location("/s", fmt.REPORT) == LocalLocation("/s").describe(fmt.REPORT)


def test_the_quality_resume_directory_is_where_earlier_runs_left_their_parts(tmp_path, cache):
    assert resume_dir(str(tmp_path)) == tmp_path / RESUME_DIR
    key = hashlib.sha256(URL.encode()).hexdigest()[:16]  # the digest earlier versions used
    assert resume_dir(URL + "/") == resume_dir(URL) == cache / "adaptive" / key
    assert local_work_dir(URL, "x", "elsewhere") == cache / "elsewhere" / key
