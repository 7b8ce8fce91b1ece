"""judge: the teacher names the best and the worst of the junior's candidates (SPEED: 10K calls).

For each candidate list the teacher (temperature 0) sees the generation prompt and the candidates,
numbered from 1, and answers ``{"reason", "best", "worst"}``; best becomes ``chosen`` and worst
``rejected`` of a DPO pair.

Design choices:
- Position bias: LLM judges favour early (or late) positions, so the candidates are shown in an
  order shuffled per call (``judge.shuffle``) with a generator seeded by the run seed and the row,
  and the verdict's numbers are mapped back through that order (:func:`to_original`).
- Repeats: candidates are compared after normalization (canonical JSON when they parse, collapsed
  whitespace otherwise); only the first of equal candidates is shown. A list with fewer than two
  distinct candidates is not judged (``identical_candidates``), nor is one whose candidates all fail
  to parse (``no_parseable_candidate``): no teacher call is spent on them.
- Unparseable candidates (``judge.unparseable``): ``show`` (default) lets the judge see them, so a
  broken candidate can be the rejected side of a pair (which teaches the senior to write valid
  JSON), but a verdict that names one as *best* is dropped (``best_unparseable``): we never train
  towards broken output. ``drop`` removes them before judging (a list left with one distinct
  candidate that parses: ``one_parseable_candidate``).
- Verdicts the pair cannot come from are dropped and counted, never trained on: unparseable
  answers (the parser's reason), ``judge_same_index`` (best == worst) and
  ``judge_index_out_of_range`` (a number outside 1..shown).
- Opt-in (``judge.both_orders``): each list is also shown in the reverse order and a verdict is kept
  only when both name the same best and worst (``judge_inconsistent`` otherwise). It doubles the
  judge calls; it is for small teachers, which mostly name whatever is shown first (the 0.5B teacher
  of the CPU benchmark did so in all of its 26 kept verdicts).
- The answer is constrained where the backend can: its JSON schema is the :class:`Judgement`
  model's own (:func:`verdict_schema`), with ``best`` and ``worst`` narrowed to enums of the shown
  numbers. Constrained or not, the checks above run. The verdict's model, its prompt and its
  schema live here, with the stage that asks for it.
- The stage runs on the generation skeleton (:mod:`speed.stages.generation`): the shown orders
  and the lists not worth a call are decided when planning, on the driver; workers ask and read
  the verdicts shard by shard, so a killed judge resumes by shard.

Output ``data.jsonl``: ``{prompt, chosen, rejected, reason, kind, task, best, worst, order, raw}``
(``best``/``worst`` index the candidates stage's list; ``order`` is the shown order; ``raw`` is the
teacher's text). ``dropped.jsonl`` keeps the rest with their reason; ``stats["best_position"]``
counts where the chosen candidate was shown, to watch position bias.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from speed.data.parsing import ParseResult, parse_json
from speed.stage import StageContext, register
from speed.stages.alignment import REASON_MAX_CHARS, chat, normalize, require_rows, sampling
from speed.stages.generation import GenerationStage, Job, Plan, record

logger = logging.getLogger(__name__)

SAME_INDEX = "judge_same_index"
OUT_OF_RANGE = "judge_index_out_of_range"
BEST_UNPARSEABLE = "best_unparseable"
IDENTICAL = "identical_candidates"
NONE_PARSEABLE = "no_parseable_candidate"
ONE_PARSEABLE = "one_parseable_candidate"
INCONSISTENT = "judge_inconsistent"

JUDGE_TEMPLATE = "judge"


# --------------------------------------------------------------------------------------------
# the verdict: its model, its prompt, its schema


class Judgement(BaseModel):
    """The teacher's verdict on K candidates: 1-based indices of the best and the worst."""

    model_config = ConfigDict(extra="ignore")

    reason: str = Field(
        "",
        description="Why the best beats the others and the worst loses.",
        # a cap in the schema only (constrained decoding), not when reading: see REASON_MAX_CHARS
        json_schema_extra={"maxLength": REASON_MAX_CHARS},
    )
    best: int = Field(ge=1, description="Number of the best candidate, as shown in the prompt (from 1).")
    worst: int = Field(ge=1, description="Number of the worst candidate, as shown in the prompt (from 1).")

    @field_validator("best", "worst", mode="before")
    @classmethod
    def _number_in_text(cls, value: Any) -> Any:
        # "Candidate 3" or "#3" -> 3
        if isinstance(value, str):
            digits = re.findall(r"\d+", value)
            if len(digits) == 1:
                return int(digits[0])
        return value

    @model_validator(mode="after")
    def _distinct(self) -> Judgement:
        if self.best == self.worst:
            raise ValueError(f"best and worst are both candidate {self.best}; they must differ")
        return self


