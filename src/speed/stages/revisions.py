"""revisions: the senior writes, the teacher revises (SPEED: 10K calls), data for the revisor.

``revisions.num_prompts`` new generation prompts are drawn (none that seed or candidates used); the
senior (``models.senior`` run on the senior stage's merged model) answers each; the teacher then sees
the prompt and the senior's output and answers ``{"reason", "revised"}``, checking relevance (does
the example do the task), completeness (every field and constraint) and accuracy (facts,
guidelines). The revised example must parse as the kind's schema and pass the filters, since it is
the revisor's training target.

Output ``data.jsonl``: ``{kind, task, attributes, prompt, senior, senior_parsed, revised, reason,
unchanged, raw}``: ``senior`` is the senior's text as written (the revisor's input), ``revised`` the
parsed revision, ``raw`` the teacher's text. ``dropped.jsonl`` keeps the rest with their reason.
The senior is closed before the teacher is asked, to free memory.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.io import write_jsonl
from speed.stage import Stage, StageContext, StageError, register
from speed.stages.alignment import (
    REASON_MAX_CHARS,
    build_filters,
    chat,
    check_pool,
    generate_all,
    kind_templates,
    mix_kinds,
    normalize,
    require_rows,
    sample_prompts,
    sampling,
    task_pool,
)

logger = logging.getLogger(__name__)


def revision_json_schema(kind: Any) -> dict[str, Any]:
    """JSON schema of the teacher's revision of one example of ``kind`` (reason first)."""
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
            "revised": kind.json_schema(),
        },
        "required": ["reason", "revised"],
        "additionalProperties": False,
    }


@register
class Revisions(Stage):
    """Senior outputs and the teacher's revisions of them."""

    name = "revisions"
    reads = ("brainstorm", "seed", "candidates", "senior")
    roles = ("senior", "teacher")

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        return ("revise", *kind_templates(mix_kinds(cfg), generate=True))

    def check(self, ctx: StageContext) -> None:
        check_pool(
            task_pool(require_rows(ctx, "brainstorm", ("kind", "task"))), mix_kinds(ctx.cfg), "revisions"
        )
        ctx.weights("senior")  # the trained senior, as this stage reads 'senior'

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.data.filters import DropCounter, first_failure
        from speed.tasks import example_json, get_kind, parse_revision, revise_prompt

        rcfg = ctx.cfg.revisions
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        used = {r["prompt"] for r in require_rows(ctx, "seed", ("prompt",))}
        used |= {r["prompt"] for r in require_rows(ctx, "candidates", ("prompt",))}
        prompts, _ = sample_prompts(
            pool, rcfg.num_prompts, ctx.cfg.seed.kind_mix, ctx.rng("prompts"), ctx.cfg.seed.language, used
        )

        # 1. the senior writes
        sspec = ctx.cfg.models.senior
        senior = ctx.llm("senior")  # the trained senior (ctx.weights)
        outputs = generate_all(
            ctx,
            senior,
            # the senior's key in the seed: a retrained senior is asked anew, not replayed (the ledger
            # names it by its folder in the run)
            [
                chat(p.prompt, sampling(sspec, seed=ctx.seed_for("senior", ctx.manifest("senior")["key"], i)))
                for i, p in enumerate(prompts)
            ],
            "senior outputs",
        )
        ctx.session.release("senior")

        counter = DropCounter("revisions")
        dropped: list[dict[str, Any]] = []
        todo = []
        senior_parsed = 0
        for p, comp in zip(prompts, outputs, strict=True):
            if comp.error is not None or not comp.text.strip():
                counter.drop("generation_error", comp.error or "empty output")
                dropped.append({**p.to_row(), "senior": comp.text, "reason": "generation_error"})
                continue
            parsed = get_kind(p.kind).parse(comp.text).value
            senior_parsed += parsed is not None
            todo.append((p, comp.text, parsed))

        # 2. the teacher revises
        tspec = ctx.cfg.models.teacher
        requests = [
            chat(
                revise_prompt(p.prompt, text),
                sampling(tspec, seed=ctx.seed_for("revise", i)),
                schema=revision_json_schema(get_kind(p.kind)),
            )
            for i, (p, text, _) in enumerate(todo)
        ]
        comps = generate_all(ctx, ctx.llm("teacher"), requests, "revisions")

        filters = build_filters(ctx.cfg.seed.check_language)
        rows: list[dict[str, Any]] = []
        unchanged = 0
        for (p, text, parsed), comp in zip(todo, comps, strict=True):
            base = {**p.to_row(), "senior": text, "senior_parsed": parsed is not None, "raw": comp.text}
            if comp.error is not None:
                counter.drop("generation_error", comp.error)
                dropped.append({**base, "reason": "generation_error"})
                continue
            kind = get_kind(p.kind)
            result = parse_revision(comp.text, kind)
            if result.value is None:
                reason = result.reason or "unparseable"
                counter.drop(reason, result.detail)
                dropped.append({**base, "reason": reason})
                continue
            revised = result.value.revised
            failed = first_failure(revised, kind, p.attributes, filters, counter)
            if failed is not None:
                dropped.append({**base, "reason": failed, "revised": revised.model_dump()})
                continue
            same = parsed is not None and normalize(example_json(parsed)) == normalize(example_json(revised))
            unchanged += same
            counter.keep()
            rows.append(
                {**base, "revised": revised.model_dump(), "reason": result.value.reason, "unchanged": same}
            )
        write_jsonl(ctx.out / "data.jsonl", rows)
        write_jsonl(ctx.out / "dropped.jsonl", dropped)
        counter.log_summary()
        if not rows:
            raise StageError(
                f"stage 'revisions': no usable revision (drops: {dict(counter.reasons)}); look at "
                f"{ctx.out / 'dropped.jsonl'}"
            )
        return {
            "count": len(rows),
            "prompts": len(prompts),
            "senior_parse_rate": round(senior_parsed / len(prompts), 4) if prompts else 0.0,
            "unchanged": unchanged,
            "drops": dict(counter.reasons),
        }
