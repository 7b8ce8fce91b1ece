"""Decontamination against the evaluation data: shared n-grams and whole short eval texts are caught."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from speed.data.decontam import CONTAMINATED, DecontamError, Decontaminator, eval_texts, find_eval_dir
from speed.data.filters import DropCounter


@pytest.fixture(scope="module")
def eval_dir() -> Path:
    try:
        return find_eval_dir(os.environ.get("SPEED_EVAL_DIR"))
    except FileNotFoundError:
        pytest.skip("no evaluation data (set SPEED_EVAL_DIR to the shared/eval folder)")


@pytest.fixture(scope="module")
def sts_index(eval_dir) -> Decontaminator:
    return Decontaminator.from_eval_dir(["STSBenchmark"], eval_dir)


def _sts_test_sentences(eval_dir: Path) -> list[str]:
    with (eval_dir / "sts" / "STSBenchmark" / "test.jsonl").open() as f:
        return [json.loads(line)["sentence1"] for line in f]


def test_drops_an_example_holding_an_stsbenchmark_test_sentence(eval_dir, sts_index):
    sentences = _sts_test_sentences(eval_dir)
    long_one = next(s for s in sentences if len(s.split()) >= 14)
    short_one = next(s for s in sentences if 8 <= len(s.split()) < 13)
    tiny_one = next(s for s in sentences if len(s.split()) == 5)
    examples = [
        {"S1": long_one, "S2": "Something else entirely.", "S3": "And another."},  # whole sentence
        {
            "S1": "Quite unrelated.",
            "S2": f"Reporters said that {long_one.lower()} Later on, more.",
            "S3": "x",
        },
        {
            "user_query": "q",
            "positive_document": f"Earlier today {short_one} That is all.",
            "hard_negative_document": "n",
        },
        {"S1": tiny_one.upper(), "S2": "b", "S3": "c"},  # a field equal to a short eval text
        {"S1": "A completely original sentence about heat pumps in winter.", "S2": "b", "S3": "c"},
    ]
    counter = DropCounter("decontam")
    kept, per_task = sts_index.filter(examples, counter=counter)
    assert kept == examples[-1:]
    assert per_task == {"STSBenchmark": 4} and counter[CONTAMINATED] == 4


def test_a_shared_thirteen_gram_is_enough(eval_dir, sts_index):
    sentence = next(s for s in _sts_test_sentences(eval_dir) if len(s.split()) >= 16)
    gram = " ".join(sentence.split()[1:14])
    assert sts_index.check(f"We wrote: {gram}, and then stopped.") == "STSBenchmark"
    shorter = " ".join(sentence.split()[1:12])  # 11 words of a long sentence: not an n-gram hit
    assert sts_index.check(f"We wrote: {shorter}, and then stopped.") is None


def test_training_splits_are_not_indexed(eval_dir):
    texts = set(eval_texts(eval_dir / "sts" / "STSBenchmark", "sts"))
    with (eval_dir / "sts" / "STSBenchmark" / "train.jsonl").open() as f:
        train_only = [json.loads(line)["sentence1"] for line in f]
    assert any(t not in texts for t in train_only)
    assert next(iter(_sts_test_sentences(eval_dir))) in texts


def test_retrieval_layout_and_folder_names(tmp_path):
    folder = tmp_path / "retrieval" / "Toy"
    folder.mkdir(parents=True)
    doc = "the cathedral bells of the old town ring at noon every sunday while the market closes early"
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "1", "title": "Bells", "text": doc}) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "when do bells ring"}) + "\n")
    index = Decontaminator.from_eval_dir(["retrieval/Toy"], tmp_path)
    assert index.check("Fact: " + doc[4:]) == "retrieval/Toy"
    assert index.check("When do bells ring") == "retrieval/Toy"
    assert index.check("bells ring at noon") is None
    index = Decontaminator.from_eval_dir(["Toy"], tmp_path)
    assert index.sizes == {"Toy": 3}  # title, text, query
    # a run grounded on this very corpus: its documents are the user's text, the queries stay checked
    index = Decontaminator.from_eval_dir(["Toy"], tmp_path, documents=False)
    assert index.sizes == {"Toy": 1} and index.check("Fact: " + doc[4:]) is None
    assert index.check("When do bells ring") == "Toy"
    with pytest.raises(DecontamError, match="retrieval/Toy"):
        Decontaminator.from_eval_dir(["Tyo"], tmp_path)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="min_words"):
        Decontaminator(n=5, min_words=8)
    index = Decontaminator(n=5, min_words=3)
    index.add("toy", ["one two three four five six"])
    assert index.check("zero one two three four five") == "toy"
    assert index.check("") is None
