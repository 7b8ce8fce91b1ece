"""Classification: a long input text, its short label and a misleading label (E5, SPEED).

The input text becomes the query, the label the positive and the misleading label the hard negative.
Attributes follow SPEED: input length with the paper's weights; clarity and difficulty are added
together half of the time. SPEED gives no weights for those two, so clarity reuses the retrieval
clarity weights and difficulty is drawn uniformly from E5's three education levels.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from speed.tasks.base import (
    CLARITY,
    EDUCATION_LEVELS,
    Example,
    TaskKind,
    largest_within,
    register_kind,
    weighted_choice,
)

INPUT_LENGTHS = {
    "less than 10 words": 0.1,
    "at least 10 words": 0.3,
    "at least 50 words": 0.2,
    "at least 100 words": 0.2,
    "at least 200 words": 0.2,
}
#: the lower bound each input length asks for (0: no lower bound)
MIN_WORDS = {
    "less than 10 words": 0,
    "at least 10 words": 10,
    "at least 50 words": 50,
    "at least 100 words": 100,
    "at least 200 words": 200,
}


class ClassificationExample(Example):
    """One classification example."""

    input_text: str = Field(description="The text to classify.")
    label: str = Field(description="Its correct label.")
    misleading_label: str = Field(description="A plausible but wrong label of the same task.")


@register_kind
class Classification(TaskKind):
    """Long text, short label (SPEED: 246K of 920K examples)."""

    name = "classification"
    schema = ClassificationExample
    query_field = "input_text"
    positive_field = "label"
    negative_field = "misleading_label"
    label_fields = ("label", "misleading_label")

    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        input_length = weighted_choice(rng, INPUT_LENGTHS)
        add_style = rng.random() < 0.5
        clarity = weighted_choice(rng, CLARITY) if add_style else None
        difficulty = rng.choice(EDUCATION_LEVELS) if add_style else None
        return {
            "input_length": input_length,
            "clarity": clarity,
            "difficulty": difficulty,
            "language": language,
        }

    def requested_words(self, attributes: Mapping[str, Any]) -> dict[str, int]:
        words = MIN_WORDS.get(str(attributes.get("input_length")), 0)
        return {"input_text": words} if words else {}

    def fit_lengths(self, attributes: Mapping[str, Any], max_words: int | None) -> dict[str, Any]:
        out = dict(attributes)
        # the text and the two labels (about 10 words) must fit
        if max_words is not None and MIN_WORDS.get(str(out.get("input_length")), 0) > max_words - 10:
            fit = largest_within(list(MIN_WORDS.values()), max_words - 10)
            out["input_length"] = next(name for name, words in MIN_WORDS.items() if words == fit)
        return out
