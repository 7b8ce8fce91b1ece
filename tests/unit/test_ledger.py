"""The SQLite call ledger: record, replay, totals, no secrets."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

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


def test_ledger_is_wal_and_stores_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-123456789")
    ledger = Ledger(tmp_path / "l.sqlite")
    LedgeredBackend(CountingBackend(), ledger, role="teacher", stage="s").generate([Request.chat("x")])
    with sqlite3.connect(tmp_path / "l.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"sk-test-secret" not in blob


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
