"""fsspec filesystems from store URLs, and error messages a user can act on.

``s3://bucket/prefix`` uses s3fs: endpoint, region and credentials come from the
usual AWS environment variables and files (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION`` ...) unless ``endpoint_url`` is given.
Other fsspec protocols (``memory://``, ``gcs://`` with gcsfs installed ...) are
opened with fsspec's defaults.

Retries are pcrfs's own (:mod:`.retry`): s3fs and botocore are told to try once,
so one policy decides, logs and counts every retry. Every read of a remote store
ends within ``read_deadline`` seconds (:mod:`.deadline`), and no single request's
connect or read timeout is longer than that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .deadline import DEFAULT_READ_DEADLINE
from .retry import is_final

S3_PROTOCOLS = ("s3", "s3a")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


class RemoteError(Exception):
    """A remote store cannot be used; the message says why and what to check."""


@dataclass(frozen=True)
class RemoteOptions:
    endpoint_url: str | None = None   # e.g. http://127.0.0.1:5000 for MinIO or moto
    attempts: int = 5                 # tries per request (retryable errors only)
    concurrency: int = 16             # ranged GETs in flight at once
    connect_timeout: float = 5.0
    read_timeout: float = 30.0        # seconds a request may wait for bytes (obstore: for all of them)
    # Seconds a read may take in all -- every request, retry and path it tries, waiting on
    # other readers' fetches included -- before it fails (EIO through the mount). None or 0:
    # no deadline. Also caps connect_timeout and read_timeout. See pcrfs.remote.deadline.
    read_deadline: float | None = DEFAULT_READ_DEADLINE

    def __post_init__(self) -> None:
        if self.read_deadline is not None and not self.read_deadline >= 0:
            raise ValueError(f"read_deadline must be a number of seconds >= 0 (0 or None: no deadline), "
                             f"got {self.read_deadline!r}")

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts of one request, each at most the read deadline."""
        cap = self.read_deadline or float("inf")
        return min(self.connect_timeout, cap), min(self.read_timeout, cap)


def is_url(location: str) -> bool:
    """True for ``proto://...`` locations other than ``file://``."""
    m = _URL.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('s3', 'bucket/a/b')."""
    m = _URL.match(url)
    if not m:
        raise ValueError(f"not a URL: {url!r}")
    return m.group(1).lower(), m.group(2).strip("/")


def filesystem(url: str, options: RemoteOptions = RemoteOptions()) -> Any:
    """An fsspec filesystem for ``url``'s protocol (RemoteError if it cannot be had)."""
    protocol, path = split_url(url)
    if protocol in S3_PROTOCOLS:
        if not path:
            raise RemoteError(f"{url}: no bucket named (expected s3://BUCKET[/PREFIX])")
        try:
            import s3fs
        except ImportError:
            raise RemoteError("stores on S3 need s3fs: pip install 'pcrfs[s3]'") from None
        client_kwargs = {"endpoint_url": options.endpoint_url} if options.endpoint_url else {}
        connect_timeout, read_timeout = options.timeouts()
        config_kwargs = {"retries": {"total_max_attempts": 1, "mode": "standard"},  # "max_attempts" would mean retries
                         "connect_timeout": connect_timeout, "read_timeout": read_timeout,
                         "max_pool_connections": max(10, options.concurrency)}
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs,
                               skip_instance_cache=True, use_listings_cache=False)
        fs.retries = 1  # one try inside s3fs: pcrfs's RetryPolicy does the retrying
        return fs
    try:
        import fsspec

        return fsspec.filesystem(protocol, skip_instance_cache=True)
    except ImportError as e:
        raise RemoteError(f"{url}: no filesystem for {protocol}:// ({e})") from None
    except ValueError as e:
        raise RemoteError(f"{url}: unknown protocol {protocol}:// ({e})") from None


def _bucket(url: str) -> str:
    return split_url(url)[1].split("/", 1)[0]


def explain(exc: BaseException, url: str, options: RemoteOptions = RemoteOptions()) -> str:
    """A one-line message for ``exc`` raised while using ``url`` (no traceback needed)."""
    where = f" at {options.endpoint_url}" if options.endpoint_url else ""
    text = str(exc).strip() or type(exc).__name__
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        return f"bucket '{_bucket(url)}' does not exist{where} (create it first, or check the URL {url})"
    if isinstance(exc, FileNotFoundError):
        return f"{url}: not found{where}"
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return (f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or configure ~/.aws/credentials")
    if isinstance(exc, PermissionError):
        return (f"access to {url} denied{where} ({text}); check the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_PROFILE) and that they may read (and, to convert, write) this bucket")
    if names & {"EndpointConnectionError", "ConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ConnectionRefusedError"} or isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot reach the object store{where or ' for ' + url}: {text}"
    if is_final(exc):
        return f"{url}: {text}"
    return f"{url}: {type(exc).__name__}: {text} (gave up after retries)"
