"""A real run SIGKILLed 3 times over its stages and resumed: bench/chaos.py at its smallest.

The figures the bench prints are asserted here: the resumed run's stage files equal an
uninterrupted run's byte for byte, no teacher answer that the server finished is missing from the
ledger beyond the one in flight at a kill, no call is sent twice beyond it either, and no server outlives its run.
Two pipelines up to the judge at tiny counts and 3 restarts: a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_three_kills_leave_the_data_of_an_uninterrupted_run(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    # up to the judge: teacher calls, LoRA training, a GGUF conversion and the junior on llama-server,
    # in a few minutes (bench/chaos.py without --until crosses every stage)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "chaos.py"),
        "--kills",
        "3",
        "--seed",
        "1",
        "--until",
        "judge",
    ]
    proc = subprocess.run(
        [*cmd, "--work", str(tmp_path / "runs"), "--json", str(out)],
        capture_output=True, text=True, timeout=5400, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["kills"] >= 1
    assert r["files_differ"] == [] and r["files"] > 0
    assert 0 <= r["teacher_finished_not_recorded"] <= r["kills_in_teacher_stages"]
    assert 0 <= r["teacher_sent_twice"] <= r["kills_in_teacher_stages"]
    assert r["orphans"] == []
