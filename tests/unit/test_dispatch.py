"""Dispatch decoupled from durability: a real slow HTTP server, a real SQLite ledger, real kills.

A ledgered OpenAI backend must keep ``concurrency`` requests in flight whatever ``flush_every`` is,
let no slow request hold up the others, and store each answer as it arrives: a SIGKILL, an error or
Ctrl-C mid-batch loses only the calls in flight, and a rerun sends only those. Nothing here asserts
on wall time, except the lower bound that C requests at a time cannot beat (N / C) x L; waits use
the server's gate and counts, with deadlines only to fail (not hang) when the property is broken.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import speed
from fake_openai import FakeOpenAIServer
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import BackendError, Request
from speed.llm.base import Completion
from speed.llm.openai_api import OpenAIBackend

# the child of the kill tests: the same requests through the same kind of ledgered backend
_CHILD = """
import sys
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import Request
from speed.llm.openai_api import OpenAIBackend

url, path, concurrency, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
backend = OpenAIBackend("fake-model", base_url=url, concurrency=concurrency, timeout_s=60, max_retries=0)
llm = LedgeredBackend(backend, Ledger(path), role="teacher", stage="seed", flush_every=16)
llm.generate([Request.chat(p) for p in prompts])
"""


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    yield fake
    fake.close()


def _ledgered(fake: FakeOpenAIServer, ledger: Ledger, concurrency: int, flush_every: int) -> LedgeredBackend:
    backend = OpenAIBackend(
        "fake-model", base_url=fake.base_url, concurrency=concurrency, timeout_s=60, max_retries=0
    )
    return LedgeredBackend(backend, ledger, role="teacher", stage="seed", flush_every=flush_every)


def _rows(path: Path) -> list[dict[str, Any]]:
    """Every row of the ledger, read by a connection of our own (as ``speed status`` would)."""
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM calls").fetchall()]
        except sqlite3.OperationalError:  # the child has not created the table yet
            return []


def _prompt(row: dict[str, Any]) -> str:
    return str(json.loads(row["request"])["messages"][-1]["content"])


def _check_complete(path: Path) -> set[str]:
    """Assert that every ledger row is a whole answer or an error with no answer; return the prompts answered."""
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    prompts = set()
    for row in _rows(path):
        prompt = _prompt(row)
        if row["error"] is not None:
            assert row["response"] is None and row["attempts"] >= 1, row
            continue
        comp = Completion.from_dict(json.loads(row["response"]))
        assert row["error"] is None and comp.texts == [f"answer to {prompt} #0 seed None"], row
        assert (row["tokens_in"], row["tokens_out"], row["attempts"]) == (7, 5, 1), row
        prompts.add(prompt)
    return prompts


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait for ``condition``; fail naming ``what`` if it never holds (a broken property, not slowness)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened within {timeout_s:.0f}s: {what}")
        time.sleep(0.01)


def _child(
    fake: FakeOpenAIServer, ledger: Path, concurrency: int, prompts: list[str]
) -> subprocess.Popen[bytes]:
    src = str(Path(speed.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", _CHILD, fake.base_url, str(ledger), str(concurrency), *prompts]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_batch_keeps_concurrency_requests_in_flight(server: FakeOpenAIServer, tmp_path: Path) -> None:
    n, concurrency, latency = 24, 6, 0.2
    server.latency_s = latency
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rows_at_arrival: list[int] = []
    server.on_arrival = lambda prompt: rows_at_arrival.append(len(_rows(ledger.path)))
    # flush_every as the runner sets it (the role's batch_size): it must not cap requests in flight
    with _ledgered(server, ledger, concurrency, flush_every=4) as llm:
        start = time.monotonic()
        comps = llm.generate([Request.chat(f"q{i}") for i in range(n)])
        elapsed = time.monotonic() - start
    print(
        f"\n{n} requests, latency {latency}s, concurrency {concurrency}: {elapsed:.2f}s "
        f"(N/C x L = {n / concurrency * latency:.2f}s), max in flight {server.max_in_flight}"
    )
    assert [c.text for c in comps] == [f"answer to q{i} #0 seed None" for i in range(n)]
    assert server.max_in_flight == concurrency
    assert elapsed >= n / concurrency * latency * 0.9  # never more than C at a time
    assert llm.sent == n and sum(server.hits.values()) == n
    # answers reached the ledger while later requests were still being sent: the first wave at least
    assert rows_at_arrival[-1] >= concurrency
    assert _check_complete(ledger.path) == {f"q{i}" for i in range(n)}


def test_a_slow_request_holds_up_only_itself(server: FakeOpenAIServer, tmp_path: Path) -> None:
    others = [f"q{i}" for i in range(11)]
    held_until_the_rest_was_answered = threading.Event()

    def release() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(server.answered[p] for p in others):
                held_until_the_rest_was_answered.set()
                break
            time.sleep(0.01)
        server.gate.set()  # let it go either way, so that a broken dispatch fails instead of hanging

    watcher = threading.Thread(target=release, daemon=True)
    watcher.start()
    with _ledgered(server, Ledger(tmp_path / "ledger.sqlite"), concurrency=3, flush_every=4) as llm:
        comps = llm.generate([Request.chat("wait:slow"), *(Request.chat(p) for p in others)])
    watcher.join()
    assert held_until_the_rest_was_answered.is_set(), "the other requests waited for the slow one"
    assert all(c.error is None for c in comps)


def test_sigkill_at_a_quiet_moment_loses_nothing_answered(server: FakeOpenAIServer, tmp_path: Path) -> None:
    # K quick answers, then requests the server holds: the child is killed with C of them in flight
    k, concurrency = 10, 4
    answered_first = [f"q{i}" for i in range(k)]
    held = [f"wait:{i}" for i in range(10)]
    server.latency_s = 0.05
    path = tmp_path / "ledger.sqlite"
    proc = _child(server, path, concurrency, answered_first + held)
    try:
        _until(lambda: sum(server.hits[p] for p in held) == concurrency, "the held requests arrived")
        # every worker moved on to a held request, so the K answers are in the client: stored soon
        _until(
            lambda: len(_rows(path)) == k, f"the ledger held the {k} answers while requests were in flight"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert _check_complete(path) == set(answered_first) == set(server.answered)

    before = Counter(server.hits)
    server.gate.set()
    with _ledgered(server, Ledger(path), concurrency, flush_every=16) as llm:
        comps = llm.generate([Request.chat(p) for p in answered_first + held])
    resent = Counter(server.hits) - before
    # the answered requests were replayed, the unanswered ones (in flight or never sent) sent once
    assert resent == Counter(held)
    assert (llm.replayed, llm.sent) == (k, len(held))
    assert [c.cached for c in comps] == [True] * k + [False] * len(held)
    assert _check_complete(path) == set(answered_first + held)


def test_sigkill_while_answers_stream_then_rerun_sends_only_the_rest(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    # killed at whatever moment: mid-transaction maybe, answers in flight surely
    n, concurrency = 80, 4
    prompts = [f"q{i}" for i in range(n)]
    server.latency_s = 0.03
    path = tmp_path / "ledger.sqlite"
    proc = _child(server, path, concurrency, prompts)
    try:
        _until(lambda: len(_rows(path)) >= 20, "20 answers in the ledger")
        answered_before = set(server.answered)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    recorded = _check_complete(path)  # no half-written row
    assert len(recorded) < n, "the child finished before the kill: nothing was tested"
    print(f"\nkilled with {len(recorded)} of {n} answers stored; {len(answered_before - recorded)} lost")
    # only answers in the client's hands at the kill are lost: at most one per worker, with a margin
    # for a scheduler that pauses the recording thread (chunks of flush_every=16 lost up to 15)
    assert len(answered_before - recorded) <= 2 * concurrency

    server.latency_s = 0.0
    before = Counter(server.hits)
    with _ledgered(server, Ledger(path), concurrency, flush_every=16) as llm:
        llm.generate([Request.chat(p) for p in prompts])
    resent = Counter(server.hits) - before
    assert resent == Counter(p for p in prompts if p not in recorded)
    assert (llm.replayed, llm.sent) == (len(recorded), n - len(recorded))
    assert _check_complete(path) == set(prompts)


def test_an_error_mid_batch_keeps_every_answer_received(server: FakeOpenAIServer, tmp_path: Path) -> None:
    prompts = [f"q{i}" for i in range(6)] + ["unauthorized"] + [f"q{i}" for i in range(7, 12)]
    server.latency_s = 0.05
    path = tmp_path / "ledger.sqlite"
    with (
        _ledgered(server, Ledger(path), concurrency=3, flush_every=16) as llm,
        pytest.raises(BackendError, match="HTTP 401"),
    ):
        llm.generate([Request.chat(p) for p in prompts])
    recorded = _check_complete(path)
    # every answer the server gave, before the error or in flight with it, is in the ledger
    assert recorded == set(server.answered) and set(prompts[:6]) <= recorded
    # and so is the refused request, as an error with its one attempt, never as an answer
    refused = [r for r in _rows(path) if r["error"] is not None]
    assert [(_prompt(r), r["attempts"]) for r in refused] == [("unauthorized", 1)]
    assert "HTTP 401" in refused[0]["error"]
    assert llm.sent == len(recorded) + 1

    good = [p for p in prompts if p != "unauthorized"]
    before = Counter(server.hits)
    with _ledgered(server, Ledger(path), concurrency=3, flush_every=16) as llm:
        llm.generate([Request.chat(p) for p in good])
    assert Counter(server.hits) - before == Counter(p for p in good if p not in recorded)


def test_ctrl_c_mid_batch_keeps_every_answer_received(server: FakeOpenAIServer, tmp_path: Path) -> None:
    k, concurrency = 4, 4
    answered_first = [f"q{i}" for i in range(k)]
    held = [f"wait:{i}" for i in range(concurrency)]
    interrupted = threading.Event()
    signalled: list[float] = []

    def interrupt_when_all_held(prompt: str) -> None:
        # all workers on held requests: the K answers are in the client, maybe not yet stored.
        # Checked and set under the lock: two arrivals seeing "all held" at once would send two
        # SIGINTs, and the second would cut short the saving of what the first interrupted (CI saw it)
        with server.lock:
            all_held = sum(server.hits[p] for p in held) == concurrency
            if not all_held or interrupted.is_set():
                return
            interrupted.set()
        # Ctrl-C delivered to a thread other than the main one (this server thread), as the kernel
        # may do with a process-wide SIGINT: Python only sets a flag there, and the main thread,
        # blocked waiting for answers, must still wake up and act on it
        signalled.append(time.monotonic())
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    server.on_arrival = interrupt_when_all_held
    path = tmp_path / "ledger.sqlite"
    llm = _ledgered(server, Ledger(path), concurrency, flush_every=16)
    # Python's own Ctrl-C handler (KeyboardInterrupt), whatever an earlier test left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate([Request.chat(p) for p in answered_first + held])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted.is_set()
    # acted on at once, not when a held request times out (the client's timeout is 60 s)
    assert time.monotonic() - signalled[0] < 30
    assert _check_complete(path) == set(answered_first)
    server.gate.set()
    llm.close()
