"""Record sources: byte ranges of a store's record files, wherever they live.

A :class:`RecordSource` answers "these (record, offset, length) spans" and counts
requests and bytes for the mount's stats. :class:`LocalRecords` reads local
files with ``pread``; :class:`FsspecRecords` issues one ranged GET per span to an
object store, many at once, with retries; :class:`ObstoreRecords` does the same
for ``s3://`` with obstore (Rust ``object_store``), which costs the client ~10x
less CPU per request and ~3x less per MB than s3fs (``tools/bench_s3_client.py``),
and is used for ``s3://`` when obstore is installed (:func:`remote_records`). All honour an optional bandwidth
limit. Which spans to ask for (coalescing, readahead, caching) is decided above
this layer, in :mod:`pcrfs.store.fetch`.
"""
from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..remote.bwlimit import TokenBucket
from ..remote.fs import RemoteOptions, explain
from ..remote.retry import RetryPolicy
from . import format as fmt
from .errors import CorruptData, StoreUnavailable

log = logging.getLogger("pcrfs.store")


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

    def __init__(self, bwlimit: TokenBucket | None = None) -> None:
        self.bwlimit = bwlimit
        self._counter_lock = threading.Lock()
        self.requests = 0   # counters for the mount's stats file
        self.bytes_read = 0

    @abstractmethod
    def _fetch(self, span: Span) -> bytes:
        """The bytes of one span (may be short if the record is)."""

    def describe(self, record: int) -> str:
        """Where record ``record`` lives, for messages."""
        return fmt.record_name(record)

    def read(self, record: int, offset: int, length: int) -> bytes:
        return self._read_one(Span(record, offset, length))

    def read_in_record(self, record: int, offsets: list[int], lengths: list[int]) -> list[bytes]:
        """Several ranges of one record (a whole image's groups), in order."""
        return [self.read(record, o, n) for o, n in zip(offsets, lengths)]

    def read_spans(self, spans: Sequence[Span]) -> list[bytes]:
        """The bytes of every span, in order (sources that can, fetch them concurrently)."""
        return [self._read_one(s) for s in spans]

    def _read_one(self, span: Span) -> bytes:
        data = self._fetch(span)
        self._account(len(data))
        if len(data) != span.length:
            raise CorruptData(f"record {span.record}: short read at {span.offset} "
                              f"({len(data)} of {span.length} bytes; {self.describe(span.record)} is truncated)")
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


class LocalRecords(RecordSource):
    """Positional reads from local record files, one cached descriptor per record."""

    def __init__(self, root: Path, record_sizes: np.ndarray, bwlimit: TokenBucket | None = None) -> None:
        super().__init__(bwlimit)
        self.root = Path(root)
        self._sizes = record_sizes
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def describe(self, record: int) -> str:
        return str(self.root / fmt.record_name(record))

    def _fd(self, record: int) -> int:
        fd = self._fds.get(record)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(record)
            if fd is None:
                path = self.root / fmt.record_name(record)
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise CorruptData(f"record file {path} cannot be opened: {e.strerror}") from e
                size = os.fstat(fd).st_size
                if size != int(self._sizes[record]):
                    os.close(fd)
                    raise CorruptData(f"record file {path} is {size} bytes, index says {int(self._sizes[record])}")
                self._fds[record] = fd
        return fd

    def _fetch(self, span: Span) -> bytes:
        return os.pread(self._fd(span.record), span.length, span.offset)

    def dup_descriptor(self, record: int) -> int:
        """A duplicate of record ``record``'s descriptor, opened and checked like every
        other; the caller owns it (the mount's compiled read path, pcrfs.fuse.fastpath)."""
        return os.dup(self._fd(record))

    def read_in_record(self, record: int, offsets: list[int], lengths: list[int]) -> list[bytes]:
        # the hot path of every whole-file read through the mount: one descriptor
        # lookup and one counter update for all of an image's groups
        fd, pread = self._fd(record), os.pread
        out = [pread(fd, n, o) for o, n in zip(offsets, lengths)]
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
        """A whole record file (for verification)."""
        path = self.root / fmt.record_name(record)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CorruptData(f"record file {path} unreadable: {e.strerror}") from e
        self._account(len(data))
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


RecordFiles = LocalRecords  # the name this class had before remote stores


