"""The labels helpers with a tiny bag-of-words embedder built here (a StaticEmbedding whose word
vectors are one-hot, so cosine is word overlap): the mining wrapper, search and round-trip ranks,
BM25 ranks, the relabel verdicts, and the labels stage end to end on a fake run."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from speed.config import MiningConfig
from speed.corpus import Passage
from speed.data.labels import (
    BM25Scorer,
    Encoded,
    PassageIndex,
    Pool,
    RelabelVerdict,
    agreed_outcome,
    dense_ranks,
    document_neighbours,
    encode,
    mine_negatives,
    other_side,
    relabel_order,
    relabel_outcome,
    relabel_values,
)
from tiny import bow_model


@pytest.fixture(scope="module")
def model() -> Any:
    return bow_model()


# --------------------------------------------------------------------------------------------
# pool and search


def test_pool_keeps_distinct_texts_in_first_seen_order() -> None:
    pool = Pool(["a b", "c", "a b", ""])
    pool.add(["c", "d"])
    assert (
        pool.texts == ["a b", "c", "d"] and pool.id("d") == 2 and pool.id("zzz") == -1 and pool.id(None) == -1
    )


@pytest.mark.parametrize("threshold", [1_000, 2])  # exact search, then faiss HNSW
def test_search_finds_the_overlapping_passage_first(model: Any, threshold: int) -> None:
    pytest.importorskip("faiss")
    pool = ["cat mat", "sun moon", "ship sea river", "bread milk cheese"]
    index = PassageIndex(encode(model, pool), ann_threshold=threshold)
    assert index.kind == ("exact" if threshold > len(pool) else "faiss-hnsw")
    scores, ids = index.search(encode(model, ["ship on the sea", "milk and bread"], query=True), 6)
    assert ids[0, 0] == 2 and ids[1, 0] == 3
    assert ids[0, 5] == -1 and scores[0, 5] == -np.inf  # padded past the pool's 4 passages
    assert np.all(np.diff(scores[0, :4]) <= 1e-6)  # best first


def test_round_trip_ranks_a_good_positive_first_and_an_unrelated_one_past_k(model: Any) -> None:
    pool = Pool(["cat mat tree", "sun moon star", "ship sea river", "bread milk cheese", "king queen castle"])
    index = PassageIndex(encode(model, pool.texts))
    queries = encode(model, ["cat on the mat", "ship on the sea river"], query=True)
    # the second example's positive is unrelated to its query: three passages outscore... none overlap
    ranked = dense_ranks(
        queries, index, [pool.id("cat mat tree"), pool.id("bread milk cheese")], [-1, -1], depth=1
    )
    assert ranked[0].rank == 1
    assert ranked[1].rank is None and ranked[1].best_other == pool.id("ship sea river")
    assert ranked[1].best_other_score > ranked[1].positive_score


def test_round_trip_does_not_count_the_examples_own_negative(model: Any) -> None:
    pool = Pool(["cat mat", "cat mat tree", "sun moon"])
    index = PassageIndex(encode(model, pool.texts))
    q = encode(model, ["cat mat"], query=True)
    # the own negative "cat mat" outscores the positive; excluded, the positive is first
    assert dense_ranks(q, index, [1], [0], depth=1)[0].rank == 1
    assert dense_ranks(q, index, [1], [-1], depth=1)[0].rank is None


def test_a_passage_of_the_positives_own_document_does_not_count_above_it(model: Any) -> None:
    pool = Pool(["cat mat", "cat mat tree", "cat dog", "sun moon"])
    index = PassageIndex(encode(model, pool.texts))
    q = encode(model, ["cat mat"], query=True)
    # "cat mat" (0) outscores the positive (1): a competitor, unless it is the positive's neighbour
    (alone,) = dense_ranks(q, index, [1], [-1], depth=1)
    assert alone.rank is None and alone.best_other == 0 and alone.neighbours_above == 0
    (near,) = dense_ranks(q, index, [1], [-1], depth=1, neighbours=[{0}])
    assert near.rank == 1 and near.best_other == 2 and near.neighbours_above == 1


def test_document_neighbours_come_from_the_passage_an_example_was_built_on() -> None:
    passages = [
        Passage("7#0", "cat mat tree", None, "7"),
        Passage("7#1", "cat mat", None, "7"),
        Passage("7#2", "mat rug", None, "7"),
        Passage("8", "sun moon", None, "8"),
    ]
    got = document_neighbours(
        [
            '{"passage": {"id": "7#0", "text": "cat mat tree"}}',
            {"passage": {"id": "8"}},
            "{}",
            None,
            "not json",
        ],
        ["cat mat tree", "sun moon", "x", "y", "z"],
        passages,
    )
    assert got == [frozenset({"cat mat", "mat rug"}), frozenset(), frozenset(), frozenset(), frozenset()]


def test_bm25_ranks() -> None:
    pytest.importorskip("bm25s")
    texts = ["the cat sat on the mat", "ships sail the sea", "bread and milk", "a dog in the rain"]
    scorer = BM25Scorer(texts)
    ranked = scorer.ranks(["cat mat", "ships sea", "the of"], [0, 2, 1], [-1, -1, -1], depth=1)
    assert ranked[0].rank == 1
    assert ranked[1].rank is None and ranked[1].best_other == 1  # its positive shares no word
    assert ranked[2].rank is None  # stopwords only: retrieves nothing
    # "ships sail the sea" (1) outscores the positive "bread and milk" (2) but is its neighbour
    near = scorer.ranks(["ships sea"], [2], [-1], depth=1, neighbours=[{1}])[0]
    assert near.neighbours_above == 1 and near.best_other != 1


# --------------------------------------------------------------------------------------------
# mining


def test_mining_takes_the_closest_passage_below_the_margin(model: Any) -> None:
    corpus = ["cat mat tree", "cat mat", "cat dog", "sun moon", "ship sea"]
    cfg = MiningConfig(negatives="mined", relative_margin=None, num_negatives=1)
    mined = mine_negatives(model, ["cat mat tree"], ["cat mat tree"], corpus, cfg)
    ((neg, score),) = mined[("cat mat tree", "cat mat tree")]
    assert neg == "cat mat" and 0 < score < 1
    # positive-aware: at a 0.2 relative margin, "cat mat" (0.82 > 0.8 x 1.0) is too close to be a negative
    tight = mine_negatives(
        model, ["cat mat tree"], ["cat mat tree"], corpus, cfg.model_copy(update={"relative_margin": 0.2})
    )
    assert tight[("cat mat tree", "cat mat tree")][0][0] == "cat dog"


def test_mining_on_vectors_already_encoded_gives_the_same_negatives_without_encoding_again(
    model: Any,
) -> None:
    corpus = ["cat mat tree", "cat mat", "cat dog", "sun moon", "ship sea"]
    queries = ["cat mat tree", "ship on the sea"]
    cfg = MiningConfig(negatives="mined", relative_margin=None, num_negatives=2)
    plain = mine_negatives(model, queries, corpus[:1] * 2, corpus, cfg)
    known = Encoded(
        model,
        dict(zip(queries, encode(model, queries, query=True), strict=True)),
        dict(zip(corpus, encode(model, corpus), strict=True)),
    )
    assert mine_negatives(known, queries, corpus[:1] * 2, corpus, cfg) == plain and known.encoded == 0
    # a text it has not seen is encoded once, then kept; the vectors are the model's
    half = Encoded(model, {}, dict(zip(corpus[:2], encode(model, corpus[:2]), strict=True)))
    assert mine_negatives(half, queries, corpus[:1] * 2, corpus, cfg) == plain
    assert half.encoded == len(queries) + len(corpus) - 2
    again = half.encode_document(corpus, normalize_embeddings=True, convert_to_numpy=True)
    assert half.encoded == len(queries) + len(corpus) - 2
    assert np.allclose(again, encode(model, corpus), atol=1e-6)


def test_mining_never_mines_a_passage_known_to_answer(model: Any) -> None:
    corpus = ["cat mat", "cat dog", "sun moon"]
    cfg = MiningConfig(negatives="mined", relative_margin=None)
    plain = mine_negatives(model, ["cat mat tree"], ["cat mat tree"], corpus, cfg)
    assert plain[("cat mat tree", "cat mat tree")][0][0] == "cat mat"
    told = mine_negatives(
        model, ["cat mat tree"], ["cat mat tree"], corpus, cfg, extra_positives=[("cat mat tree", "cat mat")]
    )
    assert told[("cat mat tree", "cat mat tree")][0][0] == "cat dog"


def test_mining_passes_over_the_positives_own_document(model: Any) -> None:
    corpus = ["cat mat", "cat dog", "sun moon"]
    cfg = MiningConfig(negatives="mined", relative_margin=None)
    pair = ("cat mat tree", "cat mat tree")
    counts: Counter[str] = Counter()
    got = mine_negatives(model, [pair[0]], [pair[1]], corpus, cfg, aside={pair: {"cat mat"}}, counts=counts)
    assert got[pair] == [("cat dog", pytest.approx(got[pair][0][1]))] and counts["aside"] == 1
    plain = mine_negatives(model, [pair[0]], [pair[1]], corpus, cfg)
    assert plain[pair][0][0] == "cat mat"


def test_mining_leaves_out_a_pair_the_margin_leaves_without_negative(model: Any) -> None:
    cfg = MiningConfig(negatives="mined", absolute_margin=0.99, relative_margin=None, range_max=3)
    mined = mine_negatives(model, ["cat mat"], ["cat mat"], ["cat mat tree", "cat"], cfg)
    assert mined == {}


# --------------------------------------------------------------------------------------------
# relabel


@pytest.mark.parametrize(
    ("answer", "candidate_at", "outcome"),
    [
        ("A", "A", "swap"),
        ("B", "A", "keep"),
        ("B", "B", "swap"),
        ("A", "B", "keep"),
        ("both", "A", "both"),
        ("neither", "B", "drop"),
    ],
)
def test_relabel_outcome(answer: str, candidate_at: str, outcome: str) -> None:
    assert relabel_outcome(RelabelVerdict(answer=answer), candidate_at) == outcome  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "second", "acted_on"),
    [
        ("swap", "swap", "swap"),
        ("keep", "keep", "keep"),
        ("drop", "drop", "drop"),
        ("swap", "keep", "inconsistent"),  # a judge that always says A, candidate shown first then second
        ("both", "drop", "inconsistent"),
        ("swap", "unparsed", "unparsed"),
    ],
)
def test_only_a_verdict_that_survives_the_order_is_acted_on(first: str, second: str, acted_on: str) -> None:
    assert agreed_outcome([first, second]) == acted_on  # type: ignore[list-item]
    assert agreed_outcome([first]) == first  # type: ignore[list-item]
    always_a = RelabelVerdict(answer="A")
    assert agreed_outcome([relabel_outcome(always_a, s) for s in ("A", other_side("A"))]) == "inconsistent"


def test_relabel_unparsed_keeps_and_the_order_is_both_ways() -> None:
    assert relabel_outcome(None, "A") == "unparsed"
    rng = random.Random(0)
    assert {relabel_order(rng) for _ in range(20)} == {"A", "B"}
    values = relabel_values({"instruction": "t", "query_text": "q"}, "POS", "CAND", "B")
    assert values["passage_a"] == "POS" and values["passage_b"] == "CAND" and values["query"] == "q"
