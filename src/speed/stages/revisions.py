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

Design choices:
- The stage runs on the generation skeleton (:mod:`speed.stages.generation`): prompts are drawn
  on the driver; a worker has the senior answer a shard's prompts and the teacher revise them, and
  returns one record per prompt, so a killed stage resumes by shard. The senior is closed once every
  shard is done.
- The revision's pydantic model (:class:`Revision`, parametrized by the kind's example schema), its
  prompt and its JSON schema (derived from the model) live here, with the stage that asks for them.
- Each request's seed is fixed per prompt when planning (not per answer the senior got right), so
  a shard asks the same requests whichever shards ran before it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from speed.data.parsing import ParseResult, parse_json
from speed.stage import StageContext, register
from speed.stages.alignment import (
    REASON_MAX_CHARS,
    build_filters,
    chat,
    check_pool,
    corpus_hashes,
    grounding,
    kind_templates,
    mix_kinds,
    normalize,
    require_rows,
    sample_prompts,
    sampling,
    task_pool,
)
from speed.stages.generation import GenerationStage, Job, Plan, record
from speed.tasks.base import answer_words

logger = logging.getLogger(__name__)

REVISE_TEMPLATE = "revise"

E = TypeVar("E", bound=BaseModel)


# --------------------------------------------------------------------------------------------
# the revision: its model, its prompt, its schema


class Revision(BaseModel, Generic[E]):
    """The teacher's revision: a reason and the revised example of the kind's schema."""

    model_config = ConfigDict(extra="ignore")

    reason: str = Field(
        "",
        description="What was wrong and what changed (relevance, completeness, accuracy).",
        json_schema_extra={"maxLength": REASON_MAX_CHARS},  # in the schema only, as the judge's
    )
    revised: E = Field(description="The revised example, same fields as the generator's output.")


@cache
def revision_schema(kind_name: str) -> type[Revision[Any]]:
    """The pydantic model of the teacher's revision for one kind (``reason`` + ``revised``)."""
    from speed.tasks import get_kind

    generic: Any = Revision  # parametrized at run time with the kind's schema
    return cast(type[Revision[Any]], generic[get_kind(kind_name).schema])


def revision_json_schema(kind: Any) -> dict[str, Any]:
    """JSON schema of the teacher's revision of one example of ``kind`` (a kind or its name): the
    model's own, reason first."""
    from speed.tasks import strict_schema

    return strict_schema(revision_schema(kind if isinstance(kind, str) else kind.name))


def parse_revision(text: str, kind: Any) -> ParseResult[Revision[Any]]:
    """Parse the teacher's revision; ``revised`` is validated against the kind's schema."""
    return parse_json(text, revision_schema(kind if isinstance(kind, str) else kind.name))


def revise_prompt(generation_prompt: str, example: str | BaseModel | Mapping[str, Any]) -> str:
    """The prompt showing the teacher a generation prompt and one generated example."""
    from speed.tasks import example_json, render_template

    shown = example if isinstance(example, str) else example_json(example)
    return render_template(
        REVISE_TEMPLATE, generation_prompt=generation_prompt.strip(), example=shown.strip()
    )


# --------------------------------------------------------------------------------------------
# the stage


