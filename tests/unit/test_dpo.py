"""LoRA DPO (senior) on a tiny random Llama built in the test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from speed.config import DPOConfig
from speed.training.common import TrainingInputError
from speed.training.dpo import preference_loss, to_conversational, train_dpo
from tiny import tiny_llama

torch = pytest.importorskip("torch")

PAIRS = [
    {
        "prompt": f"Write one classification example {i} as JSON.",
        "chosen": f'{{"input_text": "text {i}", "label": "a", "misleading_label": "b"}}',
        "rejected": "Sure! Here is an example: label a",
    }
    for i in range(6)
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dpo")
    base = tiny_llama(root / "junior")
    cfg = DPOConfig(max_steps=4, batch_size=2, per_device_batch_size=2, learning_rate=5e-3)
    return base, train_dpo(base, PAIRS, cfg, root / "out", seed=0, threads=1)


def test_dpo_changes_weights_and_keeps_loss_finite(trained) -> None:
    from safetensors.torch import load_file

    base, result = trained
    assert result.steps == 4
    assert all(math.isfinite(v) for v in result.losses)
    # at step 1 the policy is the reference (adapter B = 0): the loss is log 2
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-3)
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(result.merged_dir / "model.safetensors"))
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)
    assert "rewards/margins" in result.metrics
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_trained_policy_prefers_chosen(trained) -> None:
    base, result = trained
    score = preference_loss(result.merged_dir, base, PAIRS, beta=0.1, threads=1)
    assert score.pairs == len(PAIRS)
    assert score.loss < math.log(2)
    assert score.accuracy > 0.5
    same = preference_loss(base, base, PAIRS[:2], beta=0.1, threads=1)
    assert same.loss == pytest.approx(math.log(2))
    assert same.margin == pytest.approx(0.0, abs=1e-4)


def test_rows_are_conversational() -> None:
    row = to_conversational(PAIRS[:1])[0]
    assert row["prompt"] == [{"role": "user", "content": PAIRS[0]["prompt"]}]
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"


def test_pair_without_preference_is_refused(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    with pytest.raises(TrainingInputError, match="row 0 has chosen == rejected"):
        train_dpo(tmp_path / "none", rows, DPOConfig(), tmp_path / "out", seed=0)


def test_missing_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrainingInputError, match="'rejected'"):
        train_dpo(tmp_path / "none", [{"prompt": "p", "chosen": "c"}], DPOConfig(), tmp_path / "out", seed=0)
