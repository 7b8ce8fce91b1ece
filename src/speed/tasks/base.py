"""Task kinds: what one kind of synthetic example is, how it is asked for and how it is used.

A :class:`TaskKind` gathers everything that differs between retrieval, classification, STS, matching
and bitext examples (DESIGN.md, "Task kind"): the brainstorm prompt that asks the teacher for tasks
tied to a topic, the attribute sampler with SPEED's distributions, the generation prompt, the output
schema and the conversion of an example into training rows. A kind is mostly data; the one abstract
method is :meth:`TaskKind.sample_attributes`.

Design choices:
- Prompts are template files of the package (``templates/*.txt``), written for this project, filled
  with :class:`string.Template` (``$name``) so that the JSON braces in a prompt need no escaping.
  Stage keys include :func:`template_hash` of the templates a stage uses, so editing a prompt
  reruns exactly the stages that depend on it.
- Guidelines are one per line in a ``<kind>_guidelines.txt`` template. A line whose placeholder
  has the value ``None`` is left out: that is how attributes "added half of the time" (education
  level, clarity and difficulty) appear or not. Retrieval shuffles their order per prompt (SPEED).
- Attributes are plain JSON values so that they are stored beside each prompt and replayed.
- The method-level prompts of the alignment stages (judge, revise, revisor) are not here: each
  lives with the pydantic model of its answer in the stage that asks it (``speed.stages.judge``,
  ``speed.stages.revisions``, ``speed.stages.alignment``); their template files stay here, with
  every other prompt of the package.
- Parsing never raises on bad model output: it returns a :class:`~speed.data.parsing.ParseResult`
  with a drop reason that the stage counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from string import Template
from typing import Any, ClassVar, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from speed.data.parsing import ParseResult, parse_json
from speed.formats import format_query
from speed.suggest import did_you_mean

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"

#: SPEED's clarity values and weights (retrieval; reused for classification, see there).
CLARITY = {"clear": 0.6, "understandable with some effort": 0.2, "ambiguous": 0.2}
#: E5's education levels / difficulties, drawn uniformly.
EDUCATION_LEVELS = ("high school", "college", "PhD")
#: STS and bitext text units (SPEED weights).
UNITS = {"sentence": 0.9, "phrase": 0.05, "passage": 0.05}


class TemplateError(ValueError):
    """A template is missing or a placeholder has no value; the message names both."""


class UnknownKindError(KeyError):
    """A task kind name that is not registered; the message suggests the nearest names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


# --------------------------------------------------------------------------------------------
# templates


def template_path(name: str) -> Path:
    """Path of the template ``name`` (without ``.txt``) shipped in the package.

    Raises:
        TemplateError: no such template; the message lists the near names.
    """
    path = TEMPLATE_DIR / f"{name}.txt"
    if not path.is_file():
        known = list_templates()
        hint = did_you_mean(name, known, n=3, cutoff=0.5)
        raise TemplateError(f"no prompt template '{name}' in {TEMPLATE_DIR}.{hint}")
    return path