@register
class Revisions(GenerationStage):
    """Senior outputs and the teacher's revisions of them."""

    name = "revisions"
    # 2: the prompt_echo filter (a field that repeats the prompt's own instructions is dropped)
    version = 2
    reads = ("brainstorm", "seed", "candidates", "senior")
    roles = ("senior", "teacher")
    release_after = ("senior",)
    nothing_kept = "no usable revision"
    # the senior writes here as it will in synthesize (under the kind's schema, or free), so that the
    # revisor learns to revise the outputs it will be given
    extra_sections = ("synthesize.json_schema",)

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        return (REVISE_TEMPLATE, *kind_templates(mix_kinds(cfg), generate=True))

    def template_hashes(self, cfg: Any) -> dict[str, str]:
        return {**super().template_hashes(cfg), **corpus_hashes(cfg, mix_kinds(cfg))}

    def check(self, ctx: StageContext) -> None:
        check_pool(
            task_pool(require_rows(ctx, "brainstorm", ("kind", "task"))), mix_kinds(ctx.cfg), "revisions"
        )
        ctx.weights("senior")  # the trained senior, as this stage reads 'senior'

    def plan(self, ctx: StageContext) -> Plan:
        rcfg = ctx.cfg.revisions
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        used = {r["prompt"] for r in require_rows(ctx, "seed", ("prompt",))}
        used |= {r["prompt"] for r in require_rows(ctx, "candidates", ("prompt",))}
        prompts, _ = sample_prompts(
            pool,
            rcfg.num_prompts,
            ctx.cfg.seed.kind_mix,
            ctx.rng("prompts"),
            ctx.cfg.seed.language,
            used,
            grounding=grounding(ctx),
            max_words=answer_words(ctx.cfg.models.senior.max_tokens),
        )
        # the senior's key in the seed: a retrained senior is asked anew, not replayed (the ledger
        # names it by its folder in the run)
        senior_key = ctx.manifest("senior")["key"]
        items = [
            {
                **p.to_row(),
                "senior_seed": ctx.seed_for("senior", senior_key, i),
                "revise_seed": ctx.seed_for("revise", i),
            }
            for i, p in enumerate(prompts)
        ]
        return Plan.of_items(items, self.shard_size, prompts=len(items))

    def process(self, job: Job, payload: list[dict[str, Any]]) -> dict[str, Any]:
        from speed.data.filters import first_failure
        from speed.tasks import example_json, get_kind

        # 1. the senior writes
        sspec, tspec = job.cfg.models.senior, job.cfg.models.teacher
        constrained = job.cfg.synthesize.json_schema
        outputs = job.generate(
            "senior",
            [
                chat(
                    item["prompt"],
                    sampling(sspec, seed=item["senior_seed"]),
                    schema=get_kind(item["kind"]).json_schema() if constrained else None,
                )
                for item in payload
            ],
        )
        records: list[dict[str, Any] | None] = [None] * len(payload)
        todo = []
        for i, (item, comp) in enumerate(zip(payload, outputs, strict=True)):
            row = {k: item[k] for k in ("kind", "task", "attributes", "prompt")}
            if comp.error is not None or not comp.text.strip():
                records[i] = record(
                    {**row, "senior": comp.text}, "generation_error", comp.error or "empty output"
                )
                continue
            parsed = get_kind(item["kind"]).parse(comp.text).value
            todo.append((i, {**row, "senior": comp.text, "senior_parsed": parsed is not None}, parsed))

        # 2. the teacher revises
        comps = job.generate(
            "teacher",
            [
                chat(
                    revise_prompt(payload[i]["prompt"], base["senior"]),
                    sampling(tspec, seed=payload[i]["revise_seed"]),
                    schema=revision_json_schema(base["kind"]),
                )
                for i, base, _ in todo
            ],
        )
        filters = build_filters(job.cfg.seed.check_language)
        for (i, base, parsed), comp in zip(todo, comps, strict=True):
            base = {**base, "raw": comp.text}
            if comp.error is not None:
                records[i] = record(base, "generation_error", comp.error)
                continue
            kind = get_kind(base["kind"])
            result = parse_revision(comp.text, kind)
            if result.value is None:
                records[i] = record(base, result.reason or "unparseable", result.detail)
                continue
            revised = result.value.revised
            failed = first_failure(
                kind.complete(revised, base["attributes"]), kind, base["attributes"], filters
            )
            if failed is not None:
                records[i] = record({**base, "revised": revised.model_dump()}, failed)
                continue
            same = parsed is not None and normalize(example_json(parsed)) == normalize(example_json(revised))
            records[i] = record(
                {**base, "revised": revised.model_dump(), "reason": result.value.reason, "unchanged": same}
            )
        return {"records": records}

    def summarize(
        self, ctx: StageContext, kept: list[dict[str, Any]], dropped: list[dict[str, Any]], plan: Plan
    ) -> dict[str, Any]:
        prompts = plan.stats["prompts"]
        senior_parsed = sum(bool(r.get("senior_parsed")) for r in kept + dropped)
        return {
            "prompts": prompts,
            "senior_parse_rate": round(senior_parsed / prompts, 4) if prompts else 0.0,
            "unchanged": sum(bool(r["unchanged"]) for r in kept),
        }
