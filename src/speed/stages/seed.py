"""seed: the teacher writes the examples the junior is fine-tuned on (SPEED: 25K calls).

``seed.num_examples`` generation prompts are drawn (kind by ``seed.kind_mix``, a brainstormed task
of that kind, attributes from the kind's sampler; see :func:`speed.stages.alignment.sample_prompts`)
and the teacher answers each, constrained to the kind's JSON schema where the backend can. Each
answer is parsed, filtered and near-deduplicated.

Output ``data.jsonl``: ``{kind, task, attributes, prompt, raw, example}`` per kept example (``raw``
is the teacher's text, ``example`` the parsed fields). ``dropped.jsonl`` holds the rest with their
reason; ``stats["drops"]`` counts them by reason.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.io import write_jsonl
from speed.stage import Stage, StageContext, StageError, register
from speed.stages.alignment import (
    build_filters,
    chat,
    check_pool,
    generate_all,
    kind_templates,
    mix_kinds,
    parse_example,
    require_rows,
    sample_prompts,
    sampling,
    task_pool,
)

logger = logging.getLogger(__name__)


@register
class Seed(Stage):
    """Teacher-written seed examples."""

    name = "seed"
    reads = ("brainstorm",)
    roles = ("teacher",)

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        return tuple(kind_templates(mix_kinds(cfg), generate=True))

    def check(self, ctx: StageContext) -> None:
        rows = require_rows(ctx, "brainstorm", ("kind", "task"))
        check_pool(task_pool(rows), mix_kinds(ctx.cfg), "seed")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.data.dedup import MinHashDeduplicator, example_text
        from speed.data.filters import DropCounter
        from speed.tasks import get_kind

        scfg = ctx.cfg.seed
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        prompts, _ = sample_prompts(pool, scfg.num_examples, scfg.kind_mix, ctx.rng("prompts"), scfg.language)
        spec = ctx.cfg.models.teacher
        requests = [
            chat(p.prompt, sampling(spec, seed=ctx.seed_for(i)), schema=get_kind(p.kind).json_schema())
            for i, p in enumerate(prompts)
        ]
        comps = generate_all(ctx, ctx.llm("teacher"), requests, "seed examples")

        filters = build_filters(scfg.check_language)
        dedup = MinHashDeduplicator(threshold=scfg.dedup_threshold, seed=ctx.cfg.run.seed)
        counter = DropCounter("seed")
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        per_kind: dict[str, int] = {}
        for p, comp in zip(prompts, comps, strict=True):
            row = {**p.to_row(), "raw": comp.text}
            if comp.error is not None:
                counter.drop("generation_error", comp.error)
                dropped.append({**row, "reason": "generation_error", "detail": comp.error})
                continue
            kind = get_kind(p.kind)
            example, reason = parse_example(kind, comp.text, p.attributes, filters, counter)
            if example is None:
                dropped.append({**row, "reason": reason})
                continue
            dup = dedup.check(example_text(example))
            if dup is not None:
                counter.drop(dup)
                dropped.append({**row, "reason": dup})
                continue
            counter.keep()
            kept.append({**row, "example": example.model_dump()})
            per_kind[p.kind] = per_kind.get(p.kind, 0) + 1
        write_jsonl(ctx.out / "data.jsonl", kept)
        write_jsonl(ctx.out / "dropped.jsonl", dropped)
        counter.log_summary()
        if not kept:
            raise StageError(
                f"stage 'seed': no teacher answer survived parsing and filters (drops: {dict(counter.reasons)}); "
                f"look at {ctx.out / 'dropped.jsonl'}"
            )
        return {
            "count": len(kept),
            "requested": len(prompts),
            "per_kind": per_kind,
            "drops": dict(counter.reasons),
        }
