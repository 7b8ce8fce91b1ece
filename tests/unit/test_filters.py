"""Quality filters: each has a case it drops and a case it keeps; the counter adds up."""

from __future__ import annotations

import logging
import random

import pytest

from speed.data.filters import (
    DropCounter,
    EmptyField,
    LabelNotAllowed,
    PlaceholderText,
    PromptEcho,
    QueryInDocument,
    Repetitive,
    TooShort,
    WithoutNegative,
    WrongLanguage,
    default_filters,
    failing_filter,
    first_failure,
    language_code,
    placeholder_in,
    positive_equals_negative,
    query_equals_positive,
    similarity,
)
from speed.tasks import get_kind
from speed.tasks.grounded import grounded_kind

RETRIEVAL = get_kind("retrieval")
CLASSIFICATION = get_kind("classification")
STS = get_kind("sts")
BITEXT = get_kind("bitext")
MATCHING = get_kind("matching_short")

DOC = (
    "Regular maintenance keeps an air source heat pump efficient through the winter. Clear snow "
    "and leaves from the outdoor unit, check that the condensate drains freely, and replace or wash "
    "the indoor filters every few months. A technician should inspect refrigerant pressure once a year."
)
NEG = (
    "Heat pumps have been used in refrigerators for more than a century. The same thermodynamic "
    "cycle moves heat against its natural direction, which is why engineers describe a heat pump "
    "as a refrigerator working in reverse; early designs relied on ammonia as the working fluid."
)
GOOD = {
    "user_query": "how to maintain a heat pump in winter",
    "positive_document": DOC,
    "hard_negative_document": NEG,
}
#: a retrieval prompt's attributes as sampled, with 60-word documents
ATTRS = {**RETRIEVAL.sample_attributes(random.Random(0), "English"), "num_words": 60}


def check(flt, fields, kind=RETRIEVAL, attrs=ATTRS):
    return flt.check(fields, kind, attrs)


def test_empty_field():
    assert check(EmptyField(), GOOD) is None
    assert "positive_document" in check(EmptyField(), GOOD | {"positive_document": "   "})
    assert "hard_negative_document" in check(
        EmptyField(), {k: v for k, v in GOOD.items() if k != "hard_negative_document"}
    )


@pytest.mark.parametrize(
    "value",
    ["string", "...", "<document>", "[insert document here]", "Lorem ipsum dolor sit amet", "${task}"],
)
def test_placeholder_text_drops(value):
    assert check(PlaceholderText(), GOOD | {"positive_document": value}) is not None


def test_placeholder_text_drops_a_field_name_as_value():
    assert "'S2'" in check(PlaceholderText(), {"S1": "The house is red.", "S2": "S1"}, BITEXT, {})


def test_placeholder_text_keeps_real_text():
    assert check(PlaceholderText(), GOOD) is None
    assert (
        check(
            PlaceholderText(),
            {"input_text": "None of the above applies.", "label": "other", "misleading_label": "none"},
            CLASSIFICATION,
        )
        is None
    )


def test_repetitive_text():
    loop = "The sun is looking at the beautiful flowers, and the sun is looking at the trees. " * 8
    assert "repeats itself" in check(Repetitive(), GOOD | {"positive_document": loop})
    assert check(Repetitive(), GOOD) is None
    assert check(Repetitive(), GOOD | {"user_query": "ha ha ha ha ha"}) is None  # too short to judge


def test_too_short():
    assert check(TooShort(0.25), GOOD) is None  # 40+ words of 60 asked
    assert "positive_document" in check(TooShort(0.25), GOOD, attrs={"num_words": 500})
    attrs = {"input_length": "at least 50 words"}
    short = {"input_text": "Too short.", "label": "a", "misleading_label": "b"}
    assert "2 words, 50" in check(TooShort(), short, CLASSIFICATION, attrs)
    assert check(TooShort(), short, CLASSIFICATION, {"input_length": "less than 10 words"}) is None
    with pytest.raises(ValueError, match="min_ratio"):
        TooShort(0)


def test_query_in_document():
    copied = GOOD | {"positive_document": "How to maintain a heat pump in winter? " + DOC}
    assert "positive_document" in check(QueryInDocument(), copied)
    assert check(QueryInDocument(), GOOD) is None
    # short queries are exempt: documents naturally repeat a two-word topic
    assert check(QueryInDocument(), GOOD | {"user_query": "heat pump"}) is None


