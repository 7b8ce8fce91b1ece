"""JSON extraction, repair and validation of model output: round trips, repairs, and fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speed.data.parsing import EMPTY_OUTPUT, NO_JSON, SCHEMA_MISMATCH, extract_json, parse_json
from speed.tasks import get_kind, kind_names

KINDS = [get_kind(n) for n in kind_names()]
REASONS = {EMPTY_OUTPUT, NO_JSON, SCHEMA_MISMATCH}
RETRIEVAL = get_kind("retrieval").schema

# --------------------------------------------------------------------------------------------
# round trip of valid examples in the wrappers models put around them

WRAPPERS = [
    "{}",
    "```json\n{}\n```",
    "```\n{}\n```",
    "Here is the example you asked for:\n\n{}\n\nLet me know if you need another one.",
    "Sure! ```json\n{}``` Hope this helps.",
    "  \n{}\n",
]


@st.composite
def valid_outputs(draw):
    kind = draw(st.sampled_from(KINDS))
    example = {f: draw(st.text(max_size=80)) for f in kind.fields()}
    if draw(st.booleans()):
        example["note"] = draw(st.text(max_size=10))  # extra keys are ignored
    body = json.dumps(example, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    return kind, example, draw(st.sampled_from(WRAPPERS)).replace("{}", body)


@settings(max_examples=1000, deadline=None, database=None)
@given(valid_outputs())
def test_valid_examples_round_trip(case):
    kind, example, text = case
    result = kind.parse(text)
    assert result.ok, (result.reason, result.detail, text)
    assert result.value == kind.schema.model_validate(example)
    assert not result.repaired


# --------------------------------------------------------------------------------------------
# fuzzing: broken output never raises


@st.composite
def broken_outputs(draw):
    kind = draw(st.sampled_from(KINDS))
    example = {f: draw(st.text(max_size=30)) for f in kind.fields()}
    text = draw(st.sampled_from(WRAPPERS)).replace("{}", json.dumps(example))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cut", "delete", "insert", "swap_quotes"]))
        i = draw(st.integers(0, max(len(text) - 1, 0)))
        if op == "cut":
            text = text[:i]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 5)) :]
        elif op == "insert":
            text = text[:i] + draw(st.text(alphabet="{}[]\":,\\'` \nabc0", max_size=6)) + text[i:]
        else:
            text = text.replace('"', "'")
    return kind, text


NOISE = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="{}[]\":,\\'`\n tfnule0123456789.-", max_size=200),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=10_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(broken_outputs(), st.tuples(st.sampled_from(KINDS), NOISE)))
def test_broken_output_never_raises(case):
    kind, text = case
    result = kind.parse(text)
    if result.ok:
        assert isinstance(result.value, kind.schema)
        assert result.reason is None
    else:
        assert result.reason in REASONS and result.detail


def test_deep_nesting_and_many_braces_do_not_raise():
    for text in ["[" * 5000, "{" * 5000 + "}" * 10, '{"a": ' * 3000, "} {" * 3000, "```" * 500]:
        assert not parse_json(text, RETRIEVAL).ok


# --------------------------------------------------------------------------------------------
# the common kinds of breakage


GOOD = {"user_query": "q", "positive_document": "p", "hard_negative_document": "n"}


@pytest.mark.parametrize(
    "text",
    [
        "{'user_query': 'q', 'positive_document': 'p', 'hard_negative_document': 'n'}",  # single quotes
        '{"user_query": "q", "positive_document": "p", "hard_negative_document": "n",}',  # trailing comma
        '```json\n{"user_query": "q", "positive_document": "p", "hard_negative_document": "n"',  # cut off
        '{"user_query": "q",\n"positive_document": "p"\n"hard_negative_document": "n"}',  # missing comma
    ],
)
def test_repairs_common_breakage(text):
    result = parse_json(text, RETRIEVAL)
    assert result.ok, result.detail
    assert result.value.model_dump() == GOOD
    assert result.repaired


@pytest.mark.parametrize(
    "text",
    [
        '{"User Query": "q", "Positive-Document": "p", "HARD_NEGATIVE_DOCUMENT": "n"}',  # key spelling
        '{"example": {"user_query": "q", "positive_document": "p", "hard_negative_document": "n"}}',
        '[{"user_query": "q", "positive_document": "p", "hard_negative_document": "n"}]',
        'See [1] and {"user_query": "q", "positive_document": "p", "hard_negative_document": "n"} {x}',
    ],
)
def test_normalizes_keys_and_unwraps(text):
    result = parse_json(text, RETRIEVAL)
    assert result.ok, result.detail
    assert result.value.model_dump() == GOOD


def test_braces_inside_strings_do_not_confuse_the_scan():
    text = 'Output: {"user_query": "what is {x}?", "positive_document": "a } b", "hard_negative_document": "n"} done'
    result = parse_json(text, RETRIEVAL)
    assert result.ok and result.value.user_query == "what is {x}?" and not result.repaired


def test_raw_control_characters_in_strings_are_text_not_breakage():
    # llama-cpp-python's schema grammar lets a model write a raw newline inside a string (CI saw
    # '{"query":"...UTF8}\n\nIn this..."}'): the strict decoder refuses it, the parser keeps it as written
    text = (
        '{"user_query": "line one\nline two\tend", "positive_document": "p", "hard_negative_document": "n"}'
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    result = parse_json(text, RETRIEVAL)
    assert result.ok and not result.repaired
    assert result.value.user_query == "line one\nline two\tend"


def test_numbers_become_strings_and_whitespace_is_stripped():
    result = parse_json(
        '{"input_text": "  hi  ", "label": 3, "misleading_label": 4.5}', get_kind("classification").schema
    )
    assert result.ok and result.value.model_dump() == {
        "input_text": "hi",
        "label": "3",
        "misleading_label": "4.5",
    }


def test_drop_reasons_name_what_went_wrong():
    assert parse_json("", RETRIEVAL).reason == EMPTY_OUTPUT
    assert parse_json(None, RETRIEVAL).reason == EMPTY_OUTPUT
    assert parse_json("I am sorry, I cannot do that.", RETRIEVAL).reason == NO_JSON
    missing = parse_json('{"user_query": "q", "positive_document": "p"}', RETRIEVAL)
    assert missing.reason == SCHEMA_MISMATCH and "hard_negative_document" in missing.detail
    wrong_type = parse_json(
        '{"user_query": ["a"], "positive_document": "p", "hard_negative_document": "n"}', RETRIEVAL
    )
    assert wrong_type.reason == SCHEMA_MISMATCH and "user_query" in wrong_type.detail


def test_extract_json_prefers_an_object_over_a_stray_array():
    value, repaired = extract_json('refs [1, 2] then {"a": 1}')
    assert value == {"a": 1} and not repaired
    assert extract_json("no json here") is None
