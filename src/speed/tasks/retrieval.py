"""Retrieval: a short query, a long positive document and a hard negative (E5, SPEED).

Attributes follow SPEED: query type, query length and clarity with the paper's weights, a document
length of 50 to 500 words, an education level added half of the time, and the guidelines shuffled
per prompt so that the generator does not learn one fixed order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

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

QUERY_TYPES = {"extremely long-tail": 0.4, "long-tail": 0.5, "common": 0.1}
QUERY_LENGTHS = {"less than 5 words": 0.4, "5 to 15 words": 0.4, "at least 10 words": 0.2}
DOCUMENT_WORDS = (50, 100, 200, 300, 400, 500)


class RetrievalExample(Example):
    """One retrieval example."""

    user_query: str = Field(description="The search request.")
    positive_document: str = Field(description="A document that answers the request.")
    hard_negative_document: str = Field(description="A document that looks relevant but answers it worse.")


@register_kind
class Retrieval(TaskKind):
    """Short query, long documents (SPEED: 303K of 920K examples)."""

    name = "retrieval"
    schema = RetrievalExample
    query_field = "user_query"
    positive_field = "positive_document"
    negative_field = "hard_negative_document"
    shuffle_guidelines = True
    #: documents asked for with N words are dropped below this share of N by default
    length_fields: ClassVar[tuple[str, ...]] = ("positive_document", "hard_negative_document")

    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        return {
            "query_type": weighted_choice(rng, QUERY_TYPES),
            "query_length": weighted_choice(rng, QUERY_LENGTHS),
            "clarity": weighted_choice(rng, CLARITY),
            "num_words": rng.choice(DOCUMENT_WORDS),
            "education_level": rng.choice(EDUCATION_LEVELS) if rng.random() < 0.5 else None,
            "language": language,
            "guideline_order": self.guideline_order(rng),
        }

    def requested_words(self, attributes: Mapping[str, Any]) -> dict[str, int]:
        return {f: int(attributes["num_words"]) for f in self.length_fields}

    def fit_lengths(self, attributes: Mapping[str, Any], max_words: int | None) -> dict[str, Any]:
        out = dict(attributes)
        if max_words is not None:
            # both documents and the query (at most about 20 words) must fit
            per_document = (max_words - 20) // len(self.length_fields)
            if int(out["num_words"]) > per_document:
                out["num_words"] = largest_within(DOCUMENT_WORDS, per_document)
        return out
