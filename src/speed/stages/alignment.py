"""What the alignment stages share: prompt sampling, requests, parsing with filters, key parts.

The alignment stages (brainstorm, seed, junior, candidates, judge, senior, revisions, revisor; one
module each) turn a teacher into training signal for small generators (SPEED, arXiv 2410.18634).
This module holds the pieces more than one of them needs.

Design choices:
- Generation prompts are drawn in one place (:func:`sample_prompts`): a kind by the seed section's
  ``kind_mix``, a task of that kind from the brainstorm pool, attributes from the kind's sampler,
  all from one ``random.Random`` that the stage derives from the run seed and its own name. So seed,
  candidates and revisions draw different prompts from the same distribution; prompts already used
  upstream are skipped, so the junior and senior are judged and revised on prompts they were not
  trained on.
- With a ``corpus`` configured, the prompts of its ``grounded_kinds`` are drawn the same way but
  built on a passage of the corpus sample (:class:`Grounding`): the row's kind is then the grounded
  variant (``retrieval_grounded``, :mod:`speed.tasks.grounded`), so every later stage parses and
  revises it by its own schema. Without a corpus the draws are exactly SPEED's.
- Every LLM call goes through ``ctx.llm`` (the ledger), with a per-request seed from
  ``ctx.seed_for``. A stage hands all its requests to the backend at once (:func:`generate_all`),
  which keeps as many in flight as its engine takes; the ledger stores each answer as it arrives, so
  a rerun replays what was answered and a crash resumes with only the calls that were in flight.
- The raw output is kept next to what was parsed from it, and every drop is counted by reason in a
  :class:`~speed.data.filters.DropCounter`; dropped rows are written to ``dropped.jsonl``.
- A stage key must change when anything that shapes its output changes. Besides its own section,
  an alignment stage depends on templates the config chooses (one per kind: ``template_names``) and
  on other sections (brainstorm on ``topics``: ``extra_sections``); the runner's Stage base hashes
  both.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from speed.config import ModelSpec, SpeedConfig
from speed.io import read_rows
from speed.llm.base import Completion, Request, Sampling
from speed.stage import StageContext, StageError

if TYPE_CHECKING:
    from speed.data.filters import DropCounter, Filter
    from speed.tasks.base import Example, TaskKind

logger = logging.getLogger(__name__)

#: seconds between progress lines in the log while a stage's requests are answered
_LOG_EVERY_S = 10.0


#: cap on the reason of the judge (and of the teacher's revision) under constrained decoding: a
#: small model can loop inside the string until max_tokens cuts the JSON before the verdict. Here,
#: not in judge.py, because revisions uses it too and stages do not import each other.
REASON_MAX_CHARS = 600


def kind_templates(kinds: Iterable[str], *, brainstorm: bool = False, generate: bool = False) -> list[str]:
    """Template names of ``kinds``: brainstorm templates and/or generate + guidelines templates."""
    from speed.tasks import get_kind

    names: list[str] = []
    for name in kinds:
        kind = get_kind(name)
        if brainstorm and kind.brainstorm_template:
            names.append(kind.brainstorm_template)
        if generate:
            names += [kind.generate_template, kind.guidelines_template]
    return names


def mix_kinds(cfg: SpeedConfig) -> list[str]:
    """The kinds generation prompts are drawn from: those with a positive weight in ``seed.kind_mix``."""
    return [k for k, w in cfg.seed.kind_mix.items() if w > 0]


# --------------------------------------------------------------------------------------------
# inputs


def require_rows(ctx: StageContext, stage: str, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of an upstream stage, checked to be non-empty and to carry ``fields``.

    Raises:
        StageError: the stage wrote no rows, or a row lacks a field (naming both).
    """
    try:
        rows = read_rows(ctx.input(stage))
    except FileNotFoundError as err:
        raise StageError(f"stage '{ctx.name}': upstream '{stage}' has no data ({err}); rerun it") from None
    if not rows:
        raise StageError(
            f"stage '{ctx.name}': upstream '{stage}' wrote no rows; look at its manifest's drops and "
            f"rerun it with larger counts"
        )
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise StageError(
                f"stage '{ctx.name}': row {i} of '{stage}' lacks {missing}; it was written by another "
                f"version of speed: rerun '{stage}'"
            )
    return rows


