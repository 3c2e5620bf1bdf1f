"""``ImageFolder`` over a store: what torchvision's ImageFolder gives over ``MNT/<view>``, without a mount.

Same ``classes``, ``class_to_idx``, ``samples``, ``targets``, ``imgs``, length and
``ds[i] == (PIL image, target)`` in the same order, for every view (``scanK``,
``full``, ``ssimNN``). Differences, on purpose:

* a sample's path is its path relative to the view (``"n01440764/x.JPEG"``), not
  an absolute path under a mount: there is no mount. ``root`` is the store's location.
* a custom ``loader`` gets a binary file object (``io.BytesIO``, with ``.name`` set to
  the sample's path) instead of a path; ``PIL.Image.open`` takes either.
* the view can change between epochs (:meth:`ImageFolder.set_view`), also in
  persistent ``DataLoader`` workers.

How the view reaches the workers: it is an index into the store's view list, kept
in a 4-byte shared-memory slot (``multiprocessing.RawValue``) that the workers
inherit when they start (fork, spawn or forkserver); every ``__getitem__`` reads it,
so a ``set_view`` between epochs is seen by the next item each worker loads. A
copy made any other way (``pickle.dumps``, ``copy.deepcopy``) keeps the view it had
then, with a slot of its own.

Each process opens its own :class:`~pcrfs.store.read.reader.Store` on first use (a
fork is noticed through :data:`pcrfs.access.forks`), so no file descriptor, lock or
thread pool crosses a fork.

**One download per node, whatever the number of workers.** Where the store is read
as whole record prefixes (remote stores), the stores of all processes reading
through this dataset -- its DataLoader workers, and the process that made it --
keep the prefixes in one cache on this machine's disk
(:class:`~pcrfs.store.sources.sharedcache.SharedDiskCache`), not one each: a record is
fetched by one worker while any other that needs it waits for it and then reads the
file (an ``flock`` per record, released by the kernel if the fetching worker dies),
every group read from it checked against its CRC-32. Its size cap holds for all the
workers together; by default it is the memory cache one store opened with these
``storage_options`` keeps (``cache_bytes``, at least 4x ``readahead_bytes``: the
budget ``RecordShuffleSampler`` sizes its window for), in a private temporary
directory removed when the dataset is; with ``disk_cache`` in ``storage_options``
it is ``disk_cache_bytes`` in ``DISK_CACHE/shared`` (kept for the next run).
``storage_options`` ``shared_cache``/``shared_cache_bytes`` name another directory
and cap; ``shared_cache=False`` (the argument) gives each process a cache of its own,
as before. With a :class:`~pcrfs.sampling.RecordShuffleSampler`,
:meth:`ImageFolder.fetch_ahead` fetches the records its order needs next into that
cache, so decoding overlaps the download (:mod:`pcrfs.access.torch.ahead`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import io
import os
import shutil
import tempfile
import weakref
from multiprocessing import context as mp_context
from multiprocessing.sharedctypes import RawValue
from typing import Any, Callable, Mapping

import numpy as np
import torch.utils.data
from PIL import Image

from ... import access
from .. import find_view, read_options
from ..imagefolder import IMG_EXTENSIONS, imagefolder_order
from ...store.read.reader import ReadOptions, Store, open_store
from ..views import View, ViewTree


def pil_loader(f: Any) -> Image.Image:
    """torchvision's default loader: open with Pillow, convert to RGB."""
    img = Image.open(f)
    return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """A map-style dataset of a store's images at one view, in ``torchvision.datasets.ImageFolder`` order.

    ``store`` is a local path or a URL the CLI takes (``s3://bucket/train.pcr``);
    ``storage_options`` are fsspec-style (``{"endpoint_url": ...}``, see
    :func:`pcrfs.access.read_options`). ``shared_cache``: record prefixes in one cache
    for all processes of this machine that read through this dataset (see the module
    doc); False: one per process. Raises :class:`~pcrfs.store.errors.StoreError`
    for a location that is not a store, an unknown view, a missing bucket or credentials.
    """

    def __init__(self, store: str | os.PathLike, view: str = "scan5", transform: Callable | None = None,
                 target_transform: Callable | None = None, loader: Callable[[Any], Any] | None = None,
                 storage_options: Mapping[str, Any] | None = None, shared_cache: bool = True) -> None:
        self.root = os.fspath(store)
        self.storage_options = dict(storage_options or {})
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader or pil_loader
        self.extensions = IMG_EXTENSIONS
        options = read_options(self.storage_options)
        opened: Store | None = open_store(self.root, options=options)
        try:
            tree = ViewTree(opened)
            find_view(tree.views, view, opened)
            order = imagefolder_order(opened, tree=tree)
            self._options, temporary = _cache_options(options, opened, shared_cache)
        except BaseException:
            opened.close()
            raise
        self.cache_dir = self._options.shared_cache  # the shared cache's directory (None: none)
        self._cleanup = weakref.finalize(self, _remove_tree, self.cache_dir, os.getpid()) if temporary else None
        if self._options != options:  # this process reads through the shared cache too: reopened on use
            opened.close()
            opened = None
        self._store = opened
        if opened is not None:
            opened.note_walk()
        self._forks = access.forks
        # fetch_ahead was asked for: this process and its workers (forked or spawned after it)
        # read in the sampler's order, so their stores fetch a record's prefix on its first read
        self._follows_sampler = False
        self._views: dict[str, View] | None = tree.views
        self._view_names = list(tree.views)
        self.classes: list[str] = order.classes
        self.class_to_idx: dict[str, int] = {c: t for t, c in enumerate(order.classes)}
        self._images = order.images    # int64[n]: store image of sample j
        self._targets = order.targets  # int64[n]: its class
        self._slot = RawValue(ctypes.c_int, self._view_names.index(view))
        self._current: tuple[int, View | None] = (-1, None)
        self._samples: list[tuple[str, int]] | None = None
        self._targets_list: list[int] | None = None

    # ---- the view --------------------------------------------------------------------

    @property
    def view(self) -> str:
        """The view items are read at now."""
        return self._view_names[self._slot.value]

    def set_view(self, view: str) -> None:
        """Read items at ``view`` from now on, here and in this dataset's DataLoader workers
        (persistent ones too). Call it between epochs: items already handed to a worker
        are not re-read."""
        store = self._open()
        find_view(self._views, view, store)
        self._slot.value = self._view_names.index(view)

    # ---- per process -----------------------------------------------------------------

    def _open(self) -> Store:
        """This process's store (opened on first use after a fork or unpickling)."""
        if self._store is None or self._forks != access.forks:
            # A store inherited through fork is left alone (its descriptors and
            # threads belong to the parent); this process gets its own.
            self._store = open_store(self.root, options=self._process_options())
            self._forks = access.forks
            self._store.note_walk()  # a dataset over the whole view: read as an epoch from the start
            if self._follows_sampler:
                self._store.announce()
            self._views = ViewTree(self._store).views
            self._current = (-1, None)
        return self._store

    def _process_options(self) -> ReadOptions:
        """This process's read options: in one of N DataLoader workers sharing the cache, each
        sees 1/N of a record's reads (so 1/N of them tell that an epoch is under way)."""
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1 and self._options.shared_cache:
            return dataclasses.replace(self._options, prefix_readers=info.num_workers)
        return self._options

    def _view_now(self) -> View:
        slot = self._slot.value
        cached_slot, view = self._current
        if slot != cached_slot or view is None:
            view = self._views[self._view_names[slot]]
            self._current = (slot, view)
        return view

    def fetch_ahead(self, sampler: Any, ahead: int | None = None, behind: int | None = None) -> Any:
        """Fetch record prefixes ahead of ``sampler``'s order (a :class:`~pcrfs.sampling.RecordShuffleSampler`
        that a DataLoader over this dataset iterates, in this process) into the shared cache,
        in a thread, so the workers' decoding overlaps the download: see :mod:`pcrfs.access.ahead`.
        Returns the :class:`~pcrfs.access.ahead.FetchAhead` (``close()`` stops it)."""
        from .ahead import dataset_fetch_ahead

        self._follows_sampler = True  # before the loader starts its workers: they inherit it
        if self._store is not None and self._forks == access.forks:
            self._store.announce()
        return dataset_fetch_ahead(self, sampler, ahead, behind)

    # ---- items -----------------------------------------------------------------------

    def read_bytes(self, index: int) -> bytes:
        """Sample ``index``'s file at the current view: a complete JPEG, as the mount serves it."""
        store = self._store
        if store is None or self._forks != access.forks:
            store = self._open()
        view = self._view_now()
        i = int(self._images[index])
        return store.read(i, view.k_of(i))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        data = io.BytesIO(self.read_bytes(index))
        if self.loader is not pil_loader:
            data.name = self._path(index)
        sample = self.loader(data)
        target = int(self._targets[index])
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def __len__(self) -> int:
        return len(self._images)

    def _path(self, index: int) -> str:
        return self._open().path(int(self._images[index]))

    # ---- torchvision's lists (built on first use: nothing per image until asked) -----------

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path relative to the view, class index)`` per sample, as torchvision lists them."""
        if self._samples is None:
            store = self._open()
            self._samples = [(store.path(i), t) for i, t in zip(self._images.tolist(), self._targets.tolist())]
        return self._samples

    @samples.setter
    def samples(self, value: list[tuple[str, int]]) -> None:
        # torchvision users subset a dataset by assigning samples; __getitem__ follows them
        store = self._open()
        self._images = np.array([store.find(p) for p, _ in value], dtype=np.int64)
        self._targets = np.array([t for _, t in value], dtype=np.int64)
        self._samples = list(value)

    @property
    def imgs(self) -> list[tuple[str, int]]:
        return self.samples

    @property
    def targets(self) -> list[int]:
        if self._targets_list is None:
            self._targets_list = self._targets.tolist()
        return self._targets_list

    @targets.setter
    def targets(self, value: list[int]) -> None:
        self._targets_list = list(value)  # as in torchvision: items keep their samples' targets

    # ---- pickling (DataLoader workers) -----------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_store=None, _views=None, _current=(-1, None), _samples=None, _targets_list=None,
                     _cleanup=None)  # the shared cache's directory is removed by the process that made it
        if mp_context.get_spawning_popen() is None:
            # not a worker being started: the shared slot cannot travel; keep its value
            state["_slot"] = self._slot.value
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_slot"], int):
            state["_slot"] = RawValue(ctypes.c_int, state["_slot"])
        self.__dict__.update(state)

    def close(self) -> None:
        """Close this process's store handle (a later item opens it again)."""
        if self._store is not None and self._forks == access.forks:
            self._store.close()
        self._store = None

    def __repr__(self) -> str:
        lines = [f"Dataset {type(self).__name__}", f"    Number of datapoints: {len(self)}",
                 f"    Root location: {self.root}", f"    View: {self.view}"]
        if self.transform is not None:
            lines.append(f"    Transform: {self.transform!r}")
        if self.target_transform is not None:
            lines.append(f"    Target transform: {self.target_transform!r}")
        return "\n".join(lines)


# ---- the shared cache of record prefixes ----------------------------------------------------------

def _cache_options(options: ReadOptions, store: Store, shared: bool) -> tuple[ReadOptions, bool]:
    """The read options of this dataset's stores: ``options`` with a cache of record prefixes
    shared by the processes of this machine (where the store serves prefixes and ``shared``),
    and whether its directory is a temporary one of this dataset's."""
    if not shared or not store.serves_prefixes:
        return dataclasses.replace(options, shared_cache=None), False
    if options.shared_cache and options.shared_cache_bytes > 0:
        return options, False
    # the cache one store opened with these options keeps (readahead raises the memory cache,
    # and the larger cache holds the prefixes): what RecordShuffleSampler sizes its window for
    readahead = options.readahead_for(store.location)
    budget = max(int(options.cache_bytes), 4 * readahead if readahead else 0,
                 int(options.disk_cache_bytes) if options.disk_cache else 0)
    temporary = not (options.shared_cache or options.disk_cache)
    if options.shared_cache:
        directory = options.shared_cache
    elif options.disk_cache:
        directory = os.path.join(options.disk_cache, "shared")
    else:
        directory = tempfile.mkdtemp(prefix="pcrfs-prefixes-")  # 0700, this user's
    return dataclasses.replace(options, shared_cache=directory, shared_cache_bytes=budget), temporary


def _remove_tree(directory: str, pid: int) -> None:
    """Remove the temporary shared cache, in the process that made it only (a forked
    worker that inherits the finalizer leaves it to its parent)."""
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)
