"""candidates: the junior samples K candidates per new prompt, for the judge (SPEED: K = 5).

``candidates.num_prompts`` generation prompts are drawn like the seed's (same kinds, tasks and
attribute samplers) but from this stage's own random stream, and any prompt the seed already used is
skipped, so the junior is judged on prompts it was not trained on. The junior (``models.junior``
run on the junior stage's merged model) answers each with ``k`` samples at
``candidates.temperature`` (1.0). No JSON schema is imposed: the judge sees what the junior writes.

Output ``data.jsonl``: ``{kind, task, attributes, prompt, candidates, parsed}`` where ``parsed[i]``
says whether candidate i parses as the kind's schema (the judge may use it). Requests the backend
failed on are counted under ``generation_error``.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.io import write_jsonl
from speed.stage import Stage, StageContext, StageError, register
from speed.stages.alignment import (
    chat,
    check_pool,
    generate_all,
    kind_templates,
    mix_kinds,
    require_rows,
    sample_prompts,
    sampling,
    task_pool,
)

logger = logging.getLogger(__name__)


@register
class Candidates(Stage):
    """K junior samples per new prompt."""

    name = "candidates"
    reads = ("brainstorm", "seed", "junior")
    roles = ("junior",)

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        return tuple(kind_templates(mix_kinds(cfg), generate=True))

    def check(self, ctx: StageContext) -> None:
        check_pool(
            task_pool(require_rows(ctx, "brainstorm", ("kind", "task"))), mix_kinds(ctx.cfg), "candidates"
        )
        require_rows(ctx, "seed", ("prompt",))
        ctx.weights("junior")  # the trained junior, as this stage reads 'junior'

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.data.filters import DropCounter
        from speed.tasks import get_kind

        ccfg = ctx.cfg.candidates
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        used = {r["prompt"] for r in require_rows(ctx, "seed", ("prompt",))}
        prompts, repeats = sample_prompts(
            pool, ccfg.num_prompts, ctx.cfg.seed.kind_mix, ctx.rng("prompts"), ctx.cfg.seed.language, used
        )
        spec = ctx.cfg.models.junior
        # the ledger names the junior by its folder in the run; the junior's key in the seed makes a
        # retrained junior's requests new ones instead of replays of the old junior's answers
        junior_key = ctx.manifest("junior")["key"]
        requests = [
            chat(
                p.prompt,
                sampling(spec, seed=ctx.seed_for(junior_key, i), temperature=ccfg.temperature, n=ccfg.k),
            )
            for i, p in enumerate(prompts)
        ]
        llm = ctx.llm("junior")  # the trained junior (ctx.weights)
        comps = generate_all(ctx, llm, requests, "candidate lists")
        ctx.session.release("junior")

        counter = DropCounter("candidates")
        rows: list[dict[str, Any]] = []
        parsed_total = 0
        for p, comp in zip(prompts, comps, strict=True):
            if comp.error is not None or not comp.texts:
                counter.drop("generation_error", comp.error or "no text")
                continue
            kind = get_kind(p.kind)
            parsed = [kind.parse(t).ok for t in comp.texts]
            parsed_total += sum(parsed)
            counter.keep()
            rows.append(
                {
                    **p.to_row(),
                    "candidates": list(comp.texts),
                    "parsed": parsed,
                    "finish": comp.finish_reasons,
                }
            )
        write_jsonl(ctx.out / "data.jsonl", rows)
        counter.log_summary()
        if not rows:
            raise StageError(
                f"stage 'candidates': the junior answered no prompt (drops: {dict(counter.reasons)})"
            )
        samples = sum(len(r["candidates"]) for r in rows)
        return {
            "count": len(rows),
            "samples": samples,
            "parse_rate": round(parsed_total / samples, 4) if samples else 0.0,
            "repeated_prompts_skipped": repeats,
            "drops": dict(counter.reasons),
        }
