"""Semantic textual similarity: S1, S2 close to it, S3 further away (E5, SPEED).

STS is not brainstormed: its task is E5's fixed instruction for symmetric similarity. The row is
S1 as query, S2 as positive and S3 as hard negative. Attributes follow SPEED: a high score from
{4, 4.5, 5}, a low score from {2.5, 3, 3.5}, both uniform, and the unit (sentence .9, phrase .05,
passage .05).
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from speed.tasks.base import UNITS, Example, TaskKind, register_kind, weighted_choice

HIGH_SCORES = (4, 4.5, 5)
LOW_SCORES = (2.5, 3, 3.5)


class STSExample(Example):
    """One STS triple."""

    S1: str = Field(description="The anchor text.")
    S2: str = Field(description="A text close in meaning to S1 (the high score).")
    S3: str = Field(description="A text on the same subject, further in meaning (the low score).")


@register_kind
class STS(TaskKind):
    """Symmetric similarity (SPEED: 294K of 920K examples)."""

    name = "sts"
    schema = STSExample
    brainstormed = False
    fixed_tasks = ("Retrieve semantically similar text.",)
    query_field = "S1"
    positive_field = "S2"
    negative_field = "S3"

    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        return {
            "high_score": rng.choice(HIGH_SCORES),
            "low_score": rng.choice(LOW_SCORES),
            "unit": weighted_choice(rng, UNITS),
            "language": language,
        }