class _AnyVerdict(Judgement):
    """A verdict read without the range and distinctness checks, only to name why one failed."""

    best: int
    worst: int

    @model_validator(mode="after")
    def _distinct(self) -> _AnyVerdict:  # replaces Judgement's check of the same name
        return self


def judge_prompt(generation_prompt: str, candidates: Sequence[str]) -> str:
    """The prompt showing the teacher a generation prompt and its numbered candidates (from 1).

    Raises:
        ValueError: fewer than two candidates.
    """
    from speed.tasks import render_template

    if len(candidates) < 2:
        raise ValueError(f"the judge needs at least 2 candidates, got {len(candidates)}")
    shown = "\n\n".join(f"Candidate {i}:\n{c.strip()}" for i, c in enumerate(candidates, start=1))
    return render_template(
        JUDGE_TEMPLATE,
        generation_prompt=generation_prompt.strip(),
        candidates=shown,
        num_candidates=len(candidates),
    )


def verdict_schema(num_shown: int) -> dict[str, Any]:
    """JSON schema of the judge's answer for ``num_shown`` candidates: :class:`Judgement`'s own
    (reason first, then the verdict), with ``best`` and ``worst`` narrowed to the shown numbers."""
    from speed.tasks import strict_schema

    schema = strict_schema(Judgement)
    numbers = list(range(1, num_shown + 1))
    for name in ("best", "worst"):
        schema["properties"][name]["enum"] = numbers
    return schema


def parse_judgement(text: str, num_candidates: int) -> ParseResult[Judgement]:
    """Parse the judge's answer; indices outside ``1..num_candidates`` are a drop."""
    result = parse_json(text, Judgement)
    if result.value is not None:
        bad = [i for i in (result.value.best, result.value.worst) if i > num_candidates]
        if bad:
            return ParseResult(
                None,
                OUT_OF_RANGE,
                f"candidate {bad[0]} named, but only {num_candidates} were shown",
                result.repaired,
            )
    return result


def read_verdict(text: str, num_shown: int) -> tuple[Judgement | None, str | None, str]:
    """Parse the judge's answer: the verdict, or None with a drop reason and detail."""
    result = parse_judgement(text, num_shown)
    if result.value is not None:
        return result.value, None, ""
    # name the failure precisely when the answer is a well-formed but unusable verdict
    loose = parse_json(text, _AnyVerdict)
    if loose.value is not None:
        best, worst = loose.value.best, loose.value.worst
        if not (1 <= best <= num_shown and 1 <= worst <= num_shown):
            return None, OUT_OF_RANGE, f"best {best}, worst {worst}, shown {num_shown}"
        if best == worst:
            return None, SAME_INDEX, f"best and worst are both {best}"
    return None, result.reason or "unparseable", result.detail


# --------------------------------------------------------------------------------------------
# shown order


def distinct_indices(texts: Sequence[str]) -> list[int]:
    """Indices of the first of each group of equal candidates (after :func:`normalize`), in order."""
    seen: set[str] = set()
    out = []
    for i, text in enumerate(texts):
        key = normalize(text)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def shuffled_order(indices: Sequence[int], rng: random.Random | None) -> list[int]:
    """The order to show candidates in: ``order[j]`` is the candidate shown as number ``j + 1``."""
    order = list(indices)
    if rng is not None:
        rng.shuffle(order)
    return order


def to_original(order: Sequence[int], shown_number: int) -> int:
    """The candidate index behind the number the judge saw (from 1).

    Raises:
        IndexError: ``shown_number`` is outside ``1..len(order)``.
    """
    if not 1 <= shown_number <= len(order):
        raise IndexError(f"candidate number {shown_number} is outside 1..{len(order)}")
    return order[shown_number - 1]


# --------------------------------------------------------------------------------------------
# the stage


