"""Contrastive trainer: row preparation, and real training steps of tiny models built here
(a 2-layer BERT with a word-level vocabulary; a 2-layer Llama with a BPE tokenizer trained here)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from speed.config import EmbedConfig
from speed.training.contrastive import EmbedDataError, prepare_rows, train_embedder
from tiny import WORDS, make_tiny_bert, make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_rows() -> list[dict]:
    rows = [
        {
            "query": f"where does the {a} sit",
            "positive": f"the {a} sat on the {b}",
            "negative": f"the {b} is {c}",
            "instruction": "find what sat",
        }
        for a in ("cat", "dog", "bird", "fish")
        for b in ("mat", "tree", "house")
        for c in ("wet", "hot")
    ]
    rows += [
        {"query": f"why is the {w} blue", "positive": f"the {w} is blue", "task": "find"} for w in WORDS[:8]
    ]
    return rows


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [" ".join(WORDS), "Instruct: find what sat\nQuery: where does the cat sit"] * 3
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), extra_text=corpus, vocab_size=300)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _weights(folder_or_model) -> dict:
    from sentence_transformers import SentenceTransformer

    model = (
        SentenceTransformer(str(folder_or_model), device="cpu")
        if isinstance(folder_or_model, str | Path)
        else folder_or_model
    )
    return {k: v.detach().clone() for k, v in model[0].auto_model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# rows


def test_prepare_rows_instructions_aliases_and_drops() -> None:
    dropped: Counter[str] = Counter()
    rows = [
        {"query": "q1", "positive": "p1", "negative": "n1", "instruction": "Find it."},
        {"anchor": "q2", "positive": "p2", "hard_negative": "n2", "task": "Find it."},
        {"query": "Instruct: X\nQuery: q3", "positive": "p3", "instruction": "Find it."},
        {"query": "q4", "positive": "p4", "negative": ""},
        {"query": "", "positive": "p"},
        {"query": "q", "positive": None},
        {"query": "q", "positive": "same", "negative": "same"},
        "not a row",
    ]
    out = prepare_rows(rows, use_instructions=True, dropped=dropped)
    assert [r["anchor"] for r in out] == [
        "Instruct: Find it.\nQuery: q1",
        "Instruct: Find it.\nQuery: q2",
        "Instruct: X\nQuery: q3",
        "q4",
    ]
    assert out[1]["negative"] == "n2" and "negative" not in out[3]
    assert dropped == Counter(no_query=1, no_positive=1, negative_equals_positive=1, not_a_mapping=1)
    bare = prepare_rows(rows[:1], use_instructions=False)
    assert bare[0]["anchor"] == "q1"


def test_no_usable_rows_is_an_error(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbedDataError, match="no usable training rows"):
        train_embedder([{"query": "", "positive": "x"}], tiny_bert, tmp_path / "m", EmbedConfig())


def test_batch_must_split_over_processes(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"embed\.batch_size=4"):
        train_embedder(make_rows(), tiny_bert, tmp_path / "m", EmbedConfig(batch_size=4))


# --------------------------------------------------------------------------------------------
# training


def test_tiny_bert_trains(tiny_bert: Path, tmp_path: Path) -> None:
    before = _weights(tiny_bert)
    cfg = EmbedConfig(batch_size=8, max_steps=6, warmup_steps=0, learning_rate=1e-3)
    result = train_embedder(make_rows(), tiny_bert, tmp_path / "model", cfg, seed=0, logging_steps=1)
    assert result.steps == 6
    assert len(result.loss_history) == 6
    assert all(math.isfinite(h["loss"]) for h in result.loss_history)
    assert result.pooling == "mean" and not result.lora
    assert result.rows == {"synthetic": 32, "total": 32}
    assert result.extra["scale"] == pytest.approx(50.0)  # 1 / temperature 0.02
    after = _weights(tmp_path / "model")
    changed = [k for k in before if not bool((before[k] == after[k]).all())]
    assert changed, "no weight changed after training"
    stats = json.loads((tmp_path / "model" / "training_stats.json").read_text())
    assert stats["steps"] == 6 and stats["config"]["temperature"] == 0.02


def test_tiny_bert_gradcache_and_labelled_mix(tiny_bert: Path, tmp_path: Path) -> None:
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        "".join(json.dumps({"query": f"what is {w}", "positive": f"{w} is red"}) + "\n" for w in WORDS[10:16])
    )
    cfg = EmbedConfig(
        batch_size=8,
        mini_batch_size=2,
        max_steps=3,
        warmup_steps=0,
        learning_rate=1e-3,
        extra_data=[str(labelled)],
    )
    result = train_embedder(make_rows(), tiny_bert, tmp_path / "model", cfg, logging_steps=1)
    assert result.extra["loss"] == "CachedMultipleNegativesRankingLoss"
    assert result.rows == {"synthetic": 32, "labelled": 6, "total": 38}
    assert all(math.isfinite(h["loss"]) for h in result.loss_history)


def test_tiny_llama_lora_last_token(tiny_llama: Path, tmp_path: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_llama).state_dict()
    cfg = EmbedConfig(batch_size=8, max_steps=4, warmup_steps=0, learning_rate=1e-2, lora_r=4)
    result = train_embedder(make_rows(), tiny_llama, tmp_path / "model", cfg, logging_steps=1)
    assert result.lora and result.pooling == "lasttoken"
    assert result.extra["decoder"] and result.extra["eos_appended"] and result.extra["lora_merged"]
    assert all(math.isfinite(h["loss"]) for h in result.loss_history)
    loaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    ids = loaded.tokenizer("the cat")["input_ids"]
    assert ids[-1] == loaded.tokenizer.eos_token_id  # EOS survives saving: last-token pooling reads it
    merged = loaded[0].auto_model.state_dict()
    assert not any("lora" in k for k in merged), "LoRA weights were not merged"
    changed = [k for k in base if k in merged and not torch.equal(base[k], merged[k])]
    assert changed, "merged weights equal the base model"
    assert loaded.encode(["the cat"]).shape == (1, 32)


def test_embedding_training_stays_fp32_on_cpu_even_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    from speed import precision
    from speed.training import contrastive

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.choose_precision("auto", "cpu") == "bf16"  # the shared policy would pick bf16
    assert contrastive.embed_precision("cpu") == "fp32"


def test_a_non_finite_loss_stops_training_with_a_clear_error(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diverged run raises the shared non-finite check's error and saves no model."""
    from sentence_transformers import SentenceTransformerTrainer

    real = SentenceTransformerTrainer.compute_loss

    def nan_loss(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    monkeypatch.setattr(SentenceTransformerTrainer, "compute_loss", nan_loss)
    cfg = EmbedConfig(batch_size=8, max_steps=2, warmup_steps=0, learning_rate=1e-3)
    with pytest.raises(RuntimeError, match=r"embed: loss is not finite at step 1 \(nan\)"):
        train_embedder(make_rows(), tiny_bert, tmp_path / "model", cfg, seed=0, logging_steps=1)
    assert not (tmp_path / "model").exists()
