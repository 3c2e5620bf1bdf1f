"""Record sources: byte ranges of a store's record files, wherever they live.

A :class:`RecordSource` answers "these (record, offset, length) spans" and counts
requests and bytes for the mount's stats. :class:`LocalRecords` reads local
files with ``pread``; :class:`FsspecRecords` issues one ranged GET per span to an
object store, many at once, with retries; :class:`ObstoreRecords` does the same
for ``s3://`` with obstore (Rust ``object_store``), which costs the client ~10x
less CPU per request and ~3x less per MB than s3fs (``tools/bench_s3_client.py``),
and is used for ``s3://`` when obstore is installed (:func:`remote_records`). All honour an optional bandwidth
limit. Which spans to ask for (coalescing, readahead, caching) is decided above
this layer, in :mod:`pcrfs.store.read.fetch`.

A remote source's every call ends within the read's deadline (:mod:`pcrfs.remote.deadline`;
``RemoteOptions.read_deadline``): the one of the read in progress on the calling thread,
else one of its own. Its requests run in its pool, the caller waits for them no longer
than that (:class:`~pcrfs.store.errors.ReadTimedOut`, EIO, past it), and their retries
stop when the deadline is too close for another try.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, NamedTuple, Sequence

import numpy as np

from ...remote.bwlimit import TokenBucket
from ...remote.deadline import Deadline, DeadlineExceeded, Interrupted, in_worker, scope
from ...remote.fs import RemoteOptions, explain
from ...remote.retry import RetryPolicy
from .. import format as fmt
from ..errors import CorruptData, ReadTimedOut, StoreUnavailable
from ..format.files import open_regular

log = logging.getLogger("pcrfs.store")

# Bytes per piece of a streamed GET (ObstoreRecords.read_into). Measured through a 4 MB/s
# link: streaming a record prefix into place costs the client ~25% less CPU than
# collecting each part whole and joining them (64 KiB..1 MiB pieces alike).
STREAM_CHUNK = 256 << 10


class Span(NamedTuple):
    record: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(spans: Sequence[Span]) -> list[Span]:
    """Merge spans that touch or overlap (same record) into single spans, sorted."""
    out: list[Span] = []
    for s in sorted(spans):
        if out and out[-1].record == s.record and s.offset <= out[-1].end:
            last = out[-1]
            out[-1] = Span(last.record, last.offset, max(last.end, s.end) - last.offset)
        else:
            out.append(s)
    return out


class RecordSource(ABC):
    """Reads spans of record files; thread-safe; counts what it fetched."""

    read_deadline: float | None = None  # seconds a read may take (remote sources); None: no deadline

    def __init__(self, bwlimit: TokenBucket | None = None) -> None:
        self.bwlimit = bwlimit
        self._counter_lock = threading.Lock()
        self.requests = 0   # counters for the mount's stats file
        self.bytes_read = 0

    @abstractmethod
    def _fetch(self, span: Span, into: memoryview | None = None) -> Any:
        """The bytes of one span (may be short if the record is); with ``into``, they are
        written there instead and their number returned (see :meth:`read_into`)."""

    @abstractmethod
    def read_record(self, record: int) -> bytes:
        """A whole record file, as verification reads it (counted like any read)."""

    def describe(self, record: int) -> str:
        """Where record ``record`` lives, for messages."""
        return fmt.record_name(record)

    def offers_descriptors(self) -> bool:
        """True if ``dup_descriptor(record)`` gives an OS descriptor of the record's file that
        its caller may ``pread`` (the mount's compiled read path): local record files only."""
        return False

    def deadline(self) -> ContextManager[Deadline]:
        """The deadline of the read in progress on this thread, or, outside one, a new one
        of ``read_deadline`` seconds for the ``with`` block (what every layer of a read opens)."""
        return scope(self.read_deadline, ReadTimedOut)

    def read(self, record: int, offset: int, length: int) -> bytes:
        return self._read_one(Span(record, offset, length))

    def read_into(self, record: int, offset: int, length: int, out: memoryview) -> None:
        """Like :meth:`read`, into ``out`` (``length`` bytes): for spans of megabytes (record
        prefixes), which a source that can (obstore) streams there as they arrive, with no
        copy of the whole in the client and none to join the parts."""
        self._read_one(Span(record, offset, length), into=out)

    def read_in_record(self, record: int, offsets: list[int], lengths: list[int]) -> list[bytes]:
        """Several ranges of one record (a whole image's groups), in order."""
        return [self.read(record, o, n) for o, n in zip(offsets, lengths)]

    def read_spans(self, spans: Sequence[Span]) -> list[bytes]:
        """The bytes of every span, in order (sources that can, fetch them concurrently)."""
        return [self._read_one(s) for s in spans]

    def _read_one(self, span: Span, into: memoryview | None = None) -> Any:
        data = self._fetch(span, into) if into is not None else self._fetch(span)
        got = data if into is not None else len(data)
        self._account(got)
        if got != span.length:
            raise CorruptData(f"record {span.record}: short read at {span.offset} "
                              f"({got} of {span.length} bytes; {self.describe(span.record)} is truncated)")
        return data

    def _account(self, nbytes: int) -> None:
        with self._counter_lock:
            self.requests += 1
            self.bytes_read += nbytes
        if self.bwlimit is not None:
            self.bwlimit.consume(nbytes)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "bytes": self.bytes_read}
        if self.bwlimit is not None:
            out["bwlimit_bytes_per_s"] = int(self.bwlimit.rate)
            out["bwlimit_waited_s"] = round(self.bwlimit.waited, 3)
        return out

    def close(self) -> None:
        pass