@register
class Judge(GenerationStage):
    """Teacher verdicts on candidate lists, as DPO pairs."""

    name = "judge"
    reads = ("candidates",)
    roles = ("teacher",)
    templates = (JUDGE_TEMPLATE,)
    nothing_kept = "no usable verdict"

    def check(self, ctx: StageContext) -> None:
        require_rows(ctx, "candidates", ("prompt", "candidates", "parsed"))

    def plan(self, ctx: StageContext) -> Plan:
        """One item per candidate list: the shown orders, or the reason it is not worth a call."""
        jcfg = ctx.cfg.judge
        items: list[dict[str, Any]] = []
        judged = calls = 0
        for i, row in enumerate(require_rows(ctx, "candidates", ("prompt", "candidates", "parsed"))):
            texts, parsed = row["candidates"], row["parsed"]
            if not any(parsed):
                items.append({"row": row, "drop": NONE_PARSEABLE})
                continue
            idx = distinct_indices(texts)
            reason = IDENTICAL
            if len(idx) >= 2 and jcfg.unparseable == "drop":
                idx = [j for j in idx if parsed[j]]
                reason = ONE_PARSEABLE
            if len(idx) < 2:
                items.append({"row": row, "drop": reason})
                continue
            rng = random.Random(ctx.seed_for("order", i)) if jcfg.shuffle else None
            order = shuffled_order(idx, rng)
            # one shown order per list, or the order and its reverse (judge.both_orders)
            orders = [order, order[::-1]] if jcfg.both_orders else [order]
            items.append({"row": row, "orders": orders, "seed": ctx.seed_for("judge", row["prompt"])})
            judged += 1
            calls += len(orders)
        return Plan.of_items(items, self.shard_size, judged=judged, calls=calls)

    def process(self, job: Job, payload: list[dict[str, Any]]) -> dict[str, Any]:
        jcfg, spec = job.cfg.judge, job.cfg.models.teacher
        asked = [item for item in payload if "orders" in item]
        requests = [
            chat(
                judge_prompt(item["row"]["prompt"], [item["row"]["candidates"][j] for j in order]),
                sampling(spec, seed=item["seed"], temperature=jcfg.temperature),
                schema=verdict_schema(len(order)),
            )
            for item in asked
            for order in item["orders"]
        ]
        answers = iter(job.generate("teacher", requests))
        records = []
        for item in payload:
            if "orders" not in item:
                records.append(record(item["row"], item["drop"]))
                continue
            records.append(self.verdict(item["row"], item["orders"], [next(answers) for _ in item["orders"]]))
        return {"records": records}

    @staticmethod
    def verdict(row: dict[str, Any], orders: list[list[int]], comps: list[Any]) -> dict[str, Any]:
        """The record of one list: its DPO pair, or why its verdicts cannot make one."""
        order, raw = orders[0], comps[0].text
        mapped: list[tuple[int, int]] = []
        failure: tuple[str, str] | None = None
        verdict = None
        for shown_order, comp in zip(orders, comps, strict=True):
            if comp.error is not None:
                failure = ("generation_error", comp.error)
                break
            got, why, detail = read_verdict(comp.text, len(shown_order))
            if got is None:
                failure = (why or "unparseable", detail)
                break
            verdict = verdict or got
            mapped.append((to_original(shown_order, got.best), to_original(shown_order, got.worst)))
        if failure is None and len(set(mapped)) > 1:
            failure = (INCONSISTENT, f"verdicts by order: {mapped}")
        if failure is None and not row["parsed"][mapped[0][0]]:
            failure = (BEST_UNPARSEABLE, "")
        if failure is not None or verdict is None:
            reason, detail = failure or ("unparseable", "")
            return record({**row, "order": order, "raw": raw}, reason, detail)
        best, worst = mapped[0]
        return record(
            {
                "prompt": row["prompt"],
                "chosen": row["candidates"][best],
                "rejected": row["candidates"][worst],
                "reason": verdict.reason,
                "kind": row.get("kind"),
                "task": row.get("task"),
                "best": best,
                "worst": worst,
                "order": order,
                "raw": raw,
            }
        )

    def summarize(
        self, ctx: StageContext, kept: list[dict[str, Any]], dropped: list[dict[str, Any]], plan: Plan
    ) -> dict[str, Any]:
        # where the chosen candidate was shown (from 1), to watch position bias
        position = Counter(str(p["order"].index(p["best"]) + 1) for p in kept)
        return {**plan.stats, "best_position": dict(sorted(position.items()))}
