"""synthesize: the senior writes the training data at scale, the revisor fixes it in one pass (SPEED).

``synthesize.num_examples`` generation prompts are planned (a kind per prompt by
``synthesize.kind_mix``, SPEED's 7:7:7:2 by default, apportioned exactly and shuffled; a task of that
kind from the brainstorm pool; attributes from the kind's sampler) and cut into shards of
``shard_size`` prompts. Each shard goes to a worker (``ctx.executor``: this process, or a Ray actor
holding its own senior and revisor replicas) that runs the senior on every prompt, the revisor once
on every answer (``synthesize.revise``), then parses and filters the result. When every shard is
done, decontamination (against the data of ``evaluate.tasks``) and MinHash deduplication run over
all shards in shard order, and the kept examples are written as training rows.

Outputs (in the stage folder):
- ``data/part-NNNNN.parquet``: one row per training row of a kept example, with its provenance:
  ``id``, ``shard``, ``kind``, ``task``, ``attributes`` (JSON), ``prompt``, ``raw_output`` (the
  senior's text), ``revisor_output``, ``revised`` (whether the revisor's version was used),
  ``example`` (the parsed fields, JSON) and the training row itself: ``instruction``, ``query``
  (``Instruct: {task}\\nQuery: {query}``), ``query_text`` (the bare query), ``positive``,
  ``negative`` (null for kinds without one).
- ``shards/NNNNN.jsonl``: every prompt of a shard with the raw outputs and the worker's drop reason
  (kept for inspection and resume); ``shards/NNNNN.done``: the shard's completion marker, written
  after its records; ``shards/processed.log``: one line per shard processed, in every invocation.
- ``stats["drops"]``: drops by reason over all steps (generation errors, parse reasons, filters,
  ``contaminated``, ``exact_duplicate``, ``near_duplicate``); ``stats["negative_removed"]``: kept
  examples whose hard negative alone failed a filter, by that filter, kept as (query, positive)
  pairs (``synthesize.keep_without_negative``; their shard records carry ``negative_removed``).

Design choices:
- Resume is by shard: a shard whose marker exists is not sent again; a shard killed halfway is
  redone and the ledger replays the calls it finished. The prompt plan is a pure function of the
  seed (the kind order from one stream, each shard's tasks and attributes from a stream of its own),
  so a resumed run plans the same prompts without storing them. A shard carries only its kinds and
  seeds; the worker renders its prompts, so the driver of a 920K run never holds 920K prompts.
- The stage runs on the generation skeleton (:mod:`speed.stages.generation`), as every stage that
  calls a model does; it keeps its own shard plan (a shard is its kinds and seeds, not its prompts)
  and its own :meth:`Synthesize.finish` (decontamination, dedup and Parquet parts written shard by
  shard, since a 920K-example output is not held in memory).
- Dedup and decontamination run after generation, over all shards in shard order, on the driver:
  the result is the same whether or not the run was killed, and whichever executor ran the shards.
  Parsing and filtering run in the workers (they are per example, and spread the CPU work).
- The revisor sees the generation prompt and the senior's output as written, as it was trained
  (:func:`speed.stages.revisor.revisor_rows`), so it may also repair broken JSON. Its answer is
  used when it parses as the kind's schema;
  otherwise the senior's parsed example is kept (``revised`` false, counted in
  ``stats["revisions"]["unparsed"]``), so a weak revisor never costs an example.
- With a ``corpus``, prompts of its ``grounded_kinds`` are built on a passage (drawn on the driver,
  carried by the shard): the row's kind is the grounded variant (``retrieval_grounded``), the senior
  and the revisor write only the query side (and the hard negative), and the training row's
  positive is the passage itself (:meth:`speed.tasks.grounded.GroundedKind.complete`). Filters see
  the whole example; dedup and decontamination see what was generated (the passage is the user's).
- Requests carry a per-prompt seed (``ctx.seed_for``) that includes the senior's (revisor's) stage
  key, so a retrained model is asked anew rather than replayed. The kind's JSON schema goes with
  each request (``synthesize.json_schema``, on by default): engines that constrain decoding to it
  (llama.cpp, vLLM) then write data that parses, where a 135M senior's free output parsed 34% of
  the time. Parsing, repair and filters still run and count every drop; ``json_schema: false``
  gives free output, to study it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from speed.executors.base import Shard
from speed.io import atomic_write, read_jsonl
from speed.llm.base import Request, Sampling
from speed.stage import StageContext, StageError, register
from speed.stages.alignment import (
    corpus_hashes,
    grounding,
    kind_templates,
    require_rows,
    revisor_prompt,
    task_pool,
)
from speed.stages.generation import GenerationStage, Job, Plan, shard_id
from speed.tasks.base import answer_words

logger = logging.getLogger(__name__)

#: where the upstream stages keep their merged models
MERGED = "merged"

#: the columns of the Parquet output, in order (a fixed schema, so that every part file agrees)
COLUMNS: dict[str, str] = {
    "id": "string",
    "shard": "string",
    "kind": "string",
    "task": "string",
    "attributes": "string",
    "prompt": "string",
    "raw_output": "string",
    "revisor_output": "string",
    "revised": "bool_",
    "example": "string",
    "instruction": "string",
    "query": "string",
    "query_text": "string",
    "positive": "string",
    "negative": "string",
}


def training_rows(shard: str, record: dict[str, Any], example: dict[str, Any]) -> list[dict[str, Any]]:
    """The output rows of one kept example: its training rows, each with the example's provenance.

    ``record`` is a shard record (``index``, ``kind``, ``task``, ``attributes``, ``prompt``,
    ``raw_output``, ``revisor_output``, ``revised``); the report reads the same columns.
    """
    from speed.tasks import get_kind

    kind = get_kind(record["kind"])
    # the whole example: a grounded one gets its positive, the corpus passage, from its attributes
    example = kind.complete(example, record["attributes"])
    provenance = {
        "id": f"{shard}-{record['index']}",
        "shard": shard,
        "kind": record["kind"],
        "task": record["task"],
        "attributes": json.dumps(record["attributes"], ensure_ascii=False),
        "prompt": record["prompt"],
        "raw_output": record["raw_output"],
        "revisor_output": record["revisor_output"],
        "revised": bool(record["revised"]),
        "example": json.dumps(example, ensure_ascii=False),
    }
    return [
        {**provenance, **row, "query_text": str(example[kind.query_field])}
        for row in kind.to_rows(record["task"], example)
    ]


def write_part(folder: Path, shard: str, rows: list[dict[str, Any]]) -> Path:
    """Write one shard's rows as ``part-SHARD.parquet`` in the stage's columns (atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    path = folder / f"part-{shard}.parquet"
    with atomic_write(path, "wb") as fh:
        pq.write_table(table, fh)
    return path


# --------------------------------------------------------------------------------------------
# the plan


def apportion(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` by ``weights`` exactly (largest remainder; ties in the mapping's order)."""
    positive = {k: float(w) for k, w in weights.items() if w > 0}
    total = sum(positive.values())
    quotas = {k: n * w / total for k, w in positive.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    rest = n - sum(counts.values())
    order = sorted(positive, key=lambda k: (-(quotas[k] - counts[k]), list(positive).index(k)))
    for k in order[:rest]:
        counts[k] += 1
    return counts


def plan_kinds(n: int, kind_mix: Mapping[str, float], rng: random.Random) -> list[str]:
    """The kind of each of ``n`` prompts: exact shares of the mix, in a seeded random order."""
    kinds = [k for k, c in apportion(n, kind_mix).items() for _ in range(c)]
    rng.shuffle(kinds)
    return kinds


def plan_shard(
    kinds: Sequence[str],
    start: int,
    pool: Mapping[str, Sequence[str]],
    rng: random.Random,
    language: str,
    seeds: Sequence[int],
    revise_seeds: Sequence[int],
    passages: Sequence[Mapping[str, Any] | None] | None = None,
    max_words: int | None = None,
) -> list[dict[str, Any]]:
    """The prompts of one shard: for prompt ``start + i``, a task of ``kinds[i]`` and its attributes;
    where ``passages[i]`` is a corpus passage, the prompt is the kind's grounded variant's, built on it.
    Lengths are cut to what ``max_words`` (the senior's answer) can hold."""
    from speed.tasks import get_kind
    from speed.tasks.grounded import grounded_kind

    out = []
    for i, name in enumerate(kinds):
        passage = passages[i] if passages is not None else None
        kind = get_kind(name) if passage is None else grounded_kind(name)
        task = rng.choice(list(pool[name]))
        attributes = kind.sample_attributes(rng, language)
        if passage is not None:
            attributes = kind.ground(attributes, passage)  # type: ignore[attr-defined]
        attributes = kind.fit_lengths(attributes, max_words)
        out.append(
            {
                "index": start + i,
                "kind": kind.name,
                "task": task,
                "attributes": attributes,
                "prompt": kind.generation_prompt(task, attributes),
                "seed": seeds[i],
                "revise_seed": revise_seeds[i],
            }
        )
    return out


def shard_prompts(
    payload: Mapping[str, Any], pool: Mapping[str, Sequence[str]], language: str
) -> list[dict[str, Any]]:
    """The prompts a shard's payload stands for (built where the shard runs, not on the driver)."""
    return plan_shard(
        payload["kinds"],
        payload["start"],
        pool,
        random.Random(payload["rng_seed"]),
        language,
        payload["seeds"],
        payload["revise_seeds"],
        payload.get("passages"),
        payload.get("max_words"),
    )


# --------------------------------------------------------------------------------------------
# the stage


@register
class Synthesize(GenerationStage):
    """Senior writes, revisor revises, then parse, filter, decontaminate, dedup; sharded, resumable."""

    name = "synthesize"
    # 2: the prompt_echo filter (a field that repeats the prompt's own instructions is dropped)
    version = 2
    # typed as the base class's, so that a study source (speed.study) may read and use others
    reads: ClassVar[tuple[str, ...]] = ("brainstorm", "senior", "revisor")
    roles: ClassVar[tuple[str, ...]] = ("senior", "revisor")
    release_after: ClassVar[tuple[str, ...]] = ("senior", "revisor")
    # the evaluation tasks decide what decontamination drops (the rest of evaluate does not)
    extra_sections: ClassVar[tuple[str, ...]] = ("evaluate.tasks",)
    #: the role that writes the data; ``speed study`` writes the same prompts with other writers
    writer: ClassVar[str] = "senior"

    # -- what varies between the pipeline's synthesis and a study source (speed.study) -----------

    def revises(self, cfg: Any) -> bool:
        """Whether the revisor makes its pass over the writer's outputs."""
        return bool(cfg.synthesize.revise)

    def plan_size(self, ctx: StageContext) -> tuple[int, int]:
        """Prompts to plan and prompts per shard."""
        return ctx.cfg.synthesize.num_examples, ctx.cfg.synthesize.shard_size

    def plan_rng(self, ctx: StageContext, salt: str) -> random.Random:
        """The generator of the prompt plan's draws (kinds, tasks, attributes)."""
        return ctx.rng(salt)

    def request_seed(self, ctx: StageContext, *parts: Any) -> int:
        """The sampling seed of one request (``ctx.seed_for``: the run seed, this stage, ``parts``)."""
        return ctx.seed_for(*parts)

    def decontam_tasks(self, cfg: Any) -> list[str]:
        """The evaluation tasks whose text the data must not share."""
        return list(cfg.evaluate.tasks)

    def weights_key(self, ctx: StageContext, role: str) -> str:
        """The key of the stage that trained ``role``'s weights for this stage, or ``base`` when
        it runs its spec's own model; it salts the request seeds, so a retrained model is asked anew."""
        from speed.roles import TRAINED_BY

        trained = TRAINED_BY.get(role)
        if trained is None or trained[0] not in ctx.reads:
            return "base"
        return str(ctx.manifest(trained[0])["key"])

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        kinds = [k for k, w in cfg.synthesize.kind_mix.items() if w > 0]
        names = kind_templates(kinds, generate=True)
        if self.revises(cfg):
            names.append("revisor")
        return tuple(names)

    def template_hashes(self, cfg: Any) -> dict[str, str]:
        kinds = [k for k, w in cfg.synthesize.kind_mix.items() if w > 0]
        return {**super().template_hashes(cfg), **corpus_hashes(cfg, kinds)}

    # -- inputs --------------------------------------------------------------------------------

    def pool(self, ctx: StageContext) -> dict[str, list[str]]:
        pool = task_pool(require_rows(ctx, "brainstorm", ("kind", "task")))
        wanted = [k for k, w in ctx.cfg.synthesize.kind_mix.items() if w > 0]
        empty = [k for k in wanted if not pool.get(k)]
        if empty:
            raise StageError(
                f"stage 'synthesize': no brainstormed task for kind(s) {empty}; add them to "
                "brainstorm.kinds or give them weight 0 in synthesize.kind_mix"
            )
        return pool

    def decontaminator(self, ctx: StageContext) -> Any:
        """The evaluation-text index, or None when decontamination is off or has no task."""
        scfg, ecfg = ctx.cfg.synthesize, ctx.cfg.evaluate
        tasks = self.decontam_tasks(ctx.cfg)
        if not scfg.decontaminate or not tasks:
            return None
        from speed.data.decontam import Decontaminator

        try:
            return Decontaminator.from_eval_dir(
                tasks, ecfg.data_dir, n=scfg.decontam_ngram, documents=scfg.decontam_documents
            )
        except (FileNotFoundError, ValueError) as err:
            raise StageError(
                f"stage 'synthesize': cannot read the evaluation data to decontaminate against ({err}); "
                "set evaluate.data_dir, or synthesize.decontaminate: false"
            ) from None

    def check(self, ctx: StageContext) -> None:
        self.pool(ctx)
        grounding(ctx)  # an unreadable corpus fails here, before the first call
        ctx.weights(self.writer)  # the trained writer and revisor, as this stage reads their stages
        if self.revises(ctx.cfg):
            ctx.weights("revisor")
        if ctx.cfg.synthesize.decontaminate and self.decontam_tasks(ctx.cfg):
            from speed.data.decontam import find_eval_dir, resolve_eval_folders

            try:
                resolve_eval_folders(self.decontam_tasks(ctx.cfg), find_eval_dir(ctx.cfg.evaluate.data_dir))
            except (FileNotFoundError, ValueError) as err:
                raise StageError(
                    f"stage 'synthesize': cannot find the evaluation data to decontaminate against ({err}); "
                    "set evaluate.data_dir, or synthesize.decontaminate: false"
                ) from None

    # -- run -----------------------------------------------------------------------------------

    def shards(self, ctx: StageContext) -> list[Shard]:
        """All shards of the plan, in order. A payload holds the shard's kinds, seeds and the seed
        of its task and attribute draws; :func:`shard_prompts` turns it into prompts."""
        scfg = ctx.cfg.synthesize
        num, shard_size = self.plan_size(ctx)
        kinds = plan_kinds(num, scfg.kind_mix, self.plan_rng(ctx, "kinds"))
        # the ledger names the senior and revisor by their folders in the run; their stages' keys in
        # the seeds make a retrained model's requests new ones, not replays of the old model's answers
        writer_key = self.weights_key(ctx, self.writer)
        revisor_key = self.weights_key(ctx, "revisor")
        ground = grounding(ctx)
        out = []
        for i, start in enumerate(range(0, len(kinds), shard_size)):
            part = kinds[start : start + shard_size]
            indices = range(start, start + len(part))
            payload = {
                "start": start,
                "kinds": part,
                "rng_seed": self.plan_rng(ctx, f"shard/{i}").getrandbits(64),
                "seeds": [self.request_seed(ctx, self.writer, writer_key, j) for j in indices],
                "revise_seeds": [self.request_seed(ctx, "revisor", revisor_key, j) for j in indices],
                # lengths the pipeline's writer (the senior) can hold: the same prompts whoever writes
                "max_words": answer_words(ctx.cfg.models.senior.max_tokens),
            }
            if ground is not None:
                # the shard carries its passages (not the whole sample), drawn on the driver from
                # a stream of the shard's own, so that a worker needs no corpus of its own
                draw = self.plan_rng(ctx, f"passages/{i}")
                payload["passages"] = [
                    draw.choice(ground.passages) if k in ground.kinds else None for k in part
                ]
            out.append(Shard(shard_id(i), payload))
        return out

    def plan(self, ctx: StageContext) -> Plan:
        shards = self.shards(ctx)
        logger.info("%s: %d prompts in %d shards", ctx.name, self.plan_size(ctx)[0], len(shards))
        return Plan(shards)

    def worker_context(self, ctx: StageContext) -> dict[str, Any]:
        spec_s, spec_r = getattr(ctx.cfg.models, self.writer), ctx.cfg.models.revisor
        return {
            "writer": {
                "temperature": spec_s.temperature,
                "top_p": spec_s.top_p,
                "max_tokens": spec_s.max_tokens,
            },
            "revisor": {
                "temperature": spec_r.temperature,
                "top_p": spec_r.top_p,
                "max_tokens": spec_r.max_tokens,
            },
            "pool": self.pool(ctx),
        }

    def process(self, job: Job, payload: dict[str, Any]) -> dict[str, Any]:
        """The writer (senior) writes each prompt of the shard, the revisor revises, then parse and filter."""
        from speed.data.filters import DropCounter, WithoutNegative, failing_filter
        from speed.stages.alignment import build_filters
        from speed.tasks import get_kind

        scfg, context = job.cfg.synthesize, job.context
        prompts = shard_prompts(payload, context["pool"], scfg.language)
        kinds = [get_kind(p["kind"]) for p in prompts]
        schema = [k.json_schema() if scfg.json_schema else None for k in kinds]
        # the env resolves the trained senior's and revisor's folders, on the driver or a Ray actor
        senior = job.generate(
            self.writer,
            [
                Request.chat(p["prompt"], sampling=Sampling(**context["writer"], seed=p["seed"]), schema=s)
                for p, s in zip(prompts, schema, strict=True)
            ],
        )
        parsed = [k.parse(c.text) if c.error is None else None for k, c in zip(kinds, senior, strict=True)]

        revised_texts: dict[int, str | None] = {}
        if self.revises(job.cfg):
            todo = [i for i, c in enumerate(senior) if c.error is None and c.text.strip()]
            requests = [
                Request.chat(
                    revisor_prompt(prompts[i]["prompt"], senior[i].text),
                    sampling=Sampling(**context["revisor"], seed=prompts[i]["revise_seed"]),
                    schema=schema[i],
                )
                for i in todo
            ]
            for i, comp in zip(todo, job.generate("revisor", requests), strict=True):
                revised_texts[i] = comp.text if comp.error is None else None

        filters = build_filters(scfg.check_language)
        counter = DropCounter("synthesize shard")
        unparsed_revisions = 0
        records = []
        for i, p in enumerate(prompts):
            kind, comp, result = kinds[i], senior[i], parsed[i]
            record: dict[str, Any] = {
                **{k: p[k] for k in ("index", "kind", "task", "attributes", "prompt")},
                "raw_output": comp.text,
                "revisor_output": revised_texts.get(i),
                "revised": False,
                "example": None,
                "drop": None,
                "detail": "",
            }
            example = None
            if i in revised_texts and revised_texts[i] is not None:
                revision = kind.parse(revised_texts[i] or "")
                if revision.value is not None:
                    example, record["revised"] = revision.value, True
                else:
                    unparsed_revisions += 1
            if example is None and result is not None and result.value is not None:
                example = result.value
            if example is None:
                if comp.error is not None:
                    record["drop"], record["detail"] = "generation_error", comp.error
                else:
                    assert result is not None
                    record["drop"] = result.reason or "unparseable"
                    record["detail"] = result.detail
                counter.drop(record["drop"], record["detail"])
            else:
                record["example"] = example.model_dump()
                whole = kind.complete(example, p["attributes"])  # a grounded one's positive: its passage
                failed = failing_filter(whole, kind, p["attributes"], filters)
                if (
                    failed is not None
                    and scfg.keep_without_negative
                    and kind.negative_field
                    and failing_filter(whole, WithoutNegative(kind), p["attributes"], filters) is None
                ):
                    # the query and positive pass: keep the pair, not the botched negative
                    record["example"][kind.negative_field] = ""
                    record["negative_removed"], record["detail"] = failed
                    failed = None
                if failed is not None:
                    record["drop"], record["detail"] = failed
                    counter.drop(*failed)
                else:
                    counter.keep()
            records.append(record)
        return {
            "records": records,
            "kept": counter.kept,
            "drops": dict(counter.reasons),
            "revised": sum(r["revised"] for r in records),
            "unparsed_revisions": unparsed_revisions,
            "tokens_out": sum(c.tokens_out for c in senior),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def finish(self, ctx: StageContext, ids: Sequence[str], plan: Plan) -> dict[str, Any]:
        """Decontaminate and deduplicate across all shards (in order), write the training rows."""
        from speed.data.dedup import MinHashDeduplicator, example_text
        from speed.data.filters import DropCounter

        scfg = ctx.cfg.synthesize
        folder = ctx.out / "shards"
        data = ctx.out / "data"
        if data.exists():  # a crash during a previous finish: write it again
            for old in data.glob("*.parquet"):
                old.unlink()
        data.mkdir(parents=True, exist_ok=True)
        decontam = self.decontaminator(ctx)
        dedup = MinHashDeduplicator(threshold=scfg.dedup_threshold, seed=ctx.cfg.run.seed)
        counter = DropCounter("synthesize")
        per_kind: Counter[str] = Counter()
        revised = unparsed = tokens = rows_total = 0
        contaminated: Counter[str] = Counter()
        negative_removed: Counter[str] = Counter()
        for sid in ids:
            summary = json.loads((folder / f"{sid}.done").read_text(encoding="utf-8"))
            unparsed += summary.get("unparsed_revisions", 0)
            tokens += summary.get("tokens_out", 0)
            rows: list[dict[str, Any]] = []
            for rec in read_jsonl(folder / f"{sid}.jsonl"):
                if rec["drop"] is not None:
                    counter.drop(rec["drop"], rec.get("detail", ""))
                    continue
                example = rec["example"]
                if decontam is not None:
                    task = decontam.check_example(example)
                    if task is not None:
                        counter.drop("contaminated", f"shares text with {task}")
                        contaminated[task] += 1
                        continue
                dup = dedup.check(example_text(example))
                if dup is not None:
                    counter.drop(dup)
                    continue
                counter.keep()
                per_kind[rec["kind"]] += 1
                if rec.get("negative_removed"):
                    negative_removed[rec["negative_removed"]] += 1
                revised += bool(rec["revised"])
                rows += training_rows(sid, rec, example)
            if rows:
                write_part(data, sid, rows)
                rows_total += len(rows)
        counter.log_summary()
        if counter.kept == 0:
            raise StageError(
                f"stage 'synthesize': no example survived (drops: {dict(counter.reasons)}); look at the "
                f"raw outputs in {folder}"
            )
        return {
            "count": counter.kept,
            "rows": rows_total,
            "generated": counter.seen,
            "per_kind": dict(per_kind),
            "revisions": {"used": revised, "unparsed": unparsed},
            "contaminated": dict(contaminated),
            "negative_removed": dict(negative_removed),
            "tokens_out_senior": tokens,
            "drops": dict(counter.reasons),
        }
