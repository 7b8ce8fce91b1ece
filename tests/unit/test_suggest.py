"""The one "did you mean" helper every unknown-name error uses."""

from __future__ import annotations

import pytest

from speed.suggest import close_matches, did_you_mean

STAGES = ["brainstorm", "seed", "junior", "candidates", "judge"]


def test_one_near_name_is_suggested() -> None:
    assert did_you_mean("brainstrom", STAGES) == " Did you mean 'brainstorm'?"


def test_nothing_near_gives_no_hint() -> None:
    assert did_you_mean("xyzzy", STAGES) == ""


def test_several_suggestions_read_as_a_list_best_first() -> None:
    hint = did_you_mean("jud", ["judge", "junior", "judges", "seed"], n=3, cutoff=0.4)
    assert hint.startswith(" Did you mean 'judge'")
    assert hint.endswith("?")
    assert hint.count("'") == 2 * len(close_matches("jud", ["judge", "junior", "judges", "seed"], 3, 0.4))
    assert " or " in hint


def test_a_name_equal_but_for_case_comes_first_even_when_difflib_misses_it() -> None:
    # difflib alone ranks 'sci' far from 'SCI' (ratio 0): the case-blind match must still win
    assert close_matches("sci", ["SCI", "scifi"], n=2, cutoff=0.9) == ["SCI"]
    assert did_you_mean("sci", ["SCI", "scifi"], n=1, cutoff=0.9) == " Did you mean 'SCI'?"


def test_at_most_n_suggestions() -> None:
    assert len(close_matches("jud", ["judge", "judges", "judged", "judo"], n=2, cutoff=0.3)) == 2


@pytest.mark.parametrize(
    ("what", "show", "expected"),
    [
        ("the packaged model ", str, " Did you mean the packaged model 'english'?"),
        ("", str.title, " Did you mean 'English'?"),
    ],
)
def test_words_and_display_form(what: str, show: object, expected: str) -> None:
    assert did_you_mean("englsh", ["english", "german"], what=what, show=show) == expected  # type: ignore[arg-type]


def test_choices_may_be_any_iterable_of_names() -> None:
    assert did_you_mean("sed", {"seed": 1, "judge": 2}) == " Did you mean 'seed'?"
    assert did_you_mean("sed", (n for n in STAGES)) == " Did you mean 'seed'?"
