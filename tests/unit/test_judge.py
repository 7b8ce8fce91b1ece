"""The judge's pure parts: shown order and mapping back, repeats, its prompt, verdict reading."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speed.stages.alignment import REASON_MAX_CHARS
from speed.stages.judge import (
    OUT_OF_RANGE,
    SAME_INDEX,
    Judgement,
    distinct_indices,
    judge_prompt,
    parse_judgement,
    read_verdict,
    shuffled_order,
    to_original,
    verdict_schema,
)


@given(
    texts=st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=8, unique=True),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    data=st.data(),
)
def test_shown_numbers_map_back_to_the_candidates_shown(texts: list[str], seed: int, data) -> None:
    idx = list(range(len(texts)))
    order = shuffled_order(idx, random.Random(seed))
    shown = [texts[i] for i in order]
    assert sorted(order) == idx
    number = data.draw(st.integers(min_value=1, max_value=len(order)))
    assert texts[to_original(order, number)] == shown[number - 1]


@given(st.integers(min_value=-3, max_value=12))
def test_numbers_outside_the_shown_range_raise(number: int) -> None:
    order = [2, 0, 1]
    if 1 <= number <= 3:
        assert to_original(order, number) == order[number - 1]
    else:
        try:
            to_original(order, number)
        except IndexError as err:
            assert f"{number}" in str(err)
        else:  # pragma: no cover - the assertion that fails
            raise AssertionError("no IndexError")


def test_no_shuffle_keeps_order() -> None:
    assert shuffled_order([0, 2, 3], None) == [0, 2, 3]


def test_repeats_are_shown_once() -> None:
    texts = ['{"a": 1, "b": 2}', "x  y", '{"b":2,"a":1}', "x y", "z"]
    assert distinct_indices(texts) == [0, 1, 4]


def test_read_verdict_names_each_failure() -> None:
    ok, reason, _ = read_verdict(json.dumps({"reason": "r", "best": 2, "worst": 1}), 3)
    assert ok is not None and (ok.best, ok.worst) == (2, 1) and reason is None
    assert read_verdict('{"reason": "r", "best": 2, "worst": 2}', 3)[1] == SAME_INDEX
    assert read_verdict('{"reason": "r", "best": 4, "worst": 1}', 3)[1] == OUT_OF_RANGE
    assert read_verdict('{"reason": "r", "best": 0, "worst": 1}', 3)[1] == OUT_OF_RANGE
    assert read_verdict("no idea", 3)[1] == "no_json"
    assert read_verdict('```json\n{"reason": "r", "best": "Candidate 3", "worst": "#1"}\n```', 3)[0].best == 3


def test_verdict_schema_allows_only_shown_numbers() -> None:
    schema = verdict_schema(4)
    assert schema["properties"]["best"]["enum"] == [1, 2, 3, 4]
    assert schema["properties"]["worst"]["enum"] == [1, 2, 3, 4]
    assert schema["required"] == ["reason", "best", "worst"] and schema["additionalProperties"] is False
    assert schema["properties"]["reason"]["maxLength"] == REASON_MAX_CHARS
    assert "default" not in schema["properties"]["reason"]  # required in strict mode: no fallback


def test_verdict_schema_is_the_models_own() -> None:
    """The schema follows the pydantic model: a field added to the model shows up in it."""
    schema = verdict_schema(3)
    model = Judgement.model_json_schema()
    assert list(schema["properties"]) == list(model["properties"])
    for name, prop in model["properties"].items():
        assert schema["properties"][name]["description"] == prop["description"]
    # the cap is the schema's only: a long reason still reads
    long = json.dumps({"reason": "x" * (REASON_MAX_CHARS + 50), "best": 1, "worst": 2})
    assert read_verdict(long, 2)[0] is not None


def test_judge_prompt_numbers_candidates_from_one() -> None:
    prompt = judge_prompt("GEN PROMPT", ['{"a": 1}', '{"a": 2}', '{"a": 3}'])
    assert "GEN PROMPT" in prompt and 'Candidate 1:\n{"a": 1}' in prompt and "Candidate 3:" in prompt
    assert "The 3 candidates" in prompt and '"best"' in prompt and '"worst"' in prompt
    with pytest.raises(ValueError, match="at least 2 candidates"):
        judge_prompt("p", ["only one"])


def test_parse_judgement() -> None:
    ok = parse_judgement('Verdict:\n{"reason": "2 follows the prompt", "best": "Candidate 2", "worst": 1}', 3)
    assert ok.ok and (ok.value.best, ok.value.worst) == (2, 1)
    out_of_range = parse_judgement('{"reason": "", "best": 4, "worst": 1}', 3)
    assert out_of_range.reason == "judge_index_out_of_range" and "only 3" in out_of_range.detail
    same = parse_judgement('{"reason": "", "best": 2, "worst": 2}', 3)
    assert same.reason == "schema_mismatch" and "must differ" in same.detail
