"""The labels stage end to end on a stand-in synthesize folder: a tiny bag-of-words embedder built
here, a scripted judge behind the real ledger (SQLite), every drop, swap and mined negative counted."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from speed.config import SpeedConfig, load_config
from speed.io import read_jsonl, read_rows
from speed.ledger import Ledger, LedgeredBackend
from speed.llm.base import Backend, Completion, Request
from speed.stage import StageContext, StageError
from speed.stages.labels import Labels
from tiny import bow_model

#: (query, positive, generated negative): 0, 2 and 4 are sound; 1's positive is unrelated to its
#: query (the passage that answers it is 2's positive); 3's positive too, and no passage answers it
ROWS = [
    ("cat on the mat", "cat mat tree", "dog sun"),
    ("ship on the sea river", "bread milk cheese", None),
    ("river ship sea", "ship sea river", "car road"),
    ("king queen sword", "apple pear", None),
    ("castle gold king", "king castle gold coin", "book page"),
]


class ScriptedJudge(Backend):
    """Answers the relabel prompt from a script: query -> 'candidate', 'positive' or 'neither'."""

    name = "scripted"
    model_id = "scripted-judge"

    def __init__(self, script: dict[str, str]) -> None:
        self.script = script
        self.calls = 0

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out = []
        for req in requests:
            self.calls += 1
            prompt = req.messages[-1]["content"]
            query = re.search(r"<<<QUERY\n(.*)\nQUERY>>>", prompt).group(1)  # type: ignore[union-attr]
            a = re.search(r"<<<A\n(.*)\nA>>>", prompt).group(1)  # type: ignore[union-attr]
            want = self.script[query]
            positive = next(p for q, p, _ in ROWS if q == query)
            if want == "neither":
                answer = "neither"
            else:
                shown_first = (a == positive) == (want == "positive")
                answer = "A" if shown_first else "B"
            out.append(
                Completion(
                    texts=[json.dumps({"reason": "scripted", "answer": answer})], tokens_in=50, tokens_out=9
                )
            )
        return out


class Session:
    def __init__(self, ledger: Ledger, judge: Backend) -> None:
        self.ledger, self.judge = ledger, judge

    def llm(
        self, role: str, stage: str, model_path: Any = None, stage_key: Any = None, reads: Any = ()
    ) -> LedgeredBackend:
        return LedgeredBackend(self.judge, self.ledger, role, stage, stage_key=stage_key)

    def release(self, role: str) -> None:
        pass

    def executor(self) -> Any:
        raise AssertionError("labels runs on the driver")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("bow")
    bow_model().save(str(folder))
    return str(folder)


def run_labels(
    tmp_path: Path,
    embedder: str,
    *overrides: str,
    script: dict[str, str] | None = None,
    corpus: list[str] | None = None,
    judge: ScriptedJudge | None = None,
    attributes: dict[int, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], StageContext, ScriptedJudge]:
    run = tmp_path / "run"
    syn = run / "synthesize"
    syn.mkdir(parents=True)
    rows = [
        {
            "id": f"00000-{i}",
            # a grounded variant is checked as its kind: 1 and 3 must be dropped whatever the name
            "kind": {1: "matching_short_grounded", 3: "retrieval_grounded"}.get(i, "retrieval"),
            "instruction": "Find the passage.",
            "query": f"Instruct: x\nQuery: {q}",
            "query_text": q,
            "positive": p,
            "negative": n,
            "attributes": json.dumps((attributes or {}).get(i, {})),
        }
        for i, (q, p, n) in enumerate(ROWS)
    ]
    rows.append(
        {
            "id": "00000-9",
            "kind": "sts",
            "instruction": "t",
            "query": "a b",
            "query_text": "a b",
            "positive": "zzz",
            "negative": None,
        }
    )
    (syn / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (syn / "manifest.json").write_text("{}")
    if corpus is not None:  # the user's documents, read through the corpus section as in a run
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(corpus)))
        overrides = (*overrides, f"corpus.paths=[{docs}]", "corpus.min_tokens=1")
    cfg: SpeedConfig = load_config(None, [f"run.dir={run}", f"labels.model={embedder}", *overrides])
    judge = judge or ScriptedJudge(script or {})
    ledger = Ledger(run / "ledger.sqlite")
    out = run / ".work" / "labels"
    out.mkdir(parents=True)
    ctx = StageContext(cfg, run, "labels", "k1", out, Labels.reads, Session(ledger, judge))
    stage = Labels()
    stage.check(ctx)
    stats = stage.run(ctx)
    return stats, read_rows(out / "data"), ctx, judge


def test_off_by_default_passes_every_row_through(tmp_path: Path, embedder: str) -> None:
    stats, rows, _, judge = run_labels(tmp_path, embedder)
    assert stats["count"] == len(ROWS) + 1 and stats["drops"] == {} and judge.calls == 0
    assert [r["positive"] for r in rows[: len(ROWS)]] == [p for _, p, _ in ROWS]
    assert rows[0]["negative_source"] == "generated" and rows[1]["negative_source"] is None


def test_round_trip_drops_the_examples_whose_positive_is_unrelated(tmp_path: Path, embedder: str) -> None:
    stats, rows, ctx, _ = run_labels(
        tmp_path, embedder, "labels.round_trip.enabled=true", "labels.round_trip.k=1"
    )
    assert stats["drops"] == {"round_trip": 2} and stats["round_trip"]["dropped"] == 2
    assert stats["index"] == "exact"
    kept = {r["query_text"] for r in rows}
    assert "ship on the sea river" not in kept and "king queen sword" not in kept
    assert {"cat on the mat", "river ship sea", "castle gold king", "a b"} <= kept  # sts passes unchecked
    dropped = read_jsonl(ctx.out / "dropped.jsonl")
    assert {d["drop"] for d in dropped} == {"round_trip"} and dropped[0]["best_other"] == "ship sea river"


def test_round_trip_with_bm25(tmp_path: Path, embedder: str) -> None:
    pytest.importorskip("bm25s")
    stats, _, _, _ = run_labels(
        tmp_path,
        embedder,
        "labels.round_trip.enabled=true",
        "labels.round_trip.scorer=bm25",
        "labels.round_trip.k=1",
    )
    assert stats["drops"] == {"round_trip": 2} and stats["round_trip"]["scorer"] == "bm25"


def test_relabel_swaps_or_drops_as_the_judge_says_and_the_calls_are_in_the_ledger(
    tmp_path: Path, embedder: str
) -> None:
    script = {"ship on the sea river": "candidate", "king queen sword": "neither"}
    stats, rows, ctx, judge = run_labels(
        tmp_path,
        embedder,
        "labels.relabel.enabled=true",
        "labels.round_trip.enabled=true",
        "labels.round_trip.k=1",
        script=script,
    )
    rel = stats["relabel"]
    # each pair in both orders: 2 examples, 4 calls; a judge that reads the passages agrees with itself
    assert rel["asked"] == 2 and rel["swap"] == 1 and rel["drop"] == 1 and judge.calls == rel["calls"] == 4
    # the swapped example now passes the round trip; the judged-unanswerable one is dropped by name
    assert stats["drops"] == {"relabel_neither": 1}
    swapped = next(r for r in rows if r["query_text"] == "ship on the sea river")
    assert swapped["positive"] == "ship sea river" and swapped["relabeled"] is True
    assert ctx.ledger.totals(stage="labels", role="teacher").calls == 4
    log = read_jsonl(ctx.out / "relabel.jsonl")
    assert sorted(e["outcome"] for e in log) == ["drop", "swap"]
    assert all(sorted(v["candidate_at"] for v in e["verdicts"]) == ["A", "B"] for e in log)


class FirstPassageJudge(ScriptedJudge):
    """A position-biased judge, as the 0.5B teacher was on the domain bench: always answers A."""

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self.calls += len(requests)
        return [Completion(texts=['{"reason": "first", "answer": "A"}'], tokens_out=9) for _ in requests]


@pytest.mark.parametrize("both_orders", [True, False])
def test_a_judge_that_always_picks_the_first_passage_swaps_nothing_when_asked_both_ways(
    tmp_path: Path, embedder: str, both_orders: bool
) -> None:
    stats, rows, ctx, judge = run_labels(
        tmp_path,
        embedder,
        "labels.relabel.enabled=true",
        f"labels.relabel.both_orders={str(both_orders).lower()}",
        "labels.round_trip.k=1",
        judge=FirstPassageJudge({}),
    )
    rel = stats["relabel"]
    swapped = [r for r in rows if r["relabeled"]]
    if both_orders:
        # its verdict flips with the order: every example is kept as written, and counted
        assert rel["asked"] == 2 and rel["inconsistent"] == 2 and rel["swap"] == rel["keep"] == 0
        assert not swapped and judge.calls == 4
    else:
        # one order: the swap follows where the candidate happened to be shown
        assert rel["swap"] + rel["keep"] == rel["asked"] == 2 and judge.calls == 2
        log = read_jsonl(ctx.out / "relabel.jsonl")
        shown_first = sum(e["verdicts"][0]["candidate_at"] == "A" for e in log)
        assert len(swapped) == rel["swap"] == shown_first


def test_relabel_keep_leaves_the_positive_for_the_round_trip_to_judge(tmp_path: Path, embedder: str) -> None:
    script = {"ship on the sea river": "positive", "king queen sword": "positive"}
    stats, _, _, _ = run_labels(
        tmp_path,
        embedder,
        "labels.relabel.enabled=true",
        "labels.round_trip.enabled=true",
        "labels.round_trip.k=1",
        script=script,
    )
    assert stats["relabel"]["keep"] == 2 and stats["drops"] == {"round_trip": 2}


@pytest.mark.parametrize("mode", ["mined", "both"])
def test_mined_negatives_from_the_pool(tmp_path: Path, embedder: str, mode: str) -> None:
    stats, rows, _, _ = run_labels(
        tmp_path, embedder, f"labels.mining.negatives={mode}", "labels.mining.relative_margin=null"
    )
    mining = stats["mining"]
    assert mining["source"] == "pool" and mining["examples"] == len(ROWS)
    mined = [r for r in rows if r["negative_source"] == "mined"]
    assert len(mined) == mining["mined"] > 0
    for r in mined:
        assert r["negative"] != r["positive"]
    generated = [r for r in rows if r["negative_source"] == "generated"]
    if mode == "mined":
        assert mining["rows_added"] == 0 and len(rows) == len(ROWS) + 1
        assert mining["replaced"] + mining["filled"] == len(mined)
        assert mining["none_found"] + len(mined) == mining["examples"]
        assert mining["replaced"] == sum(1 for _, _, n in ROWS if n) - len(generated)
    else:
        assert len(generated) == sum(1 for _, _, n in ROWS if n)
        assert len(rows) == len(ROWS) + 1 + mining["rows_added"]


def test_mined_negatives_from_the_corpus_when_the_run_has_one(tmp_path: Path, embedder: str) -> None:
    corpus = ["cat mat", "sea ship car", "milk bread", "gold coin king"]
    stats, rows, _, _ = run_labels(
        tmp_path,
        embedder,
        "labels.mining.negatives=mined",
        "labels.mining.relative_margin=null",
        corpus=corpus,
    )
    assert stats["mining"]["source"] == "corpus" and stats["corpus"] == len(corpus)
    assert stats["mining"]["encoded"] is None  # no search ran before it: the library encoded
    first = next(r for r in rows if r["query_text"] == "cat on the mat")
    assert first["negative"] == "cat mat" and first["negative_source"] == "mined"


def test_corpus_source_without_a_corpus_fails_before_any_work(tmp_path: Path, embedder: str) -> None:
    with pytest.raises(StageError, match=r"labels\.mining\.source is 'corpus'"):
        run_labels(tmp_path, embedder, "labels.mining.negatives=mined", "labels.mining.source=corpus")


def test_mining_after_the_round_trip_reuses_its_vectors(tmp_path: Path, embedder: str) -> None:
    stats, _, _, _ = run_labels(
        tmp_path,
        embedder,
        "labels.round_trip.enabled=true",
        "labels.mining.negatives=both",
        "labels.mining.relative_margin=null",
    )
    assert stats["mining"]["mined"] > 0 and stats["mining"]["encoded"] == 0


#: SciFact-like: document 0 is cut into two passages ("0#0": row 0's positive, and "0#1", which its
#: query matches better); the others are one passage each
CHUNKED = (["cat mat tree cat mat", "sea ship car", "milk bread", "gold coin king"], "corpus.chunk_tokens=3")


@pytest.mark.parametrize("grounded", [True, False])
def test_a_passage_of_the_positives_own_document_is_no_competitor_and_no_negative(
    tmp_path: Path, embedder: str, grounded: bool
) -> None:
    docs, chunking = CHUNKED
    stats, rows, _, _ = run_labels(
        tmp_path,
        embedder,
        "labels.round_trip.enabled=true",
        "labels.round_trip.k=1",
        "labels.mining.negatives=mined",
        "labels.mining.relative_margin=null",
        chunking,
        "corpus.chunk_overlap=0",
        corpus=docs,
        # row 0 was built on passage 0#0 (as synthesize writes a grounded prompt's attributes)
        attributes={0: {"passage": {"id": "0#0", "text": "cat mat tree"}}} if grounded else None,
    )
    assert stats["corpus"] == 5  # 0#0, 0#1 and three one-passage documents
    first = [r for r in rows if r["query_text"] == "cat on the mat"]
    if grounded:
        # "cat mat" (0#1) outscores the positive but is the same document: rank 1, kept, and counted
        assert stats["round_trip"]["ranks"]["1"] >= 1 and stats["round_trip"]["neighbour_above"] == 1
        assert first and all(r["negative"] != "cat mat" for r in first)
        assert stats["mining"]["same_document"] == 1  # the one plain mining would have taken
    else:
        # without provenance the neighbour is a competitor: the example is dropped at k=1
        assert not first and stats["round_trip"]["neighbour_above"] == 0
        assert stats["mining"]["same_document"] == 0
