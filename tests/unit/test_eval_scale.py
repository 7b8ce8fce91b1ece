"""Scale study: the log-linear fit, and a small study (tiny BERT, tiny STS folder) that writes the fit
JSON, the plot and per-size results, and resumes without retraining."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

from speed.config import EmbedConfig
from speed.scale import fit_log_linear, scale_study
from tiny import WORDS, make_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _sts_folder(root: Path) -> Path:
    rng = random.Random(1)
    rows = []
    for i in range(20):
        a = " ".join(rng.choice(WORDS) for _ in range(5))
        b = a if i % 2 else " ".join(rng.choice(WORDS) for _ in range(5))
        rows.append({"sentence1": a, "sentence2": b, "score": 5.0 if a == b else float(i % 4)})
    path = root / "sts" / "STSBenchmark" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_fit_log_linear_recovers_the_line() -> None:
    sizes = [10, 100, 1000, 10000]
    fit = fit_log_linear(sizes, [0.5 + 0.02 * math.log(n) for n in sizes])
    assert (
        fit["a"] == pytest.approx(0.5) and fit["b"] == pytest.approx(0.02) and fit["r2"] == pytest.approx(1.0)
    )
    assert math.isnan(fit_log_linear([5], [0.3])["b"])
    with pytest.raises(ValueError, match="positive"):
        fit_log_linear([0, 10], [0.1, 0.2])


def test_scale_study_writes_fit_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import speed.scale

    torch.set_num_threads(1)
    model = make_tiny_bert(tmp_path / "bert", WORDS)
    data = _sts_folder(tmp_path / "eval")
    rng = random.Random(0)
    rows = [
        {
            "query": " ".join(rng.choice(WORDS) for _ in range(4)),
            "positive": " ".join(rng.choice(WORDS) for _ in range(6)),
            "instruction": "find",
        }
        for _ in range(32)
    ]
    cfg = EmbedConfig(batch_size=8, epochs=1, warmup_steps=0, learning_rate=1e-3)
    out = tmp_path / "study"
    study = scale_study(rows, [8, 16, 32], model, ["STSBenchmark"], out, cfg, data_dir=data, batch_size=8)
    assert [p["n"] for p in study["points"]] == [8, 16, 32]
    assert [p["steps"] for p in study["points"]] == [1, 2, 4]
    assert set(study["fit"]) == {"a", "b", "r2", "n_points"} and study["fit"]["n_points"] == 3
    assert math.isfinite(study["fit"]["b"])
    saved = json.loads((out / "scale_study.json").read_text())
    assert saved["fit"] == study["fit"] and saved["task_fits"]["STSBenchmark"]["n_points"] == 3
    png = (out / "scale_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "evals" / "n16" / "results.md").is_file()
    assert not (out / "models").exists() or not any((out / "models").iterdir())  # models deleted

    # resume: every size is evaluated already, so nothing is trained again
    def no_training(*args, **kwargs):
        raise AssertionError("retrained a size that was already evaluated")

    monkeypatch.setattr(speed.scale, "train_embedder", no_training)
    again = scale_study(rows, [8, 16, 32], model, ["STSBenchmark"], out, cfg, data_dir=data, batch_size=8)
    assert again["fit"] == pytest.approx(study["fit"])


def test_scale_study_rejects_sizes_beyond_the_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"outside 1\.\.2"):
        scale_study([{"query": "a", "positive": "b"}] * 2, [1, 5], "unused", ["STSBenchmark"], tmp_path)
