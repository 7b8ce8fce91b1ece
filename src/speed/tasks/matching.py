"""Text matching: short-short and long-long pairs of an input and its matching text (E5, SPEED).

Both kinds share the schema (``input``, ``positive_document``) and have no hard negative; they differ
in their templates, which ask for short or long texts. SPEED samples no attribute for them except the
language.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from speed.tasks.base import Example, TaskKind, register_kind


class MatchingExample(Example):
    """One matching pair."""

    input: str = Field(description="The text the task starts from.")
    positive_document: str = Field(description="The text the task should return for it.")


class _Matching(TaskKind):
    schema = MatchingExample
    query_field = "input"
    positive_field = "positive_document"

    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        return {"language": language}


@register_kind
class MatchingShort(_Matching):
    """Short query, short target (SPEED: 40K of 920K examples)."""

    name = "matching_short"


@register_kind
class MatchingLong(_Matching):
    """Long query, long target (SPEED: 37K of 920K examples)."""

    name = "matching_long"
