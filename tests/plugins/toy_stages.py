"""Toy stages for testing the runner: deterministic, optionally slow, no models.

``numbers`` asks a deterministic echo backend (through the real ledger) for one value per row and
sleeps between rows, so a test can kill it halfway; ``total`` reads its output.

``numbers`` resumes from its work folder as a sharded stage does: each finished row is appended to
``rows.jsonl`` there, and a rerun with the same key starts after the last one (its stats say how
many rows came from the work folder). What makes it slow (``$SPEED_TOY_DELAY``) or fail
(:data:`FAIL_AT`) is set outside the config, so that a killed run and its rerun share one key.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from speed.io import read_jsonl, write_jsonl
from speed.ledger import LedgeredBackend
from speed.llm.base import Backend, Completion, Request
from speed.runner import Stage, StageContext, register


class EchoBackend(Backend):
    """Answers each request with a hash of its seed: deterministic, instant."""

    name = "echo"
    model_id = "echo-1"

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [
            Completion(texts=[str((r.sampling.seed or 0) % 1000)], tokens_in=3, tokens_out=1)
            for r in requests
        ]


#: a test sets it (not the config, which is in the key): ``numbers`` raises before this row
FAIL_AT: int | None = None
#: how many times each toy stage's ``run`` was called in this process
RUNS: Counter[str] = Counter()


class ToyCrash(RuntimeError):
    """What ``numbers`` raises at :data:`FAIL_AT`."""


def _finished_rows(path: Any) -> list[dict[str, Any]]:
    """The rows a previous attempt finished (a line cut by a kill is not one)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


@register
class Numbers(Stage):
    name = "numbers"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        RUNS[self.name] += 1
        section = ctx.cfg.extra.get("numbers", {})
        count = int(section.get("count", 10))
        delay = float(os.environ.get("SPEED_TOY_DELAY", section.get("delay", 0.0)))
        llm = LedgeredBackend(
            EchoBackend(), ctx.ledger, role="teacher", stage=ctx.name, flush_every=1, stage_key=ctx.key
        )
        rows = _finished_rows(ctx.out / "rows.jsonl")
        resumed = len(rows)
        with open(ctx.out / "rows.jsonl", "a") as log, open(ctx.out / "progress.txt", "a") as progress:
            for i in range(resumed, count):
                if FAIL_AT is not None and i == FAIL_AT:
                    raise ToyCrash(f"numbers: failing at row {i}, as the test asked")
                req = Request.chat(f"row {i}")
                req = Request(req.messages, type(req.sampling)(seed=ctx.seed_for(i)))
                answer = int(llm.generate([req])[0].text)
                # one stream per row, so that a resumed run draws what an uninterrupted one does
                row = {"i": i, "value": ctx.rng(f"values/{i}").randint(0, 10**6), "answer": answer}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                progress.write(f"{i}\n")
                progress.flush()
                time.sleep(delay)
        write_jsonl(ctx.out / "data.jsonl", rows)
        return {"count": len(rows), "sent": llm.sent, "replayed": llm.replayed, "resumed_rows": resumed}


@register
class Total(Stage):
    name = "total"
    reads = ("numbers",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        RUNS[self.name] += 1
        rows = read_jsonl(ctx.input("numbers") / "data.jsonl")
        total = sum(r["value"] + r["answer"] for r in rows)
        (ctx.out / "total.json").write_text(json.dumps({"total": total}))
        write_jsonl(ctx.out / "data.jsonl", [{"total": total, "n": len(rows)}])
        return {"count": 1}
