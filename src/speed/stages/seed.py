"""seed: the teacher writes the examples the junior is fine-tuned on (SPEED: 25K calls).

``seed.num_examples`` generation prompts are drawn on the driver (kind by ``seed.kind_mix``, a
brainstormed task of that kind, attributes from the kind's sampler; see
:func:`speed.stages.alignment.sample_prompts`) and cut into shards. A worker
(:class:`~speed.stages.generation.GenerationStage`: this process or a Ray actor) has the teacher
answer each prompt, constrained to the kind's JSON schema where the backend can, parses the answer
against the kind's pydantic schema and filters it; the driver then near-deduplicates the kept
examples across shards, in shard order.

Output ``data.jsonl``: ``{kind, task, attributes, prompt, raw, example}`` per kept example (``raw``
is the teacher's text, ``example`` the whole example). ``dropped.jsonl`` holds the rest with their
reason; ``stats["drops"]`` counts them by reason.

With a ``corpus`` configured, prompts of its ``grounded_kinds`` are built on a sampled passage
(:mod:`speed.tasks.grounded`): their rows carry the grounded kind (``retrieval_grounded``), the
passage in ``attributes["passage"]``, and an ``example`` whose positive is that passage; the junior
is trained on what the teacher wrote, and near-dedup compares that too (two queries written for one
passage are not duplicates).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from speed.stage import StageContext, register
from speed.stages.alignment import (
    build_filters,
    chat,
    check_pool,
    corpus_hashes,
    grounding,
    kind_templates,
    mix_kinds,
    parse_example,
    require_rows,
    sample_prompts,
    sampling,
    task_pool,
)
from speed.stages.generation import GenerationStage, Job, Plan, record
from speed.tasks.base import answer_words

logger = logging.getLogger(__name__)

#: the fields of a prompt that its output row keeps
PROMPT_FIELDS = ("kind", "task", "attributes", "prompt")


@register
class Seed(GenerationStage):
    """Teacher-written seed examples."""

    name = "seed"
    # 2: the prompt_echo filter (a field that repeats the prompt's own instructions is dropped)
    version = 2
    reads = ("brainstorm",)
    roles = ("teacher",)
    nothing_kept = "no teacher answer survived parsing and filters"

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        return tuple(kind_templates(mix_kinds(cfg), generate=True))

    def template_hashes(self, cfg: Any) -> dict[str, str]:
        return {**super().template_hashes(cfg), **corpus_hashes(cfg, mix_kinds(cfg))}

    def check(self, ctx: StageContext) -> None:
        rows = require_rows(ctx, "brainstorm", ("kind", "task"))
        check_pool(task_pool(rows), mix_kinds(ctx.cfg), "seed")
        grounding(ctx)  # an unreadable corpus fails here, before the first call

    def plan(self, ctx: StageContext) -> Plan:
        scfg = ctx.cfg.seed
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        prompts, _ = sample_prompts(
            pool,
            scfg.num_examples,
            scfg.kind_mix,
            ctx.rng("prompts"),
            scfg.language,
            grounding=grounding(ctx),
            max_words=answer_words(ctx.cfg.models.teacher.max_tokens),
        )
        items = [{**p.to_row(), "seed": ctx.seed_for(i)} for i, p in enumerate(prompts)]
        stats: dict[str, Any] = {"requested": len(items)}
        if ctx.cfg.corpus.enabled:
            stats["grounded"] = sum("passage" in p.attributes for p in prompts)
        return Plan.of_items(items, self.shard_size, **stats)

    def process(self, job: Job, payload: list[dict[str, Any]]) -> dict[str, Any]:
        from speed.tasks import get_kind

        spec = job.cfg.models.teacher
        kinds = [get_kind(item["kind"]) for item in payload]
        comps = job.generate(
            "teacher",
            [
                chat(item["prompt"], sampling(spec, seed=item["seed"]), schema=kind.json_schema())
                for item, kind in zip(payload, kinds, strict=True)
            ],
        )
        filters = build_filters(job.cfg.seed.check_language)
        records = []
        for item, kind, comp in zip(payload, kinds, comps, strict=True):
            row = {**{k: item[k] for k in PROMPT_FIELDS}, "raw": comp.text}
            if comp.error is not None:
                records.append(record(row, "generation_error", comp.error))
                continue
            example, reason, detail = parse_example(kind, comp.text, item["attributes"], filters)
            if example is None:
                records.append(record(row, reason, detail))
            else:
                records.append(record({**row, "example": kind.complete(example, item["attributes"])}))
        return {"records": records}

    def accept(self, ctx: StageContext) -> Callable[[dict[str, Any]], str | None]:
        from speed.data.dedup import MinHashDeduplicator, example_text
        from speed.tasks import get_kind

        dedup = MinHashDeduplicator(threshold=ctx.cfg.seed.dedup_threshold, seed=ctx.cfg.run.seed)
        # what the teacher wrote: a grounded example's positive is a corpus passage, shared by design
        return lambda row: dedup.check(example_text(get_kind(row["kind"]).generated(row["example"])))

    def summarize(
        self, ctx: StageContext, kept: list[dict[str, Any]], dropped: list[dict[str, Any]], plan: Plan
    ) -> dict[str, Any]:
        return {**plan.stats, "per_kind": dict(Counter(r["kind"] for r in kept))}
