"""Topics that brainstorm calls are tied to.

SPEED draws one topic per brainstorm call from a web directory's category tree cut at depth 4, so
that tasks cover the breadth of the web rather than what a model thinks of first. We ship our own
taxonomy (``taxonomy.txt``: a few hundred paths such as ``Science/Biology/Genetics/Gene therapy``
over arts, business, computers, games, health, home, news, recreation, reference, regional,
science, shopping, society and sports). A domain-focused run instead asks the teacher to expand a
user domain ("Swiss tax law") into subtopics, which become paths under the domain.

Design choices:
- Paths are cut at ``max_depth`` and deduplicated in file order, so a cut tree is still a list of
  distinct topics.
- Sampling goes through every topic once before repeating any (a shuffled round per pass), driven
  by a ``random.Random`` so that a run seed fixes the topics.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from speed.data.parsing import ParseResult, parse_json
from speed.tasks.base import render_template

logger = logging.getLogger(__name__)

TAXONOMY_PATH = Path(__file__).parent / "taxonomy.txt"
DOMAIN_TEMPLATE = "domain_expansion"
SEPARATOR = "/"


def load_topics(source: str | Path = "builtin", max_depth: int = 4) -> list[str]:
    """Topic paths from the packaged taxonomy or a text file, cut at ``max_depth``.

    Args:
        source: ``"builtin"`` for the package's taxonomy, or a path to a text file with one
            ``A/B/C`` path a line (``#`` starts a comment line).
        max_depth: keep at most this many levels of each path (SPEED: 4).

    Returns:
        Distinct paths, in file order.

    Raises:
        FileNotFoundError: ``source`` is not a file.
        ValueError: ``max_depth`` is below 1, or the file holds no topic.
    """
    if max_depth < 1:
        raise ValueError(f"topics.max_depth must be at least 1, got {max_depth}")
    path = TAXONOMY_PATH if str(source) == "builtin" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"topics.source '{source}' is not a file; use 'builtin' or a text file with one A/B/C path a line"
        )
    topics: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(SEPARATOR) if p.strip()]
        topics[SEPARATOR.join(parts[:max_depth])] = None
    if not topics:
        raise ValueError(f"topics.source '{source}' holds no topic")
    logger.debug("loaded %d topics from %s (max depth %d)", len(topics), path, max_depth)
    return list(topics)


def sample_topics(topics: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """``n`` topics: every topic once in random order before any repeats.

    Raises:
        ValueError: ``topics`` is empty and ``n`` is positive.
    """
    if n > 0 and not topics:
        raise ValueError("cannot sample topics from an empty list; check topics.source")
    out: list[str] = []
    while len(out) < n:
        round_ = list(topics)
        rng.shuffle(round_)
        out.extend(round_[: n - len(out)])
    return out


# --------------------------------------------------------------------------------------------
# domain-focused runs


def _no_separator(text: str) -> str:
    """ "VAT/MWST" -> "VAT or MWST": a slash would add a level to the topic path."""
    return re.sub(r"\s*/\s*", " or ", text)


class SubtopicList(BaseModel):
    """The teacher's answer to the domain-expansion prompt: ``{"subtopics": [...]}``."""

    model_config = ConfigDict(extra="ignore")

    subtopics: list[str] = Field(
        description="Distinct subtopics of the domain, short noun phrases.",
        json_schema_extra={"minItems": 1},  # in the schema only: parsing keeps its own checks
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_list(cls, data: Any) -> Any:
        return {"subtopics": data} if isinstance(data, list) else data

    @field_validator("subtopics", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        seen: set[str] = set()
        out = []
        for item in value:
            if not isinstance(item, str):
                continue
            # numbering, bullets and slashes (the path separator) would corrupt the topic path
            text = _no_separator(re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", item)).strip()
            if text and text.casefold() not in seen:
                seen.add(text.casefold())
                out.append(text)
        return out

    @field_validator("subtopics")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no subtopic left after dropping empty and repeated entries")
        return value


def domain_prompt(domain: str, n: int) -> str:
    """The prompt asking the teacher to expand ``domain`` into ``n`` subtopics.

    Raises:
        ValueError: the domain is empty or ``n`` is below 1.
    """
    if not domain.strip():
        raise ValueError("topics.domain is empty; give a domain such as 'Swiss tax law' or leave it unset")
    if n < 1:
        raise ValueError(f"topics.num_subtopics must be at least 1, got {n}")
    return render_template(DOMAIN_TEMPLATE, domain=domain.strip(), n=n)


def parse_subtopics(text: str) -> ParseResult[SubtopicList]:
    """Parse the teacher's subtopics; a drop reason instead of an exception on bad output."""
    return parse_json(text, SubtopicList)


def domain_topics(domain: str, subtopics: Sequence[str]) -> list[str]:
    """Topic paths ``domain/subtopic`` for a domain-focused run."""
    root = _no_separator(domain.strip())
    return [f"{root}{SEPARATOR}{s}" for s in subtopics]
