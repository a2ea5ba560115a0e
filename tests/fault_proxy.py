"""A fault-injecting HTTP proxy on 127.0.0.1 (stdlib only), put between the client and a real server.

Each request is either forwarded to the upstream server or answered with a fault:

- ``"429"``: Too Many Requests with ``Retry-After`` (``retry_after_s``)
- ``"500"``, ``"503"``, ``"400"``: an error status with a JSON error body
- ``"hang"``: accept the request, never answer (until ``hang_s`` or the proxy stops)
- ``"close"``: close the connection without a response
- ``"truncate"``: forward, then return the first half of the upstream JSON body (a complete HTTP
  response whose JSON is cut off)
- ``"cut"``: forward, then announce the full length, send half the body and close the connection

A *plan* decides the fault of each request from its body and how many times that exact body was
seen before. The proxy counts what it receives and forwards, so tests can check how many requests
the client really made.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence
from urllib.parse import urlsplit

FAULTS = ("429", "500", "503", "hang", "close", "truncate", "cut")


@dataclass
class Seen:
    """One received request: when, which body, the how-many-th time this body came, the fault."""

    t: float
    key: str
    attempt: int
    fault: str | None


Plan = Callable[[bytes, int], "str | None"]  # (body, attempt index from 0) -> fault or None


class RotatingPlan:
    """Deterministic faults: the i-th distinct body fails its first ``i % (max_faults + 1)`` attempts.

    The faults given cycle through ``faults`` in order, so every kind shows up. With
    ``max_faults=2`` half of all requests are faulted and every body succeeds by its third attempt.
    Bodies containing a string of ``always`` get that fault on every attempt.
    """

    def __init__(self, faults: Sequence[str] = FAULTS, max_faults: int = 2, always: dict[str, str] | None = None):
        self.faults = itertools.cycle(faults)
        self.max_faults = max_faults
        self.always = {k.encode(): v for k, v in (always or {}).items()}
        self._budget: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __call__(self, body: bytes, attempt: int) -> str | None:
        with self._lock:
            for marker, fault in self.always.items():
                if marker in body:
                    return fault
            if body not in self._budget:
                self._budget[body] = len(self._budget) % (self.max_faults + 1)
            return next(self.faults) if attempt < self._budget[body] else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that timed out or was killed hangs up on us: expected here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        self.server.proxy.access_log.append(format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, declared: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": {"message": message, "type": "injected", "code": status}}).encode()
        self._send(status, body, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        fault = proxy.decide(self.command, body)
        if proxy.require_auth is not None and auth != f"Bearer {proxy.require_auth}":
            # Like some real servers, echo what was received: clients must not store it verbatim.
            self._error(401, f"invalid credentials: {auth!r}")
            return
        if fault == "close":
            self._drop()
            return
        if fault == "hang":
            proxy.stopping.wait(proxy.hang_s)
            self._drop()
            return
        if fault in ("429", "500", "503", "400", "401", "404"):
            extra = {"Retry-After": str(proxy.retry_after_s)} if fault == "429" else {}
            self._error(int(fault), f"injected {fault}", extra)
            return
        status, data, ctype = proxy.forward(self.command, self.path, body, self.headers.get("Content-Type"))
        if fault == "truncate":
            self._send(status, data[: len(data) // 2])
        elif fault == "cut":
            self._send(status, data[: len(data) // 2], declared=len(data))
            self._drop()
        else:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


@dataclass
class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:8000", plan) as proxy: ... proxy.base_url ...``"""

    upstream: str
    plan: Plan | None = None
    retry_after_s: int = 1
    hang_s: float = 60.0
    require_auth: str | None = None
    seen: list[Seen] = field(default_factory=list)
    forwarded: int = 0
    access_log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._up = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._attempts: Counter = Counter()
        self.stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- accounting -----------------------------------------------------------------------------

    def decide(self, method: str, body: bytes) -> str | None:
        key = hashlib.sha256(body).hexdigest()[:16]
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
            fault = self.plan(body, attempt) if (self.plan is not None and method == "POST") else None
            self.seen.append(Seen(time.monotonic(), key, attempt, fault))
        return fault

    @property
    def received(self) -> int:
        return len(self.seen)

    def fault_counts(self) -> Counter:
        return Counter(s.fault for s in self.seen if s.fault)

    def forward(self, method: str, path: str, body: bytes, content_type: str | None) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection(*self._up, timeout=300)
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            with self._lock:
                self.forwarded += 1
            return resp.status, data, resp.getheader("Content-Type") or "application/json"
        finally:
            conn.close()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "FaultProxy":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
