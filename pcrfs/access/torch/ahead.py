"""``ImageFolder.fetch_ahead(sampler)``: record prefixes fetched ahead of a sampler into the
dataset's shared cache (:mod:`pcrfs.store.sources.sharedcache`), where the DataLoader workers find
them -- or wait for the fetch in flight: one flight per record across the processes.

The planning (which records, how many, when) is :class:`pcrfs.access.ahead.FetchAhead`'s; this
module gives it the dataset's records, views and store. It needs the shared cache (a
remote store, ``shared_cache=True``); otherwise it does nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..ahead import FetchAhead, sampler_position  # noqa: F401 - sampler_position: re-exported
from ...store.read.prefixpolicy import group_bounds


def dataset_fetch_ahead(dataset: Any, sampler: Any, ahead: int | None = None,
                        behind: int | None = None) -> FetchAhead:
    """A :class:`~pcrfs.access.ahead.FetchAhead` of ``sampler``'s order into ``dataset``'s shared cache."""
    store = dataset._open()
    capacity = int(dataset._options.shared_cache_bytes) if dataset._options.shared_cache else 0
    index = store.index
    record_of = index.records_of(np.asarray(dataset._images))  # dataset index -> record
    bounds = group_bounds(index.record_group_offsets, index.records["size"])

    def record_ks() -> tuple[str, np.ndarray]:
        """Each record's prefix at the dataset's view now: the largest k its images are read at."""
        view = dataset._view_now()
        if view.ks is None:
            return dataset.view, np.full(len(bounds), min(max(int(view.k), 1), store.num_groups), dtype=np.int64)
        ks = np.zeros(len(bounds), dtype=np.int64)
        images = np.arange(store.num_images)
        np.maximum.at(ks, index.records_of(images), np.asarray(view.ks, dtype=np.int64)[images])
        return dataset.view, np.clip(ks, 0, store.num_groups)

    return FetchAhead(sampler, record_of, bounds, record_ks, capacity if store.serves_prefixes else 0,
                      store.fetch_prefix_ahead, ahead, behind)