class _Handle:
    """An open record file; closed once evicted from the table and no read still uses it."""
    __slots__ = ("fd", "users", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd, self.users, self.evicted = fd, 1, False


def default_max_open() -> int:
    """How many record files a local store keeps open: a quarter of the soft open-file
    limit (the rest is for FUSE, the kernel's requests, caches and the caller), 16 to 4096."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft // 4))


# Linux returns at most this from one read (0x7ffff000, MAX_RW_COUNT): a larger span (a scan
# group of 2 GiB or more) takes several, or it would look truncated
_MAX_RW = 0x7FFFF000


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    if length <= _MAX_RW:
        return os.pread(fd, length, offset)
    buf = bytearray(length)
    got = _preadv_full(fd, memoryview(buf), offset)
    del buf[got:]
    return bytes(buf) if got < length else buf


def _preadv_full(fd: int, into: memoryview, offset: int) -> int:
    """Fill ``into`` from ``offset``; the bytes read (fewer only at the end of the file)."""
    got = 0
    while got < len(into):
        n = os.preadv(fd, [into[got:got + _MAX_RW]], offset + got)
        if n <= 0:
            break
        got += n
    return got


class LocalRecords(RecordSource):
    """Positional reads from local record files.

    Descriptors are kept in an LRU table bounded by ``max_open`` (a store may have more
    records than the process may open files: ImageNet at 64 MiB records is ~2,200). Each
    record file is opened as a regular file only (no symlink, FIFO or device; see
    :mod:`pcrfs.store.format.files`) and its size and 16-byte header are checked against the
    index every time it is opened, before any byte of it is served. No lock is held
    while a file is opened; a descriptor evicted while a read uses it is closed by the
    last user, so a number is never reused under a running ``pread``.
    """

    def __init__(self, root: Path, record_sizes: np.ndarray, bwlimit: TokenBucket | None = None,
                 max_open: int | None = None) -> None:
        super().__init__(bwlimit)
        self.root = Path(root)
        self._sizes = record_sizes
        self.max_open = max(1, max_open if max_open is not None else default_max_open())
        self._fds: OrderedDict[int, _Handle] = OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0  # record files opened (reopens after eviction included)

    def describe(self, record: int) -> str:
        return str(self.root / fmt.record_name(record))

    def _open_checked(self, record: int) -> int:
        """A descriptor of record ``record``, checked: regular file, size and header as the index says."""
        path = self.root / fmt.record_name(record)
        try:
            fd, size = open_regular(path)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE) and self._close_idle():
                return self._open_checked(record)
            raise CorruptData(f"record file {path} is unreadable (cannot be opened: {e.strerror})") from None
        try:
            want = int(self._sizes[record])
            if size != want:
                raise CorruptData(f"record file {path} is {size} bytes, index says {want}")
            if os.pread(fd, fmt.RECORD_HEADER_SIZE, 0) != fmt.record_header(record):
                raise CorruptData(f"record file {path} has a damaged header (not record {record} of a PCR store)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _acquire(self, record: int) -> _Handle:
        with self._lock:
            h = self._fds.get(record)
            if h is not None:
                self._fds.move_to_end(record)
                h.users += 1
                return h
        fd = self._open_checked(record)  # outside the lock: an open must never stall other reads
        with self._lock:
            self.opens += 1
            h = self._fds.get(record)
            if h is not None:  # another reader opened it meanwhile
                os.close(fd)
                self._fds.move_to_end(record)
                h.users += 1
                return h
            h = self._fds[record] = _Handle(fd)
            while len(self._fds) > self.max_open:
                _, old = self._fds.popitem(last=False)
                old.evicted = True
                if not old.users:
                    os.close(old.fd)
            return h

    def _release(self, h: _Handle) -> None:
        with self._lock:
            h.users -= 1
            if h.evicted and not h.users:
                os.close(h.fd)

    def _close_idle(self) -> bool:
        """Close every descriptor no read is using (the process ran out of them); True if any was."""
        with self._lock:
            idle = [r for r, h in self._fds.items() if not h.users]
            for r in idle:
                os.close(self._fds.pop(r).fd)
        return bool(idle)

    @contextmanager
    def descriptor(self, record: int) -> Iterator[int]:
        """A checked descriptor of record ``record`` for the ``with`` block (for a caller that
        does its own positional reads); it stays open at least until the block ends."""
        h = self._acquire(record)
        try:
            yield h.fd
        finally:
            self._release(h)

    def open_count(self) -> int:
        with self._lock:
            return len(self._fds)

    def _fetch(self, span: Span, into: memoryview | None = None) -> Any:
        with self.descriptor(span.record) as fd:
            if into is not None:
                return _preadv_full(fd, into[:span.length], span.offset)
            return _pread_full(fd, span.length, span.offset)

    def offers_descriptors(self) -> bool:
        return True

    def dup_descriptor(self, record: int) -> int:
        """A duplicate of record ``record``'s descriptor, opened and checked like every
        other; the caller owns it (the mount's compiled read path, pcrfs.fuse.fastpath)."""
        with self.descriptor(record) as fd:
            return os.dup(fd)

    def read_in_record(self, record: int, offsets: list[int], lengths: list[int]) -> list[bytes]:
        # the hot path of every whole-file read through the mount: one descriptor
        # lookup and one counter update for all of an image's groups
        h, pread = self._acquire(record), _pread_full
        try:
            fd = h.fd
            out = [pread(fd, n, o) for o, n in zip(offsets, lengths)]
        finally:
            self._release(h)
        got = 0
        for data, o, n in zip(out, offsets, lengths):
            if len(data) != n:
                raise CorruptData(f"record {record}: short read at {o} ({len(data)} of {n} bytes; "
                                  f"{self.describe(record)} is truncated)")
            got += n
        with self._counter_lock:
            self.requests += len(out)
            self.bytes_read += got
        if self.bwlimit is not None:
            self.bwlimit.consume(got)
        return out

    def read_record(self, record: int) -> bytes:
        """A whole record file (checked as for any read; its size is the index's, so bounded by it)."""
        return self.read(record, 0, int(self._sizes[record]))

    def close(self) -> None:
        with self._lock:
            for h in self._fds.values():
                h.evicted = True
                if not h.users:
                    os.close(h.fd)
            self._fds.clear()




class _RemoteRecords(RecordSource):
    """What every object-store source shares: many GETs at once, retries, whole-record reads.
    A subclass issues one GET (``_get``) and says how a span becomes one (``_fetch``)."""

    client = "s3fs"  # for the mount's stats

    def __init__(self, url: str, options: RemoteOptions, bwlimit: TokenBucket | None,
                 retry: RetryPolicy | None) -> None:
        super().__init__(bwlimit)
        self.url = url.rstrip("/")
        self.options = options
        self.read_deadline = options.read_deadline or None
        self.retry = retry or RetryPolicy(attempts=options.attempts)
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="pcrfs-get")

    def describe(self, record: int) -> str:
        return f"{self.url}/{fmt.record_name(record)}"

    @abstractmethod
    def _get(self, record: int, what: str) -> bytes:
        """The whole object of record ``record`` (``what`` names the request in errors)."""

    # Every public read runs its requests in the pool and waits for them until the read's
    # deadline -- except on a thread that is itself such work (a record prefix's part:
    # its reader already waits for it with the deadline), where they run in place.

    def _bounded(self, calls: Sequence[tuple[Callable[..., Any], tuple]], what: str) -> list[Any]:
        with self.deadline() as d:
            if in_worker():
                return [fn(*args) for fn, args in calls]
            return d.wait_all([self._pool.submit(d.run, fn, *args) for fn, args in calls], what)

    def _what(self, record: int, offset: int | None = None, length: int | None = None) -> str:
        where = f" [{offset}, {offset + length})" if offset is not None and length is not None else ""
        return f"GET {self.describe(record)}{where}"

    def read(self, record: int, offset: int, length: int) -> bytes:
        return self._bounded([(self._read_one, (Span(record, offset, length),))], self._what(record, offset, length))[0]

    def read_into(self, record: int, offset: int, length: int, out: memoryview) -> None:
        self._bounded([(self._read_one, (Span(record, offset, length), out))], self._what(record, offset, length))

    def read_in_record(self, record: int, offsets: list[int], lengths: list[int]) -> list[bytes]:
        return self.read_spans([Span(record, o, n) for o, n in zip(offsets, lengths)])

    def read_spans(self, spans: Sequence[Span]) -> list[bytes]:
        if not spans:
            return []
        what = self._what(spans[0].record, spans[0].offset, spans[0].length)
        if len(spans) > 1:
            what += f" and {len(spans) - 1} more ranges"
        return self._bounded([(self._read_one, (s,)) for s in spans], what)

    def read_record(self, record: int) -> bytes:
        """A whole record object (for verification) in one GET."""
        return self._bounded([(self._read_record, (record,))], self._what(record))[0]

    def _read_record(self, record: int) -> bytes:
        data = self._get(record, self._what(record))
        self._account(len(data))
        return data

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["retries"] = self.retry.retried
        out["client"] = self.client
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class FsspecRecords(_RemoteRecords):
    """Ranged GETs against an fsspec filesystem (s3fs for ``s3://``), concurrently, with retries."""

    def __init__(self, fs: Any, base: str, url: str, options: RemoteOptions = RemoteOptions(),
                 bwlimit: TokenBucket | None = None, retry: RetryPolicy | None = None) -> None:
        super().__init__(url, options, bwlimit, retry)
        self.fs = fs
        self.base = base.rstrip("/")
        self.client = type(fs).__module__.split(".")[0]  # s3fs, gcsfs, fsspec ...

    def _get(self, record: int, what: str, **range_kwargs: int) -> bytes:
        path = f"{self.base}/{fmt.record_name(record)}"
        try:
            return self.retry.call(lambda: self.fs.cat_file(path, **range_kwargs), what=what)
        except (DeadlineExceeded, Interrupted):
            raise
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise StoreUnavailable(explain(e, self.url, self.options)) from None
            raise CorruptData(f"record file {self.describe(record)} is missing") from None
        except Exception as e:  # noqa: BLE001 - every other failure is "unavailable", with its reason
            raise StoreUnavailable(explain(e, self.describe(record), self.options)) from None

    def _fetch(self, span: Span, into: memoryview | None = None) -> Any:
        data = self._get(span.record, f"GET {self.describe(span.record)} [{span.offset}, {span.end})",
                         start=span.offset, end=span.end)
        if into is None:
            return data
        n = min(len(data), len(into))
        into[:n] = data[:n]
        return len(data)



class _BotocoreCredentials:
    """obstore credentials from botocore's chain (environment, profiles, files, instance
    roles ...), so ``s3://`` stores authenticate exactly as they do through s3fs."""

    def __init__(self, session: Any) -> None:
        credentials = session.get_credentials()
        if credentials is None:
            raise ValueError("no credentials")
        self._credentials = credentials

    def __call__(self) -> dict[str, Any]:
        import datetime

        frozen = self._credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=15)}