def test_positive_equals_negative():
    flt = positive_equals_negative()
    assert check(flt, GOOD) is None
    assert check(flt, GOOD | {"hard_negative_document": DOC}) is not None
    assert check(flt, GOOD | {"hard_negative_document": DOC.replace("winter", "cold season")}) is not None
    same_label = {
        "input_text": "My card never came.",
        "label": "Card arrival",
        "misleading_label": "card_arrival",
    }
    assert check(flt, same_label, CLASSIFICATION, {}) is not None
    assert check(flt, same_label | {"misleading_label": "lost card"}, CLASSIFICATION, {}) is None
    assert check(flt, {"input": "a", "positive_document": "a"}, MATCHING, {}) is None  # no negative


def test_query_equals_positive():
    flt = query_equals_positive()
    sts = {
        "S1": "A man is playing a guitar.",
        "S2": "A man is playing a guitar!",
        "S3": "A man sells guitars.",
    }
    assert check(flt, sts, STS, {}) is not None
    assert check(flt, sts | {"S2": "Someone strums a guitar."}, STS, {}) is None


def test_similarity_is_exact_above_the_bound():
    assert similarity("a b c d", "a b c d") == 1.0
    assert similarity("a b c d", "w x y z") == 0.0
    assert 0.7 < similarity("a b c d e f g h i j", "a b c d e f g h i k") < 1.0


def test_wrong_language():
    flt = WrongLanguage()
    assert check(flt, GOOD) is None
    german = GOOD | {
        "positive_document": "Eine Wärmepumpe sollte im Winter regelmäßig gewartet werden, damit sie effizient bleibt.",
        "hard_negative_document": "Wärmepumpen werden seit über hundert Jahren in Kühlschränken verwendet.",
    }
    assert "detected de" in check(flt, german)
    bitext = {
        "S1": "The weather is lovely today and we are going for a walk.",
        "S2": "Das Wetter ist heute schön und wir gehen spazieren.",
    }
    attrs = {"source_language": "English", "target_language": "German"}
    assert check(flt, bitext, BITEXT, attrs) is None
    assert check(flt, bitext, BITEXT, attrs | {"target_language": "French"}) is not None
    assert check(flt, {"S1": "ok", "S2": "ja"}, BITEXT, attrs) is None  # too short to judge


def test_language_codes():
    assert (
        language_code("English") == "en" and language_code(" german ") == "de" and language_code("pt") == "pt"
    )
    with pytest.raises(ValueError, match="Did you mean 'English'"):
        language_code("Englsh")


def test_label_not_allowed():
    example = {"input_text": "I love it.", "label": "positive", "misleading_label": "negative"}
    assert check(LabelNotAllowed({"Positive", "Negative"}), example, CLASSIFICATION, {}) is None
    assert check(LabelNotAllowed({"joy", "anger"}), example, CLASSIFICATION, {}) is not None
    assert check(LabelNotAllowed(), example, CLASSIFICATION, {"labels": ["joy", "anger"]}) is not None
    assert check(LabelNotAllowed(), example, CLASSIFICATION, {}) is None  # no label set: keep


def test_first_failure_counts_the_first_reason_only():
    counter = DropCounter("test")
    filters = default_filters()
    assert first_failure(RETRIEVAL.schema.model_validate(GOOD), RETRIEVAL, ATTRS, filters, counter) is None
    bad = GOOD | {"positive_document": "", "hard_negative_document": ""}
    assert first_failure(bad, RETRIEVAL, ATTRS, filters, counter) == "empty_field"
    assert counter.as_dict() == {"kept": 0, "dropped": 1, "reasons": {"empty_field": 1}}
    assert [f.name for f in default_filters(check_language=False)][-1] == "label_not_allowed"


def test_drop_counter_merges_and_logs(caplog):
    a, b = DropCounter("shard0"), DropCounter("shard1")
    a.keep(3)
    a.drop("no_json")
    b.drop("no_json", n=2)
    b.drop("too_short")
    b.keep()
    a.merge(b)
    assert (a.kept, a.dropped, a.seen, a["no_json"], a["missing"]) == (4, 4, 8, 3, 0)
    assert list(a.as_dict()["reasons"]) == ["no_json", "too_short"]
    with caplog.at_level(logging.INFO, logger="speed.data.filters"):
        a.log_summary()
    assert "kept 4 of 8" in caplog.text and "no_json 3" in caplog.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_query", "Find the region the city of [topic], from [topic]."),
        ("user_query", "What does {query} mean for my garden?"),
        ("positive_document", "Dear [Your Name], thank you for writing to us about the delay."),
        ("positive_document", "A long answer about <insert topic here> that goes on."),
    ],
)
def test_placeholder_text_drops_unfilled_slots_in_running_text(field, value):
    detail = check(PlaceholderText(), GOOD | {field: value})
    assert detail is not None and field in detail


