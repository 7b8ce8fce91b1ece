"""The study's data sources: the same prompts written by each writer, as stages of the run.

Each source is a :class:`~speed.stages.synthesize.Synthesize` stage with another writer and reads,
so it plans, shards, generates, parses, filters, decontaminates, deduplicates and writes exactly as
the pipeline's synthesis does; only the writer (and whether the revisor passes over it) differs:

| source          | writer role | weights                          | revisor |
|-----------------|-------------|----------------------------------|---------|
| teacher         | teacher     | the teacher's model (E5-style)   | no      |
| untuned         | junior      | the junior's base model          | no      |
| junior          | junior      | RUN/junior/merged                | no      |
| junior+revisor  | junior      | RUN/junior/merged                | yes     |
| senior          | senior      | RUN/senior/merged                | no      |
| senior+revisor  | senior      | RUN/senior/merged                | yes     |

The weights follow from each stage's ``reads`` (:func:`speed.roles.role_weights`): ``untuned`` does
not read ``junior``, so the junior role runs with its spec's own model.

Design choices:
- A source's stage is named ``study/SOURCE`` and runs through the run's own runner
  (:class:`StudyRunner`): keys, manifests, the work folder, shard markers, resume, the lock, the
  preflight and the ledger are the pipeline's. Its folder is ``RUN/study/SOURCE``.
- The prompt plan (kinds, tasks, attributes) is drawn from generators seeded by the run seed and
  ``study`` only, never the stage name, so every source gets the same prompts in the same order.
  Request seeds hold the writer and its weights' key but not the source, so ``senior+revisor``
  asks the senior exactly what ``senior`` asked: the ledger replays those answers, and the two sets
  differ by the revisor's pass alone (likewise for the junior).
- Prompts planned are ``N x study.oversample``. Every source is cut to the smallest count of kept
  examples, at most N (:func:`training_sets`), so the sets are of equal size; each takes first the
  prompts that every source kept, then its own others in plan order, so the sets share as many
  prompts as the sources' drops allow (``prompts_shared_by_all_sources`` in the table).
- A source's key holds ``study.num_examples``, ``oversample`` and ``shard_size``, the synthesize
  settings that shape the data (kind mix, language, filters, dedup, JSON schema) and the
  decontamination tasks; not the seeds, embedders or pairs, so those can change without a call.
- The decontamination set is ``evaluate.tasks`` and ``study.tasks`` together: the study must not
  train on text it is scored on.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from speed.config import ConfigError, SpeedConfig
from speed.io import read_rows
from speed.runner import Runner, stage_keys
from speed.stage import Stage, StageContext
from speed.stages.synthesize import Synthesize

__all__ = [
    "SOURCE_STAGES",
    "SourceSynthesis",
    "StudyRunner",
    "source_stage",
    "training_sets",
]

#: the folder of the study inside the run
STUDY_DIR = "study"


class SourceSynthesis(Synthesize):
    """One data source of the study: the study's prompts, written by ``writer``."""

    source: ClassVar[str]
    revise: ClassVar[bool] = False
    extra_sections = (
        "study.num_examples",
        "study.oversample",
        "study.shard_size",
        "synthesize.kind_mix",
        "synthesize.language",
        "synthesize.check_language",
        "synthesize.json_schema",
        "synthesize.dedup_threshold",
        "synthesize.decontaminate",
        "synthesize.decontam_ngram",
        "evaluate.tasks",
        "study.tasks",
    )

    def revises(self, cfg: Any) -> bool:
        return self.revise

    def plan_size(self, ctx: StageContext) -> tuple[int, int]:
        study = ctx.cfg.study
        return math.ceil(study.num_examples * study.oversample), study.shard_size

    def plan_rng(self, ctx: StageContext, salt: str) -> random.Random:
        # the same draws for every source: only the writer differs between them
        return plan_rng(ctx.cfg.run.seed, salt)

    def request_seed(self, ctx: StageContext, *parts: Any) -> int:
        # not the stage name: senior and senior+revisor send the senior the same requests, so the
        # second replays the first's answers from the ledger and differs from it by the revisor only
        digest = hashlib.sha256(
            "/".join(map(str, (ctx.cfg.run.seed, STUDY_DIR, *parts))).encode()
        ).hexdigest()
        return int(digest[:8], 16) & 0x7FFFFFFF

    def decontam_tasks(self, cfg: Any) -> list[str]:
        return list(dict.fromkeys([*cfg.evaluate.tasks, *cfg.study.tasks]))


