"""End to end: `speed run configs/quickstart.yaml` (smaller counts) on real packaged models.

The real parts all run: a llama.cpp server on 127.0.0.1 as the teacher (Qwen2.5-Coder-0.5B), SmolLM2-135M
fine-tuned into the junior (SFT), the senior (DPO) and the revisor (SFT), synthesis, MiniLM trained
contrastively and evaluated with MTEB's own STSBenchmark task from ../shared/eval. The pipeline runs
once per module (about 10-15 minutes on 2 cores); the tests read what it left.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from speed.io import read_json, read_jsonl, read_rows
from speed.ledger import Ledger

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ALIGNMENT = ["brainstorm", "seed", "junior", "candidates", "judge", "senior", "revisions", "revisor"]
STAGES = [*ALIGNMENT, "synthesize", "labels", "embed", "evaluate"]
SMALLER = [
    "brainstorm.kinds=[sts, matching_short]",
    "brainstorm.calls_per_kind=2",
    "seed.num_examples=12",
    "seed.kind_mix={sts: 1, matching_short: 1}",
    "junior.max_steps=8",
    "candidates.num_prompts=6",
    "senior.max_steps=4",
    "revisions.num_prompts=3",
    "revisor.max_steps=2",
    "synthesize.num_examples=16",
    "synthesize.shard_size=8",
    "synthesize.kind_mix={sts: 1, matching_short: 1}",
    "embed.max_steps=6",
    "embed.batch_size=4",
    "evaluate.tasks=[STSBenchmark]",
]


def speed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speed.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=3600
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from speed.models import PACKAGED, is_installed

    for name in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"):
        if not is_installed(name):
            pytest.fail(f"packaged model {name} is not installed: {PACKAGED[name].install_command}")
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    overrides = [x for o in [*SMALLER, f"run.dir={run_dir}"] for x in ("-o", o)]
    proc = speed("run", "configs/quickstart.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_every_stage_finished_with_its_manifest(run: Path) -> None:
    for stage in STAGES:
        manifest = read_json(run / stage / "manifest.json")
        assert manifest["stage"] == stage
    assert not (run / ".work").exists() or not any((run / ".work").iterdir())


def test_teacher_calls_are_counted_where_they_were_made(run: Path) -> None:
    manifests = {s: read_json(run / s / "manifest.json") for s in STAGES}
    assert manifests["brainstorm"]["calls"]["teacher"]["calls"] == 2  # matching_short; sts is fixed
    for stage in ("seed", "judge", "revisions"):
        assert manifests[stage]["calls"]["teacher"]["calls"] > 0, stage
    for stage in ("junior", "candidates", "senior", "revisor", "synthesize", "embed", "evaluate"):
        assert "teacher" not in manifests[stage]["calls"], stage
    cost = json.loads(speed("cost", str(run), "--json").stdout)
    assert cost["teacher_total"]["calls"] == sum(
        m["calls"].get("teacher", {}).get("calls", 0) for m in manifests.values()
    )


def test_trainers_wrote_adapters_and_merged_models(run: Path) -> None:
    for stage in ("junior", "senior", "revisor"):
        assert (run / stage / "adapter" / "adapter_config.json").is_file(), stage
        assert (run / stage / "merged" / "model.safetensors").is_file(), stage
        stats = read_json(run / stage / "manifest.json")["stats"]
        assert stats["steps"] > 0 and math.isfinite(stats["loss_last"]), stage


def test_senior_prefers_what_the_judge_chose(run: Path) -> None:
    from speed.training.dpo import preference_loss

    pairs = read_jsonl(run / "judge" / "data.jsonl")
    assert pairs, "the judge kept no pair"
    losses = read_json(run / "senior" / "train_result.json")["losses"]
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)  # the senior starts as the junior
    score = preference_loss(run / "senior" / "merged", run / "junior" / "merged", pairs, beta=0.1, threads=1)
    assert score.loss < math.log(2), score  # the DPO loss on its pairs fell
    assert score.margin > 0, score


def test_synthesis_wrote_training_rows_with_provenance(run: Path) -> None:
    rows = read_rows(run / "synthesize")
    assert rows, "synthesis kept no example"
    for row in rows:
        assert row["query"].startswith("Instruct: ") and row["positive"]
        assert row["kind"] in ("sts", "matching_short") and row["raw_output"]
    stats = read_json(run / "synthesize" / "manifest.json")["stats"]
    assert sum(stats["drops"].values()) + len({r["id"] for r in rows}) <= 16


def test_embedder_trained_and_was_evaluated_beside_its_base(run: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from speed.models import resolve_hf

    stats = read_json(run / "embed" / "manifest.json")["stats"]
    assert stats["steps"] > 0 and math.isfinite(stats["last_loss"])
    trained = load_file(run / "embed" / "model" / "model.safetensors")
    base = load_file(Path(resolve_hf("sentence-transformers/all-MiniLM-L6-v2")) / "model.safetensors")
    changed = [k for k in trained if k in base and not torch.equal(trained[k], base[k])]
    assert changed, "embedding weights did not change"

    results = read_json(run / "evaluate" / "results.json")
    assert 0.0 < results["tasks"]["STSBenchmark"]["main_score"] <= 1.0
    assert results["baseline"]["tasks"]["STSBenchmark"]["main_score"] == pytest.approx(0.8203, abs=5e-4)


def test_report_and_summary(run: Path) -> None:
    summary = read_json(run / "summary.json")
    html = (run / "report.html").read_text(encoding="utf-8")
    assert summary["complete"] is True
    ledger = Ledger(run / "ledger.sqlite")
    assert summary["costs"]["teacher_total"]["calls"] == ledger.totals(role="teacher").calls
    assert "STSBenchmark" in html and "synthesize" in html


def test_status_show_and_a_rerun_that_sends_nothing(run: Path) -> None:
    status = speed("status", str(run))
    assert status.returncode == 0
    assert all(f"{s} " in status.stdout for s in STAGES)
    assert "pending" not in status.stdout and "stale" not in status.stdout
    show = speed("show", str(run), "synthesize", "-n", "1")
    assert show.returncode == 0 and '"query"' in show.stdout

    rows_before = len(Ledger(run / "ledger.sqlite").rows(limit=1_000_000))
    overrides = [x for o in [*SMALLER, f"run.dir={run}"] for x in ("-o", o)]
    again = speed("run", "configs/quickstart.yaml", *overrides)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("skipped") == len(STAGES)
    assert len(Ledger(run / "ledger.sqlite").rows(limit=1_000_000)) == rows_before