class ObstoreRecords(_RemoteRecords):
    """Ranged GETs to S3 with obstore, concurrently, with pcrfs's retries (obstore's own are off)."""

    client = "obstore"

    def __init__(self, bucket: str, prefix: str, url: str, options: RemoteOptions = RemoteOptions(),
                 bwlimit: TokenBucket | None = None, retry: RetryPolicy | None = None) -> None:
        import botocore.session
        from obstore.store import S3Store

        super().__init__(url, options, bwlimit, retry)
        self.prefix = prefix.strip("/")
        session = botocore.session.Session()
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config: dict[str, Any] = {"region": session.get_config_variable("region") or "us-east-1"}
        if endpoint:
            config.update(endpoint=endpoint, virtual_hosted_style_request=False)
        connect_timeout, timeout = options.timeouts()  # each at most the read deadline
        client = {"allow_http": bool(endpoint and endpoint.startswith("http://")),
                  "connect_timeout": f"{connect_timeout}s", "timeout": f"{timeout}s",
                  "pool_max_idle_per_host": str(max(10, options.concurrency))}
        self._store = S3Store(bucket, config=config, client_options=client, retry_config={"max_retries": 0},
                              credential_provider=_BotocoreCredentials(session))

    def _key(self, record: int) -> str:
        return f"{self.prefix}/{fmt.record_name(record)}" if self.prefix else fmt.record_name(record)

    def _get(self, record: int, what: str, start: int | None = None, length: int | None = None,
             into: memoryview | None = None) -> Any:
        import obstore
        from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

        key = self._key(record)

        def get() -> bytes:
            try:
                if start is None:
                    return obstore.get(self._store, key).bytes().to_bytes()
                if into is None:
                    return obstore.get_range(self._store, key, start=start, length=length).to_bytes()
                # streamed into place as it arrives (a retry starts over at the beginning)
                result = obstore.get(self._store, key, options={"range": (start, start + length)})
                pos = 0
                for chunk in result.stream(min_chunk_size=STREAM_CHUNK):
                    n = len(chunk)
                    if pos + n > len(into):
                        return pos + n  # longer than asked: the caller reports it
                    into[pos:pos + n] = chunk
                    pos += n
                return pos
            except NotFoundError as e:  # final: retrying cannot help
                raise FileNotFoundError(str(e)) from None
            except (PermissionDeniedError, UnauthenticatedError) as e:
                raise PermissionError(str(e)) from None
        try:
            return self.retry.call(get, what=what)
        except (DeadlineExceeded, Interrupted):
            raise
        except FileNotFoundError:
            raise CorruptData(f"record file {self.describe(record)} is missing") from None
        except Exception as e:  # noqa: BLE001 - every other failure is "unavailable", with its reason
            raise StoreUnavailable(explain(e, self.describe(record), self.options)) from None

    def _fetch(self, span: Span, into: memoryview | None = None) -> Any:
        return self._get(span.record, f"GET {self.describe(span.record)} [{span.offset}, {span.end})",
                         span.offset, span.length, into=into)


