"""A fault-injecting HTTP proxy, to put in front of a real OpenAI-compatible server (tests and bench).

:class:`FaultProxy` listens on 127.0.0.1 (``http.server`` in a thread, one handler thread per
connection, keep-alive as a client expects) and forwards every request to ``upstream``, except that
it may first inject one fault:

========== ==================================================================================
kind       what the client sees
========== ==================================================================================
latency    the real answer, ``latency_s`` late
drop       the real status and headers, then half the body, then the connection closes
429        ``429 Too Many Requests`` with ``Retry-After: retry_after_s`` (not forwarded)
500        ``500 Internal Server Error`` with a JSON error (not forwarded)
truncate   ``200`` with the first half of the real body, framed as if whole (Content-Length of
           the cut body): a body that arrives "complete" but is not the answer
nonjson    ``200`` with an HTML page, as a misconfigured gateway sends (not forwarded)
hang       nothing: the connection is accepted and the request read, and no answer ever comes
           (until the proxy closes)
========== ==================================================================================

Design choices:
- Deterministic given ``seed``, also with requests in flight together: whether a fault hits is drawn
  from ``random.Random`` seeded by (seed, fault kind, hash of the request body, how many times this
  body came before), never from arrival order. A retry of the same body is a fresh draw, so a fault
  with ``rate < 1`` lets retries through. ``count`` caps how many times a fault hits in all (a
  "burst" of the first ``count`` requests with ``rate=1``); that cap follows arrival order.
- One fault per request: the first of ``faults`` (in order) whose draw hits.
- The proxy keeps what it did: per request its fault (``log``), counts per fault kind (``hits``),
  the requests forwarded upstream, and the message texts of every ``200`` answer delivered whole
  (``delivered``), so that a test can check that nothing a client stored as answered was a body
  it never got.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULT_KINDS = ("latency", "drop", "429", "500", "truncate", "nonjson", "hang")

_HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>\n"


@dataclass(frozen=True)
class Fault:
    """One kind of fault and how often it hits.

    Args:
        kind: one of :data:`FAULT_KINDS`.
        rate: the share of requests it hits (each request's draw is seeded, see the module docstring).
        count: hit at most this many times in all; None: no cap.
        latency_s: the delay of ``latency``.
        retry_after_s: the ``Retry-After`` seconds of ``429``; None sends no header.
    """

    kind: str
    rate: float = 1.0
    count: int | None = None
    latency_s: float = 0.5
    retry_after_s: int | None = 1

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind '{self.kind}' is not one of {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate {self.rate} is not in [0, 1]")


@dataclass
class Seen:
    """One request the proxy received: when, which body (hash, and how many times before), what fault."""

    at: float
    path: str
    digest: str
    repeat: int
    fault: str | None


class FaultProxy:
    """See the module docstring.

    Args:
        upstream: the real server's API root, e.g. ``http://127.0.0.1:8080/v1``.
        faults: the faults to inject; none: a plain proxy.
        seed: seeds every draw.
        upstream_timeout_s: how long to wait for the real server.

    Example:
        >>> with FaultProxy(server.base_url, [Fault("429", count=2)]) as proxy:  # doctest: +SKIP
        ...     client = OpenAIBackend("m", base_url=proxy.base_url)
    """

    def __init__(
        self,
        upstream: str,
        faults: Sequence[Fault] = (),
        *,
        seed: int = 0,
        upstream_timeout_s: float = 600.0,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream '{upstream}' is not an http:// URL")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.api_path = parts.path.rstrip("/")
        self.faults = list(faults)
        self.seed = seed
        self.upstream_timeout_s = upstream_timeout_s
        self.lock = threading.Lock()
        self.log: list[Seen] = []
        self.hits: Counter[str] = Counter()
        self.forwarded = 0
        self.delivered: list[str] = []
        self._repeats: Counter[str] = Counter()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                proxy._handle(self, self.rfile.read(length))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a hanging handler must not hold up close()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="faultproxy", daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        """The API root to give a client instead of the upstream's."""
        return f"http://127.0.0.1:{self.port}{self.api_path}"

    def close(self) -> None:
        """Stop serving; hanging requests are let go (their connections close)."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request -------------------------------------------------------------------------

    def choose(self, body: bytes, path: str = "") -> Fault | None:
        """Draw the fault for a request with this body (and note the request)."""
        digest = hashlib.sha256(body).hexdigest()[:16]
        with self.lock:
            repeat = self._repeats[digest]
            self._repeats[digest] += 1
            chosen = None
            for fault in self.faults:
                if fault.count is not None and self.hits[fault.kind] >= fault.count:
                    continue
                draw = random.Random(f"{self.seed}:{fault.kind}:{digest}:{repeat}").random()
                if draw < fault.rate:
                    chosen = fault
                    self.hits[fault.kind] += 1
                    break
            self.log.append(Seen(time.monotonic(), path, digest, repeat, chosen.kind if chosen else None))
        return chosen

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        fault = self.choose(body, h.path)
        kind = fault.kind if fault else None
        if fault is not None and kind == "hang":
            self._closing.wait()
            h.close_connection = True
            return
        if fault is not None and kind == "429":
            headers = {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_s is not None else {}
            self._send_json(
                h, 429, {"error": {"message": "rate limited (fault proxy)", "code": 429}}, headers
            )
            return
        if kind == "500":
            self._send_json(h, 500, {"error": {"message": "internal error (fault proxy)", "code": 500}})
            return
        if kind == "nonjson":
            self._send(h, 200, _HTML, "text/html")
            return
        if fault is not None and kind == "latency":
            time.sleep(fault.latency_s)
        try:
            status, ctype, answer = self._forward(h, body)
        except OSError as err:
            self._send_json(h, 502, {"error": {"message": f"upstream unreachable: {err}"}})
            return
        if kind == "drop":
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(answer)))
            h.end_headers()
            h.wfile.write(answer[: len(answer) // 2])
            h.wfile.flush()
            h.close_connection = True  # the client is left waiting for the rest: the connection ends
            return
        if kind == "truncate":
            self._send(h, status, answer[: len(answer) // 2], ctype)
            return
        self._send(h, status, answer, ctype)
        if status == 200:
            self._note_delivered(answer)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, str, bytes]:
        conn = HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout_s)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
        finally:
            conn.close()
        with self.lock:
            self.forwarded += 1
        return resp.status, resp.getheader("Content-Type") or "application/json", answer

    def _note_delivered(self, answer: bytes) -> None:
        try:
            data = json.loads(answer)
            texts = [c["message"]["content"] for c in data.get("choices", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        with self.lock:
            self.delivered.extend(t for t in texts if isinstance(t, str))

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def _send_json(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        data: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        self._send(h, status, json.dumps(data).encode(), "application/json", headers)
