"""Object storage for the benchmarks: an S3 server whose ranged GETs cost the same whatever
the object's size, behind a slow link on 127.0.0.1 that counts what crosses it.

* :class:`S3rver` -- s3rver 3.7.1 (npm; installed into ``npm_cache`` on first use). moto
  reads the whole object for every ranged GET, so a benchmark on moto measures moto.
* :class:`LinkProxy` -- a user-space link (``tc netem`` is not available on these
  machines): ``latency`` seconds per request, ``rate`` bytes/s shared by all responses;
  requests, GETs, GETs of ``/records/`` and bytes counted (``.counts()``). It runs in its
  own process (this file run as a script) so its threads do not share a GIL with the
  loader being measured.
* :func:`upload` puts local files into the bucket; :func:`store_files` lists a store's
  files (``pcr.yaml`` last, as a writer publishes it).
"""
from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as the link proxy's process: python benchlib/remote.py PORT ...
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LOOPBACK = "127.0.0.1"
BUCKET = "pcrfs-bench"
S3RVER_ENV = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_EC2_METADATA_DISABLED": "true"}


try:
    from . import log
except ImportError:  # run as a script (the proxy's process) it needs no log
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


# ---- the slow link: a counting proxy with latency and a shared rate ------------------------------

class _Link:
    def __init__(self, upstream: int, latency: float, rate: float) -> None:
        from pcrfs.remote.bwlimit import TokenBucket

        self.upstream = upstream
        self.latency = latency
        self.bucket = TokenBucket(rate, burst=64 * 1024)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "gets": 0, "record_gets": 0, "bytes": 0}
        self.local = threading.local()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def conn(self) -> http.client.HTTPConnection:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = http.client.HTTPConnection(LOOPBACK, self.upstream, timeout=60)
        return c


class _LinkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_LinkServer"

    def log_message(self, *args) -> None:
        pass

    def _stats(self) -> None:
        with self.server.link.lock:
            body = json.dumps(self.server.link.counts).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        link = self.server.link
        if self.path == "/__link_stats":
            return self._stats()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        link.count("requests")
        if self.command == "GET":
            link.count("gets")
            if "/records/" in self.path:
                link.count("record_gets")
        time.sleep(link.latency)  # the round trip
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        for attempt in range(2):
            conn = link.conn()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                break
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                link.local.conn = None
                if attempt:
                    raise
        self.send_response(resp.status, resp.reason)
        n = resp.getheader("Content-Length")
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        if n is None:
            data = resp.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            chunks = [data]
        else:
            self.end_headers()
            chunks = iter(lambda: resp.read(64 * 1024), b"")
        for chunk in chunks:
            link.bucket.consume(len(chunk))  # the shared link's rate
            link.count("bytes", len(chunk))
            if self.command != "HEAD":
                self.wfile.write(chunk)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _LinkServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_link(port: int, upstream: int, latency: float, rate: float) -> None:
    server = _LinkServer((LOOPBACK, port), _LinkHandler)
    server.link = _Link(upstream, latency, rate)
    server.serve_forever()


class LinkProxy:
    """The proxy in its own process (so its threads do not share a GIL with the loader)."""

    def __init__(self, upstream: int, latency: float, rate: float, log_file: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._log = open(log_file, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.port), str(upstream),
                                      str(latency), str(rate)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "link proxy")

    def counts(self) -> dict:
        with urllib.request.urlopen(f"{self.endpoint}/__link_stats", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


class S3rver:
    def __init__(self, npm_cache: Path, data: Path, log_file: Path) -> None:
        exe = npm_cache / "node_modules" / ".bin" / "s3rver"
        if not exe.exists():
            log(f"installing s3rver@3.7.1 into {npm_cache} (npm)")
            npm_cache.mkdir(parents=True, exist_ok=True)
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(npm_cache), "s3rver@3.7.1"],
                           check=True, stdout=subprocess.DEVNULL)
        data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._log = open(log_file, "ab")
        self.proc = subprocess.Popen([str(exe), "-d", str(data), "-a", LOOPBACK, "-p", str(self.port), "--silent",
                                      "--allow-mismatched-signatures", "--configure-bucket", BUCKET],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "s3rver")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def upload(files: list[tuple[Path, str]], endpoint: str) -> None:
    """Put ``(local path, key)`` pairs into :data:`BUCKET` at ``endpoint``."""
    from pcrfs.remote.fs import RemoteOptions, filesystem

    fs = filesystem(f"s3://{BUCKET}", RemoteOptions(endpoint_url=endpoint))
    for local, key in files:
        fs.put_file(str(local), f"{BUCKET}/{key}")


def store_files(store: Path, prefix: str) -> list[tuple[Path, str]]:
    """A local store's files as ``(path, prefix/relative path)``, ``pcr.yaml`` last."""
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.name != "pcr.yaml")
    return [(p, f"{prefix}/{p.relative_to(store)}") for p in files] + [(store / "pcr.yaml", f"{prefix}/pcr.yaml")]


if __name__ == "__main__":
    _port, _upstream, _latency, _rate = sys.argv[1:5]
    serve_link(int(_port), int(_upstream), float(_latency), float(_rate))