def task_pool(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Tasks per kind from brainstorm rows, in order, without repeats."""
    pool: dict[str, dict[str, None]] = {}
    for row in rows:
        pool.setdefault(row["kind"], {})[row["task"]] = None
    return {k: list(v) for k, v in pool.items()}


def check_pool(pool: Mapping[str, Sequence[str]], kinds: Iterable[str], where: str) -> None:
    """Every kind to be sampled has at least one task.

    Raises:
        StageError: naming the kinds without tasks and the fix.
    """
    empty = [k for k in kinds if not pool.get(k)]
    if empty:
        raise StageError(
            f"stage '{where}': no brainstormed task for kind(s) {empty}; add them to brainstorm.kinds, "
            f"raise brainstorm.calls_per_kind, or give them weight 0 in seed.kind_mix"
        )


# --------------------------------------------------------------------------------------------
# generation prompts


@dataclass(frozen=True)
class GenPrompt:
    """One generation prompt and what it was drawn from."""

    kind: str
    task: str
    attributes: dict[str, Any]
    prompt: str

    def to_row(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, "attributes": self.attributes, "prompt": self.prompt}


def sample_prompts(
    pool: Mapping[str, Sequence[str]],
    n: int,
    kind_mix: Mapping[str, float],
    rng: random.Random,
    language: str = "English",
    exclude: Iterable[str] = (),
    max_tries_factor: int = 20,
    grounding: Grounding | None = None,
    max_words: int | None = None,
) -> tuple[list[GenPrompt], int]:
    """Draw ``n`` distinct generation prompts that are not in ``exclude``.

    Args:
        pool: tasks per kind.
        n: prompts wanted.
        kind_mix: relative weight per kind (kinds without weight or without tasks are skipped).
        rng: the only source of randomness.
        language: the language of the examples.
        exclude: prompts used before (the seed's, the candidates'), never drawn again.
        max_tries_factor: give up after ``n * max_tries_factor`` draws (a small pool runs out of
            distinct prompts); fewer than ``n`` prompts are then returned.
        grounding: the corpus sample and the kinds grounded on it (:func:`grounding`): a prompt of
            such a kind is its grounded variant's, built on a passage drawn from ``rng``; None (no
            corpus): every prompt is SPEED's, drawn exactly as before.
        max_words: the words the writer's answer can hold (:func:`speed.tasks.base.answer_words` of
            its ``max_tokens``): longer lengths drawn are cut to fit (:meth:`TaskKind.fit_lengths`).

    Returns:
        The prompts and the number of draws rejected as repeats.
    """
    from speed.tasks import get_kind
    from speed.tasks.base import weighted_choice

    weights = {k: w for k, w in kind_mix.items() if w > 0 and pool.get(k)}
    if not weights:
        raise StageError(
            f"no kind to sample: seed.kind_mix {dict(kind_mix)} shares no kind with the brainstormed "
            f"tasks ({sorted(pool)})"
        )
    seen = set(exclude)
    out: list[GenPrompt] = []
    repeats = 0
    for _ in range(max(n, 1) * max_tries_factor):
        if len(out) >= n:
            break
        name = weighted_choice(rng, weights)
        kind = get_kind(name)
        task = rng.choice(list(pool[name]))
        if grounding is not None and name in grounding.kinds:
            kind, attributes = grounding.draw(name, rng, language)
        else:
            attributes = kind.sample_attributes(rng, language)
        attributes = kind.fit_lengths(attributes, max_words)
        prompt = kind.generation_prompt(task, attributes)
        if prompt in seen:
            repeats += 1
            continue
        seen.add(prompt)
        out.append(GenPrompt(kind.name, task, attributes, prompt))
    if len(out) < n:
        logger.warning(
            "only %d distinct new prompts after %d draws (%d wanted): the task pool is small",
            len(out),
            n * max_tries_factor,
            n,
        )
    return out, repeats


# --------------------------------------------------------------------------------------------
# grounding on the user's corpus


@dataclass(frozen=True)
class Grounding:
    """The corpus sample that prompts are grounded on, and the kinds that are grounded.

    Attributes:
        passages: the sampled passages (rows ``{"id", "text", "title"}``), in corpus order.
        kinds: names of the base kinds whose prompts are built on a passage.
    """

    passages: tuple[dict[str, Any], ...]
    kinds: frozenset[str]

    def draw(self, name: str, rng: random.Random, language: str) -> tuple[TaskKind, dict[str, Any]]:
        """The grounded variant of kind ``name`` and the attributes of one prompt: the kind's
        attributes, then a passage, both drawn from ``rng``."""
        from speed.tasks.grounded import grounded_kind

        kind = grounded_kind(name)
        attributes = kind.sample_attributes(rng, language)
        return kind, kind.ground(attributes, rng.choice(self.passages))


def grounding(ctx: StageContext) -> Grounding | None:
    """The run's grounding, preparing its corpus if needed (:func:`speed.corpus.prepare`, cached in
    ``RUN/corpus``); None without a corpus.

    Raises:
        speed.corpus.CorpusError: the corpus cannot be read (a ConfigError naming the field).
    """
    ccfg = ctx.cfg.corpus
    if not ccfg.enabled:
        return None
    from speed.corpus import load_sample, prepare

    prepare(ccfg, ctx.cfg.run.seed, ctx.run_dir, ctx.cfg.evaluate.data_dir)
    passages = tuple(p.to_row() for p in load_sample(ctx.run_dir))
    return Grounding(passages, frozenset(ccfg.grounded_kinds))


def grounded_kinds(cfg: SpeedConfig, kinds: Iterable[str]) -> list[str]:
    """Those of ``kinds`` whose prompts are grounded under ``cfg`` (none without a corpus)."""
    if not cfg.corpus.enabled:
        return []
    return [k for k in kinds if k in cfg.corpus.grounded_kinds]


def corpus_hashes(cfg: SpeedConfig, kinds: Iterable[str]) -> dict[str, str]:
    """Key parts of a stage that grounds prompts of ``kinds``: the grounded templates' hashes and the
    corpus fingerprint (:func:`speed.corpus.fingerprint`); empty without a corpus, so that runs
    without one keep their keys.

    Raises:
        speed.corpus.CorpusError: a corpus path does not exist (before any stage runs).
    """
    names = grounded_kinds(cfg, kinds)
    if not names:
        return {}
    from speed.corpus import fingerprint
    from speed.tasks import template_hash
    from speed.tasks.grounded import grounded_kind

    hashes = {t: template_hash(t) for k in names for t in grounded_kind(k).template_names()}
    hashes["corpus"] = fingerprint(cfg.corpus, cfg.run.seed, cfg.evaluate.data_dir)
    return hashes


# --------------------------------------------------------------------------------------------
# requests


def sampling(
    spec: ModelSpec,
    *,
    seed: int | None,
    temperature: float | None = None,
    n: int = 1,
    max_tokens: int | None = None,
) -> Sampling:
    """Sampling parameters from a role's spec, with per-call overrides."""
    return Sampling(
        temperature=spec.temperature if temperature is None else temperature,
        top_p=spec.top_p,
        max_tokens=max_tokens or spec.max_tokens,
        n=n,
        seed=seed,
    )


