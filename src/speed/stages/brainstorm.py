"""brainstorm: the teacher writes task descriptions, each call tied to a topic (SPEED).

For every brainstormed kind in ``brainstorm.kinds`` the teacher gets ``calls_per_kind`` calls, each
asking for ``tasks_per_call`` (about 5) tasks around one topic. Topics come from the packaged
taxonomy (or ``topics.source``), each used once before any repeats; with ``topics.domain`` set the
teacher first expands the domain into subtopics (one more call) and those are the topics.

Output ``data.jsonl``: one row per task, ``{kind, task, topic}``. Kinds that are not brainstormed
(STS, bitext) get their fixed task descriptions with ``topic: null`` and no call, so that this
file is the one task pool of the run. ``calls.jsonl`` keeps every call's topic, raw output, parsed
tasks and drop reason.

With a ``corpus`` configured, the kinds of ``corpus.grounded_kinds`` are brainstormed on the corpus
instead of topics: each call shows ``corpus.brainstorm_passages`` excerpts of sampled passages and
asks for tasks that fit documents like these, so that the instructions of grounded examples fit the
user's domain; ``topic`` is then ``corpus: ID, ID, ...`` (the excerpts shown).

Design choices:
- SPEED found one task per topic better than five (MTEB 62.6 vs 60.9), so by default one of the
  distinct new tasks of a call is kept (``keep_per_call``), drawn with the stage's seeded rng.
- Tasks are deduplicated within a kind after normalizing case and spaces; repeats are counted under
  ``duplicate_task``. A call whose answer does not parse is counted under the parser's reason.
- The output is constrained to the ``{"tasks": [...]}`` schema where the backend supports it; the
  schema is the :class:`~speed.tasks.TaskList` model's own (the subtopics':
  :class:`~speed.tasks.topics.SubtopicList`'s), never a hand-written copy beside it.
- Brainstorm is not on the generation skeleton (:mod:`speed.stages.generation`): its calls are a
  few hundred, and which tasks are kept depends on every call before (dedup across topics).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from speed.io import write_jsonl
from speed.stage import Stage, StageContext, StageError, register
from speed.stages.alignment import (
    chat,
    corpus_hashes,
    generate_all,
    grounded_kinds,
    grounding,
    kind_templates,
    sampling,
)

logger = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")


def task_key(task: str) -> str:
    """The form under which two tasks count as the same."""
    return _SPACE.sub(" ", task.casefold()).strip().rstrip(".")


def tasks_schema() -> dict[str, Any]:
    """JSON schema of the brainstorm answer: :class:`~speed.tasks.TaskList`'s own."""
    from speed.tasks import TaskList, strict_schema

    return strict_schema(TaskList)


