"""Find, repair and validate the JSON object inside an LLM's answer.

Small models wrap their JSON in prose or code fences, leave it unterminated, use single quotes or
trailing commas, rename keys (``"User Query"``) or nest the example one level down. This module
turns such text into a validated pydantic object, or into a named drop reason that the caller counts.

Design choices:
- Order of attempts, cheapest first: the whole text as JSON; each code fence; each balanced
  ``{...}`` or ``[...]`` span found by a string-aware bracket scan; finally ``json_repair`` on the
  most promising span. A repaired parse is flagged so that repair rates can be reported.
- Raw control characters inside strings (a newline in a query) are accepted as written: a schema
  grammar may allow them, and they are the model's text, not a fault to repair.
- A real JSON parser and pydantic validation only: never ``eval``, and only the specific
  exceptions those libraries raise are caught.
- Keys are matched to the schema's fields ignoring case, spaces, ``-`` and ``_``; a single wrapper
  object (``{"example": {...}}``) or list (``[{...}]``) around the example is unwrapped.
- The raw text is not stored here: the caller keeps it beside the parsed fields (STYLE.md, 8).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import json_repair
from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

#: drop reasons (the names counted by :class:`speed.data.filters.DropCounter`)
EMPTY_OUTPUT = "empty_output"
NO_JSON = "no_json"
SCHEMA_MISMATCH = "schema_mismatch"

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
#: bracket spans tried per text; bounds the work on adversarial output with many stray braces
_MAX_STARTS = 32
_MAX_NESTING = 200


@dataclass(frozen=True)
class ParseResult(Generic[T]):
    """The outcome of parsing one output.

    Attributes:
        value: the validated object, or None when the output was dropped.
        reason: the drop reason (``empty_output``, ``no_json``, ``schema_mismatch`` or a caller's
            own), None when parsed.
        detail: a short human explanation of the drop (the first failing field, ...).
        repaired: whether json-repair had to fix the JSON.
    """

    value: T | None
    reason: str | None = None
    detail: str = ""
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return self.value is not None


def _loads(text: str) -> tuple[bool, Any]:
    # strict=False: a raw newline or tab inside a string is text the model wrote, not broken JSON;
    # llama-cpp-python's schema grammar admits them (llama.cpp's own converter escapes them)
    try:
        return True, json.loads(text, strict=False)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return False, None


def _balanced_spans(text: str) -> list[str]:
    """Balanced ``{...}``/``[...]`` spans, outermost first, each starting at a different opener.

    A string-aware scan (quotes and escapes) so that braces inside JSON strings do not count.
    """
    spans: list[str] = []
    starts = [m.start() for m in re.finditer(r"[{\[]", text)][:_MAX_STARTS]
    covered_until = -1
    for start in starts:
        if start < covered_until:
            continue  # inside a span already found
        stack: list[str] = []
        in_string = False
        escaped = False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
                continue
            if ch == '"':
                in_string = True
            elif ch in "{[":
                stack.append("}" if ch == "{" else "]")
                if len(stack) > _MAX_NESTING:
                    break
            elif ch in "}]":
                if not stack or stack.pop() != ch:
                    break
                if not stack:
                    spans.append(text[start : i + 1])
                    covered_until = i + 1
                    break
    return spans


def _repair(text: str) -> Any:
    try:
        return json_repair.loads(text)
    except (ValueError, TypeError, RecursionError, IndexError) as err:
        logger.debug("json-repair gave up: %s", err)
        return None


def extract_json(text: str) -> tuple[Any, bool] | None:
    """The first JSON object or array in ``text``.

    Args:
        text: a model's raw answer.

    Returns:
        ``(value, repaired)`` or None when no JSON value could be found or repaired. ``value`` is a
        dict or a list.
    """
    stripped = text.strip()
    if not stripped:
        return None
    ok, value = _loads(stripped)
    if ok and isinstance(value, dict | list):
        return value, False
    pieces = [m.group(2) for m in _FENCE.finditer(stripped)]
    for piece in pieces:
        ok, value = _loads(piece.strip())
        if ok and isinstance(value, dict | list):
            return value, False
    # prefer an object: prose such as "see [1]" may hold a small array before the example
    arrays = []
    for span in _balanced_spans(stripped):
        ok, value = _loads(span)
        if ok and isinstance(value, dict) and value:
            return value, False
        if ok and isinstance(value, list) and value:
            arrays.append(value)
    if arrays:
        return arrays[0], False
    # repair: the fenced piece, else from the first opener to the end (often unterminated)
    first = re.search(r"[{\[]", stripped)
    candidates = [p for p in pieces if p.strip()]
    if first is not None:
        candidates.append(stripped[first.start() :])
    for candidate in candidates:
        value = _repair(candidate)
        if isinstance(value, dict | list) and value:
            return value, True
    return None


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", key).casefold()


def _field_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _match_keys(value: Any, schema: type[BaseModel]) -> Any:
    """Rename keys to the schema's field names, ignoring case and separators; recurse into sub-models."""
    if not isinstance(value, dict):
        return value
    by_norm = {_norm_key(name): name for name in schema.model_fields}
    out: dict[str, Any] = {}
    for key, item in value.items():
        key = str(key)
        name = key if key in schema.model_fields else by_norm.get(_norm_key(key), key)
        if name not in out or name == key:  # an exact key wins over a respelled one
            out[name] = item
    for field_name, field in schema.model_fields.items():
        sub = _field_model(field.annotation)
        if sub is not None and field_name in out:
            out[field_name] = _match_keys(out[field_name], sub)
    return out


def _candidates(value: Any, schema: type[BaseModel]) -> list[Any]:
    """The value itself, then plausible unwrappings of it."""
    found = [value]
    if isinstance(value, dict) and len(value) == 1:
        inner = next(iter(value.values()))
        if isinstance(inner, dict | list):
            found.append(inner)
    for item in list(found):
        if isinstance(item, list):
            found.extend(x for x in item[:1] if isinstance(x, dict))
    return [_match_keys(v, schema) for v in found]


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"field '{where}': {first['msg']}{more}"


def parse_json(text: str | None, schema: type[T]) -> ParseResult[T]:
    """Parse a model's answer into ``schema``.

    Args:
        text: the raw answer (None or empty counts as ``empty_output``).
        schema: the pydantic model the JSON must satisfy.

    Returns:
        A :class:`ParseResult`; never raises on malformed output.
    """
    if text is None or not text.strip():
        return ParseResult(None, EMPTY_OUTPUT, "the model returned no text")
    found = extract_json(text)
    if found is None:
        return ParseResult(None, NO_JSON, "no JSON object found or repairable in the output")
    value, repaired = found
    first_error: ValidationError | None = None
    for candidate in _candidates(value, schema):
        try:
            return ParseResult(schema.model_validate(candidate), repaired=repaired)
        except ValidationError as err:
            first_error = first_error or err
        except RecursionError:
            break
    detail = _describe(first_error) if first_error is not None else "nesting too deep"
    return ParseResult(None, SCHEMA_MISMATCH, detail, repaired)
