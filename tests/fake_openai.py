"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, slow or broken on purpose.

:class:`FakeOpenAIServer` runs ``http.server.ThreadingHTTPServer`` on a free port in a thread (one
handler thread per connection, so requests really overlap). It reads what to do from the last user
message:

- ``429:2`` answers 429 twice and then properly; ``500:1`` likewise with 500; ``always500`` (503).
- ``slow:1`` sleeps ``slow_s`` (past a client's timeout) on the first hit; ``drop:1`` closes the
  connection without an answer; ``garbage`` (200, HTML body); ``nochoices``; ``badrequest`` (400);
  ``unauthorized`` (401).
- ``wait:...`` holds its answer until :attr:`FakeOpenAIServer.gate` is set.
- anything else is answered ``answer to PROMPT #i seed SEED``, 7 prompt and 5 completion tokens.

Every answer first sleeps ``latency_s`` (the model's time). The server counts what it saw: ``hits``
(requests received per prompt), ``answered`` (200 answers about to be written, per prompt),
``in_flight`` and ``max_in_flight`` (requests being handled at once), request bodies, headers and
arrival times; ``on_arrival(prompt)`` runs as each request arrives (a test hook).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAIServer:
    """See the module docstring.

    Args:
        honour_n: answer ``n`` choices when asked (False: one, as llama.cpp's server does).
        slow_s: how long ``slow:`` prompts sleep.
        json_object_only: refuse ``response_format`` type ``json_schema`` (422), as llama-cpp-python's
            server does.
        latency_s: how long every answer takes.
    """

    def __init__(
        self,
        honour_n: bool = True,
        slow_s: float = 1.0,
        json_object_only: bool = False,
        latency_s: float = 0.0,
    ):
        self.honour_n = honour_n
        self.json_object_only = json_object_only
        self.slow_s = slow_s
        self.latency_s = latency_s
        self.gate = threading.Event()
        self.on_arrival: Callable[[str], None] | None = None
        self.hits: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.hits[prompt] += 1
                    hit = server.hits[prompt]
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.arrivals.append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.on_arrival is not None:
                        server.on_arrival(prompt)
                    self._handle(body, prompt, hit)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _handle(self, body: dict[str, Any], prompt: str, hit: int) -> None:
                if server.latency_s:
                    time.sleep(server.latency_s)
                fmt = body.get("response_format") or {}
                if server.json_object_only and fmt.get("type") == "json_schema":
                    # llama-cpp-python's server: pydantic refuses the type
                    return self._send(422, b'{"detail": [{"loc": ["body", "response_format", "type"]}]}')
                kind, _, count = prompt.partition(":")
                failing = kind != "wait" and hit <= int(count or 0)
                if kind == "429" and failing:
                    return self._send(429, b'{"error": "slow down"}', {"Retry-After": "0"})
                if kind == "500" and failing:
                    return self._send(500, b"internal error")
                if kind == "always500":
                    return self._send(503, b"unavailable")
                if kind == "slow" and failing:
                    time.sleep(server.slow_s)
                    return self._answer(body, prompt)
                if kind == "drop" and failing:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if kind == "wait":
                    server.gate.wait()
                if kind == "garbage":
                    return self._send(200, b"<html>upstream proxy error</html>")
                if kind == "nochoices":
                    return self._send(200, b'{"object": "chat.completion"}')
                if kind == "badrequest":
                    return self._send(400, b'{"error": "context too long"}')
                if kind == "unauthorized":
                    return self._send(401, b'{"error": "bad key"}')
                return self._answer(body, prompt)

            def do_GET(self) -> None:
                self._send(200, b'{"data": [{"id": "fake"}]}')

            def _answer(self, body: dict[str, Any], prompt: str) -> None:
                n = body.get("n", 1) if server.honour_n else 1
                seed = body.get("seed")
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": f"answer to {prompt} #{i} seed {seed}"},
                        "finish_reason": "stop",
                    }
                    for i in range(n)
                ]
                data = {
                    "choices": choices,
                    "usage": {"prompt_tokens": 7, "completion_tokens": 5 * n, "total_tokens": 7 + 5 * n},
                }
                # counted before the write: once a client holds the answer, the count already has it
                with server.lock:
                    server.answered[prompt] += 1
                self._send(200, json.dumps(data).encode())

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed: fine

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving; requests held at the gate are let go."""
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
