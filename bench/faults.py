"""Faults the teacher connection survives: a real llama.cpp server behind the fault proxy.

One llama.cpp server on 127.0.0.1 serves the packaged SmolLM2-135M (one thread); in front of it,
``tests/faultproxy.py`` injects one class of fault per row (and all of them at once in the last
rows). speed's OpenAI-compatible client sends ``--requests`` short requests through the proxy,
through the call ledger (a real SQLite file), as a stage does. Per row it prints:

- ``injected``: how many times the proxy injected the fault; ``tries``: requests the proxy received;
- ``answered``: requests with an answer stored in the ledger;
- ``failed tries``: tries that failed, by cause (429, 5xx, timeout, dropped), from the ledger: the
  ledger's attempts equal the proxy's tries on every row;
- ``drops``: requests stored as an error (a 200 body that is not an answer: counted, asked again on
  a rerun), or left unanswered when the endpoint was given up;
- ``bad stored``: answers stored whose text the proxy never delivered whole (must be 0);
- ``outcome``: finished, or stopped with the error a user sees (``speed: error: ...``, exit 2; the
  messages are printed below the table);
- ``wall s``: wall time of the batch.

Usage::

    python bench/faults.py                # about a minute on 2 cores
    python bench/faults.py --requests 32 --seed 3

The client's settings are the ones printed with the conditions; figures depend on the machine's load
(printed before and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from speed.hardware import cpu_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faultproxy import Fault, FaultProxy
from speed.config import parse_model_spec
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import BackendError, Request, Sampling, load_backend
from speed.llm.server import LlamaCppServer
from speed.models import resolve_gguf

MODEL = "smollm2-135m-instruct"

#: (row name, the faults, client settings that differ from the defaults below)
SCENARIOS: list[tuple[str, list[Fault], dict[str, Any]]] = [
    ("none", [], {}),
    ("latency 0.5 s, half", [Fault("latency", rate=0.5, latency_s=0.5)], {}),
    ("drop mid-body, 1/4", [Fault("drop", rate=0.25)], {}),
    ("429 burst of 4, Retry-After 1", [Fault("429", count=4, retry_after_s=1)], {}),
    ("500, 1/4", [Fault("500", rate=0.25)], {}),
    ("truncated body, 1/4", [Fault("truncate", rate=0.25)], {}),
    ("non-JSON body, 1/4", [Fault("nonjson", rate=0.25)], {}),
    ("hang once (timeout 10 s)", [Fault("hang", count=1)], {"timeout_s": 10.0}),
    (
        "all at once, 1/10 each",
        [
            Fault("latency", rate=0.1, latency_s=0.5),
            Fault("drop", rate=0.1),
            Fault("429", rate=0.1, retry_after_s=1),
            Fault("500", rate=0.1),
            Fault("truncate", rate=0.1),
            Fault("nonjson", rate=0.1),
            Fault("hang", count=1),
        ],
        {"timeout_s": 10.0},
    ),
    ("hang always (timeout 3 s)", [Fault("hang")], {"timeout_s": 3.0, "max_retries": 1}),
    ("500 always", [Fault("500")], {}),
]


def run_row(
    upstream: str, faults: list[Fault], overrides: dict[str, Any], n: int, seed: int, workdir: Path
) -> dict[str, Any]:
    """One batch of ``n`` requests through the proxy and a fresh ledger; what came of it."""
    ledger = Ledger(workdir / "ledger.sqlite")
    requests = [
        Request.chat(f"Name a colour and a fruit. ({i})", sampling=Sampling(max_tokens=16, seed=i))
        for i in range(n)
    ]
    outcome = "finished"
    with FaultProxy(upstream, faults, seed=seed) as proxy:
        spec = client_spec(proxy.base_url) | overrides
        llm = LedgeredBackend(load_backend(parse_model_spec(spec)), ledger, "teacher", "bench")
        t0 = time.perf_counter()
        try:
            llm.generate(requests)
        except BackendError as err:
            outcome = f"stopped: {err}"
        finally:
            wall = time.perf_counter() - t0
            llm.close()
    rows = ledger.rows(limit=10 * n)
    totals = ledger.totals()
    ledger.close()
    bad = sum(
        1
        for r in rows
        if r["error"] is None and not all(t in proxy.delivered for t in json.loads(r["response"])["texts"])
    )
    return {
        "injected": sum(proxy.hits.values()),
        "sent": len(proxy.log),
        "answered": totals.calls,
        "attempts": totals.attempts,
        "by_cause": {k: v for k, v in totals.failed.items() if v},
        "drops": n - totals.calls,
        "bad": bad,
        "outcome": outcome,
        "wall_s": wall,
    }


def client_spec(base_url: str) -> dict[str, Any]:
    return {
        "backend": "openai",
        "model": MODEL,
        "base_url": base_url,
        "concurrency": 2,
        "timeout_s": 60.0,
        "max_retries": 4,
        "options": {
            "schema_mode": "json_object",
            "retry_initial_s": 0.2,
            "retry_max_s": 2.0,
            "extra_body": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per row")
    parser.add_argument("--seed", type=int, default=17, help="seeds the proxy's fault draws")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # retries log a warning each: the table says it all

    print(f"CPU: {cpu_info().label()}; {os.cpu_count()} cores; load average before: {os.getloadavg()}")
    print(
        f"teacher: llama.cpp server (python engine, 1 thread) serving {MODEL}; client: concurrency 2, "
        "max_retries 4 (1 for 'hang always'), backoff 0.2 s doubling, capped at 2 s (Retry-After "
        f"too); timeout 60 s unless the row says; {args.requests} requests of 16 tokens per row; "
        f"seed {args.seed}"
    )
    header = (
        "fault",
        "injected",
        "requests",
        "tries",
        "answered",
        "failed tries (by cause)",
        "drops",
        "bad stored",
        "outcome",
        "wall s",
    )
    lines = [header]
    errors: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LlamaCppServer(
            resolve_gguf(MODEL), threads=1, n_ctx=2048, alias=MODEL, log_path=Path(tmp) / "server.log"
        ) as server,
    ):
        for i, (name, faults, overrides) in enumerate(SCENARIOS):
            work = Path(tmp) / f"row{i}"
            r = run_row(server.base_url, faults, overrides, args.requests, args.seed, work)
            causes = ", ".join(f"{k}: {v}" for k, v in r["by_cause"].items())
            if r["outcome"] != "finished":
                errors.append(f"{name}: speed: error: {r['outcome'].removeprefix('stopped: ')}")
            lines.append(
                (
                    name,
                    str(r["injected"]),
                    str(args.requests),
                    f"{r['sent']}" + ("" if r["sent"] == r["attempts"] else f" (ledger: {r['attempts']})"),
                    str(r["answered"]),
                    f"{sum(r['by_cause'].values())}" + (f" ({causes})" if causes else ""),
                    str(r["drops"]),
                    str(r["bad"]),
                    "finished" if r["outcome"] == "finished" else "stopped, exit 2",
                    f"{r['wall_s']:.1f}",
                )
            )
            print(f"  {name}: {r}", file=sys.stderr, flush=True)
    print("| " + " | ".join(lines[0]) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(line) + " |")
    for line in errors:
        print(line)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