@register
class Brainstorm(Stage):
    """Teacher-written tasks per kind, tied to topics."""

    name = "brainstorm"
    roles = ("teacher",)
    extra_sections = ("topics",)

    def template_names(self, cfg: Any) -> tuple[str, ...]:
        names = kind_templates(cfg.brainstorm.kinds, brainstorm=True)
        if cfg.topics.domain:
            names.append("domain_expansion")
        return tuple(names)

    def template_hashes(self, cfg: Any) -> dict[str, str]:
        hashes = super().template_hashes(cfg)
        if not cfg.topics.domain:
            # the taxonomy file's text, packaged or the user's, shapes the tasks as a template does
            import hashlib

            from speed.tasks.topics import TAXONOMY_PATH

            path = TAXONOMY_PATH if cfg.topics.source == "builtin" else Path(cfg.topics.source)
            if path.is_file():
                hashes["topics:file"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return {**hashes, **corpus_hashes(cfg, cfg.brainstorm.kinds)}

    def check(self, ctx: StageContext) -> None:
        from speed.tasks import get_kind
        from speed.tasks.topics import load_topics

        for name in ctx.cfg.brainstorm.kinds:
            get_kind(name)  # an unknown kind fails here, with the near names
        if not ctx.cfg.topics.domain:
            try:
                load_topics(ctx.cfg.topics.source, ctx.cfg.topics.max_depth)
            except (OSError, ValueError) as err:
                raise StageError(f"stage 'brainstorm': {err}") from None
        grounding(ctx)  # an unreadable corpus fails here, before the first call

    def topics(self, ctx: StageContext, llm: Any) -> list[str]:
        """The topic list: the taxonomy, or the teacher's subtopics of ``topics.domain``."""
        from speed.tasks import strict_schema
        from speed.tasks.topics import (
            SubtopicList,
            domain_prompt,
            domain_topics,
            load_topics,
            parse_subtopics,
        )

        tcfg = ctx.cfg.topics
        if not tcfg.domain:
            return load_topics(tcfg.source, tcfg.max_depth)
        spec = ctx.cfg.models.teacher
        req = chat(
            domain_prompt(tcfg.domain, tcfg.num_subtopics),
            sampling(spec, seed=ctx.seed_for("domain")),
            schema=strict_schema(SubtopicList),
        )
        comp = llm.generate([req])[0]
        parsed = parse_subtopics(comp.text) if comp.error is None else None
        if parsed is None or parsed.value is None:
            why = comp.error or (parsed.detail if parsed else "")
            raise StageError(
                f"stage 'brainstorm': the teacher's subtopics of topics.domain '{tcfg.domain}' could not "
                f"be read ({why}); check the teacher, or use topics.source instead"
            )
        subtopics = parsed.value.subtopics[: tcfg.num_subtopics]
        (ctx.out / "subtopics.txt").write_text("\n".join(subtopics) + "\n", encoding="utf-8")
        return domain_topics(tcfg.domain, subtopics)

    def corpus_calls(self, ctx: StageContext, name: str, passages: Any) -> tuple[list[str], list[str]]:
        """The topics (``corpus: ID, ...``) and prompts of kind ``name``'s calls on corpus excerpts."""
        from speed.tasks.grounded import grounded_kind

        bcfg, ccfg = ctx.cfg.brainstorm, ctx.cfg.corpus
        rng = ctx.rng(f"corpus/{name}")
        kind = grounded_kind(name)
        topics, prompts = [], []
        for _ in range(bcfg.calls_per_kind):
            shown = rng.sample(list(passages), min(ccfg.brainstorm_passages, len(passages)))
            topics.append("corpus: " + ", ".join(str(p["id"]) for p in shown))
            prompts.append(kind.brainstorm_prompt_on(shown, bcfg.tasks_per_call))
        return topics, prompts

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.data.filters import DropCounter, placeholder_in
        from speed.tasks import get_kind
        from speed.tasks.topics import sample_topics

        bcfg = ctx.cfg.brainstorm
        spec = ctx.cfg.models.teacher
        llm = ctx.llm("teacher")
        ground = grounding(ctx)
        on_corpus = set(grounded_kinds(ctx.cfg, bcfg.kinds))
        topics = self.topics(ctx, llm)
        pick = ctx.rng("keep")
        counter = DropCounter("brainstorm")
        rows: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        per_kind: dict[str, int] = {}
        for name in bcfg.kinds:
            kind = get_kind(name)
            if not kind.brainstormed:
                for task in kind.fixed_tasks:
                    rows.append({"kind": name, "task": task, "topic": None})
                per_kind[name] = len(kind.fixed_tasks)
                continue
            if ground is not None and name in on_corpus:
                drawn, prompts = self.corpus_calls(ctx, name, ground.passages)
            else:
                drawn = sample_topics(topics, bcfg.calls_per_kind, ctx.rng(f"topics/{name}"))
                prompts = [kind.brainstorm_prompt(topic, bcfg.tasks_per_call) for topic in drawn]
            requests = [
                chat(prompt, sampling(spec, seed=ctx.seed_for(name, i)), schema=tasks_schema())
                for i, prompt in enumerate(prompts)
            ]
            comps = generate_all(ctx, llm, requests, f"{name} tasks")
            seen: set[str] = set()
            kept_kind = 0
            for topic, comp in zip(drawn, comps, strict=True):
                record: dict[str, Any] = {"kind": name, "topic": topic, "raw": comp.text, "tasks": []}
                calls.append(record)
                if comp.error is not None:
                    counter.drop("generation_error", comp.error)
                    record["reason"] = "generation_error"
                    continue
                parsed = kind.parse_tasks(comp.text)
                if parsed.value is None:
                    reason = parsed.reason or "unparseable"
                    counter.drop(reason, parsed.detail)
                    record["reason"] = reason
                    continue
                fresh = []
                for task in parsed.value.tasks:
                    slot = placeholder_in(task)
                    if slot is not None:
                        # "Find the region the city of [topic]" would reach every prompt built on it
                        counter.drop("placeholder_task", f"{slot!r} in {task[:60]!r}")
                        continue
                    key = task_key(task)
                    if key in seen:
                        counter.drop("duplicate_task", task)
                        continue
                    seen.add(key)
                    fresh.append(task)
                record["tasks"] = fresh
                if bcfg.keep_per_call is not None and len(fresh) > bcfg.keep_per_call:
                    chosen = set(pick.sample(range(len(fresh)), bcfg.keep_per_call))
                    for j, task in enumerate(fresh):
                        if j not in chosen:
                            counter.drop("not_kept_per_call", task)
                            seen.discard(task_key(task))  # another topic may still bring it
                    fresh = [t for j, t in enumerate(fresh) if j in chosen]
                record["kept"] = fresh
                for task in fresh:
                    rows.append({"kind": name, "task": task, "topic": topic})
                    counter.keep()
                kept_kind += len(fresh)
            per_kind[name] = kept_kind
            if kept_kind == 0:
                logger.warning("brainstorm: no task kept for kind '%s'", name)
        write_jsonl(ctx.out / "data.jsonl", rows)
        write_jsonl(ctx.out / "calls.jsonl", calls)
        counter.log_summary()
        brainstormed = [k for k in bcfg.kinds if get_kind(k).brainstormed]
        if brainstormed and not any(per_kind.get(k) for k in brainstormed):
            raise StageError(
                "stage 'brainstorm': the teacher's answers gave no usable task (drops: "
                f"{dict(counter.reasons)}); look at {ctx.out / 'calls.jsonl'}"
            )
        return {
            "count": len(rows),
            "per_kind": per_kind,
            "topics": len(topics),
            "calls": len(calls),
            "drops": dict(counter.reasons),
        }
