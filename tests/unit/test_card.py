"""The dataset card of every export, and the report's "too easy" figure, on a run written by the
stages' own writers (tests/fakerun.py: the synthesize stage's Parquet writer, a real SQLite ledger)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakerun import DROPS, KINDS, TEACHER_CALLS, make_fake_run
from speed.card import jaccard, overlap_by_kind, size_category, words
from speed.config import load_config
from speed.export import export_run
from speed.io import read_rows
from speed.ledger import cost_summary

CORPUS = {"paths": ["docs/scifact.jsonl"], "text_field": "text", "chunk_tokens": 256}


def card_run(tmp_path: Path, corpus: dict[str, Any] | None = None) -> Path:
    run = make_fake_run(tmp_path / "run")
    cfg = load_config(None, [f"run.dir={run}", "evaluate.tasks=[SciFact, STSBenchmark]"])
    data = yaml.safe_load(cfg.to_yaml())
    if corpus is not None:
        data["corpus"] = corpus  # the section another branch adds: the card must read it as it is
    (run / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return run


def split_card(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def table_row(body: str, first: str) -> list[str]:
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no table row '{first}' in the card")


def test_the_card_header_parses_and_its_figures_match_the_run(tmp_path: Path) -> None:
    run = card_run(tmp_path, corpus=CORPUS)
    out = export_run(run, "flagembedding", tmp_path / "fe")
    header, body = split_card((out.parent / "README.md").read_text(encoding="utf-8"))

    rows = read_rows(run / "synthesize")
    assert header["license"] == "other"
    assert header["language"] == ["en"]
    assert header["size_categories"] == ["n<1K"]
    assert header["task_categories"] == ["sentence-similarity", "text-classification", "text-retrieval"]

    assert f"{len(rows)} training rows from {len({r['id'] for r in rows})} generated examples" in body
    for kind in KINDS:
        assert table_row(body, kind)[1] == str(sum(r["kind"] == kind for r in rows))
    # the figures of the ledger, per stage and in all
    cost = cost_summary(run)
    assert table_row(body, "total")[1] == str(TEACHER_CALLS) == str(cost["teacher_total"]["calls"])
    assert table_row(body, "judge")[1:] == [
        str(cost["teacher_by_stage"]["judge"][k]) for k in ("calls", "tokens_in", "tokens_out")
    ]
    # each filter of synthesize with its count, and another stage's
    for reason, n in DROPS.items():
        assert re.search(rf"^\| synthesize \| {reason} \| {n} \|$", body, re.MULTILINE), reason
    assert "| judge | judge_unparsable | 1 |" in body
    assert "Kept without their hard negative, which alone failed a filter: 2 examples (too_short 2)" in body
    # generators with the keys of the stages that trained them
    senior = table_row(body, "senior")
    assert senior[1] == "(trained in the run)" and "`key-senior`" in senior[3]
    assert table_row(body, "teacher")[1] == "gpt-4o"
    assert "data of SciFact, STSBenchmark were dropped" in body
    for key, value in CORPUS.items():
        assert f"- `{key}`: {value}" in body


def test_too_easy_is_the_word_overlap_of_query_and_positive_per_kind(tmp_path: Path) -> None:
    from speed.report.summary import collect_summary

    run = card_run(tmp_path)
    rows = read_rows(run / "synthesize")
    expected: dict[str, list[float]] = {}
    for row in rows:
        q, p = set(row["query_text"].lower().split()), set(row["positive"].lower().split())
        expected.setdefault(row["kind"], []).append(len(q & p) / len(q | p))
    figures = overlap_by_kind(rows)
    summary, _, _ = collect_summary(run)
    for kind, scores in expected.items():
        assert figures[kind]["mean_jaccard"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
        assert figures[kind]["share_above"] == pytest.approx(
            sum(s > 0.5 for s in scores) / len(scores), abs=1e-4
        )
        assert summary["examples"]["too_easy"][kind]["mean_jaccard"] == figures[kind]["mean_jaccard"]
    # the fake examples share "about <kind>" and their number: some overlap, not all of it
    assert 0 < figures["sts"]["mean_jaccard"] < 1

    from speed.report import build_report

    html = build_report(run).read_text(encoding="utf-8")
    assert f"{figures['retrieval']['mean_jaccard']:.3f}" in html and "too easy" in html


def test_every_format_writes_its_card_and_no_corpus_says_so(tmp_path: Path) -> None:
    run = card_run(tmp_path)
    file_out = export_run(run, "flagembedding", tmp_path / "train.jsonl")
    assert (tmp_path / "train.README.md").is_file() and file_out.is_file()
    _, body = split_card((tmp_path / "train.README.md").read_text(encoding="utf-8"))
    assert "None: ungrounded generation" in body
    pytest.importorskip("datasets")
    import datasets

    folder = export_run(run, "hf", tmp_path / "hf")
    header, _ = split_card((folder / "README.md").read_text(encoding="utf-8"))
    assert header["size_categories"] == ["n<1K"]
    assert len(datasets.load_from_disk(str(folder))) == len(read_rows(run / "synthesize"))


def test_word_overlap_and_size_categories() -> None:
    assert words("The cat, the CAT!") == {"the", "cat"}
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 0.0
    assert [size_category(n) for n in (0, 999, 1000, 99_999, 920_000, 2_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
        "1M<n<10M",
    ]
