"""The SQLite call ledger: record, replay, totals, no secrets."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from speed.ledger import Ledger, LedgeredBackend
from speed.llm.base import Backend, BackendError, Completion, Request, Sampling


class CountingBackend(Backend):
    name = "counting"
    model_id = "m"

    def __init__(self, fail_on: set[str] | None = None):
        self.seen: list[str] = []
        self.fail_on = fail_on or set()

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            self.seen.append(text)
            if text in self.fail_on:
                out.append(Completion(error="garbage: not JSON"))
            else:
                out.append(Completion(texts=[text.upper()], tokens_in=5, tokens_out=2))
        return out


def test_answered_requests_are_replayed_not_sent(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    backend = CountingBackend()
    llm = LedgeredBackend(backend, ledger, role="teacher", stage="seed", flush_every=2)
    reqs = [Request.chat(f"q{i}") for i in range(5)]
    first = llm.generate(reqs)
    assert [c.text for c in first] == [f"Q{i}" for i in range(5)]
    llm2 = LedgeredBackend(backend, ledger, role="teacher", stage="seed")
    again = llm2.generate([*reqs, Request.chat("q5")])
    assert backend.seen == [f"q{i}" for i in range(6)]
    assert llm2.replayed == 5 and llm2.sent == 1
    assert all(c.cached for c in again[:5]) and not again[5].cached
    t = ledger.totals(stage="seed", role="teacher")
    assert (t.calls, t.tokens_in, t.tokens_out) == (6, 30, 12)


def test_a_write_left_open_by_an_interrupt_does_not_block_the_next(tmp_path):
    # Ctrl-C can land between an earlier write's BEGIN and its try block; the answers saved right
    # after the interrupt (the ones already paid for) must still be stored
    ledger = Ledger(tmp_path / "l.sqlite")
    with ledger._conn() as conn:
        conn.execute("BEGIN IMMEDIATE")
        assert conn.in_transaction
    llm = LedgeredBackend(CountingBackend(), ledger, role="teacher", stage="seed")
    llm.generate([Request.chat("q0")])
    ledger.close()
    with sqlite3.connect(tmp_path / "l.sqlite") as other:
        assert other.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1


def test_key_depends_on_role_model_sampling_and_schema():
    r = Request.chat("hello")
    assert r.key("teacher", "a") != r.key("junior", "a")
    assert r.key("teacher", "a") != r.key("teacher", "b")
    assert r.key("teacher", "a") != Request.chat("hello", sampling=Sampling(temperature=0)).key(
        "teacher", "a"
    )
    assert r.key("teacher", "a") != Request.chat("hello", schema={"type": "object"}).key("teacher", "a")
    assert r.key("teacher", "a") == Request.chat("hello").key("teacher", "a")


def test_errors_are_recorded_but_asked_again(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    backend = CountingBackend(fail_on={"bad"})
    llm = LedgeredBackend(backend, ledger, role="teacher", stage="judge")
    out = llm.generate([Request.chat("bad"), Request.chat("ok")])
    assert out[0].error and out[1].text == "OK"
    backend.fail_on.clear()
    out = LedgeredBackend(backend, ledger, role="teacher", stage="judge").generate([Request.chat("bad")])
    assert out[0].text == "BAD"
    assert backend.seen == ["bad", "ok", "bad"]
    with sqlite3.connect(tmp_path / "l.sqlite") as conn:
        attempts, error = conn.execute(
            "SELECT attempts, error FROM calls WHERE request LIKE '%bad%'"
        ).fetchone()
    assert attempts == 2 and error is None


def test_duplicate_requests_in_one_batch_are_sent_once(tmp_path):
    backend = CountingBackend()
    llm = LedgeredBackend(backend, Ledger(tmp_path / "l.sqlite"), role="teacher", stage="s")
    out = llm.generate([Request.chat("x"), Request.chat("x")])
    assert [c.text for c in out] == ["X", "X"] and backend.seen == ["x"]


def test_ledger_is_wal_and_stores_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The key goes to the server (so the backend really read it) and nowhere else: not in the
    SQLite file, its WAL, nor the logs; the endpoint URL is not stored either."""
    from fake_openai import FakeOpenAIServer
    from speed.config import OpenAISpec
    from speed.llm import load_backend

    secret = "sk-test-secret-value-123456789"
    monkeypatch.setenv("SPEED_LEDGER_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    server = FakeOpenAIServer()
    try:
        spec = OpenAISpec(
            model="fake-model",
            base_url=server.base_url,
            api_key_env="SPEED_LEDGER_TEST_KEY",
            max_retries=2,
            timeout_s=2.0,
            options={"retry_initial_s": 0.01, "retry_max_s": 0.02},
        )
        ledger = Ledger(tmp_path / "l.sqlite")
        backend = LedgeredBackend(load_backend(spec), ledger, role="teacher", stage="s")
        # an answer after a retried 500, an unreadable answer (an error) and a plain answer
        comps = backend.generate([Request.chat("500:1"), Request.chat("garbage"), Request.chat("x")])
        backend.close()
    finally:
        server.close()
    assert server.headers and all(h["Authorization"] == f"Bearer {secret}" for h in server.headers)
    assert comps[0].error is None and comps[1].error is not None and comps[2].error is None
    assert len(ledger.rows()) == 3
    with sqlite3.connect(tmp_path / "l.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # read the files before the ledger closes: the WAL then still holds what was written
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"answer to x" in blob  # the answers are in what is read here
    assert secret.encode() not in blob
    assert server.base_url.encode() not in blob
    assert caplog.records and secret not in caplog.text
    ledger.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in blob


def test_usage_counts_what_a_stage_run_used_sent_or_replayed(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    reqs = [Request.chat(f"q{i}") for i in range(4)]
    old = LedgeredBackend(CountingBackend(), ledger, role="teacher", stage="seed", stage_key="k1")
    old.generate(reqs)
    new = LedgeredBackend(CountingBackend(), ledger, role="teacher", stage="seed", stage_key="k2")
    new.generate([*reqs[:2], Request.chat("q9")])
    assert (new.replayed, new.sent) == (2, 1)
    assert ledger.usage("k1")["teacher"].calls == 4
    assert ledger.usage("k2")["teacher"].calls == 3 and ledger.usage("k2")["teacher"].tokens_in == 15
    assert ledger.totals(stage="seed").calls == 5
    assert ledger.usage("never") == {}


class ShortBackend(CountingBackend):
    """Answers one request fewer than asked: a broken backend."""

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return super().generate(requests)[:-1]


def test_a_backend_answering_too_few_requests_is_an_error_and_nothing_is_recorded(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    llm = LedgeredBackend(ShortBackend(), ledger, role="teacher", stage="s")
    with pytest.raises(BackendError, match="returned 1 completions for 2 requests"):
        llm.generate([Request.chat("a"), Request.chat("b")])
    assert ledger.totals().calls == 0 and llm.sent == 0
