"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that misbehaves on purpose.

The server (:class:`fake_openai.FakeOpenAIServer`, http.server in a thread) reads what to do from the
user message: ``429:2`` answers 429 twice and then properly, ``500:1``, ``slow:1`` (sleeps past the
client's timeout), ``drop:1`` (closes the connection without an answer), ``garbage`` (200 with an
HTML body), ``nochoices``, ``always500``. Every assertion checks both sides: the client's
``Completion.attempts`` and the server's hit counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from fake_openai import FakeOpenAIServer
from speed.config import OpenAISpec
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import BackendError, Request, Sampling, load_backend
from speed.llm.openai_api import OpenAIBackend, redact_url


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    yield server
    server.close()


def _client(base_url: str, **kw: Any) -> OpenAIBackend:
    args: dict[str, Any] = dict(
        base_url=base_url, concurrency=4, timeout_s=0.5, max_retries=3, retry_initial_s=0.01, retry_max_s=0.05
    )
    args.update(kw)
    return OpenAIBackend("fake-model", **args)


def test_retries_drops_and_nothing_lost(fake: FakeOpenAIServer) -> None:
    prompts = ["ok", "429:2", "500:1", "slow:1", "drop:1", "garbage", "nochoices", "badrequest", "ok2"]
    with _client(fake.base_url) as backend:
        comps = backend.generate([Request.chat(p) for p in prompts])
    assert len(comps) == len(prompts)
    by = dict(zip(prompts, comps, strict=True))
    # retried until success: attempts seen by the client match hits seen by the server
    for prompt, attempts in {"ok": 1, "429:2": 3, "500:1": 2, "slow:1": 2, "drop:1": 2, "ok2": 1}.items():
        assert by[prompt].error is None, (prompt, by[prompt].error)
        assert by[prompt].attempts == attempts == fake.hits[prompt], prompt
        assert by[prompt].text.startswith(f"answer to {prompt}")
        assert by[prompt].tokens_in == 7 and by[prompt].tokens_out == 5
    # garbage and rejections are counted drops with a reason, sent once, never a crash
    assert by["garbage"].error is not None and "not JSON" in by["garbage"].error
    assert by["nochoices"].error is not None and "choices" in by["nochoices"].error
    assert by["badrequest"].error is not None and "HTTP 400" in by["badrequest"].error
    for prompt in ("garbage", "nochoices", "badrequest"):
        assert by[prompt].texts == [] and fake.hits[prompt] == 1 and by[prompt].attempts == 1


def test_dead_endpoint_raises_naming_it(fake: FakeOpenAIServer) -> None:
    backend = _client(fake.base_url, max_retries=2)
    with pytest.raises(BackendError) as info:
        backend.generate([Request.chat("always500")])
    message = str(info.value)
    assert f"127.0.0.1:{fake.port}/v1" in message and "HTTP 503" in message and "3 attempt" in message
    assert fake.hits["always500"] == 3
    backend.close()


def test_dead_endpoint_in_a_batch_stops_the_others_quickly(fake: FakeOpenAIServer) -> None:
    backend = _client(fake.base_url, max_retries=2, concurrency=2)
    with pytest.raises(BackendError):
        backend.generate([Request.chat("always500")] + [Request.chat(f"500:{i}") for i in range(6, 12)])
    backend.close()
    # requests still queued when the endpoint was found dead were never sent
    assert sum(fake.hits.values()) < 3 + 6 * 7


def test_nothing_listening_names_the_endpoint_without_credentials() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = _client(f"http://user:secret@127.0.0.1:{port}/v1?token=abc", max_retries=1)
    with pytest.raises(BackendError) as info:
        backend.generate([Request.chat("hello")])
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1" in message and "ConnectError" in message
    assert "secret" not in message and "token" not in message
    assert redact_url("https://u:p@host:8443/v1/?k=1") == "https://host:8443/v1"


def test_wrong_key_or_model_is_a_backend_error(fake: FakeOpenAIServer) -> None:
    with _client(fake.base_url) as backend, pytest.raises(BackendError, match="HTTP 401"):
        backend.generate([Request.chat("unauthorized")])