def test_placeholder_text_drops_text_about_a_field():
    fields = {"S1": "The cat sat on the mat.", "S2": "A sentence on S1 with other words.", "S3": "Dogs bark."}
    assert "'S2'" in check(PlaceholderText(), fields, get_kind("sts"), {})


def test_placeholder_text_keeps_brackets_that_are_content():
    for text in (
        "Results were significant [12].",
        "The set {1, 2, 3} is finite.",
        "Use a[i] in C.",
        "print(f'{name}')",
    ):
        assert placeholder_in(text, ["user_query"]) is None


def test_brainstorm_drops_tasks_with_unfilled_slots():
    assert placeholder_in("Find the region the city of [topic], from [topic].") == "[topic]"
    assert placeholder_in("Retrieve recipes that fit a given diet.") is None


@pytest.mark.parametrize(
    "negative,reason",
    [
        ("Cheerimentally, such as negative DNA disruption.", "too_short"),  # a senior's, verbatim
        ("2022-02-07 22:54:17.543.11-38-4-668", "too_short"),
        (DOC, "positive_equals_negative"),
        ("[insert a related but wrong document here]", "placeholder_text"),
    ],
)
def test_a_botched_negative_alone_is_what_without_negative_forgives(negative, reason):
    filters = default_filters(check_language=False)
    bad = GOOD | {"hard_negative_document": negative}
    assert failing_filter(bad, RETRIEVAL, ATTRS, filters)[0] == reason
    shape = WithoutNegative(RETRIEVAL)
    assert shape.negative_field is None and "hard_negative_document" not in shape.fields()
    assert "hard_negative_document" not in shape.requested_words(ATTRS)
    assert failing_filter(bad, shape, ATTRS, filters) is None
    # a fault of the query or the positive is not forgiven
    for field, text in (("user_query", "[query]"), ("positive_document", "Too short.")):
        assert failing_filter(bad | {field: text}, shape, ATTRS, filters) is not None
    assert failing_filter(GOOD | {"positive_document": "Too short."}, shape, ATTRS, filters)[0] == "too_short"


def test_an_example_kept_without_its_negative_trains_as_a_pair():
    rows = RETRIEVAL.to_rows("Find documents.", GOOD | {"hard_negative_document": ""})
    assert rows[0]["negative"] is None and rows[0]["positive"] == DOC
    assert RETRIEVAL.to_rows("Find documents.", GOOD)[0]["negative"] == NEG


def test_prompt_echo_drops_a_field_that_repeats_the_prompt_and_keeps_what_it_may_share():
    prompt = RETRIEVAL.instructions(ATTRS)
    assert "hard negative shares vocabulary" in prompt and "Task:" in prompt
    echo = GOOD | {"user_query": "The hard negative shares vocabulary or subject matter with the query"}
    assert "repeats the prompt" in check(PromptEcho(), echo)
    assert check(PromptEcho(), GOOD) is None
    assert failing_filter(echo, RETRIEVAL, ATTRS, default_filters(check_language=False))[0] == "prompt_echo"
    # the task is the teacher's, not the prompt's: a query may share its words
    task = "Find maintenance guides for home heating systems in winter."
    assert task in RETRIEVAL.generation_prompt(task, ATTRS)
    assert check(PromptEcho(), GOOD | {"user_query": "maintenance guides for home heating systems"}) is None


def test_prompt_echo_on_a_grounded_prompt_leaves_the_passage_out():
    kind = grounded_kind("retrieval")
    attrs = kind.ground(
        {**ATTRS, "num_words": 30}, {"id": "7", "text": DOC, "title": "Heat pump care in the cold months"}
    )
    assert DOC in kind.generation_prompt("t", attrs) and DOC not in kind.instructions(attrs)
    good = {"user_query": "how to maintain a heat pump in winter", "hard_negative_document": NEG}
    # words of the passage (its positive) and of its title are content, not an echo
    shared = {"user_query": "clear snow and leaves from the outdoor unit"}
    assert check(PromptEcho(), good | shared, kind, attrs) is None
    assert (
        check(PromptEcho(), good | {"user_query": "Heat pump care in the cold months"}, kind, attrs) is None
    )
    # a negative that is the prompt's own sentence: an echo, which keep_without_negative forgives
    botched = good | {"hard_negative_document": "This document is the one the search must find, " + NEG}
    assert "hard_negative_document" in check(PromptEcho(), botched, kind, attrs)
    assert check(PromptEcho(), botched, WithoutNegative(kind), attrs) is None
