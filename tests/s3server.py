"""A real S3 server on 127.0.0.1 for the tests and ``benchmarks/remote.py``.

* :func:`start_moto` runs moto's standalone server (``python -m moto.server``)
  in a subprocess with IAM authentication on, and creates two users: ``admin``
  (everything) and ``reader`` (get and list only), so that wrong credentials
  and a read-only bucket are refused the way AWS refuses them.
* :class:`FaultProxy` is a small threaded HTTP proxy in front of it that adds
  latency to every request and answers some requests with HTTP 503 (S3's
  ``SlowDown``), a bounded number of times.
  :func:`proxy_process` runs one in a process of its own, as a network
  would be: its CPU is not the client's.
* :func:`serve_folder` serves a local folder read-only over HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REGION = "us-east-1"
SETUP_ACTIONS = 6  # unauthenticated IAM calls moto allows before it enforces signatures and policies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
            time.sleep(0.05)


@dataclasses.dataclass
class Moto:
    """A running moto server and the credentials of its two users."""

    proc: subprocess.Popen
    url: str
    admin: tuple[str, str]
    reader: tuple[str, str]

    def client(self, user: str = "admin", url: str | None = None) -> Any:
        import boto3

        key, secret = getattr(self, user)
        return boto3.client("s3", endpoint_url=url or self.url, region_name=REGION, aws_access_key_id=key,
                            aws_secret_access_key=secret)

    def env(self, user: str = "admin", url: str | None = None) -> dict[str, str]:
        """The AWS environment a user sets for this server (no ~/.aws files)."""
        key, secret = getattr(self, user)
        return {"AWS_ENDPOINT_URL": url or self.url, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_MAX_ATTEMPTS": "3", "AWS_RETRY_MODE": "standard"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_moto() -> Moto:
    """Start ``moto.server`` on a free port with IAM auth; create the users ``admin`` and ``reader``."""
    import boto3

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_ACTIONS))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_port(port)
        iam = boto3.client("iam", endpoint_url=url, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        keys = {}
        for user, actions in (("admin", ["*"]), ("reader", ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"])):
            iam.create_user(UserName=user)
            k = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
    except BaseException:
        proc.kill()
        raise
    return Moto(proc, url, keys["admin"], keys["reader"])


class _Server(http.server.ThreadingHTTPServer):
    """A threaded HTTP server whose listen queue takes a client's whole burst of connections.

    socketserver's default queue of 5 drops the SYNs of a client opening 64
    connections at once, and each dropped one waits a 1 s TCP retransmission.
    """

    daemon_threads = True
    request_queue_size = 1024


# ----------------------------------------------------------------------------
# The fault-injecting proxy.
# ----------------------------------------------------------------------------

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream``.

    Attributes set by the caller: ``latency_s`` (added to every request),
    ``fail`` (a predicate on ``(method, path)``) with ``fail_budget`` (how
    many matching requests get HTTP 503 SlowDown before the rest pass again;
    -1: all of them).  ``failed`` counts the 503s sent, ``requests`` all.
    """

    def __init__(self, upstream: str, latency_s: float = 0.0) -> None:
        m = re.match(r"http://([^:/]+):(\d+)", upstream)
        assert m, upstream
        self.host, self.port_up = m.group(1), int(m.group(2))
        self.latency_s = latency_s
        self.fail: Callable[[str, str], bool] | None = None
        self.fail_budget = 0
        self.failed = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        handler = functools.partial(_ProxyHandler, self)
        self.server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    def inject(self, fail: Callable[[str, str], bool] | None, budget: int = 0) -> None:
        with self._lock:
            self.fail, self.fail_budget, self.failed = fail, budget, 0

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            self.requests += 1
            if self.fail is None or self.fail_budget == 0 or not self.fail(method, path):
                return False
            if self.fail_budget > 0:
                self.fail_budget -= 1
            self.failed += 1
            return True

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port_up, timeout=60)
        return conn

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def proxy_process(upstream: str, latency_s: float) -> Iterator[tuple[str, int]]:
    """A :class:`FaultProxy` with ``latency_s`` in a child process; yields its URL and pid."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from s3server import FaultProxy; "
            "p = FaultProxy(sys.argv[2], float(sys.argv[3])); print(p.url, flush=True); time.sleep(1e9)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), upstream, str(latency_s)],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip(), proc.pid
    finally:
        proc.kill()
        proc.wait()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, proxy: FaultProxy, *args: Any) -> None:
        self.proxy = proxy
        super().__init__(*args)

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        if self.proxy.latency_s:
            time.sleep(self.proxy.latency_s)
        if self.proxy._should_fail(self.command, self.path):
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed meanwhile
            conn = self.proxy.connection()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.proxy._local.conn = None
                if attempt:
                    raise
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


# ----------------------------------------------------------------------------
# A read-only HTTP server for a folder.
# ----------------------------------------------------------------------------


def serve_folder(folder: Path) -> tuple[str, Callable[[], None]]:
    """Serve ``folder`` over HTTP on 127.0.0.1; return its URL and a function that stops the server."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = _Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, name="http-folder", daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop
