"""Soak: many readers over every view for a bounded time, every byte checked.

Reader threads in the test process and loader processes (as a DataLoader's workers
are) read random files of random views -- whole files, random chunks, O_DIRECT and
page-cache-dropping reads so that the requests reach the daemon, and listings with
sizes -- and compare every byte with the reader API. Meanwhile the daemon's resident
memory is sampled; it must not grow once the caches are warm. A few seconds in the
default run, two minutes under ``-m slow``.
"""
from __future__ import annotations

import json
import statistics
import threading
from pathlib import Path

import psutil
import pytest

from mountutil import fuse_unavailable
from pcrfs.fuse import mounting
from pcrfs.store.read.reader import open_store
from reliability import Load, budget, figures, read_all_files  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

RSS_SLACK = 24 << 20  # allocator noise of 16 FUSE threads; a leak per request outgrows it in a minute


class RssSampler:
    """The daemon's resident memory every ``every`` seconds, in a background thread."""

    def __init__(self, pid: int, every: float) -> None:
        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


@budget(fast=4.0, slow=120.0)
def test_soak_threads_and_processes_over_all_views(demo_store, mounts, figures, budget):
    seconds = budget
    with open_store(demo_store) as intact:
        info = mounts.mount(demo_store, "soak", cache_size="2M")  # small: the cache evicts all the time
        mnt = Path(info.mountpoint)
        warm = read_all_files(mnt, intact)  # every record opened, every listing built, caches full
        assert warm["wrong"] == [] and not warm["eio"] and not warm["other_errors"]
        sampler = RssSampler(info.pid, every=max(0.1, seconds / 100))
        load = Load(mnt, demo_store, seconds=seconds, threads=4, processes=3, seed=int(seconds))
        counts = load.finish(timeout=seconds + 60)
        rss = sampler.stop()
        stats = json.loads((mnt / ".pcrfs" / "stats").read_bytes())
        after = read_all_files(mnt, intact)
    served = sum(v["bytes_served"] for v in stats["views"].values())
    fifth = max(1, len(rss) // 5)
    early, late = statistics.median(rss[:fifth]), statistics.median(rss[-fifth:])
    figures.add("soak", reader_seconds=round(counts["seconds"], 1), reads=counts["reads"],
                listings=counts["listings"], gb_read=round(counts["bytes"] / 1e9, 3),
                gb_served_by_daemon=round(served / 1e9, 3), gb_read_from_store=round(stats["store_reads"]["bytes"] / 1e9, 3),
                bytes_wrong=counts["wrong_bytes"], errors=sum(counts["errors"].values()) + stats["errors"]["eio"],
                max_daemon_rss_mib=round(max(rss) / 2**20, 1),
                max_daemon_rss_growth_mib=round((late - early) / 2**20, 1))
    assert counts["wrong_reads"] == 0 and counts["wrong_bytes"] == 0, counts["wrong_samples"]
    assert counts["errors"] == {} and stats["errors"]["eio"] == 0
    assert after["wrong"] == [] and not after["eio"] and not after["other_errors"]
    assert counts["reads"] > 100 * seconds  # the readers really worked
    assert served >= counts["bytes"] // 4  # a good part went through the daemon, not just the page cache
    assert mounting.daemon_alive(info.pid)
    assert late - early <= RSS_SLACK, f"daemon RSS grew from {early / 2**20:.0f} to {late / 2**20:.0f} MiB"