@pytest.mark.parametrize("honour_n", [True, False])
def test_n_samples_sent_or_looped(honour_n: bool) -> None:
    server = FakeOpenAIServer(honour_n=honour_n)
    try:
        with _client(server.base_url) as backend:
            req = Request.chat("ok", sampling=Sampling(n=3, seed=10))
            first, second = backend.generate([req, Request.chat("ok2", sampling=Sampling(n=2, seed=5))])
        assert len(first.texts) == 3 and len(set(first.texts)) == 3
        assert len(second.texts) == 2
        if honour_n:
            assert server.hits["ok"] == 1 and first.tokens_out == 15
        else:
            # one call per sample, each with its own seed so seeded samples differ
            assert server.hits["ok"] == 3 and first.attempts == 3
            assert [b.get("seed") for b in server.bodies if b["messages"][-1]["content"] == "ok"] == [
                10,
                11,
                12,
            ]
            assert first.tokens_in == 7 and first.tokens_out == 15
    finally:
        server.close()


def test_schema_modes(fake: FakeOpenAIServer) -> None:
    schema = {"title": "Example pair", "type": "object", "properties": {"q": {"type": "string"}}}
    with _client(fake.base_url) as backend:
        backend.generate([Request.chat("ok", schema=schema)])
    fmt = fake.bodies[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema
    assert fmt["json_schema"]["name"] == "Example_pair"
    with _client(fake.base_url, schema_mode="json_object") as backend:
        backend.generate([Request.chat("ok2", schema=schema)])
    assert fake.bodies[-1]["response_format"] == {"type": "json_object", "schema": schema}


def test_server_without_json_schema_gets_json_object() -> None:
    server = FakeOpenAIServer(json_object_only=True)
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    try:
        with _client(server.base_url) as backend:
            first, second = backend.generate(
                [Request.chat("ok", schema=schema), Request.chat("ok2", schema=schema)]
            )
            assert backend.schema_mode == "json_object"
        assert first.error is None and second.error is None
        assert server.bodies[-1]["response_format"] == {"type": "json_object", "schema": schema}
        # at most one refused call per request in flight when the switch happened
        assert server.hits["ok"] + server.hits["ok2"] <= 4
    finally:
        server.close()


def test_rate_limit_spaces_request_starts(fake: FakeOpenAIServer) -> None:
    with _client(fake.base_url, requests_per_minute=1200) as backend:  # one start per 50 ms
        backend.generate([Request.chat(f"ok{i}") for i in range(5)])
    gaps = [b - a for a, b in zip(fake.arrivals, fake.arrivals[1:], strict=False)]
    assert sum(gaps) >= 4 * 0.05 * 0.9


def test_from_spec_reads_key_from_env_and_never_logs_it(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    monkeypatch.setenv("SPEED_TEST_KEY", "sk-very-secret")
    spec = OpenAISpec(
        model="fake-model",
        base_url=fake.base_url,
        api_key_env="SPEED_TEST_KEY",
        max_retries=2,
        timeout_s=0.5,
        options={"retry_initial_s": 0.01, "retry_max_s": 0.02},
    )
    caplog.set_level(logging.DEBUG)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with LedgeredBackend(load_backend(spec), ledger, role="teacher", stage="seed") as backend:
        comps = backend.generate([Request.chat("500:1"), Request.chat("garbage")])
    assert fake.headers[0]["Authorization"] == "Bearer sk-very-secret"
    assert comps[0].error is None and comps[1].error is not None
    assert "sk-very-secret" not in caplog.text
    rows = ledger.rows()
    assert len(rows) == 2 and not any("sk-very-secret" in json.dumps(r) for r in rows)
    assert {r["attempts"] for r in rows} == {2, 1}
    totals = ledger.totals()
    assert (totals.calls, totals.errors, totals.tokens_in, totals.tokens_out) == (1, 1, 7, 5)

    monkeypatch.delenv("SPEED_TEST_KEY")
    with pytest.raises(ValueError, match="SPEED_TEST_KEY"):
        load_backend(spec)


def test_unknown_option_is_refused_before_a_backend_is_built(fake: FakeOpenAIServer) -> None:
    # the spec itself refuses it (a config names the field and the near one: test_model_specs.py)
    with pytest.raises(ValueError, match=r"options\.schema_mod\b"):
        OpenAISpec(model="m", base_url=fake.base_url, options={"schema_mod": "none"})  # type: ignore[arg-type]
    assert not fake.arrivals
