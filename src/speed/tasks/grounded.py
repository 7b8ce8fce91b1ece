"""Grounded kinds: retrieval and matching examples built on a passage of the user's corpus.

With a ``corpus`` configured (:mod:`speed.corpus`), a prompt of a grounded kind shows a sampled
passage; the generator writes the query side of the example (InPars, Bonifacio et al. 2022;
Promptagator, Dai et al. 2022) and, for retrieval, a hard negative, and the passage itself is the
positive. So the positive is real text of the user's domain, never invented.

Each grounded kind is a variant of a registered kind (``retrieval`` -> ``retrieval_grounded``): it
has its own prompts and a schema of only what the generator writes. Rows of the alignment stages
carry the variant's name, so that candidates, the judge, revisions, the revisor and synthesis parse,
judge and revise a grounded answer exactly as any other (a grounded prompt is just another prompt).
:meth:`GroundedKind.complete` adds the positive from the prompt's ``attributes["passage"]``;
training rows, filters and the seed's examples see the whole example.

Design choices:
- The passage goes into the prompt's attributes (``{"id", "text", "title"}``), which every stage
  already stores beside its prompt, so the positive of any row can be rebuilt from the row alone.
- The generator never copies the passage into its answer: that would spend its tokens (a 0.5B
  teacher has a few hundred) on text we already have, and invite it to alter the positive.
- ``matching_short`` pairs short texts, so its positive is a short text of the corpus: the
  document's title when the corpus has titles, else the passage's first sentence.
- A retrieval hard negative is asked about as long as the passage (word count rounded to 10, kept
  within SPEED's 50-500 words) so that length does not give the positive away.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from speed.tasks.base import (
    Example,
    TaskKind,
    get_kind,
    register_variant,
    render_guidelines,
    render_template,
)

#: the suffix of a grounded kind's name
SUFFIX = "_grounded"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class GroundedRetrievalExample(Example):
    """What the generator writes for a retrieval example grounded on a passage."""

    user_query: str = Field(description="A search request that the given passage answers.")
    hard_negative_document: str = Field(
        description="A document that looks relevant but answers the request worse than the passage."
    )


class GroundedMatchingExample(Example):
    """What the generator writes for a matching pair grounded on a passage."""

    input: str = Field(description="The text the task starts from; the corpus text is its match.")


def passage_text(passage: Mapping[str, Any]) -> str:
    """A passage as a prompt shows it: its title on a line of its own (when it has one), then the text."""
    title = passage.get("title")
    text = str(passage["text"]).strip()
    return f"Title: {title}\n{text}" if title else text


def first_sentence(text: str, max_words: int = 40) -> str:
    """The first sentence of ``text``, cut at ``max_words`` words."""
    sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    words = sentence.split()
    return " ".join(words[:max_words])


class GroundedKind(TaskKind):
    """A variant of a registered kind whose positive is a corpus passage (see the module docstring).

    Class attributes:
        base_name: the kind it is a variant of; its field roles and training rows are the base's.
    """

    base_name: ClassVar[str]
    brainstormed = False  # the base kind is brainstormed (on corpus excerpts), not the variant

    @property
    def base(self) -> TaskKind:
        return get_kind(self.base_name)

    @property
    def family(self) -> str:
        return self.base_name

    @property
    def generate_template(self) -> str:
        return f"{self.base_name}{SUFFIX}_generate"

    @property
    def guidelines_template(self) -> str:
        return f"{self.base_name}{SUFFIX}_guidelines"

    @property
    def grounded_brainstorm_template(self) -> str:
        """The brainstorm prompt of the base kind conditioned on corpus excerpts."""
        return f"{self.base_name}{SUFFIX}_brainstorm"

    def template_names(self) -> tuple[str, ...]:
        return (self.grounded_brainstorm_template, self.generate_template, self.guidelines_template)

    def brainstorm_prompt_on(self, excerpts: list[Mapping[str, Any]], n: int = 5, words: int = 60) -> str:
        """The prompt asking the teacher for ``n`` tasks of the base kind that fit the documents
        ``excerpts`` come from (each cut to ``words`` words)."""
        if n < 1:
            raise ValueError(f"brainstorm n must be at least 1, got {n}")
        shown = []
        for i, passage in enumerate(excerpts, 1):
            cut = passage_text(passage).split()
            shown.append(f"[{i}] " + " ".join(cut[:words]) + (" ..." if len(cut) > words else ""))
        return render_template(self.grounded_brainstorm_template, excerpts="\n\n".join(shown), n=n)

    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        attributes = self.base.sample_attributes(rng, language)
        if "guideline_order" in attributes:  # a permutation of this kind's own guidelines
            attributes["guideline_order"] = self.guideline_order(rng)
        return attributes

    def ground(self, attributes: Mapping[str, Any], passage: Mapping[str, Any]) -> dict[str, Any]:
        """``attributes`` with the passage the example is built on (``{"id", "text", "title"}``)."""
        return {**attributes, "passage": {k: passage.get(k) for k in ("id", "text", "title")}}

    def target(self, attributes: Mapping[str, Any]) -> str:
        """The corpus text that is the example's positive (default: the passage's text)."""
        return str(attributes["passage"]["text"]).strip()

    def generation_prompt(self, task: str, attributes: Mapping[str, Any]) -> str:
        if not isinstance(attributes.get("passage"), Mapping):
            raise ValueError(
                f"a {self.name} prompt needs attributes['passage'] (a corpus passage); draw one with "
                "GroundedKind.ground"
            )
        values = {
            "task": task,
            **attributes,
            "passage": passage_text(attributes["passage"]),
            "target": self.target(attributes),
        }
        guidelines = render_guidelines(self.guidelines_template, values, attributes.get("guideline_order"))
        return render_template(self.generate_template, **values, guidelines=guidelines)

    def instructions(self, attributes: Mapping[str, Any]) -> str:
        """The prompt's own words without the task and without the passage (and its title), which
        the example is meant to share."""
        return self.generation_prompt("", {**attributes, "passage": {"id": "", "text": "", "title": None}})

    def complete(self, example: Example | Mapping[str, Any], attributes: Mapping[str, Any]) -> dict[str, Any]:
        """The base kind's whole example: the generated fields, and the corpus text as the positive."""
        data = example.model_dump() if isinstance(example, BaseModel) else dict(example)
        positive = self.target(attributes)
        return {f: positive if f == self.positive_field else data.get(f) for f in self.base.fields()}