class FsspecRecords(RecordSource):
    """Ranged GETs against an fsspec filesystem (s3fs for ``s3://``), concurrently, with retries."""

    def __init__(self, fs: Any, base: str, url: str, options: RemoteOptions = RemoteOptions(),
                 bwlimit: TokenBucket | None = None, retry: RetryPolicy | None = None) -> None:
        super().__init__(bwlimit)
        self.fs = fs
        self.base = base.rstrip("/")
        self.url = url.rstrip("/")
        self.options = options
        self.retry = retry or RetryPolicy(attempts=options.attempts)
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="pcrfs-get")

    def describe(self, record: int) -> str:
        return f"{self.url}/{fmt.record_name(record)}"

    def _get(self, record: int, what: str, **range_kwargs: int) -> bytes:
        path = f"{self.base}/{fmt.record_name(record)}"
        try:
            return self.retry.call(lambda: self.fs.cat_file(path, **range_kwargs), what=what)
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise StoreUnavailable(explain(e, self.url, self.options)) from None
            raise CorruptData(f"record file {self.describe(record)} is missing") from None
        except Exception as e:  # noqa: BLE001 - every other failure is "unavailable", with its reason
            raise StoreUnavailable(explain(e, self.describe(record), self.options)) from None

    def _fetch(self, span: Span) -> bytes:
        return self._get(span.record, f"GET {self.describe(span.record)} [{span.offset}, {span.end})",
                         start=span.offset, end=span.end)

    def read_spans(self, spans: Sequence[Span]) -> list[bytes]:
        if len(spans) <= 1:
            return [self._read_one(s) for s in spans]
        return list(self._pool.map(self._read_one, spans))

    def read_record(self, record: int) -> bytes:
        """A whole record object (for verification) in one GET."""
        data = self._get(record, f"GET {self.describe(record)}")
        self._account(len(data))
        return data

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["retries"] = self.retry.retried
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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


class ObstoreRecords(RecordSource):
    """Ranged GETs to S3 with obstore, concurrently, with pcrfs's retries (obstore's own are off)."""

    def __init__(self, bucket: str, prefix: str, url: str, options: RemoteOptions = RemoteOptions(),
                 bwlimit: TokenBucket | None = None, retry: RetryPolicy | None = None) -> None:
        import botocore.session
        from obstore.store import S3Store

        super().__init__(bwlimit)
        self.url = url.rstrip("/")
        self.prefix = prefix.strip("/")
        self.options = options
        self.retry = retry or RetryPolicy(attempts=options.attempts)
        session = botocore.session.Session()
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config: dict[str, Any] = {"region": session.get_config_variable("region") or "us-east-1"}
        if endpoint:
            config.update(endpoint=endpoint, virtual_hosted_style_request=False)
        client = {"allow_http": bool(endpoint and endpoint.startswith("http://")),
                  "connect_timeout": f"{options.connect_timeout}s", "timeout": f"{options.read_timeout}s",
                  "pool_max_idle_per_host": str(max(10, options.concurrency))}
        self._store = S3Store(bucket, config=config, client_options=client, retry_config={"max_retries": 0},
                              credential_provider=_BotocoreCredentials(session))
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="pcrfs-get")

    def describe(self, record: int) -> str:
        return f"{self.url}/{fmt.record_name(record)}"

    def _key(self, record: int) -> str:
        return f"{self.prefix}/{fmt.record_name(record)}" if self.prefix else fmt.record_name(record)

    def _get(self, record: int, what: str, start: int | None = None, length: int | None = None) -> bytes:
        import obstore
        from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

        key = self._key(record)

        def get() -> bytes:
            try:
                if start is None:
                    return obstore.get(self._store, key).bytes().to_bytes()
                return obstore.get_range(self._store, key, start=start, length=length).to_bytes()
            except NotFoundError as e:  # final: retrying cannot help
                raise FileNotFoundError(str(e)) from None
            except (PermissionDeniedError, UnauthenticatedError) as e:
                raise PermissionError(str(e)) from None
        try:
            return self.retry.call(get, what=what)
        except FileNotFoundError:
            raise CorruptData(f"record file {self.describe(record)} is missing") from None
        except Exception as e:  # noqa: BLE001 - every other failure is "unavailable", with its reason
            raise StoreUnavailable(explain(e, self.describe(record), self.options)) from None

    def _fetch(self, span: Span) -> bytes:
        return self._get(span.record, f"GET {self.describe(span.record)} [{span.offset}, {span.end})",
                         span.offset, span.length)

    def read_spans(self, spans: Sequence[Span]) -> list[bytes]:
        if len(spans) <= 1:
            return [self._read_one(s) for s in spans]
        return list(self._pool.map(self._read_one, spans))

    def read_record(self, record: int) -> bytes:
        """A whole record object (for verification) in one GET."""
        data = self._get(record, f"GET {self.describe(record)}")
        self._account(len(data))
        return data

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["retries"] = self.retry.retried
        out["client"] = "obstore"
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