def list_templates() -> list[str]:
    """Names of all templates shipped in the package."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


@cache
def load_template(name: str) -> str:
    """The raw text of template ``name`` (cached; templates are package data)."""
    return template_path(name).read_text(encoding="utf-8")


def _substitute(name: str, text: str, values: Mapping[str, Any]) -> str:
    try:
        return Template(text).substitute(values)
    except KeyError as err:
        key = err.args[0]
        raise TemplateError(
            f"template '{name}' needs a value for ${key}; pass {key}=... when rendering it"
        ) from None
    except ValueError as err:
        raise TemplateError(
            f"template '{name}' has a malformed placeholder ({err}); write $name or ${{name}}"
        ) from None


def render_template(name: str, **values: Any) -> str:
    """Fill template ``name`` with ``values`` (extra values are ignored).

    Raises:
        TemplateError: the template is unknown or a placeholder it uses has no value.
    """
    return _substitute(name, load_template(name), values).strip() + "\n"


def guideline_lines(name: str) -> list[str]:
    """The non-empty lines of a guidelines template, one guideline each."""
    return [line.strip() for line in load_template(name).splitlines() if line.strip()]


def render_guidelines(name: str, values: Mapping[str, Any], order: Sequence[int] | None = None) -> str:
    """Render a guidelines template as a bullet list.

    Args:
        name: the guidelines template.
        values: placeholder values; a line using a placeholder whose value is ``None`` is left out.
        order: a permutation of the template's line indices; ``None`` keeps the file's order.

    Raises:
        TemplateError: a placeholder has no value at all, or ``order`` is not a permutation.
    """
    lines = guideline_lines(name)
    if order is None:
        order = range(len(lines))
    elif sorted(order) != list(range(len(lines))):
        raise TemplateError(
            f"guideline order {list(order)} is not a permutation of the {len(lines)} lines of '{name}'; "
            "sample the attributes again with this package's templates"
        )
    out = []
    for i in order:
        line = lines[i]
        ids = Template(line).get_identifiers()
        if any(k in values and values[k] is None for k in ids):
            continue
        out.append("- " + _substitute(name, line, values))
    return "\n".join(out)


def template_hash(names: str | Iterable[str]) -> str:
    """SHA-256 over the names and texts of templates (one name or several, in any order): part of
    the key of a stage that uses them.

    Raises:
        TemplateError: a name is not a template of the package.
    """
    if isinstance(names, str):
        names = [names]
    h = hashlib.sha256()
    for name in sorted(set(names)):
        h.update(name.encode("utf-8") + b"\0" + load_template(name).encode("utf-8") + b"\0")
    return h.hexdigest()


def weighted_choice(rng: random.Random, weights: Mapping[Any, float]) -> Any:
    """One key of ``weights`` drawn with probability proportional to its value."""
    return rng.choices(list(weights), weights=list(weights.values()), k=1)[0]


#: tokens an answer spends on its JSON (keys, quotes, braces), and tokens per English word in the
#: byte-level BPE tokenizers of the generators in use (SmolLM2, Qwen2.5, Llama 3: 1.3-1.4)
JSON_OVERHEAD_TOKENS = 48
TOKENS_PER_WORD = 1.5


def answer_words(max_tokens: int | None) -> int | None:
    """Words of text an answer of at most ``max_tokens`` tokens can hold (None: no limit)."""
    if max_tokens is None:
        return None
    return max(0, int((max_tokens - JSON_OVERHEAD_TOKENS) / TOKENS_PER_WORD))


def largest_within(options: Sequence[int], limit: int) -> int:
    """The largest of ``options`` not above ``limit``; the smallest when none is."""
    fitting = [o for o in options if o <= limit]
    return max(fitting) if fitting else min(options)


# --------------------------------------------------------------------------------------------
# schemas


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """JSON schema of ``model`` for constrained decoding, derived from the pydantic model itself.

    In every object all properties are required and no others are allowed (what grammar-based
    decoders and OpenAI's strict mode expect); nested models are inlined rather than referenced
    through ``$defs`` (not every decoder follows ``$ref``), and defaults are left out (a required
    field has none to fall back on).
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def tighten(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                extra = {k: v for k, v in node.items() if k != "$ref"}
                return tighten({**defs[ref.removeprefix("#/$defs/")], **extra})
            out = {k: tighten(v) for k, v in node.items() if k != "default"}
            if out.get("type") == "object" and "properties" in out:
                out["required"] = list(out["properties"])
                out["additionalProperties"] = False
            return out
        if isinstance(node, list):
            return [tighten(v) for v in node]
        return node

    return cast(dict[str, Any], tighten(schema))


class Example(BaseModel):
    """Base of every kind's output schema.

    Extra keys a model adds are ignored, whitespace is stripped and numbers become strings (small
    models write ``"label": 3``). Emptiness is not checked here but by the ``empty_field`` filter, so
    that such drops are counted under their own name.
    """

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, coerce_numbers_to_str=True)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON schema for constrained decoding: every field required, no other keys."""
        return strict_schema(cls)


class TaskList(BaseModel):
    """The teacher's answer to a brainstorm prompt: ``{"tasks": [...]}`` (a bare list is accepted)."""

    model_config = ConfigDict(extra="ignore")

    tasks: list[str] = Field(
        description="One sentence per task: what the query is, what the documents are.",
        # in the schema only: emptiness is refused by _not_empty with its own message
        json_schema_extra={"minItems": 1},
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_list(cls, data: Any) -> Any:
        return {"tasks": data} if isinstance(data, list) else data

    @field_validator("tasks", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        seen: set[str] = set()
        tasks = []
        for item in value:
            if isinstance(item, dict):  # {"task": "..."} or {"description": "..."}
                texts = [v for v in item.values() if isinstance(v, str)]
                item = texts[0] if len(texts) == 1 else None
            if not isinstance(item, str):
                continue
            text = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", item).strip().strip('"').strip()
            if text and text.casefold() not in seen:
                seen.add(text.casefold())
                tasks.append(text)
        return tasks

    @field_validator("tasks")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no task left after dropping empty and repeated entries")
        return value


# --------------------------------------------------------------------------------------------
# the task kind


Row = dict[str, str | None]


class TaskKind(ABC):
    """One kind of synthetic example. Subclasses are mostly data; they implement the sampler.

    Class attributes:
        name: the kind's name in configs (``retrieval``, ``sts``, ...).
        schema: the pydantic model of one example.
        brainstormed: whether tasks come from the teacher (else ``fixed_tasks`` are used).
        fixed_tasks: the task descriptions of a kind that is not brainstormed (E5's instructions).
        query_field / positive_field / negative_field: the roles of the schema's fields in a
            training row (``negative_field`` may be None).
        label_fields: short label fields, exempt from length checks.
        shuffle_guidelines: whether the guideline order is drawn per prompt.
    """

    name: ClassVar[str]
    schema: ClassVar[type[Example]]
    brainstormed: ClassVar[bool] = True
    fixed_tasks: ClassVar[tuple[str, ...]] = ()
    query_field: ClassVar[str]
    positive_field: ClassVar[str]
    negative_field: ClassVar[str | None] = None
    label_fields: ClassVar[tuple[str, ...]] = ()
    shuffle_guidelines: ClassVar[bool] = False

    @abstractmethod
    def sample_attributes(self, rng: random.Random, language: str = "English") -> dict[str, Any]:
        """Draw the attributes of one generation prompt (SPEED's distributions).

        Args:
            rng: the only source of randomness, so that a seed fixes every prompt.
            language: the language the example is written in (SPEED: English).

        Returns:
            JSON-serializable values; ``None`` marks an optional attribute left out this time.
        """

    @property
    def family(self) -> str:
        """The registered kind whose field roles and settings this one shares: its own name, or for
        a variant (``retrieval_grounded``) the kind it varies (``retrieval``). Settings that list
        kinds (``labels.kinds``) match on it."""
        return self.name

    # -- templates ---------------------------------------------------------------------------

    @property
    def brainstorm_template(self) -> str | None:
        """Name of the brainstorm template, or None for kinds that are not brainstormed."""
        return f"{self.name}_brainstorm" if self.brainstormed else None

    @property
    def generate_template(self) -> str:
        return f"{self.name}_generate"

    @property
    def guidelines_template(self) -> str:
        return f"{self.name}_guidelines"

    def template_names(self) -> tuple[str, ...]:
        """Every template this kind renders."""
        names = [self.generate_template, self.guidelines_template]
        if self.brainstorm_template:
            names.insert(0, self.brainstorm_template)
        return tuple(names)

    def template_paths(self) -> tuple[Path, ...]:
        return tuple(template_path(n) for n in self.template_names())

    def template_hash(self) -> str:
        """Hash of this kind's templates (for stage keys)."""
        return template_hash(self.template_names())

    # -- brainstorming -------------------------------------------------------------------------

    def brainstorm_prompt(self, topic: str, n: int = 5) -> str:
        """The prompt asking the teacher for ``n`` tasks of this kind tied to ``topic``.

        Raises:
            ValueError: the kind is not brainstormed; use ``fixed_tasks``.
        """
        if not self.brainstorm_template:
            raise ValueError(
                f"task kind '{self.name}' is not brainstormed; its tasks are {list(self.fixed_tasks)}"
            )
        if n < 1:
            raise ValueError(f"brainstorm n must be at least 1, got {n}")
        return render_template(self.brainstorm_template, topic=topic, n=n)

    def parse_tasks(self, text: str) -> ParseResult[TaskList]:
        """Parse the teacher's task list; a drop reason instead of an exception on bad output."""
        return parse_json(text, TaskList)

    # -- generation ----------------------------------------------------------------------------

    def num_guidelines(self) -> int:
        return len(guideline_lines(self.guidelines_template))

    def guideline_order(self, rng: random.Random) -> list[int] | None:
        """A random permutation of the guidelines if this kind shuffles them, else None."""
        if not self.shuffle_guidelines:
            return None
        order = list(range(self.num_guidelines()))
        rng.shuffle(order)
        return order

    def generation_prompt(self, task: str, attributes: Mapping[str, Any]) -> str:
        """The prompt asking a generator for one example of ``task`` with ``attributes``.

        Raises:
            TemplateError: an attribute the templates need is missing.
        """
        values = {"task": task, **attributes}
        guidelines = render_guidelines(self.guidelines_template, values, attributes.get("guideline_order"))
        return render_template(self.generate_template, **values, guidelines=guidelines)

    def instructions(self, attributes: Mapping[str, Any]) -> str:
        """The prompt's own words (the ``prompt_echo`` filter): :meth:`generation_prompt` without
        the task, which the teacher wrote and an example may well share."""
        return self.generation_prompt("", attributes)

    def json_schema(self) -> dict[str, Any]:
        """The output schema as JSON schema, for constrained decoding."""
        return self.schema.json_schema()

    def fields(self) -> tuple[str, ...]:
        return tuple(self.schema.model_fields)

    def parse(self, text: str) -> ParseResult[Example]:
        """Parse a generator's output into this kind's schema (never raises on bad output)."""
        return parse_json(text, self.schema)

    # -- filtering hooks -----------------------------------------------------------------------

    def requested_words(self, attributes: Mapping[str, Any]) -> dict[str, int]:
        """Minimum word counts the prompt asked for, per field (for the ``too_short`` filter)."""
        return {}

    def fit_lengths(self, attributes: Mapping[str, Any], max_words: int | None) -> dict[str, Any]:
        """``attributes`` with the lengths they ask for cut to what an answer of ``max_words`` words
        can hold (None: as drawn).

        SPEED draws documents of up to 500 words; a generator whose ``max_tokens`` cannot hold them
        writes a cut answer (no JSON) or a short one (a ``too_short`` drop), so asking for them only
        wastes the call, and the junior learns from seeds that never show such a length. Kinds that
        ask for lengths override this; the draw itself is unchanged, so prompts that fit stay the same.
        """
        return dict(attributes)

    def field_languages(self, attributes: Mapping[str, Any]) -> dict[str, str]:
        """The language each text field must be written in (for the ``wrong_language`` filter)."""
        language = attributes.get("language") or "English"
        return {f: language for f in self.fields() if f not in self.label_fields}

    # -- grounding -----------------------------------------------------------------------------

    def complete(self, example: Example | Mapping[str, Any], attributes: Mapping[str, Any]) -> dict[str, Any]:
        """The whole example: what the generator wrote plus what the prompt gave it. A kind whose
        generator writes every field (every kind but the grounded ones, :mod:`speed.tasks.grounded`,
        whose positive is the corpus passage of ``attributes``) returns the example's fields."""
        return example.model_dump() if isinstance(example, BaseModel) else dict(example)

    def generated(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of a whole example that the generator writes (its schema's), in schema order:
        what a generator is trained to write and what dedup compares."""
        return {f: example[f] for f in self.fields() if f in example}

    # -- training rows -------------------------------------------------------------------------

    def to_rows(self, task: str, example: Example | Mapping[str, Any]) -> list[Row]:
        """Training rows of one example: ``instruction``, ``query`` (with the instruction),
        ``positive`` and ``negative`` (None when the kind has no negative, or the example was kept
        without it: ``synthesize.keep_without_negative``)."""
        data = example.model_dump() if isinstance(example, BaseModel) else dict(example)
        negative = data.get(self.negative_field) if self.negative_field else None
        if negative is not None and not str(negative).strip():
            negative = None
        return [
            {
                "instruction": task,
                "query": format_query(task, str(data[self.query_field])),
                "positive": str(data[self.positive_field]),
                "negative": None if negative is None else str(negative),
            }
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------
# registry

_KINDS: dict[str, TaskKind] = {}

K = TypeVar("K", bound=type[TaskKind])


def register_kind(cls: K) -> K:
    """Class decorator: make a kind available to :func:`get_kind` under ``cls.name``."""
    _KINDS[cls.name] = cls()
    return cls


#: variants of the registered kinds that stages build prompts with but configs never name (the
#: grounded kinds); :func:`get_kind` finds them, :func:`kind_names` does not list them
_VARIANTS: dict[str, TaskKind] = {}


def register_variant(cls: K) -> K:
    """Class decorator: make a kind variant available to :func:`get_kind` (not to configs)."""
    _VARIANTS[cls.name] = cls()
    return cls


def kind_names() -> list[str]:
    """Names of the registered kinds."""
    return list(_KINDS)


def get_kind(name: str) -> TaskKind:
    """The registered task kind called ``name``.

    Raises:
        UnknownKindError: no such kind; the message suggests the nearest names.
    """
    try:
        return _KINDS[name] if name in _KINDS else _VARIANTS[name]
    except KeyError:
        hint = did_you_mean(name, _KINDS, n=2, cutoff=0.5)
        raise UnknownKindError(
            f"unknown task kind '{name}'; known kinds: {', '.join(_KINDS)}.{hint}"
        ) from None


# --------------------------------------------------------------------------------------------
# examples as text


def example_json(example: BaseModel | Mapping[str, Any]) -> str:
    """An example as the compact JSON text models are trained to write (keys in schema order)."""
    data = example.model_dump() if isinstance(example, BaseModel) else dict(example)
    return json.dumps(data, ensure_ascii=False)
