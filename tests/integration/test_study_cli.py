"""End to end: `speed study configs/study.yaml` with the tiny overrides, on the real packaged models.

The real parts run: the llama.cpp teacher (Qwen2.5-Coder-0.5B) brainstorms and writes the
teacher-only data, SmolLM2-135M-Instruct (the generators' base model) writes the untuned data from
the same prompts, MiniLM is trained on each set and scored with MTEB's own STSBenchmark, the ledger
is the run's SQLite file. A second invocation must resume: nothing sent, nothing retrained.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from speed.io import read_json, read_rows
from speed.ledger import Ledger

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _tiny() -> list[str]:
    lines = (ROOT / "configs" / "study-tiny.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def speed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speed.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=1200
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    from speed.models import PACKAGED, is_installed

    for name in (
        "qwen2.5-coder-0.5b-instruct",
        "smollm2-135m-instruct",
        "sentence-transformers/all-MiniLM-L6-v2",
    ):
        if not is_installed(name):
            pytest.fail(f"packaged model {name} is not installed: {PACKAGED[name].install_command}")
    run_dir = tmp_path_factory.mktemp("study") / "run"
    overrides = [*_tiny(), f"run.dir={run_dir}", "study.keep_models=true"]
    proc = speed("study", "configs/study.yaml", *[x for o in overrides for x in ("-o", o)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


def test_equal_sets_from_shared_prompts_and_real_scores(
    study: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run, proc = study
    table = read_json(run / "study" / "table.json")
    assert set(table["sources"]) == {"teacher", "untuned"}
    sizes = {s: f["examples"] for s, f in table["sources"].items()}
    assert len(set(sizes.values())) == 1 and 0 < sizes["teacher"] <= 8
    # the sets share every prompt that both sources kept, as far as the common size allows
    kept = [{r["id"] for r in read_rows(run / "study" / s / "data")} for s in ("teacher", "untuned")]
    both = len(kept[0] & kept[1])
    assert table["conditions"]["prompts_shared_by_all_sources"] == min(both, sizes["teacher"])
    # the two sources planned the very same prompts: only the writer differs
    shard = "00000.jsonl"
    prompts = {
        s: [r["prompt"] for r in map(json.loads, (run / "study" / s / "shards" / shard).open())]
        for s in ("teacher", "untuned")
    }
    assert prompts["teacher"] == prompts["untuned"]
    block = table["embedders"]["minilm"]
    for source, entry in block["scores"].items():
        score = entry["tasks"]["STSBenchmark"]["mean"]
        assert 0.3 < score < 1.0, (source, score)
        training = entry["training"]["0"]
        assert training["steps"] > 0 and math.isfinite(training["last_loss"]), source
    assert 0.8 < block["untrained"]["average"] < 0.84  # MiniLM's published STSBenchmark score, 0.8203
    assert "| teacher |" in proc.stdout and "| untuned |" in proc.stdout


def test_training_changed_the_weights(study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    from safetensors.torch import load_file

    from speed.models import resolve_hf

    run, _ = study
    base = load_file(str(Path(resolve_hf("sentence-transformers/all-MiniLM-L6-v2")) / "model.safetensors"))
    trained = load_file(str(run / "study" / "models" / "minilm" / "teacher" / "seed0" / "model.safetensors"))
    name = next(k for k in trained if k.endswith("query.weight"))
    assert (trained[name] - base[name]).abs().max().item() > 0


def test_teacher_calls_are_ledgered_per_source(study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, _ = study
    teacher = read_json(run / "study" / "teacher" / "manifest.json")
    untuned = read_json(run / "study" / "untuned" / "manifest.json")
    generated = teacher["stats"]["generated"]
    assert teacher["calls"]["teacher"]["calls"] == generated > 0
    assert "teacher" not in untuned["calls"] and untuned["calls"]["junior"]["calls"] == generated
    sources = read_json(run / "study" / "table.json")["sources"]
    assert sources["teacher"]["teacher_calls"]["generation"] == generated
    assert sources["untuned"]["teacher_calls"]["total"] == 0
    ledger = Ledger(run / "ledger.sqlite", create=False)
    try:
        assert ledger.totals(stage="study/teacher", role="teacher").calls == generated
    finally:
        ledger.close()


def test_a_second_invocation_resumes(study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, _ = study
    before = read_json(run / "study" / "table.json")
    ledger = Ledger(run / "ledger.sqlite", create=False)
    calls_before = ledger.totals().calls
    ledger.close()
    overrides = [*_tiny(), f"run.dir={run}", "study.keep_models=true"]
    proc = speed("study", "configs/study.yaml", *[x for o in overrides for x in ("-o", o)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"stage study/teacher +done \(key \w+\), skipped", proc.stderr)
    assert len(re.findall(r"study \d/2: minilm on \w+, seed 0: scored before", proc.stderr)) == 2
    assert not re.search(r"study \d/2: .*: training", proc.stderr)
    ledger = Ledger(run / "ledger.sqlite", create=False)
    assert ledger.totals().calls == calls_before  # nothing sent again
    ledger.close()
    after = read_json(run / "study" / "table.json")
    assert after["embedders"] == before["embedders"] and after["sources"] == before["sources"]
