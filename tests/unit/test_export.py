"""Exports load with their consumers' own loaders: datasets, sentence-transformers, FlagEmbedding's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from speed.export import ExportError, export_run
from tiny import make_tiny_bert

WORDS = [
    *("the", "a", "vaccine", "immune", "system", "battery", "review", "guitar"),
    *("song", "news", "river", "bank", "money", "loan", "water"),
]


def fake_run(tmp_path: Path, n: int = 12) -> Path:
    """A run whose synthesize stage finished: Parquet parts under data/ and a manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    folder = run / "synthesize"
    (folder / "data").mkdir(parents=True)
    rows = []
    for i in range(n):
        kind = "matching_short" if i % 4 == 3 else "retrieval"
        query = f"{WORDS[i % len(WORDS)]} query {i}"
        rows.append(
            {
                "id": f"00000-{i:04d}",
                "kind": kind,
                "task": f"Find documents for task {i % 3}.",
                "attributes": json.dumps({"query_length": "less than 5 words"}),
                "raw_output": "{...}",
                "revised": i % 2 == 0,
                "instruction": f"Find documents for task {i % 3}.",
                "query_text": query,
                "query": f"Instruct: Find documents for task {i % 3}.\nQuery: {query}",
                "positive": f"the positive document number {i} about {WORDS[(i + 1) % len(WORDS)]}",
                "negative": None if kind == "matching_short" else f"a hard negative {i} about money",
            }
        )
    for part in range(2):
        chunk = rows[part * n // 2 : (part + 1) * n // 2]
        pq.write_table(pa.Table.from_pylist(chunk), folder / "data" / f"part-{part:05d}.parquet")
    (folder / "manifest.json").write_text(json.dumps({"stage": "synthesize", "stats": {"count": n}}))
    return run


def test_hf_export_keeps_every_row_and_its_provenance(tmp_path):
    from datasets import load_from_disk

    run = fake_run(tmp_path)
    out = export_run(run, "hf", tmp_path / "hf")
    data = load_from_disk(str(out))
    assert len(data) == 12
    assert {"kind", "task", "attributes", "raw_output", "revised", "query", "positive", "negative"} <= set(
        data.column_names
    )
    assert data[0]["query"].startswith("Instruct: ") and data[3]["negative"] is None
    assert data["id"] == sorted(data["id"])  # shard order kept


def test_sentence_transformers_export_trains_with_its_trainer(tmp_path):
    pytest.importorskip("sentence_transformers")
    import torch
    from datasets import load_from_disk
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    torch.set_num_threads(1)
    run = fake_run(tmp_path)
    out = export_run(run, "sentence-transformers", tmp_path / "st")
    dd = load_from_disk(str(out))
    assert dd["triplets"].column_names == ["anchor", "positive", "negative"]
    assert dd["pairs"].column_names == ["anchor", "positive"]
    assert len(dd["triplets"]) == 9 and len(dd["pairs"]) == 3
    assert dd["triplets"][0]["anchor"].startswith("Instruct: ")

    bert = make_tiny_bert(tmp_path / "bert", WORDS)
    transformer = Transformer(str(bert), max_seq_length=32)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension())], device="cpu"
    )
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "train"),
        per_device_train_batch_size=3,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dd, loss=MultipleNegativesRankingLoss(model, scale=50.0)
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_flagembedding_export_reads_as_its_loader_does(tmp_path):
    from datasets import load_dataset

    run = fake_run(tmp_path)
    path = export_run(run, "flagembedding", tmp_path / "fe")
    assert path.name == "train.jsonl"
    # FlagEmbedding's AbsEmbedderTrainDataset: load_dataset('json', data_files=..., split='train')
    data = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(data.column_names) == {"query", "pos", "neg", "prompt"}
    for i, row in enumerate(data):
        assert isinstance(row["pos"], list) and isinstance(row["neg"], list)
        # FlagEmbedding divides by len(neg) when it samples a group; it must not be empty
        assert len(row["neg"]) >= 1 and row["neg"][0] != row["pos"][0]
        assert not row["query"].startswith("Instruct:") and row["prompt"].startswith("Find documents")
        if i % 4 == 3:  # no hard negative: another example's positive
            assert row["neg"][0].startswith("the positive document")
    # FlagEmbedding's own query formatting gives back E5's query
    fmt = "Instruct: {}\nQuery: {}"
    assert fmt.format(data[0]["prompt"], data[0]["query"]) == (
        "Instruct: Find documents for task 0.\nQuery: the query 0"
    )


def test_export_errors_name_the_fix(tmp_path):
    run = fake_run(tmp_path)
    with pytest.raises(ExportError, match="Did you mean 'flagembedding'"):
        export_run(run, "flagembedings", tmp_path / "x")
    export_run(run, "flagembedding", tmp_path / "fe.jsonl")
    with pytest.raises(ExportError, match=r"already exists.*overwrite"):
        export_run(run, "flagembedding", tmp_path / "fe.jsonl")
    assert export_run(run, "flagembedding", tmp_path / "fe.jsonl", overwrite=True).exists()
    (tmp_path / "hf").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_run(run, "hf", tmp_path / "hf")
    with pytest.raises(ExportError, match="--until synthesize"):
        export_run(tmp_path / "empty", "hf", tmp_path / "y")
