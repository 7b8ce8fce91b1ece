"""E5's query format: one formatter, its parser, and the prefix evaluation puts before queries."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from speed.formats import QUERY_MARKER, format_query, instruction_prefix, parse_query


@pytest.mark.parametrize(
    ("instruction", "query"),
    [
        ("Find it.", "q"),
        (" Find it. ", " q "),
        ("\tGiven a claim, find documents that support it.\n", "\n  does aspirin thin blood?  \n"),
    ],
)
def test_format_then_parse_gives_back_the_instruction_and_the_query(instruction: str, query: str) -> None:
    text = format_query(instruction, query)
    assert text == f"Instruct: {instruction.strip()}\nQuery: {query.strip()}"
    assert parse_query(text) == (instruction.strip(), query.strip())
    # a reader that meets the text with whitespace around it still finds both parts
    assert parse_query(f"  \n{text}\n ") == (instruction.strip(), query.strip())


@given(
    instruction=st.text(min_size=1).filter(lambda s: s.strip() and QUERY_MARKER.strip() not in s),
    query=st.text(),
)
def test_round_trip_holds_for_any_text(instruction: str, query: str) -> None:
    assume(parse_query(query)[0] is None)  # a query that carries an instruction is kept as it is
    assert parse_query(format_query(instruction, query)) == (instruction.strip(), query.strip())


def test_the_query_side_of_evaluation_is_the_prefix_of_the_training_format() -> None:
    # MTEB's encoder prepends instruction_prefix; training rows are format_query: they must agree
    assert format_query(" Find it. ", "q") == instruction_prefix("Find it.") + "q"


def test_no_instruction_gives_the_bare_query() -> None:
    assert format_query(None, " a cat ") == "a cat"
    assert format_query("   ", "a cat") == "a cat"
    assert parse_query(" a cat ") == (None, "a cat")


def test_a_query_that_carries_an_instruction_is_never_prefixed_twice() -> None:
    once = format_query("Find it.", "q")
    assert format_query("Other task.", once) == once
    assert format_query("Other task.", f"  {once}\n") == once


def test_text_that_only_looks_like_the_format_is_a_bare_query() -> None:
    assert parse_query("Instruct: no marker here") == (None, "Instruct: no marker here")
    assert parse_query("Instruct: \nQuery: q") == (None, "Instruct: \nQuery: q")  # no instruction
