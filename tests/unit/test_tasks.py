"""Task kinds: prompts render, samplers follow SPEED's weights, rows have the E5 shape."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from scipy.stats import chisquare

from speed.tasks import (
    TemplateError,
    UnknownKindError,
    classification,
    format_query,
    get_kind,
    kind_names,
    list_templates,
    render_template,
    retrieval,
    sts,
    template_hash,
    template_path,
)
from speed.tasks.base import CLARITY, EDUCATION_LEVELS, UNITS, answer_words

ALL_KINDS = ["retrieval", "classification", "sts", "matching_short", "matching_long", "bitext"]
DRAWS = 20_000
TASK = "Given a question about heat pumps, find a guide that answers it."

EXAMPLES = {
    "retrieval": {
        "user_query": "heat pump noise at night",
        "positive_document": "A humming outdoor unit is normal; rattling points to loose panels.",
        "hard_negative_document": "Heat pumps move heat from outside air into a building.",
    },
    "classification": {
        "input_text": "My card never arrived.",
        "label": "card_arrival",
        "misleading_label": "card_lost",
    },
    "sts": {"S1": "A dog runs.", "S2": "A dog is running.", "S3": "A cat sleeps."},
    "matching_short": {"input": "Pride and Prejudice", "positive_document": "Jane Austen"},
    "matching_long": {"input": "A long review ...", "positive_document": "Another long review ..."},
    "bitext": {"S1": "The house is red.", "S2": "Das Haus ist rot."},
}


def _draw(kind_name: str, n: int = DRAWS, seed: int = 0) -> list[dict]:
    kind = get_kind(kind_name)
    rng = random.Random(seed)
    return [kind.sample_attributes(rng) for _ in range(n)]


def _assert_matches(observed: Counter, weights: dict) -> None:
    """Chi-square goodness of fit of observed counts against expected weights (p > 0.001)."""
    assert set(observed) <= set(weights), f"unexpected values {set(observed) - set(weights)}"
    keys = list(weights)
    total = sum(observed.values())
    norm = sum(weights.values())
    f_obs = [observed.get(k, 0) for k in keys]
    f_exp = [total * weights[k] / norm for k in keys]
    p = chisquare(f_obs, f_exp).pvalue
    assert p > 0.001, f"observed {dict(observed)} does not fit weights {weights} (p={p:.2g})"


# --------------------------------------------------------------------------------------------
# registry and templates


def test_registry_lists_the_six_kinds_in_speed_order():
    assert kind_names() == ALL_KINDS
    for name in ALL_KINDS:
        assert get_kind(name).name == name


def test_unknown_kind_suggests_the_nearest_name():
    with pytest.raises(UnknownKindError, match="Did you mean 'retrieval'"):
        get_kind("retreival")
    with pytest.raises(UnknownKindError, match="known kinds: retrieval, classification"):
        get_kind("xyz")


def test_every_template_a_kind_uses_exists_and_hashes_stably():
    for name in ALL_KINDS:
        kind = get_kind(name)
        for path in kind.template_paths():
            assert path.is_file() and path.read_text().strip()
        assert kind.template_hash() == template_hash(reversed(kind.template_names()))
        assert len(kind.template_hash()) == 64
    assert {"judge", "revise", "revisor", "domain_expansion"} <= set(list_templates())
    assert template_hash(["judge"]) != template_hash(["revise"])
    assert template_hash("judge") == template_hash(["judge"])
    assert get_kind("retrieval").template_hash() != get_kind("classification").template_hash()


def test_unknown_template_and_missing_value_name_the_fix():
    with pytest.raises(TemplateError, match="Did you mean 'judge'"):
        template_path("jugde")
    with pytest.raises(TemplateError, match=r"needs a value for \$generation_prompt"):
        render_template("revise", example="{}")


# --------------------------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("name", ALL_KINDS)
def test_each_kind_renders_its_prompts_with_sampled_attributes(name):
    kind = get_kind(name)
    rng = random.Random(1)
    for _ in range(50):
        attrs = kind.sample_attributes(rng)
        json.dumps(attrs)  # attributes are stored beside each prompt
        task = kind.fixed_tasks[0] if not kind.brainstormed else TASK
        prompt = kind.generation_prompt(task, attrs)
        assert not re.search(r"\$\{?[A-Za-z_]", prompt), prompt
        for field in kind.fields():
            assert f'"{field}"' in prompt, f"prompt of {name} does not name field {field}"
        if kind.brainstormed:
            assert task in prompt
    if kind.brainstormed:
        prompt = kind.brainstorm_prompt("Home/Energy at home/Heat pumps", n=5)
        assert "Home/Energy at home/Heat pumps" in prompt and " 5 " in prompt
        assert '"tasks"' in prompt
    else:
        with pytest.raises(ValueError, match="not brainstormed"):
            kind.brainstorm_prompt("anything")


def test_prompts_carry_the_sampled_values():
    kind = get_kind("retrieval")
    attrs = kind.sample_attributes(random.Random(3))
    attrs.update(education_level="PhD", num_words=300, query_length="less than 5 words")
    prompt = kind.generation_prompt(TASK, attrs)
    assert "about 300 words" in prompt and "less than 5 words" in prompt and "PhD" in prompt
    attrs["education_level"] = None
    assert "education" not in kind.generation_prompt(TASK, attrs)

    prompt = get_kind("sts").generation_prompt(
        "x", {"high_score": 4.5, "low_score": 2.5, "unit": "phrase", "language": "French"}
    )
    assert "rate 4.5" in prompt and "rate 2.5" in prompt and "phrases in French" in prompt


def test_retrieval_shuffles_its_guidelines_and_others_do_not():
    kind = get_kind("retrieval")
    rng = random.Random(0)
    orders = {tuple(kind.sample_attributes(rng)["guideline_order"]) for _ in range(200)}
    assert len(orders) > 100
    assert all(sorted(o) == list(range(kind.num_guidelines())) for o in orders)
    first_lines = set()
    for order in list(orders)[:20]:
        attrs = kind.sample_attributes(rng) | {"guideline_order": list(order)}
        prompt = kind.generation_prompt(TASK, attrs)
        first_lines.add(prompt.split("Guidelines:\n")[1].splitlines()[0])
    assert len(first_lines) > 3
    assert "guideline_order" not in get_kind("classification").sample_attributes(rng)


def test_sampling_is_deterministic_per_seed():
    for name in ALL_KINDS:
        assert _draw(name, 50, seed=7) == _draw(name, 50, seed=7)
    assert _draw("retrieval", 50, seed=7) != _draw("retrieval", 50, seed=8)


def test_language_reaches_the_prompt():
    kind = get_kind("classification")
    attrs = kind.sample_attributes(random.Random(0), language="German")
    assert "written in German" in kind.generation_prompt(TASK, attrs)
    assert kind.sample_attributes(random.Random(0))["language"] == "English"


# --------------------------------------------------------------------------------------------
# SPEED's distributions (20,000 draws, chi-square p > 0.001)


def test_retrieval_attributes_follow_speed_weights():
    draws = _draw("retrieval")
    _assert_matches(Counter(d["query_type"] for d in draws), retrieval.QUERY_TYPES)
    _assert_matches(Counter(d["query_length"] for d in draws), retrieval.QUERY_LENGTHS)
    _assert_matches(Counter(d["clarity"] for d in draws), CLARITY)
    _assert_matches(Counter(d["num_words"] for d in draws), dict.fromkeys(retrieval.DOCUMENT_WORDS, 1))
    # education level: absent half of the time, else uniform over three levels
    _assert_matches(
        Counter(d["education_level"] for d in draws),
        {None: 3, **dict.fromkeys(EDUCATION_LEVELS, 1)},
    )


def test_classification_attributes_follow_speed_weights():
    draws = _draw("classification")
    _assert_matches(Counter(d["input_length"] for d in draws), classification.INPUT_LENGTHS)
    # clarity and difficulty come together, half of the time
    assert all((d["clarity"] is None) == (d["difficulty"] is None) for d in draws)
    _assert_matches(Counter(d["clarity"] is None for d in draws), {True: 1, False: 1})
    styled = [d for d in draws if d["clarity"] is not None]
    _assert_matches(Counter(d["clarity"] for d in styled), CLARITY)
    _assert_matches(Counter(d["difficulty"] for d in styled), dict.fromkeys(EDUCATION_LEVELS, 1))


def test_sts_attributes_follow_speed_weights():
    draws = _draw("sts")
    _assert_matches(Counter(d["high_score"] for d in draws), dict.fromkeys(sts.HIGH_SCORES, 1))
    _assert_matches(Counter(d["low_score"] for d in draws), dict.fromkeys(sts.LOW_SCORES, 1))
    _assert_matches(Counter(d["unit"] for d in draws), UNITS)
    assert {d["language"] for d in draws} == {"English"}


def test_bitext_draws_a_target_language_other_than_the_source():
    kind = get_kind("bitext")
    draws = _draw("bitext")
    targets = [t for t in kind.TARGET_LANGUAGES if t != "English"]
    _assert_matches(Counter(d["target_language"] for d in draws), dict.fromkeys(targets, 1))
    _assert_matches(Counter(d["unit"] for d in draws), UNITS)
    assert kind.field_languages(draws[0]) == {"S1": "English", "S2": draws[0]["target_language"]}


# --------------------------------------------------------------------------------------------
# schemas and rows


@pytest.mark.parametrize("name", ALL_KINDS)
def test_json_schema_requires_exactly_the_fields(name):
    kind = get_kind(name)
    schema = kind.json_schema()
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"]) == set(EXAMPLES[name])


def test_format_query_is_the_e5_instruction_format():
    assert format_query(" Find it. ", " q ") == "Instruct: Find it.\nQuery: q"


@pytest.mark.parametrize("name", ALL_KINDS)
def test_to_rows_has_the_e5_shape(name):
    kind = get_kind(name)
    example = kind.schema.model_validate(EXAMPLES[name])
    task = kind.fixed_tasks[0] if kind.fixed_tasks else TASK
    (row,) = kind.to_rows(task, example)
    assert set(row) == {"instruction", "query", "positive", "negative"}
    assert row["instruction"] == task
    assert row["query"].startswith(f"Instruct: {task}\nQuery: ")
    assert kind.to_rows(task, EXAMPLES[name]) == [row]  # a plain dict works too


def test_rows_map_fields_to_roles_as_in_e5():
    (row,) = get_kind("classification").to_rows(TASK, EXAMPLES["classification"])
    assert row["query"].endswith("Query: My card never arrived.")
    assert (row["positive"], row["negative"]) == ("card_arrival", "card_lost")
    (row,) = get_kind("sts").to_rows("Retrieve semantically similar text.", EXAMPLES["sts"])
    assert (row["query"].split("Query: ")[1], row["positive"], row["negative"]) == (
        "A dog runs.",
        "A dog is running.",
        "A cat sleeps.",
    )
    (row,) = get_kind("matching_short").to_rows(TASK, EXAMPLES["matching_short"])
    assert row["positive"] == "Jane Austen" and row["negative"] is None
    (row,) = get_kind("bitext").to_rows("Retrieve parallel sentences.", EXAMPLES["bitext"])
    assert row["positive"] == "Das Haus ist rot." and row["negative"] is None


def test_requested_words_follow_the_attributes():
    assert get_kind("retrieval").requested_words({"num_words": 200}) == {
        "positive_document": 200,
        "hard_negative_document": 200,
    }
    cls = get_kind("classification")
    assert cls.requested_words({"input_length": "at least 100 words"}) == {"input_text": 100}
    assert cls.requested_words({"input_length": "less than 10 words"}) == {}


@pytest.mark.parametrize("name", ALL_KINDS)
def test_lengths_asked_fit_the_writers_answer(name):
    kind = get_kind(name)
    rng = random.Random(0)
    small = answer_words(256)  # the quickstart's generators
    assert small is not None and 100 < small < 160
    for _ in range(500):
        drawn = kind.sample_attributes(rng)
        fitted = kind.fit_lengths(drawn, small)
        assert sum(kind.requested_words(fitted).values()) <= small
        # only the lengths change, and only when they did not fit
        assert {k for k in drawn if drawn[k] != fitted[k]} <= {"num_words", "input_length"}
        if sum(kind.requested_words(drawn).values()) <= small:
            assert fitted == drawn
        # a writer with room for SPEED's longest documents (configs/paper.yaml) is asked as drawn
        assert kind.fit_lengths(drawn, answer_words(2048)) == drawn
        assert kind.fit_lengths(drawn, None) == drawn


def test_fitting_keeps_the_longest_length_that_fits():
    retrieval_kind, cls = get_kind("retrieval"), get_kind("classification")
    assert retrieval_kind.fit_lengths({"num_words": 500}, 250)["num_words"] == 100
    assert retrieval_kind.fit_lengths({"num_words": 500}, 30)["num_words"] == 50  # the shortest asked
    assert (
        cls.fit_lengths({"input_length": "at least 200 words"}, 150)["input_length"] == "at least 100 words"
    )


# --------------------------------------------------------------------------------------------
# brainstorm parsing


@pytest.mark.parametrize(
    "text",
    [
        '{"tasks": ["Find A.", "Find B."]}',
        'Sure! Here you go:\n```json\n{"tasks": ["1. Find A.", "2. Find B.", "Find a."]}\n```',
        '["Find A.", {"task": "Find B."}, ""]',
        "{'tasks': ['Find A.', 'Find B.',]}",
    ],
)
def test_parse_tasks_accepts_the_usual_shapes(text):
    result = get_kind("retrieval").parse_tasks(text)
    assert result.ok, result.detail
    assert [t.casefold() for t in result.value.tasks] == ["find a.", "find b."]


def test_parse_tasks_drops_an_empty_list():
    result = get_kind("retrieval").parse_tasks('{"tasks": []}')
    assert not result.ok and result.reason == "schema_mismatch" and "tasks" in result.detail
