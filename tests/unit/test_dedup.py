"""MinHash dedup: near duplicates go, distinct texts stay, the result does not depend on the run."""

from __future__ import annotations

import random

import pytest

from speed.data.dedup import EXACT_DUPLICATE, NEAR_DUPLICATE, MinHashDeduplicator, dedup, example_text
from speed.data.filters import DropCounter


def _doc(rng: random.Random, n: int = 120) -> str:
    vocab = [f"word{i}" for i in range(3000)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _near(text: str, rng: random.Random, edits: int = 3) -> str:
    tokens = text.split()
    for _ in range(edits):
        tokens[rng.randrange(len(tokens))] = "changed"
    return " ".join(tokens)


def test_near_duplicates_are_removed_and_distinct_texts_kept():
    rng = random.Random(0)
    originals = [_doc(rng) for _ in range(200)]
    variants = [_near(t, rng, edits=2) for t in originals[:50]]  # Jaccard about 0.9
    copies = [t.upper() + " " for t in originals[50:60]]  # same words after normalization
    counter = DropCounter("dedup")
    kept = dedup(originals + variants + copies, text=lambda s: s, threshold=0.8, counter=counter)
    assert kept == originals
    assert counter[NEAR_DUPLICATE] == 50 and counter[EXACT_DUPLICATE] == 10


def test_texts_below_the_threshold_are_kept():
    rng = random.Random(1)
    base = _doc(rng, 100)
    half = " ".join(base.split()[:50] + _doc(rng, 50).split())  # about a third of shingles shared
    assert dedup([base, half], text=lambda s: s, threshold=0.8) == [base, half]


def test_dedup_is_deterministic_and_keeps_the_first():
    rng = random.Random(2)
    items = []
    for _ in range(100):
        t = _doc(rng, 60)
        items += [t, _near(t, rng, 1)]
    rng.shuffle(items)
    first = dedup(items, text=lambda s: s)
    assert first == dedup(list(items), text=lambda s: s)
    assert len(first) == 100


def test_examples_are_compared_on_all_fields():
    a = {"S1": "A dog runs in the park.", "S2": "A dog is running in a park.", "S3": "A cat sleeps."}
    b = dict(a, S3="A completely different third sentence about the stock market today.")
    assert example_text(a).count("\n") == 2
    dd = MinHashDeduplicator(threshold=0.9)
    assert dd.check(example_text(a)) is None
    assert dd.check(example_text(dict(a))) == EXACT_DUPLICATE
    assert dd.check(example_text(b)) is None
    assert len(dd) == 2


def test_short_texts_and_bad_settings():
    dd = MinHashDeduplicator()
    assert dd.check("hi") is None and dd.check("Hi!") == EXACT_DUPLICATE and dd.check("ho") is None
    with pytest.raises(ValueError, match="threshold"):
        MinHashDeduplicator(threshold=0)
