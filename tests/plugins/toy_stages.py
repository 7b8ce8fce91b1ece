"""Toy stages for testing the runner: deterministic, optionally slow, no models.

``numbers`` asks a deterministic echo backend (through the real ledger) for one value per row and
sleeps between rows, so a test can kill it halfway; ``total`` reads its output.
"""

from __future__ import annotations

import json
import time
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


@register
class Numbers(Stage):
    name = "numbers"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        section = ctx.cfg.extra.get("numbers", {})
        count, delay = int(section.get("count", 10)), float(section.get("delay", 0.0))
        rng = ctx.rng("values")
        llm = LedgeredBackend(
            EchoBackend(), ctx.ledger, role="teacher", stage=ctx.name, flush_every=1, stage_key=ctx.key
        )
        rows = []
        with open(ctx.out / "progress.txt", "w") as progress:
            for i in range(count):
                req = Request.chat(f"row {i}")
                req = Request(req.messages, type(req.sampling)(seed=ctx.seed_for(i)))
                answer = int(llm.generate([req])[0].text)
                rows.append({"i": i, "value": rng.randint(0, 10**6), "answer": answer})
                progress.write(f"{i}\n")
                progress.flush()
                time.sleep(delay)
        write_jsonl(ctx.out / "data.jsonl", rows)
        return {"count": len(rows), "sent": llm.sent, "replayed": llm.replayed}


@register
class Total(Stage):
    name = "total"
    reads = ("numbers",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        rows = read_jsonl(ctx.input("numbers") / "data.jsonl")
        total = sum(r["value"] + r["answer"] for r in rows)
        (ctx.out / "total.json").write_text(json.dumps({"total": total}))
        write_jsonl(ctx.out / "data.jsonl", [{"total": total, "n": len(rows)}])
        return {"count": 1}
