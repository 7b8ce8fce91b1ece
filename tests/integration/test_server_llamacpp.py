"""A real llama.cpp server process on 127.0.0.1 serving a packaged model (SmolLM2-135M, one thread).

What is checked: schema-constrained output parses and validates; n samples at temperature 1 differ;
tokens reach the ledger; a server killed in the middle of a batch gives a clear error naming the
endpoint after the retries, and a rerun against a restarted server replays the finished calls and
sends only the missing ones; the server process never outlives its owner (close, exit, SIGKILL of the
owner, Ctrl-C of ``speed serve``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from procs import alive as _alive
from procs import wait_gone as _wait_gone
from speed.config import LlamaCppServerSpec, parse_model_spec
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import BackendError, Request, Sampling, load_backend
from speed.llm.openai_api import OpenAIBackend
from speed.llm.server import LlamaCppServer, LlamaCppServerBackend, free_port

pytestmark = pytest.mark.slow

jsonschema = pytest.importorskip("jsonschema")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 60},
        "relevance": {"type": "integer", "enum": [1, 2, 3, 4, 5]},  # llama.cpp has no min/max
    },
    "required": ["query", "relevance"],
    "additionalProperties": False,
}


def test_schema_output_parses(llama_server_spec: dict[str, Any]) -> None:
    with load_backend(parse_model_spec(llama_server_spec)) as backend:
        reqs = [
            Request.chat(
                f"Write a web search query about {topic} and rate its relevance from 1 to 5, as JSON.",
                schema=SCHEMA,
                sampling=Sampling(max_tokens=64, seed=i),
            )
            for i, topic in enumerate(["gardening", "tax law", "volcanoes"])
        ]
        comps = backend.generate(reqs)
    for comp in comps:
        assert comp.error is None and comp.finish_reasons == ["stop"], comp
        # llama-cpp-python's schema grammar admits raw control characters inside strings
        jsonschema.validate(json.loads(comp.text, strict=False), SCHEMA)


def test_n_samples_differ_at_temperature_one(llama_server_spec: dict[str, Any]) -> None:
    with load_backend(parse_model_spec(llama_server_spec)) as backend:
        req = Request.chat("Name a fruit.", sampling=Sampling(temperature=1.0, max_tokens=16, n=4))
        comp = backend.generate([req])[0]
    assert comp.error is None and len(comp.texts) == 4
    assert len(set(comp.texts)) > 1
    assert comp.tokens_out >= 4 and comp.tokens_in > 0


def test_tokens_recorded_in_the_ledger(llama_server_spec: dict[str, Any], tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    reqs = [Request.chat(f"Count to {i}.", sampling=Sampling(max_tokens=12, seed=i)) for i in range(3)]
    with LedgeredBackend(
        load_backend(parse_model_spec(llama_server_spec)), ledger, "teacher", "seed"
    ) as backend:
        comps = backend.generate(reqs)
        assert backend.sent == 3 and backend.replayed == 0
        again = backend.generate(reqs)
        assert backend.sent == 3 and backend.replayed == 3
    assert [c.texts for c in again] == [c.texts for c in comps] and all(c.cached for c in again)
    totals = ledger.totals(stage="seed", role="teacher")
    assert totals.calls == 3 and totals.errors == 0
    assert totals.tokens_in == sum(c.tokens_in for c in comps) > 0
    assert totals.tokens_out == sum(c.tokens_out for c in comps) > 0
    rows = ledger.rows()
    assert all(
        r["tokens_in"] > 0 and r["tokens_out"] > 0 and r["model"] == llama_server_spec["model"] for r in rows
    )


def test_killed_mid_batch_fails_clearly_and_rerun_sends_only_the_missing(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    port = free_port()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    reqs = [
        Request.chat(f"Write one sentence about the number {i}.", sampling=Sampling(max_tokens=24, seed=i))
        for i in range(8)
    ]

    def backend_for(server: LlamaCppServer) -> LedgeredBackend:
        client = OpenAIBackend(
            "smollm2",
            base_url=server.base_url,
            concurrency=1,
            max_retries=2,
            retry_initial_s=0.1,
            retry_max_s=0.3,
            timeout_s=60,
        )
        return LedgeredBackend(client, ledger, role="junior", stage="candidates", flush_every=2)

    server = LlamaCppServer(
        smollm2_gguf, threads=1, n_ctx=1024, port=port, alias="smollm2", log_path=tmp_path / "a.log"
    )
    server.start()
    backend = backend_for(server)

    def kill_after_two_chunks() -> None:
        deadline = time.monotonic() + 120
        while ledger.totals().calls < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()

    killer = threading.Thread(target=kill_after_two_chunks)
    killer.start()
    try:
        with pytest.raises(BackendError) as info:
            backend.generate(reqs)
    finally:
        killer.join()
        server.stop()
        backend.close()
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1" in message and "3 attempt" in message
    done = ledger.totals().calls
    assert 4 <= done < 8 and done % 2 == 0 and backend.sent == done + 1
    # the request the dead server failed is a row with its error and its 3 tries, never an answer;
    # the chunk that failed left nothing half-recorded
    failed = [r for r in ledger.rows() if r["error"] is not None]
    assert len(ledger.rows()) == done + 1 and len(failed) == 1
    assert failed[0]["response"] is None and failed[0]["attempts"] == 3

    with LlamaCppServer(
        smollm2_gguf, threads=1, n_ctx=1024, port=port, alias="smollm2", log_path=tmp_path / "b.log"
    ) as again:
        rerun = backend_for(again)
        comps = rerun.generate(reqs)
        rerun.close()
    assert rerun.replayed == done and rerun.sent == 8 - done
    assert sum(c.cached for c in comps) == done
    assert all(c.error is None and c.text for c in comps)
    assert len(ledger.rows()) == 8 and ledger.totals().calls == 8


def test_backend_reports_a_dead_server_with_its_log(smollm2_gguf: Path, tmp_path: Path) -> None:
    backend = LlamaCppServerBackend(
        str(smollm2_gguf),
        threads=1,
        n_ctx=1024,
        max_retries=1,
        retry_initial_s=0.05,
        log_path=tmp_path / "s.log",
    )
    assert backend.generate([Request.chat("Hi", sampling=Sampling(max_tokens=4))])[0].error is None
    pid = backend.server.process.pid  # type: ignore[union-attr]
    backend.server.kill()
    with pytest.raises(BackendError) as info:
        backend.generate([Request.chat("Hi again", sampling=Sampling(max_tokens=4))])
    assert backend.base_url in str(info.value) and "has ended" in str(info.value)
    backend.close()
    assert not _alive(pid)


def test_close_stops_the_server(smollm2_gguf: Path, tmp_path: Path) -> None:
    spec = LlamaCppServerSpec(
        model="smollm2-135m-instruct",
        n_ctx=1024,
        options={"log_path": str(tmp_path / "s.log")},
    )
    backend = load_backend(spec, threads=1)
    assert isinstance(backend, LlamaCppServerBackend)
    pid = backend.server.process.pid  # type: ignore[union-attr]
    url = backend.base_url
    backend.close()
    backend.close()  # twice is fine
    assert not _alive(pid)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/models", timeout=2)
    assert (tmp_path / "s.log").stat().st_size > 0


_CHILD = textwrap.dedent(
    """
    import sys, time
    from speed.llm.server import LlamaCppServer
    server = LlamaCppServer(sys.argv[1], threads=1, n_ctx=512, log_path=sys.argv[2]).start()
    print(server.process.pid, flush=True)
    if sys.argv[3] == "exit":
        sys.exit(0)  # no stop(): atexit must do it
    time.sleep(120)
    """
)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_server_never_outlives_its_owner(smollm2_gguf: Path, tmp_path: Path, how: str) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(smollm2_gguf), str(tmp_path / "s.log"), how],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = owner.stdout.readline() if owner.stdout else ""
        assert line.strip().isdigit(), (
            f"owner printed {line!r}; server log: {(tmp_path / 's.log').read_text()[-2000:]}"
        )
        server_pid = int(line)
        if how == "sigkill":
            assert _alive(server_pid)
            owner.send_signal(signal.SIGKILL)  # no atexit, no finally: the watchdog must act
        owner.wait(timeout=60)
        assert _wait_gone(server_pid), f"server {server_pid} outlived its owner ({how})"
    finally:
        if owner.poll() is None:
            owner.kill()


def test_serve_stops_on_ctrl_c(smollm2_gguf: Path, tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from speed.llm.server import serve\n"
        f"serve({str(smollm2_gguf)!r}, port={port}, threads=1, n_ctx=512, log_path={str(tmp_path / 's.log')!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
