"""The teacher connection under faults: a real llama.cpp server behind the fault proxy, a real ledger.

Between speed's OpenAI-compatible client and a real llama.cpp server serving the packaged
SmolLM2-135M sits :class:`faultproxy.FaultProxy`, injecting one class of fault per test: latency,
connections dropped mid-body, a 429 burst with ``Retry-After``, 500s, truncated bodies, non-JSON
bodies, a server that hangs. Each test checks, in the SQLite ledger the run would use:

- the outcome: every request answered (a passing fault is retried), or a counted drop with its reason
  (a 200 body that is not the answer), or a :class:`BackendError` naming the endpoint and what
  happened (a fault that never passes);
- every try the proxy saw is an attempt in the ledger, and every failed try is counted by its cause;
- nothing is stored as answered that the client did not get whole: each stored text is one the proxy
  delivered in a whole 200 answer, and a truncated or non-JSON body is an error row with no response.

Figures (wall time per fault) are in bench/faults.py, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from faultproxy import Fault, FaultProxy
from speed.config import parse_model_spec
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import BackendError, Request, Sampling, load_backend

pytestmark = pytest.mark.slow

N = 4  # requests per test: each a few tokens, so a test costs seconds on one core


@dataclass
class Case:
    fault: Fault
    cause: str | None = None  # the failure cause the ledger must count, as many as the proxy's hits
    drops: str | None = None  # the reason of the counted drops (a 200 body that is not the answer)
    dead: str | None = None  # words the BackendError must carry: the fault never passes
    spec: dict[str, Any] = field(default_factory=dict)


CASES = {
    "latency": Case(Fault("latency", rate=0.5, latency_s=0.3)),
    "drop": Case(Fault("drop", count=2), cause="dropped"),
    "429": Case(Fault("429", count=3, retry_after_s=1), cause="429"),
    "500": Case(Fault("500", rate=0.5), cause="5xx", spec={"max_retries": 6}),
    "truncate": Case(Fault("truncate", count=2), drops="not JSON"),
    "nonjson": Case(Fault("nonjson", count=2), drops="not JSON"),
    "hang": Case(Fault("hang", count=1), cause="timeout", spec={"timeout_s": 15.0}),
    "hang-always": Case(
        Fault("hang"), cause="timeout", dead="timeout_s=2", spec={"timeout_s": 2.0, "max_retries": 1}
    ),
    "500-always": Case(Fault("500"), cause="5xx", dead="HTTP 500", spec={"max_retries": 2}),
}


def _requests() -> list[Request]:
    return [
        Request.chat(f"Name a colour. ({i})", sampling=Sampling(max_tokens=8, temperature=0.0, seed=i))
        for i in range(N)
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name: str, llama_server_spec: dict[str, Any], tmp_path: Path) -> None:
    case = CASES[name]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with FaultProxy(llama_server_spec["base_url"], [case.fault], seed=17) as proxy:
        spec = {**llama_server_spec, "base_url": proxy.base_url, "concurrency": 2, "max_retries": 3}
        spec["options"] = {**spec["options"], "retry_initial_s": 0.1, "retry_max_s": 2.0}
        spec.update(case.spec)
        llm = LedgeredBackend(load_backend(parse_model_spec(spec)), ledger, "teacher", "seed")
        comps = None
        try:
            comps = llm.generate(_requests())
        except BackendError as err:
            if not case.dead:
                raise
            # the words a user gets (speed: error: ...): which endpoint, what happened
            assert proxy.base_url in str(err) and case.dead in str(err), err
        finally:
            llm.close()
    hits = proxy.hits[case.fault.kind]
    assert hits > 0  # the fault really happened
    rows = ledger.rows()
    totals = ledger.totals()

    # every try the proxy saw is an attempt in the ledger, each failed one counted by its cause
    assert totals.attempts == len(proxy.log)
    expected = {"429": 0, "5xx": 0, "timeout": 0, "dropped": 0}
    if case.cause:
        expected[case.cause] = hits
    assert totals.failed == expected

    # nothing stored as answered that the client did not get whole
    for row in rows:
        if row["error"] is None:
            texts = json.loads(row["response"])["texts"]
            assert texts and all(t in proxy.delivered for t in texts), row
        else:
            assert row["response"] is None, row

    if case.dead:
        assert comps is None and totals.calls == 0
        assert all(r["error"].startswith("unanswered:") for r in rows)
        return
    assert comps is not None and len(comps) == N
    assert totals.calls + totals.errors == N and len(rows) == N
    if case.drops:
        # a 200 body that is not the answer is a counted drop, sent once, never an answer
        dropped = [r for r in rows if r["error"] is not None]
        assert len(dropped) == hits and all(case.drops in r["error"] for r in dropped)
        assert all(r["attempts"] == 1 for r in dropped)
    else:
        assert totals.errors == 0 and all(c.error is None and c.text for c in comps)
    if case.fault.kind == "429":
        _assert_retry_after_honoured(proxy, float(case.fault.retry_after_s or 0))


def _assert_retry_after_honoured(proxy: FaultProxy, seconds: float) -> None:
    """The retry of a request answered 429 came no sooner than Retry-After asked."""
    first_seen: dict[str, float] = {}
    gaps = []
    for seen in proxy.log:
        if seen.repeat == 0:
            first_seen[seen.digest] = seen.at
        elif seen.repeat == 1:
            gaps.append(seen.at - first_seen[seen.digest])
    assert gaps and min(gaps) >= seconds, gaps


def test_a_stage_whose_teacher_hangs_stops_with_words(
    llama_server_spec: dict[str, Any], tmp_path: Path
) -> None:
    """``speed stage brainstorm`` with the teacher behind a hanging proxy: exit 2, one line naming the
    endpoint and the timeout, no traceback, and the tries in the run's ledger as unanswered rows."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "configs" / "quickstart.yaml").read_text())
    with FaultProxy(llama_server_spec["base_url"], [Fault("hang")], seed=17) as proxy:
        config["models"]["teacher"] = {
            **{k: v for k, v in llama_server_spec.items() if k != "options"},
            "base_url": proxy.base_url,
            "timeout_s": 1.0,
            "max_retries": 1,
            "options": {**llama_server_spec["options"], "retry_initial_s": 0.1},
        }
        config["run"]["dir"] = str(tmp_path / "run")
        config["brainstorm"] = {**config["brainstorm"], "kinds": ["retrieval"], "calls_per_kind": 1}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run(
            [sys.executable, "-m", "speed.cli", "stage", str(path), "brainstorm"],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=300,
        )
        tries = len(proxy.log)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("speed: error: ") and proxy.base_url in last and "timeout_s=1" in last, last
    assert "Traceback" not in proc.stderr
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite", create=False)
    totals = ledger.totals(role="teacher")
    assert tries >= 2 and totals.calls == 0 and totals.attempts == tries
    assert totals.failed["timeout"] == tries
    assert all(r["response"] is None and r["error"].startswith("unanswered:") for r in ledger.rows())