@register_variant
class RetrievalGrounded(GroundedKind):
    """A query (and a hard negative) written for a corpus passage, which is the positive."""

    name = "retrieval_grounded"
    base_name = "retrieval"
    schema = GroundedRetrievalExample
    query_field = "user_query"
    positive_field = "positive_document"
    negative_field = "hard_negative_document"
    shuffle_guidelines = True

    def ground(self, attributes: Mapping[str, Any], passage: Mapping[str, Any]) -> dict[str, Any]:
        grounded = super().ground(attributes, passage)
        words = len(str(passage["text"]).split())
        grounded["num_words"] = min(500, max(50, round(words, -1)))
        return grounded

    def requested_words(self, attributes: Mapping[str, Any]) -> dict[str, int]:
        return {"hard_negative_document": int(attributes["num_words"])}

    def fit_lengths(self, attributes: Mapping[str, Any], max_words: int | None) -> dict[str, Any]:
        out = dict(attributes)
        if max_words is not None and "num_words" in out:
            # one generated document (the passage is the positive) and the query must fit
            out["num_words"] = min(int(out["num_words"]), max(50, (max_words - 20) // 10 * 10))
        return out


@register_variant
class MatchingShortGrounded(GroundedKind):
    """A short input written to match a short corpus text (the title, or the first sentence)."""

    name = "matching_short_grounded"
    base_name = "matching_short"
    schema = GroundedMatchingExample
    query_field = "input"
    positive_field = "positive_document"

    def target(self, attributes: Mapping[str, Any]) -> str:
        passage = attributes["passage"]
        title = passage.get("title")
        return str(title).strip() if title else first_sentence(str(passage["text"]))


@register_variant
class MatchingLongGrounded(GroundedKind):
    """A long input written to match a corpus passage."""

    name = "matching_long_grounded"
    base_name = "matching_long"
    schema = GroundedMatchingExample
    query_field = "input"
    positive_field = "positive_document"


def grounded_kind(base: str) -> GroundedKind:
    """The grounded variant of kind ``base``.

    Raises:
        UnknownKindError: ``base`` has no grounded variant.
    """
    kind = get_kind(base + SUFFIX)
    assert isinstance(kind, GroundedKind)
    return kind
