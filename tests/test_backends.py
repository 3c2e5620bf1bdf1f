"""The read path's pieces without a network: coalescing, retries, the bandwidth limit, and
the group fetcher (caches, in-flight sharing, readahead, disk cache, CRC checks)."""
from __future__ import annotations

import errno
import threading
import time

import pytest

import pcrfs
from pcrfs.store.sources.cache import ByteLRU
from pcrfs.store.sources.diskcache import DiskCache
from pcrfs.store.read.readahead import Readahead
from pcrfs.remote.bwlimit import TokenBucket, parse_rate
from pcrfs.remote.retry import RetryPolicy, is_final
from pcrfs.store.sources.backends import LocalRecords, Span, coalesce
from pcrfs.store.errors import CorruptData
from pcrfs.store.read.fetch import GroupFetcher


def test_coalesce_merges_touching_spans_per_record():
    spans = [Span(0, 30, 10), Span(0, 10, 20), Span(1, 40, 5), Span(0, 50, 5), Span(1, 45, 5)]
    assert coalesce(spans) == [Span(0, 10, 30), Span(0, 50, 5), Span(1, 40, 10)]
    assert coalesce([Span(0, 0, 10), Span(0, 5, 2)]) == [Span(0, 0, 10)]  # overlap


def test_retry_policy_retries_transient_errors_only():
    sleeps = []
    policy = RetryPolicy(attempts=4, sleep=sleeps.append)
    calls = iter([OSError(errno.EREMOTEIO, "500"), TimeoutError("slow"), b"ok"])

    def flaky():
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    assert policy.call(flaky) == b"ok" and len(sleeps) == 2 and policy.retried == 2
    assert sleeps[1] > 0 and all(s <= policy.max_delay for s in sleeps)
    for final in (FileNotFoundError("NoSuchBucket"), PermissionError("AccessDenied")):
        n = []
        with pytest.raises(type(final)):
            policy.call(lambda: n.append(1) or (_ for _ in ()).throw(final))
        assert len(n) == 1 and is_final(final)
    with pytest.raises(ConnectionError):
        RetryPolicy(attempts=3, sleep=lambda s: None).call(lambda: (_ for _ in ()).throw(ConnectionError("down")))


def test_token_bucket_holds_the_rate():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(1000, burst=100, clock=lambda: now[0], sleep=sleep)
    bucket.consume(100)  # the burst is free
    assert slept == []
    for _ in range(10):
        bucket.consume(500)
    assert now[0] == pytest.approx(5.0, rel=0.01)  # 5000 bytes at 1000 B/s
    assert parse_rate("10M") == 10 << 20 and parse_rate("512K/s") == 512 << 10
    with pytest.raises(ValueError):
        parse_rate("0")


class CountingSource(LocalRecords):
    """A local source that counts spans and can hold them back or damage them."""

    def __init__(self, *args, delay: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spans: list[Span] = []
        self.delay = delay
        self.damage: set[int] = set()  # offsets whose byte gets flipped

    def _fetch(self, span, into=None):
        self.spans.append(span)
        time.sleep(self.delay)
        data = bytearray(super()._fetch(span))
        for off in self.damage:
            if span.offset <= off < span.end:
                data[off - span.offset] ^= 0xFF
        if into is not None:
            into[:len(data)] = data
            return len(data)
        return bytes(data)


@pytest.fixture
def store(source_store):
    """Records of consecutive images (format version 1): readahead in path order reads runs of them."""
    s = pcrfs.open_store(source_store)
    yield s
    s.close()


def fetcher_for(store, **kwargs) -> tuple[GroupFetcher, CountingSource]:
    delay = kwargs.pop("delay", 0.0)
    src = CountingSource(store.root, store.index.records["size"], delay=delay)
    return GroupFetcher(store.groups, src, large_group_bytes=store.range_group_bytes, **kwargs), src


def test_whole_image_fetches_all_groups_at_once(store):
    f, src = fetcher_for(store, memory=ByteLRU(1 << 20), whole_image=True)
    k = 6
    first = store.ranges(5, k)[:1]
    assert f.read_groups(5, k, first) == [store.read(5, 1)[:-2]]
    assert len(src.spans) == min(k, store.n_groups(5))
    assert b"".join(f.read_groups(5, k, store.ranges(5, k))) == store.read(5, k)[:-2]
    assert len(src.spans) == min(k, store.n_groups(5))  # the rest came from memory


def test_concurrent_readers_share_one_fetch(store):
    f, src = fetcher_for(store, memory=ByteLRU(1 << 20), delay=0.2)
    rngs = store.ranges(9, 3)
    out = []
    threads = [threading.Thread(target=lambda: out.append(f.read_groups(9, 3, rngs))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and all(o == out[0] for o in out)
    assert len(src.spans) == len(rngs)


def test_readahead_fetches_runs_in_one_span_per_group(store):
    f, src = fetcher_for(store, memory=ByteLRU(64 << 20), readahead=Readahead(initial=4, maximum=64),
                         readahead_bytes=16 << 20)
    k, n = 4, store.num_images
    for i in range(n):
        assert b"".join(f.read_groups(i, k, store.ranges(i, k))) == store.read(i, k)[:-2]
    f.close()
    assert sum(s.length for s in src.spans) == sum(store.size(i, k) - 2 for i in range(n))  # each byte once
    records = len(store.index.records)
    assert len(src.spans) < 2 * records * k + 3 * k  # ~ one span per (record, group), not one per image
    assert f.stats()["readahead"]["windows"] >= 1


def test_a_damaged_group_fails_alone(store):
    f, src = fetcher_for(store, memory=ByteLRU(1 << 20), whole_image=True)
    bad = store.ranges(12, 5)[2]
    src.damage.add(bad.offset + 1)
    with pytest.raises(CorruptData, match="scan group 3"):
        f.read_groups(12, 5, store.ranges(12, 5))
    assert f.read_groups(12, 5, store.ranges(12, 5)[:2]) == [store.read(12, 1)[:-2],
                                                             store.read(12, 2)[len(store.read(12, 1)) - 2:-2]]


def test_disk_cache_round_trip_and_damage(store, tmp_path):
    disk = DiskCache(tmp_path, 1 << 20)
    f, src = fetcher_for(store, memory=ByteLRU(1 << 20), disk=disk, whole_image=True)
    want = store.read(20, 5)[:-2]
    assert b"".join(f.read_groups(20, 5, store.ranges(20, 5))) == want
    assert disk.size("20") == len(want)
    g, src2 = fetcher_for(store, memory=ByteLRU(1 << 20), disk=disk, whole_image=True)  # a new mount
    assert b"".join(g.read_groups(20, 3, store.ranges(20, 3))) == store.read(20, 3)[:-2]
    assert src2.spans == []
    path = tmp_path / DiskCache._shard("20") / "20"
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))
    h, src3 = fetcher_for(store, memory=ByteLRU(1 << 20), disk=disk, whole_image=True)
    assert b"".join(h.read_groups(20, 5, store.ranges(20, 5))) == want  # refetched, never the damaged bytes
    assert src3.spans