# obstore runs its requests on a tokio runtime whose threads do not survive fork(): a
# child forked after its parent used obstore (a DataLoader worker, multiprocessing's
# default on Linux) hangs on its first request. The pid that started obstore is noted,
# and a process other than that one reads through fsspec (s3fs resets its event loop
# after a fork) instead.
_obstore_pid: int | None = None


def _obstore_forked() -> bool:
    return _obstore_pid is not None and _obstore_pid != os.getpid()


def remote_records(fs: Any, base: str, url: str, options: RemoteOptions = RemoteOptions(),
                   bwlimit: TokenBucket | None = None) -> RecordSource:
    """The record source for a remote store: obstore for ``s3://`` when it is installed and
    set up (``PCRFS_S3_CLIENT=s3fs`` forces s3fs) and this process was not forked from one
    that used it; otherwise fsspec."""
    global _obstore_pid
    if url.split("://", 1)[0].lower() in ("s3", "s3a") and os.environ.get("PCRFS_S3_CLIENT", "obstore") != "s3fs":
        if _obstore_forked():
            log.info("process %d was forked after obstore ran in %d: %s is read with s3fs",
                     os.getpid(), _obstore_pid, url)
            return FsspecRecords(fs, base, url, options, bwlimit)
        bucket, _, prefix = base.partition("/")
        try:
            records = ObstoreRecords(bucket, prefix, url, options, bwlimit)
        except Exception as e:  # noqa: BLE001 - not installed, or no credentials: s3fs has the clear errors
            log.debug("obstore not used for %s (%s); s3fs instead", url, e)
        else:
            _obstore_pid = os.getpid()
            return records
    return FsspecRecords(fs, base, url, options, bwlimit)
