"""Bitext: a text and its translation (E5 only; opt-in here, not in SPEED's default mix).

Not brainstormed: its task is E5's fixed instruction for parallel text. S1 is written in the run's
language (English by default), S2 in a target language drawn uniformly from ``TARGET_LANGUAGES``;
the unit is drawn with the STS weights. The row is S1 as query, S2 as positive, no negative.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from speed.tasks.base import UNITS, Example, TaskKind, register_kind, weighted_choice


class BitextExample(Example):
    """One translation pair."""

    S1: str = Field(description="The text in the source language.")
    S2: str = Field(description="Its translation into the target language.")


@register_kind
class Bitext(TaskKind):
    """Parallel text in two languages."""

    name = "bitext"
    schema = BitextExample
    brainstormed = False
    fixed_tasks = ("Retrieve parallel sentences.",)
    query_field = "S1"
    positive_field = "S2"
    #: widely spoken languages that the bundled language detector knows well
    TARGET_LANGUAGES: ClassVar[tuple[str, ...]] = (
        "English", "Chinese", "Spanish", "French", "German", "Japanese", "Russian", "Portuguese",
        "Italian", "Arabic", "Hindi", "Korean", "Dutch", "Turkish", "Polish", "Vietnamese",
        "Indonesian", "Swedish", "Greek", "Czech",
    )  # fmt: skip

    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        targets = [t for t in self.TARGET_LANGUAGES if t != language]
        return {
            "source_language": language,
            "target_language": rng.choice(targets),
            "unit": weighted_choice(rng, UNITS),
            "language": language,
        }

    def field_languages(self, attributes: Mapping[str, Any]) -> dict[str, str]:
        return {"S1": attributes["source_language"], "S2": attributes["target_language"]}
