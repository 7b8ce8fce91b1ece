"""False-negative control in contrastive training: the margin mask on in-batch negatives (checked on
a tiny bag-of-words model built here, whose scores are known), and GISTEmbedLoss and the margin mask
through the trainer (a tiny BERT built here)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from speed.config import ConfigError, EmbedConfig, load_config
from speed.training.contrastive import train_embedder
from speed.training.margin_masked_loss import MarginMaskedMultipleNegativesRankingLoss
from tiny import WORDS, bow_model, make_tiny_bert


def features(model: Any, columns: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    return [model.preprocess(texts) for texts in columns]


def losses(model: Any, columns: list[list[str]], margin: float = 0.0) -> tuple[float, float, int]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    plain = MultipleNegativesRankingLoss(model, scale=20.0)
    masked = MarginMaskedMultipleNegativesRankingLoss(model, scale=20.0, margin=margin)
    with torch.no_grad():
        a = float(plain(features(model, columns), None))
        b = float(masked(features(model, columns), None))
    return a, b, masked.masked


def test_a_duplicate_positive_in_the_batch_is_masked_and_the_loss_differs() -> None:
    model = bow_model()
    anchors = ["cat mat", "ship sea", "cat tree"]
    positives = ["cat mat tree", "ship sea river", "cat mat tree"]  # rows 0 and 2 share their positive
    plain, masked, count = losses(model, [anchors, positives])
    # row 0 masks row 2's copy of its positive, and row 2 row 0's: nothing else scores that high
    assert count == 2
    assert masked < plain  # the duplicate no longer counts as a negative that matches the positive
    # by hand: each row of 0 and 2 keeps its positive (0.816) and "ship sea river" (0) in the softmax
    expected_row = -(20 * 0.8165) + math.log(math.exp(20 * 0.8165) + math.exp(0.0))
    row1 = -(20 * 0.8165) + math.log(math.exp(20 * 0.8165) + 2 * math.exp(0.0))
    assert masked == pytest.approx((2 * expected_row + row1) / 3, abs=1e-3)


def test_without_false_negatives_the_mask_changes_nothing() -> None:
    model = bow_model()
    # "ship sea cat" shares a word with row 0's query (0.41), well below its positive (0.82)
    plain, masked, count = losses(model, [["cat mat", "ship sea"], ["cat mat tree", "ship sea cat"]])
    assert count == 0 and plain > 1e-4 and masked == pytest.approx(plain, abs=1e-6)


def test_the_margin_widens_the_mask_and_the_own_hard_negative_is_never_masked() -> None:
    model = bow_model()
    columns = [["cat mat", "sun moon"], ["cat mat tree", "sun moon star"], ["cat mat", "sun moon"]]
    # each row's own negative scores 1.0, above its positive (0.816): still not masked
    _, _, count = losses(model, columns, margin=0.0)
    assert count == 0
    # row 1's positive "sun cat" scores 0.5 against "cat mat" (positive 0.82): masked at margin 0.5, not 0.1
    close = [["cat mat", "sun moon"], ["cat mat tree", "sun cat"], ["dog", "dog"]]
    assert losses(model, close, margin=0.1)[2] == 0
    assert losses(model, close, margin=0.5)[2] >= 1


def test_the_mask_lets_gradients_through() -> None:
    model = bow_model()
    loss = MarginMaskedMultipleNegativesRankingLoss(model, scale=20.0)
    value = loss(
        features(
            model, [["cat mat", "ship sea", "cat tree"], ["cat mat tree", "ship sea river", "cat mat tree"]]
        ),
        None,
    )
    value.backward()
    grad = next(model.parameters()).grad
    assert torch.isfinite(value) and grad is not None and grad.abs().sum() > 0


def test_margin_mask_has_no_gradcache_form() -> None:
    with pytest.raises(ConfigError, match="no GradCache form"):
        load_config(None, ["embed.false_negatives=margin", "embed.mini_batch_size=4"])


# --------------------------------------------------------------------------------------------
# through the trainer


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


def rows() -> list[dict[str, str]]:
    # the same positive under several queries: the false negatives the options are for
    return [
        {"query": f"where is the {a}", "positive": f"the {a} sat on the {b}", "instruction": "find"}
        for a in ("cat", "dog", "bird", "fish")
        for b in ("mat", "tree")
    ] + [{"query": f"what about the {a}", "positive": f"the {a} sat on the mat"} for a in ("cat", "dog")]


@pytest.mark.parametrize(
    ("option", "loss_name"),
    [("gist", "GISTEmbedLoss"), ("margin", "MarginMaskedMultipleNegativesRankingLoss")],
)
def test_the_trainer_uses_the_chosen_false_negative_control(
    tiny_bert: Path, tmp_path: Path, option: str, loss_name: str
) -> None:
    torch.set_num_threads(1)
    cfg = EmbedConfig(
        batch_size=5,
        max_steps=3,
        warmup_steps=0,
        learning_rate=1e-3,
        false_negatives=option,
        false_negative_margin=0.1,
    )
    result = train_embedder(rows(), tiny_bert, tmp_path / "model", cfg, logging_steps=1)
    assert result.extra["loss"] == loss_name
    assert all(math.isfinite(h["loss"]) for h in result.loss_history) and result.steps == 3
    if option == "margin":
        assert result.extra["in_batch_negatives_seen"] > 0
        assert 0 <= result.extra["false_negatives_masked"] <= result.extra["in_batch_negatives_seen"]
    stats = json.loads((tmp_path / "model" / "training_stats.json").read_text())
    assert stats["config"]["false_negatives"] == option
