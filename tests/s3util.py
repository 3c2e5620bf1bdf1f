"""A real S3 API on loopback for tests: moto's server mode, and a fault-injecting proxy.

:class:`MotoServer` runs ``python -m moto.server`` on 127.0.0.1 (never another
address) in a subprocess; :class:`FaultProxy` sits between a client and it and
can answer 500s for a while or stop accepting and cut every connection (the
server "goes away") and come back on the same port.
"""
from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",   # never ask the instance metadata address for credentials
}
NO_CREDENTIALS_ENV = {
    "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def s3_environment(cache_dir: str | os.PathLike) -> Iterator[None]:
    """moto's credentials and a private pcrfs cache directory in os.environ for the
    duration (inherited by the mount daemons and cluster workers started meanwhile);
    the previous values are restored afterwards."""
    keys = list(S3_ENV) + ["XDG_CACHE_HOME"]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(S3_ENV)
    os.environ["XDG_CACHE_HOME"] = str(Path(cache_dir))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def store_on_moto(store: str | os.PathLike, bucket: str, name: str, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The local store ``store`` uploaded to ``s3://bucket/name`` on a private moto server
    (skips when moto is missing); yields (``bucket/name``, the endpoint URL)."""
    import pytest

    why = s3_available()
    if why:
        pytest.skip(why)
    with s3_environment(tmp_path_factory.mktemp("xdg-cache")):
        server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
        try:
            from pcrfs.remote.fs import RemoteOptions, filesystem

            fs = filesystem(f"s3://{bucket}", RemoteOptions(endpoint_url=server.endpoint))
            fs.mkdir(bucket)
            fs.put(str(store), f"{bucket}/{name}", recursive=True)
            yield f"{bucket}/{name}", server.endpoint
        finally:
            server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def s3_available() -> str | None:
    """Why the S3 tests cannot run here, or None."""
    for module in ("s3fs", "moto.server", "flask"):
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} not installed ({e}); pip install -e '.[test]'"
    return None


class MotoServer:
    """moto in server mode on loopback, in its own process."""

    def __init__(self, log_path: str | os.PathLike) -> None:
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer within 30s; see {log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


_S3_500 = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
           b'<Message>injected by the test proxy</Message></Error>')


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: "_ProxyServer"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection)

    def _forward(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if proxy.is_down:
            self.close_connection = True
            return
        if proxy._should_fail():
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_S3_500)))
            self.end_headers()
            self.wfile.write(_S3_500)
            return
        conn = http.client.HTTPConnection(LOOPBACK, proxy.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        proxy.forwarded += 1
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _ProxyServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class FaultProxy:
    """HTTP proxy on loopback in front of ``upstream_port``, with switchable faults."""

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.is_down = False
        self.forwarded = 0
        self.failed = 0
        self._fail_until = 0.0
        self._fail_count = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._server: _ProxyServer | None = None
        self.up()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.append(sock)

    def _should_fail(self) -> bool:
        with self._lock:
            if self._fail_count > 0 or time.monotonic() < self._fail_until:
                self._fail_count = max(0, self._fail_count - 1)
                self.failed += 1
                return True
            return False

    def fail_next(self, n: int) -> None:
        """Answer the next ``n`` requests with 500 InternalError."""
        with self._lock:
            self._fail_count = n

    def fail_for(self, seconds: float) -> None:
        """Answer every request with 500 InternalError for ``seconds``."""
        with self._lock:
            self._fail_until = time.monotonic() + seconds

    def up(self) -> None:
        """(Re)start accepting on the same port."""
        self.is_down = False
        server = _ProxyServer((LOOPBACK, self.port), _Handler)
        server.proxy = self
        threading.Thread(target=server.serve_forever, daemon=True, name="fault-proxy").start()
        self._server = server

    def down(self) -> None:
        """Stop accepting and cut every open connection: the server has gone away."""
        self.is_down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.down()