def chat(prompt: str, sampling_: Sampling, schema: dict[str, Any] | None = None) -> Request:
    """A single-turn chat request."""
    return Request.chat(prompt, sampling=sampling_, schema=schema)


def generate_all(
    ctx: StageContext, llm: Any, requests: Sequence[Request], desc: str, chunk: int | None = None
) -> list[Completion]:
    """Answer ``requests`` through the ledgered backend, all sent at once, logging progress.

    Args:
        ctx: the stage context (progress bar).
        llm: a backend from ``ctx.llm`` (so that every call is ledgered).
        requests: the requests, in order.
        desc: what is generated, for the log.
        chunk: requests per ``generate`` call; default all of them, so that the backend keeps as
            many in flight as it can (answers are ledgered one by one either way).
    """
    size = chunk or max(1, len(requests))
    out: list[Completion | None] = [None] * len(requests)
    # ctx.progress wraps an iterable; stepping an endless one by hand moves the bar one answer on
    bar = ctx.progress(itertools.repeat(None), total=len(requests), desc=desc)
    done = 0
    last_log = time.monotonic()

    def keep(offset: int, ready: list[tuple[int, Completion]]) -> None:
        nonlocal done, last_log
        for i, comp in ready:
            out[offset + i] = comp
            next(bar)
        done += len(ready)
        if done == len(requests) or time.monotonic() - last_log >= _LOG_EVERY_S:
            last_log = time.monotonic()
            logger.info("%s: %s %d/%d", ctx.name, desc, done, len(requests))

    try:
        for start in range(0, len(requests), size):
            part = requests[start : start + size]
            if hasattr(llm, "generate_as_ready"):
                llm.generate_as_ready(part, lambda ready, start=start: keep(start, ready))
            else:  # a plain backend (tests, a stage's own): answers come with the whole call
                keep(start, list(enumerate(llm.generate(part))))
    finally:
        close = getattr(bar, "close", None)  # a generator: closing it closes the bar
        if close is not None:
            close()
    missing = sum(c is None for c in out)
    if missing:
        raise StageError(f"{ctx.name}: {missing} of {len(requests)} {desc} got no answer from the backend")
    return [c for c in out if c is not None]


