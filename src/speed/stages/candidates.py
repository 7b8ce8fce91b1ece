"""candidates: the junior samples K candidates per new prompt, for the judge (SPEED: K = 5).

``candidates.num_prompts`` generation prompts are drawn on the driver like the seed's (same kinds,
tasks and attribute samplers) but from this stage's own random stream, and any prompt the seed
already used is skipped, so the junior is judged on prompts it was not trained on. In the workers
(:class:`~speed.stages.generation.GenerationStage`) the junior (``models.junior`` run on the junior
stage's merged model) answers each with ``k`` samples at ``candidates.temperature`` (1.0). No JSON
schema is imposed: the judge sees what the junior writes.

Output ``data.jsonl``: ``{kind, task, attributes, prompt, candidates, parsed, finish}`` where
``parsed[i]`` says whether candidate i parses as the kind's schema (the judge may use it). Requests
the backend failed on go to ``dropped.jsonl``, counted under ``generation_error``.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.stage import StageContext, register
from speed.stages.alignment import (
    chat,
    check_pool,
    corpus_hashes,
    grounding,
    kind_templates,
    mix_kinds,
    require_rows,
    sample_prompts,
    sampling,
    task_pool,
)
from speed.stages.generation import GenerationStage, Job, Plan, record
from speed.tasks.base import answer_words

logger = logging.getLogger(__name__)


@register
class Candidates(GenerationStage):
    """K junior samples per new prompt."""

    name = "candidates"
    reads = ("brainstorm", "seed", "junior")
    roles = ("junior",)
    release_after = ("junior",)
    nothing_kept = "the junior answered no prompt"

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        return tuple(kind_templates(mix_kinds(cfg), generate=True))

    def template_hashes(self, cfg: Any) -> dict[str, str]:
        return {**super().template_hashes(cfg), **corpus_hashes(cfg, mix_kinds(cfg))}

    def check(self, ctx: StageContext) -> None:
        check_pool(
            task_pool(require_rows(ctx, "brainstorm", ("kind", "task"))), mix_kinds(ctx.cfg), "candidates"
        )
        require_rows(ctx, "seed", ("prompt",))
        ctx.weights("junior")  # the trained junior, as this stage reads 'junior'

    def plan(self, ctx: StageContext) -> Plan:
        ccfg = ctx.cfg.candidates
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        used = {r["prompt"] for r in require_rows(ctx, "seed", ("prompt",))}
        prompts, repeats = sample_prompts(
            pool,
            ccfg.num_prompts,
            ctx.cfg.seed.kind_mix,
            ctx.rng("prompts"),
            ctx.cfg.seed.language,
            used,
            grounding=grounding(ctx),
            max_words=answer_words(ctx.cfg.models.junior.max_tokens),
        )
        # the ledger names the junior by its folder in the run; the junior's key in the seed makes a
        # retrained junior's requests new ones instead of replays of the old junior's answers
        junior_key = ctx.manifest("junior")["key"]
        items = [{**p.to_row(), "seed": ctx.seed_for(junior_key, i)} for i, p in enumerate(prompts)]
        return Plan.of_items(items, self.shard_size, repeated_prompts_skipped=repeats)

    def process(self, job: Job, payload: list[dict[str, Any]]) -> dict[str, Any]:
        from speed.tasks import get_kind

        ccfg, spec = job.cfg.candidates, job.cfg.models.junior
        comps = job.generate(
            "junior",  # the trained junior (the env resolves its weights)
            [
                chat(
                    item["prompt"],
                    sampling(spec, seed=item["seed"], temperature=ccfg.temperature, n=ccfg.k),
                    schema=get_kind(item["kind"]).json_schema() if ccfg.json_schema else None,
                )
                for item in payload
            ],
        )
        records = []
        for item, comp in zip(payload, comps, strict=True):
            row = {k: item[k] for k in ("kind", "task", "attributes", "prompt")}
            if comp.error is not None or not comp.texts:
                records.append(record(row, "generation_error", comp.error or "no text"))
                continue
            kind = get_kind(item["kind"])
            parsed = [kind.parse(t).ok for t in comp.texts]
            records.append(
                record(
                    {**row, "candidates": list(comp.texts), "parsed": parsed, "finish": comp.finish_reasons}
                )
            )
        return {"records": records}

    def summarize(
        self, ctx: StageContext, kept: list[dict[str, Any]], dropped: list[dict[str, Any]], plan: Plan
    ) -> dict[str, Any]:
        samples = sum(len(r["candidates"]) for r in kept)
        parsed = sum(sum(r["parsed"]) for r in kept)
        return {
            "samples": samples,
            "parse_rate": round(parsed / samples, 4) if samples else 0.0,
            **plan.stats,
        }