def plan_rng(seed: int, salt: str) -> random.Random:
    """The study's prompt-plan generator for ``salt`` (shared by all sources)."""
    digest = hashlib.sha256(f"{seed}/{STUDY_DIR}/{salt}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


# module-level classes, importable by name where a Ray worker rebuilds the stage


class TeacherSource(SourceSynthesis):
    """E5-style: the teacher writes every example."""

    name = "study/teacher"
    source = "teacher"
    writer = "teacher"
    reads = ("brainstorm",)
    roles = ("teacher",)
    release_after = ()


class UntunedSource(SourceSynthesis):
    """The generators' base model, before any alignment."""

    name = "study/untuned"
    source = "untuned"
    writer = "junior"
    reads = ("brainstorm",)
    roles = ("junior",)
    release_after = ("junior",)


class JuniorSource(SourceSynthesis):
    """The junior (SFT on the teacher's seed examples)."""

    name = "study/junior"
    source = "junior"
    writer = "junior"
    reads = ("brainstorm", "junior")
    roles = ("junior",)
    release_after = ("junior",)


class JuniorRevisorSource(SourceSynthesis):
    """The junior, then one revisor pass."""

    name = "study/junior+revisor"
    source = "junior+revisor"
    writer = "junior"
    revise = True
    reads = ("brainstorm", "junior", "revisor")
    roles = ("junior", "revisor")
    release_after = ("junior", "revisor")


class SeniorSource(SourceSynthesis):
    """The senior (the junior after DPO on the teacher's judgements)."""

    name = "study/senior"
    source = "senior"
    writer = "senior"
    reads = ("brainstorm", "senior")
    roles = ("senior",)
    release_after = ("senior",)


class SeniorRevisorSource(SourceSynthesis):
    """SPEED's full pipeline: the senior, then one revisor pass."""

    name = "study/senior+revisor"
    source = "senior+revisor"
    writer = "senior"
    revise = True
    reads = ("brainstorm", "senior", "revisor")
    roles = ("senior", "revisor")
    release_after = ("senior", "revisor")


SOURCE_STAGES: dict[str, type[SourceSynthesis]] = {
    cls.source: cls
    for cls in (
        TeacherSource,
        UntunedSource,
        JuniorSource,
        JuniorRevisorSource,
        SeniorSource,
        SeniorRevisorSource,
    )
}


def source_stage(source: str) -> type[SourceSynthesis]:
    """The stage class of a source name (``senior+revisor``)."""
    return SOURCE_STAGES[source]


class StudyRunner(Runner):
    """The run's runner, with the study's source stages after the pipeline's.

    ``run(until=[...source stages])`` then runs the pipeline stages they read (up to the revisor
    at most, never synthesis) and the sources, under the run's lock, preflight and ledger.

    Raises:
        ConfigError: a source reads a stage that ``pipeline.stages`` leaves out.
    """

    def __init__(self, cfg: SpeedConfig, registry: dict[str, type[Stage]] | None = None):
        super().__init__(cfg, registry)
        names = {cls.name for cls in self.stages}
        sources: list[type[Stage]] = []
        for source in cfg.study.sources:
            cls = source_stage(source)
            missing = [r for r in cls.reads if r not in names]
            if missing:
                raise ConfigError(
                    f"study.sources: '{source}' needs the stage(s) {missing}, which pipeline.stages leaves "
                    "out; add them, or drop the source"
                )
            sources.append(cls)
        self.source_stages = sources
        self.registry = {**self.registry, **{cls.name: cls for cls in sources}}
        self.stages = [*self.stages, *sources]
        self.keys = stage_keys(cfg, self.stages)

    def source_targets(self) -> list[str]:
        return [cls.name for cls in self.source_stages]

    def closure(self, stage: str) -> list[str]:
        """``stage`` and every stage it reads, directly or not, in run order."""
        return [cls.name for cls in self.select(until=stage)]


# --------------------------------------------------------------------------------------------
# equal-size training sets


def kept_examples(folder: Path) -> list[dict[str, Any]]:
    """A source's kept examples in plan order, each ``{"id", "index", "kind", "rows"}``.

    A kept example may give several training rows (an STS example: both directions); they stay
    together, so a cut never splits an example.
    """
    examples: dict[str, dict[str, Any]] = {}
    for row in read_rows(folder / "data"):
        ex = examples.setdefault(
            row["id"], {"id": row["id"], "index": _index(row["id"]), "kind": row["kind"], "rows": []}
        )
        ex["rows"].append(row)
    return sorted(examples.values(), key=lambda e: e["index"])


def _index(example_id: str) -> int:
    # ids are SHARD-INDEX (training_rows in speed.stages.synthesize); INDEX is the prompt's place
    return int(example_id.rsplit("-", 1)[1])


def training_sets(
    folders: Mapping[str, Path], num_examples: int
) -> tuple[int, dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Cut every source's kept examples to one common size.

    Args:
        folders: source -> its finished stage folder (``RUN/study/SOURCE``).
        num_examples: N, the size asked for.

    Returns:
        ``(size, rows, info)``: the common size (N, or fewer when a source kept fewer), each
        source's training rows (of ``size`` examples: first those whose prompt every source kept,
        then its others, each group in plan order; the bare query
        as ``query`` for the trainer to prefix) and per source ``{"kept", "examples", "rows",
        "per_kind", "prompts"}`` (``prompts``: the plan indices used, to check they are shared).
    """
    kept = {source: kept_examples(folder) for source, folder in folders.items()}
    size = min([num_examples, *(len(k) for k in kept.values())]) if kept else 0
    # prompts every source kept come first, so that the sets share as many prompts as they can
    common = set.intersection(*({ex["index"] for ex in k} for k in kept.values())) if kept else set()
    rows: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for source, examples in kept.items():
        first = [ex for ex in examples if ex["index"] in common]
        rest = [ex for ex in examples if ex["index"] not in common]
        chosen = sorted((first + rest)[:size], key=lambda ex: ex["index"])
        rows[source] = [
            # the trainer owns the instruction format (embed.use_instructions): the bare query
            {**r, "query": r["query_text"]} if r.get("query_text") else dict(r)
            for ex in chosen
            for r in ex["rows"]
        ]
        info[source] = {
            "kept": len(examples),
            "examples": len(chosen),
            "rows": len(rows[source]),
            "per_kind": dict(Counter(ex["kind"] for ex in chosen)),
            "prompts": [ex["index"] for ex in chosen],
        }
    return size, rows, info


def fingerprint(payload: Any) -> str:
    """A short hash of a JSON-able payload (what a trained model's result depends on)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def shared_prompts(info: Mapping[str, Mapping[str, Any]]) -> Sequence[int]:
    """The plan indices every source's training set uses (the prompts written by all of them)."""
    sets = [set(i["prompts"]) for i in info.values()]
    return sorted(set.intersection(*sets)) if sets else []
