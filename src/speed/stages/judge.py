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
- The answer is constrained where the backend can: ``best`` and ``worst`` are enums of the shown
  numbers. Constrained or not, the checks above run.

Output ``data.jsonl``: ``{prompt, chosen, rejected, reason, kind, task, best, worst, order, raw}``
(``best``/``worst`` index the candidates stage's list; ``order`` is the shown order; ``raw`` is the
teacher's text). ``dropped.jsonl`` keeps the rest with their reason; ``stats["best_position"]``
counts where the chosen candidate was shown, to watch position bias.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from pydantic import model_validator

from speed.io import write_jsonl
from speed.stage import Stage, StageContext, StageError, register
from speed.stages.alignment import REASON_MAX_CHARS, chat, generate_all, normalize, require_rows, sampling
from speed.tasks.base import Judgement

logger = logging.getLogger(__name__)

SAME_INDEX = "judge_same_index"
OUT_OF_RANGE = "judge_index_out_of_range"
BEST_UNPARSEABLE = "best_unparseable"
IDENTICAL = "identical_candidates"
NONE_PARSEABLE = "no_parseable_candidate"
ONE_PARSEABLE = "one_parseable_candidate"
INCONSISTENT = "judge_inconsistent"


class _AnyVerdict(Judgement):
    """A verdict read without the range and distinctness checks, only to name why one failed."""

    best: int
    worst: int

    @model_validator(mode="after")
    def _distinct(self) -> _AnyVerdict:  # replaces Judgement's check of the same name
        return self


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


def verdict_schema(num_shown: int) -> dict[str, Any]:
    """JSON schema of the judge's answer for ``num_shown`` candidates (reason first, then the verdict)."""
    numbers = list(range(1, num_shown + 1))
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
            "best": {"type": "integer", "enum": numbers},
            "worst": {"type": "integer", "enum": numbers},
        },
        "required": ["reason", "best", "worst"],
        "additionalProperties": False,
    }


def read_verdict(text: str, num_shown: int) -> tuple[Judgement | None, str | None, str]:
    """Parse the judge's answer: the verdict, or None with a drop reason and detail."""
    from speed.data.parsing import parse_json
    from speed.tasks import parse_judgement

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


@register
class Judge(Stage):
    """Teacher verdicts on candidate lists, as DPO pairs."""

    name = "judge"
    reads = ("candidates",)
    roles = ("teacher",)
    templates = ("judge",)

    def check(self, ctx: StageContext) -> None:
        require_rows(ctx, "candidates", ("prompt", "candidates", "parsed"))

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.data.filters import DropCounter
        from speed.tasks import judge_prompt

        jcfg = ctx.cfg.judge
        rows = require_rows(ctx, "candidates", ("prompt", "candidates", "parsed"))
        counter = DropCounter("judge")
        dropped: list[dict[str, Any]] = []
        todo: list[tuple[dict[str, Any], list[int]]] = []
        for i, row in enumerate(rows):
            texts, parsed = row["candidates"], row["parsed"]
            if not any(parsed):
                counter.drop(NONE_PARSEABLE)
                dropped.append({**row, "reason": NONE_PARSEABLE})
                continue
            idx = distinct_indices(texts)
            reason = IDENTICAL
            if len(idx) >= 2 and jcfg.unparseable == "drop":
                idx = [j for j in idx if parsed[j]]
                reason = ONE_PARSEABLE
            if len(idx) < 2:
                counter.drop(reason)
                dropped.append({**row, "reason": reason})
                continue
            rng = random.Random(ctx.seed_for("order", i)) if jcfg.shuffle else None
            todo.append((row, shuffled_order(idx, rng)))

        spec = ctx.cfg.models.teacher
        # one shown order per list, or the order and its reverse (judge.both_orders)
        shown = [[order, order[::-1]] if jcfg.both_orders else [order] for _, order in todo]
        requests = [
            chat(
                judge_prompt(row["prompt"], [row["candidates"][j] for j in order]),
                sampling(spec, seed=ctx.seed_for("judge", row["prompt"]), temperature=jcfg.temperature),
                schema=verdict_schema(len(order)),
            )
            for (row, _), orders in zip(todo, shown, strict=True)
            for order in orders
        ]
        answers = iter(generate_all(ctx, ctx.llm("teacher"), requests, "verdicts"))

        pairs: list[dict[str, Any]] = []
        best_position: dict[str, int] = {}
        for (row, order), orders in zip(todo, shown, strict=True):
            comps = [next(answers) for _ in orders]
            raw = comps[0].text
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
                counter.drop(reason, detail)
                dropped.append({**row, "order": order, "reason": reason, "raw": raw})
                continue
            best, worst = mapped[0]
            counter.keep()
            best_position[str(verdict.best)] = best_position.get(str(verdict.best), 0) + 1
            pairs.append(
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
        write_jsonl(ctx.out / "data.jsonl", pairs)
        write_jsonl(ctx.out / "dropped.jsonl", dropped)
        counter.log_summary()
        if not pairs:
            raise StageError(
                f"stage 'judge': no usable verdict (drops: {dict(counter.reasons)}); look at "
                f"{ctx.out / 'dropped.jsonl'}"
            )
        return {
            "count": len(pairs),
            "judged": len(todo),
            "calls": len(requests),
            "drops": dict(counter.reasons),
            "best_position": dict(sorted(best_position.items())),
        }
