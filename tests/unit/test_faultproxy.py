"""The fault proxy (tests/faultproxy.py) on its own, and the OpenAI client's counting through it (fast).

The upstream is :class:`fake_openai.FakeOpenAIServer` (a real HTTP server on 127.0.0.1); the proving
tests with a real llama.cpp server behind the proxy are in tests/integration/test_faults.py. Here:
each fault looks on the wire as it should, the draws are deterministic given the seed whatever the
arrival order, ``count`` caps a burst, and the client counts each failed attempt by its cause.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fake_openai import FakeOpenAIServer
from faultproxy import Fault, FaultProxy
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import BackendError, Request
from speed.llm.openai_api import OpenAIBackend


@pytest.fixture
def upstream() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    yield server
    server.close()


_HTTP = httpx.Client()


def _post(url: str, prompt: str, timeout: float = 5.0) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    return _HTTP.post(f"{url}/chat/completions", json=body, timeout=timeout)


def test_no_fault_forwards_whole_answers(upstream: FakeOpenAIServer) -> None:
    with FaultProxy(upstream.base_url) as proxy:
        resp = _post(proxy.base_url, "hello")
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "answer to hello #0 seed None"
    assert upstream.hits["hello"] == 1 and proxy.forwarded == 1
    assert proxy.delivered == ["answer to hello #0 seed None"]


def test_each_fault_on_the_wire(upstream: FakeOpenAIServer) -> None:
    with FaultProxy(upstream.base_url, [Fault("429", retry_after_s=3)]) as proxy:
        resp = _post(proxy.base_url, "a")
        assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    with FaultProxy(upstream.base_url, [Fault("500")]) as proxy:
        assert _post(proxy.base_url, "b").status_code == 500
    with FaultProxy(upstream.base_url, [Fault("nonjson")]) as proxy:
        resp = _post(proxy.base_url, "c")
        assert resp.status_code == 200 and resp.text.startswith("<html>")
    with FaultProxy(upstream.base_url, [Fault("truncate")]) as proxy:
        resp = _post(proxy.base_url, "d")
        # framed as whole, but the JSON is cut: only a parser can tell
        assert resp.status_code == 200 and resp.text.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(resp.text)
    with FaultProxy(upstream.base_url, [Fault("drop")]) as proxy, pytest.raises(httpx.RemoteProtocolError):
        _post(proxy.base_url, "e")
    with FaultProxy(upstream.base_url, [Fault("hang")]) as proxy, pytest.raises(httpx.ReadTimeout):
        _post(proxy.base_url, "f", timeout=0.3)
    with FaultProxy(upstream.base_url, [Fault("latency", latency_s=0.05)]) as proxy:
        assert _post(proxy.base_url, "g").status_code == 200
        assert proxy.hits == {"latency": 1}
    # faults that answer in the proxy's place never reach the server; the others were forwarded
    assert {p: upstream.hits[p] for p in "abcdefg"} == {
        "a": 0,
        "b": 0,
        "c": 0,
        "d": 1,
        "e": 1,
        "f": 0,
        "g": 1,
    }


def _fault_pattern(upstream: FakeOpenAIServer, seed: int, prompts: list[str], threads: int) -> dict[str, int]:
    with (
        FaultProxy(upstream.base_url, [Fault("500", rate=0.5)], seed=seed) as proxy,
        ThreadPoolExecutor(threads) as pool,
    ):
        codes = list(pool.map(lambda p: _post(proxy.base_url, p).status_code, prompts))
    return dict(zip(prompts, codes, strict=True))


def test_draws_are_deterministic_given_the_seed(upstream: FakeOpenAIServer) -> None:
    prompts = [f"p{i}" for i in range(40)]
    one_by_one = _fault_pattern(upstream, 7, prompts, threads=1)
    # the same seed in another arrival order (8 at once, reversed) hits the same requests
    assert _fault_pattern(upstream, 7, prompts[::-1], threads=8) == one_by_one
    assert 5 < list(one_by_one.values()).count(500) < 35
    assert _fault_pattern(upstream, 8, prompts, threads=1) != one_by_one


def test_count_caps_a_burst_and_retries_draw_again(upstream: FakeOpenAIServer) -> None:
    with FaultProxy(upstream.base_url, [Fault("429", count=3)]) as proxy:
        codes = [_post(proxy.base_url, "same").status_code for _ in range(5)]
    assert codes == [429, 429, 429, 200, 200]
    assert [s.repeat for s in proxy.log] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="not one of"):
        Fault("teapot")


def _client(url: str, **kw: float) -> OpenAIBackend:
    args = {
        "concurrency": 2,
        "timeout_s": 0.5,
        "max_retries": 3,
        "retry_initial_s": 0.01,
        "retry_max_s": 0.05,
    }
    args.update(kw)
    return OpenAIBackend("fake-model", base_url=url, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (Fault("429", count=2, retry_after_s=None), "429"),
        (Fault("500", count=2), "5xx"),
        (Fault("drop", count=2), "dropped"),
        (Fault("hang", count=2), "timeout"),
    ],
)
def test_client_counts_failed_attempts_by_cause(
    upstream: FakeOpenAIServer, tmp_path: Path, fault: Fault, cause: str
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with (
        FaultProxy(upstream.base_url, [fault]) as proxy,
        LedgeredBackend(_client(proxy.base_url, concurrency=1), ledger, "teacher", "seed") as llm,
    ):
        comp = llm.generate([Request.chat("q")])[0]
    assert comp.error is None and comp.attempts == 3 and comp.failures == {cause: 2}
    totals = ledger.totals()
    assert (totals.calls, totals.attempts, totals.failed[cause]) == (1, 3, 2)
    assert sum(totals.failed.values()) == 2


def test_unanswered_request_is_a_ledger_row_with_its_attempts(
    upstream: FakeOpenAIServer, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with FaultProxy(upstream.base_url, [Fault("500")]) as proxy:
        llm = LedgeredBackend(_client(proxy.base_url, max_retries=2), ledger, "teacher", "seed")
        with pytest.raises(BackendError, match="3 attempt"):
            llm.generate([Request.chat("q")])
        llm.close()
    (row,) = ledger.rows()
    assert row["response"] is None and row["error"].startswith("unanswered: endpoint")
    assert (row["attempts"], row["failed_5xx"]) == (3, 3)
    # a rerun asks again and adds to the same row; what is answered then is stored
    with LedgeredBackend(_client(upstream.base_url), ledger, "teacher", "seed") as llm:
        assert llm.generate([Request.chat("q")])[0].error is None
    (row,) = ledger.rows()
    assert row["error"] is None and (row["attempts"], row["failed_5xx"]) == (4, 3)


def test_retry_after_is_honoured_and_bounded() -> None:
    import tenacity

    from speed.llm.openai_api import _RetryableStatus

    backend = _client("http://127.0.0.1:9/v1", retry_initial_s=0.01, retry_max_s=5.0)

    def wait_after(retry_after: float | None) -> float:
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = 1
        state.set_exception((_RetryableStatus, _RetryableStatus(429, "", retry_after), None))
        return backend._wait(state)

    assert wait_after(None) < 1.0
    assert wait_after(2.0) >= 2.0
    assert wait_after(3600.0) == 5.0  # a server asking for an hour gets retry_max_s
    backend.close()


def test_old_ledger_without_failure_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE calls (key TEXT PRIMARY KEY, stage TEXT NOT NULL, role TEXT NOT NULL, "
            "model TEXT NOT NULL, request TEXT NOT NULL, response TEXT, tokens_in INTEGER NOT NULL "
            "DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0, latency_s REAL NOT NULL DEFAULT 0, "
            "attempts INTEGER NOT NULL DEFAULT 0, error TEXT, created_at REAL NOT NULL, "
            "updated_at REAL NOT NULL)"
        )
        conn.execute(
            "INSERT INTO calls VALUES ('k', 'seed', 'teacher', 'm', '{}', '{}', 1, 2, 0.1, 2, NULL, 0, 0)"
        )
    conn.close()
    # a reader adds nothing and sees no failures; a run adds the columns and keeps the rows
    reader = Ledger(path, create=False)
    assert (reader.totals().calls, reader.totals().attempts, reader.totals().failed["429"]) == (1, 2, 0)
    reader.close()
    with sqlite3.connect(path) as conn:
        assert "failed_429" not in {r[1] for r in conn.execute("PRAGMA table_info(calls)")}
    conn.close()
    writer = Ledger(path)
    assert writer.totals().calls == 1 and writer.rows()[0]["failed_timeout"] == 0
    writer.close()
