"""Synthesis killed with SIGKILL resumes: only unfinished shards run again, the data equals an
uninterrupted run's, and the ledger replays the calls that finished before the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth_helpers import prepare_upstream, write_config

N, SHARD = 96, 6  # 16 shards


def speed_cmd(config: Path, up: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([up["plugins"], os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, "-m", "speed.cli", "run", str(config)], env


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return prepare_upstream(tmp_path_factory.mktemp("synth-resume"))


def test_sigkill_then_resume_redoes_only_unfinished_shards(tmp_path, upstream):
    from speed.io import read_rows

    cmd, env = speed_cmd(write_config(tmp_path, "ref", upstream, n=N, shard_size=SHARD), upstream)
    ref = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    config = write_config(tmp_path, "killed", upstream, n=N, shard_size=SHARD)
    cmd, env = speed_cmd(config, upstream)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / ".work" / "synthesize" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(list(shards.glob("*.done"))) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("synthesis never finished a shard")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = sorted(p.stem for p in shards.glob("*.done"))
    assert 3 <= len(done_at_kill) < N // SHARD, "the kill must land mid-stage"
    assert not (tmp_path / "killed" / "synthesize").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    folder = tmp_path / "killed" / "synthesize"
    stats = json.loads((folder / "manifest.json").read_text())["stats"]

    # only the shards without a marker ran again, and every shard was processed exactly once
    assert stats["shards"] == {"total": 16, "run": 16 - len(done_at_kill), "resumed": len(done_at_kill)}
    log = (folder / "shards" / "processed.log").read_text().split()
    assert sorted(log) == [f"{i:05d}" for i in range(16)]
    assert log[: len(done_at_kill)] == done_at_kill

    # calls of finished shards were not asked again; the rest were sent or replayed from the ledger
    calls = stats["calls_this_run"]
    assert calls["senior_sent"] + calls["senior_replayed"] == N - SHARD * len(done_at_kill)

    # the data equals the uninterrupted run's, row for row
    ref_rows = read_rows(tmp_path / "ref" / "synthesize")
    assert read_rows(folder) == ref_rows and ref_rows
    ref_stats = json.loads((tmp_path / "ref" / "synthesize" / "manifest.json").read_text())["stats"]
    for key in ("count", "rows", "drops", "per_kind", "revisions"):
        assert stats[key] == ref_stats[key]
