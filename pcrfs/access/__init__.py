"""Opening a store and choosing a view for the doors without FUSE.

The dataset (:mod:`pcrfs.torch`) and the fsspec filesystem (:mod:`pcrfs.filesystem`)
both take a store location plus fsspec-style options and a view name, and must
fail the same way the CLI does: one :class:`~pcrfs.store.errors.StoreError`
whose message names what is wrong (not a store, unknown view, missing bucket,
no credentials), never a traceback from deep inside s3fs as the only clue.
"""
from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Any, Mapping

from ..remote.fs import RemoteOptions
from ..store.format.adaptiveindex import AdaptiveIndexError, load as load_adaptive_index
from ..store.errors import StoreError
from ..store.read.reader import ReadOptions, Store, open_store
from .views import View, ViewTree

_REMOTE_KEYS = {f.name for f in fields(RemoteOptions)}
_READ_KEYS = {f.name for f in fields(ReadOptions)} - {"remote"}
# s3fs options that pcrfs takes from the AWS environment instead (one place for credentials)
_CREDENTIAL_KEYS = {"key", "secret", "token", "anon", "profile", "username", "password"}
_SCAN = re.compile(r"^scan(\d+)$")

# Bumped in every forked child: an object that opened a store notes the value, and a
# different one means its store (descriptors, threads, locks) belongs to the parent.
# Cheaper per read than comparing os.getpid(), a system call.
forks = 0


def _forked() -> None:
    global forks
    forks += 1


os.register_at_fork(after_in_child=_forked)


def read_options(storage_options: Mapping[str, Any] | None) -> ReadOptions:
    """:class:`ReadOptions` from fsspec-style options.

    Takes ``endpoint_url`` (also inside ``client_kwargs``, as s3fs spells it), the
    other :class:`RemoteOptions` fields (``attempts``, ``concurrency``, timeouts) and
    the :class:`ReadOptions` fields (``cache_bytes``, ``disk_cache``, ``readahead_bytes``,
    ``bwlimit`` ...). Credentials come from the usual AWS environment, as for the mount.
    """
    opts = dict(storage_options or {})
    client = opts.pop("client_kwargs", None) or {}
    if "endpoint_url" in client and "endpoint_url" not in opts:
        opts["endpoint_url"] = client["endpoint_url"]
    remote, read = {}, {}
    for key, value in opts.items():
        if key in _REMOTE_KEYS:
            remote[key] = value
        elif key in _READ_KEYS:
            read[key] = value
        elif key in _CREDENTIAL_KEYS:
            raise StoreError(f"storage option {key!r} is not taken: pcrfs reads credentials from the AWS "
                             "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws)")
        else:
            known = ", ".join(sorted(_REMOTE_KEYS | _READ_KEYS | {"client_kwargs"}))
            raise StoreError(f"unknown storage option {key!r} (known: {known})")
    return ReadOptions(remote=RemoteOptions(**remote), **read)


def open_with_options(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store at ``location`` (a path or URL) opened with fsspec-style options."""
    return open_store(location, options=read_options(storage_options))


def view_names(store: Store) -> list[str]:
    """The store's views in the mount's order: scan1..scanN, full, then any ssimNN."""
    return list(ViewTree(store).views)


def find_view(views: Mapping[str, View], name: str, store: Store) -> View:
    """The view called ``name``; StoreError naming the views there are if it is not one."""
    view = views.get(name)
    if view is not None:
        return view
    n = store.num_groups
    m = _SCAN.match(str(name))
    if m and int(m.group(1)) > n:
        raise StoreError(f"view {name!r} asks for {m.group(1)} scan groups but {store.url} has {n} "
                         f"(views scan1..scan{n} and full)")
    why = ""
    if str(name).startswith("ssim"):
        why = _adaptive_problem(store)
    raise StoreError(f"{store.url} has no view {name!r}{why} (views: {', '.join(views)})")


def _adaptive_problem(store: Store) -> str:
    """Why a store shows no adaptive views, as a clause for a message."""
    try:
        index = load_adaptive_index(store)
    except AdaptiveIndexError as e:
        return f": its adaptive index is unusable ({e})"
    if index is None:
        return ": it has no adaptive index (`pcrfs quality STORE --write-index` makes one)"
    return ""