def role_model(ctx: StageContext, role: str) -> str:
    """What transformers loads as ``role``'s weights in this stage: the folder its training stage
    left in the run when this stage reads that stage (:meth:`StageContext.weights`), else the spec's
    ``model`` resolved (a packaged name converted once to a folder, a local folder, a hub name).

    Raises:
        StageError: the trained folder holds no model, or the spec names no model.
    """
    from speed.config import LocalSpec
    from speed.models import resolve_hf

    trained = ctx.weights(role)
    if trained is not None:
        return str(trained)
    spec = getattr(ctx.cfg.models, role)
    if not spec.model:
        raise StageError(
            f"stage '{ctx.name}': models.{role}.model is not set; name the base model to fine-tune "
            "(a packaged name such as smollm2-135m-instruct, a folder or a hub name)"
        )
    return resolve_hf(spec.model, file=spec.file if isinstance(spec, LocalSpec) else None)


def free_local_models(
    ctx: StageContext, roles: Iterable[str] = ("teacher", "junior", "senior", "revisor")
) -> None:
    """Close the backends of ``roles`` that hold a model on this machine (before training).

    API backends (``openai``) hold no model and are kept.
    """
    for role in roles:
        spec: ModelSpec = getattr(ctx.cfg.models, role)
        if spec.backend != "openai":
            ctx.session.release(role)


# --------------------------------------------------------------------------------------------
# parsing generated examples


def build_filters(check_language: bool) -> list[Filter]:
    """The quality filters of generated examples (see :mod:`speed.data.filters`)."""
    from speed.data.filters import default_filters

    return default_filters(check_language=check_language)


def parse_example(
    kind: TaskKind,
    text: str,
    attributes: Mapping[str, Any],
    filters: Sequence[Filter],
    counter: DropCounter | None = None,
) -> tuple[Example | None, str | None, str]:
    """Parse one generated example against its kind's pydantic schema and run the filters on it.

    The one parse of a generated example, for every stage (in the workers of seed, revisions and
    synthesize alike).

    Returns:
        The example (or None), the drop reason (or None) and the drop's detail; a drop is counted
        in ``counter`` when one is given.
    """
    from speed.data.filters import first_failure

    result = kind.parse(text)
    if result.value is None:
        reason = result.reason or "unparseable"
        if counter is not None:
            counter.drop(reason, result.detail)
        return None, reason, result.detail
    # the whole example: a grounded one's positive is its passage, which the filters must see (a
    # query copied from it, a negative that repeats it)
    failed = first_failure(kind.complete(result.value, attributes), kind, attributes, filters, counter)
    if failed is not None:
        return None, failed, ""
    return result.value, None, ""


_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """A candidate's text for equality checks: canonical JSON when it parses as an object, else
    whitespace-collapsed text."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return _SPACE.sub(" ", stripped)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return _SPACE.sub(" ", stripped)


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------------------------
# the revisor's prompt (synthesize asks it, the revisor stage trains on it)

REVISOR_TEMPLATE = "revisor"


def revisor_prompt(generation_prompt: str, example: str | BaseModel | Mapping[str, Any]) -> str:
    """The data revisor's input; its training target is :func:`speed.tasks.example_json` of the
    teacher's revision. The revisor answers in the kind's own schema, so no model of its own."""
    from speed.tasks import example_json, render_template

    shown = example if isinstance(example, str) else example_json(example)
    return render_template(
        REVISOR_TEMPLATE, generation_prompt=generation_prompt.strip(), example=shown.strip()
    )
