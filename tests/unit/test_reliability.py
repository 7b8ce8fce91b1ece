"""Reliability: one writer per run folder, preflight, damaged state, and errors in words.

Every test drives the real CLI in a subprocess on the toy plugin stages (tests/plugins/toy_stages.py,
no model) over a real run folder, real SQLite ledger and real files that the test damages, and
asserts on exit codes, on messages naming the file or field, and on what was (not) written.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import SoftFileLock

from speed.config import load_config
from speed.preflight import check_eval, check_model
from speed.runlock import HOLDER_NAME, LOCK_NAME, RunLock, RunLockedError

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
SRC = Path(__file__).resolve().parents[2] / "src"


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(PLUGINS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def speed(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speed.cli", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
        **kw,
    )


def write_config(
    tmp_path: Path, run: str | Path, count: int = 6, delay: float = 0.0, extra: str = ""
) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"""
run: {{dir: {tmp_path / run}, seed: 7}}
pipeline: {{stages: [numbers, total], plugins: [toy_stages]}}
extra: {{numbers: {{count: {count}, delay: {delay}}}}}
{extra}
"""
    )
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: what 'nothing was written' compares."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def start_slow_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A `speed run` that holds its run folder for a while: started, and seen to make progress."""
    cfg = write_config(tmp_path, "r", count=400, delay=0.05)
    proc = subprocess.Popen(
        [sys.executable, "-m", "speed.cli", "run", str(cfg)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = tmp_path / "r" / ".work" / "numbers" / "progress.txt"
    deadline = time.time() + 120
    while not (progress.exists() and len(progress.read_text().split()) >= 3):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the slow run never made progress")
        time.sleep(0.05)
    return proc, cfg


# --------------------------------------------------------------------------------------------
# one writer per run folder


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    holder, cfg = start_slow_run(tmp_path)
    try:
        second = speed("run", str(cfg))
        assert second.returncode == 2
        assert second.stderr.startswith("speed: error: run folder")
        assert f"pid {holder.pid} on {os.uname().nodename}" in second.stderr
        assert "speed run" in second.stderr and "Traceback" not in second.stderr
        # `stage` is a writer too
        assert speed("stage", str(cfg), "numbers").returncode == 2
        # readers keep working during the run
        status = speed("status", str(tmp_path / "r"))
        assert status.returncode == 0 and "numbers" in status.stdout
        recorded = json.loads((tmp_path / "r" / HOLDER_NAME).read_text())
        assert recorded["pid"] == holder.pid and recorded["command"].startswith("speed run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder left its record behind; its lock went with it
    assert json.loads((tmp_path / "r" / HOLDER_NAME).read_text())["pid"] == holder.pid
    again = speed("run", str(write_config(tmp_path, "r", count=400, delay=0.0)))
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "r" / HOLDER_NAME).exists(), "the holder's record goes with its lock"


def test_a_stale_lock_file_of_a_dead_process_is_taken_over_a_live_ones_is_not(tmp_path):
    # where the filesystem has no OS locks, filelock keeps a lock *file*, which a killed holder leaves
    run = tmp_path / "r"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text("")
    holder = {"pid": dead.pid, "host": os.uname().nodename, "started": "then", "command": "speed run x"}
    (run / HOLDER_NAME).write_text(json.dumps(holder))
    with RunLock(run, command="speed run y", lock_class=SoftFileLock) as lock:
        assert lock.holder is not None and lock.holder.pid == os.getpid()
        assert json.loads((run / HOLDER_NAME).read_text())["command"] == "speed run y"

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text("")
        (run / HOLDER_NAME).write_text(json.dumps({**holder, "pid": live.pid}))
        with pytest.raises(RunLockedError, match=f"pid {live.pid}"), RunLock(run, lock_class=SoftFileLock):
            pass
    finally:
        live.kill()
        live.wait()


def test_two_locks_on_one_folder_in_one_process_exclude_each_other(tmp_path):
    with (
        RunLock(tmp_path / "r", command="first"),
        pytest.raises(RunLockedError, match="`first`"),
        RunLock(tmp_path / "r"),
    ):
        pass
    with RunLock(tmp_path / "r", command="after"):
        pass


# --------------------------------------------------------------------------------------------
# a rejected command never touches the run folder


def test_a_rejected_command_leaves_an_existing_run_untouched(tmp_path):
    cfg = write_config(tmp_path, "r")
    assert speed("run", str(cfg)).returncode == 0
    before = snapshot(tmp_path / "r")
    # a changed config that is then rejected must not become the run's config.yaml
    for args in (
        ["--until", "sed"],
        ["-o", "extra.numbers.count=9", "--until", "sed"],
        ["-o", "pipeline.stages=[]"],
        ["-o", "seed.num_examples=true"],
    ):
        proc = speed("run", str(cfg), *args)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("speed: error:") and "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "r") == before
    status = speed("status", str(tmp_path / "r"))
    assert "stale" not in status.stdout and status.stdout.count("done") == 2


def test_a_rejected_command_on_a_new_folder_does_not_create_it(tmp_path):
    cfg = write_config(tmp_path, "new/run")
    for args in (["--until", "sed"], ["-o", "pipeline.stages=[]"], ["--only", "total"]):
        proc = speed("run", str(cfg), *args)
        assert proc.returncode == 2, args
        assert not (tmp_path / "new").exists(), args


def test_an_empty_pipeline_is_refused(tmp_path):
    proc = speed("run", str(write_config(tmp_path, "r")), "-o", "pipeline.stages=[]")
    assert proc.returncode == 2 and "pipeline.stages is empty" in proc.stderr


# --------------------------------------------------------------------------------------------
# preflight: what the config names is checked before the first call, on resume too


def test_an_unknown_teacher_model_is_refused_before_any_stage_names_the_key(tmp_path):
    extra = "models: {teacher: {backend: llamacpp_server, model: qwen2.5-coder-0.5b}}"
    cfg = write_config(tmp_path, "r", extra=extra)
    proc = speed("run", str(cfg), "-o", "pipeline.stages=[brainstorm]")
    assert proc.returncode == 2
    assert (
        "models.teacher.model" in proc.stderr
        and "Did you mean the packaged model 'qwen2.5-coder-0.5b-instruct'" in proc.stderr
    )
    assert not (tmp_path / "r").exists()
    # a resumed run is checked the same: the finished toy run is not touched either
    assert speed("run", str(cfg)).returncode == 0
    before = snapshot(tmp_path / "r")
    proc = speed("run", str(cfg), "-o", "pipeline.stages=[brainstorm]")
    assert proc.returncode == 2 and "models.teacher.model" in proc.stderr
    assert snapshot(tmp_path / "r") == before


def test_a_hub_name_is_refused_offline_unless_cached(monkeypatch):
    cfg = load_config(None, ["models.junior.backend=hf", "models.junior.model=someorg/not-a-cached-model"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check = check_model("junior", cfg.models.junior)
    assert check is not None and not check.ok and "HF_HUB_OFFLINE" in check.detail
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check = check_model("junior", cfg.models.junior)
    assert check is not None and check.ok


def test_missing_evaluation_data_and_unknown_tasks_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_EVAL_DIR", str(tmp_path / "nowhere"))
    (fail,) = check_eval(load_config())
    assert not fail.ok and "SPEED_EVAL_DIR" in fail.detail
    monkeypatch.setenv("SPEED_EVAL_DIR", str(tmp_path))
    checks = check_eval(load_config(None, ["evaluate.tasks=[STSBenchmrk]"]))
    assert any(c.name == "evaluate.tasks" and not c.ok and "STSBenchmark" in c.detail for c in checks)
    checks = check_eval(load_config(None, ["evaluate.tasks=[STSBenchmark]"]))
    assert any(c.name == "eval task STSBenchmark" and not c.ok for c in checks)


# --------------------------------------------------------------------------------------------
# damaged state


def finished_run(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    cfg = write_config(tmp_path, "r")
    assert speed("run", str(cfg)).returncode == 0
    run = tmp_path / "r"
    return cfg, run, {s: (run / s / "data.jsonl").read_bytes() for s in ("numbers", "total")}


def test_a_cut_data_file_is_seen_as_damaged_and_redone_from_the_ledger(tmp_path):
    cfg, run, data = finished_run(tmp_path)
    lines = data["numbers"].splitlines(keepends=True)
    (run / "numbers" / "data.jsonl").write_bytes(b"".join(lines[:3]))
    status = speed("status", str(run))
    assert "damaged" in status.stdout and str(run / "numbers" / "data.jsonl") in status.stdout
    assert "3 rows" in status.stdout and f"{len(lines)} rows" in status.stdout
    again = speed("run", str(cfg))
    assert again.returncode == 0, again.stderr
    assert (run / "numbers" / "data.jsonl").read_bytes() == data["numbers"]
    stats = json.loads((run / "numbers" / "manifest.json").read_text())["stats"]
    assert stats["sent"] == 0 and stats["replayed"] == len(lines), "redoing must not pay again"


def test_a_garbage_manifest_is_named_and_its_stage_redone(tmp_path):
    cfg, run, data = finished_run(tmp_path)
    (run / "total" / "manifest.json").write_text("{not json")
    status = speed("status", str(run))
    assert status.returncode == 0
    assert f"'{run / 'total' / 'manifest.json'}' is damaged" in status.stdout
    assert speed("run", str(cfg)).returncode == 0
    assert json.loads((run / "total" / "manifest.json").read_text())["stage"] == "total"
    assert (run / "total" / "data.jsonl").read_bytes() == data["total"]


def test_a_truncated_ledger_is_refused_naming_the_file(tmp_path):
    cfg, run, _ = finished_run(tmp_path)
    # a ledger with enough rows to span many pages, then cut in half
    ledger = run / "ledger.sqlite"
    conn = sqlite3.connect(ledger)
    conn.executemany(
        "INSERT INTO calls (key, stage, role, model, request, created_at, updated_at) VALUES (?,?,?,?,?,0,0)",
        [(f"k{i}", "numbers", "teacher", "m", "x" * 500) for i in range(400)],
    )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    blob = ledger.read_bytes()
    ledger.write_bytes(blob[: len(blob) // 2])
    before = snapshot(run)
    proc = speed("run", str(cfg), "-o", "extra.numbers.count=7")
    assert proc.returncode == 2
    assert f"'{ledger}' is damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run) == before
    verbose = speed("run", str(cfg), "-o", "extra.numbers.count=7", "-v")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_an_empty_ledger_is_never_taken_for_a_new_one(tmp_path):
    cfg, run, _ = finished_run(tmp_path)
    (run / "ledger.sqlite").write_bytes(b"")
    for name in ("ledger.sqlite-wal", "ledger.sqlite-shm"):
        (run / name).unlink(missing_ok=True)
    proc = speed("run", str(cfg), "-o", "extra.numbers.count=7")
    assert proc.returncode == 2
    assert "is empty" in proc.stderr and "record 6 calls" in proc.stderr
    assert (run / "ledger.sqlite").stat().st_size == 0, "the refused run must not initialise it"
    assert speed("status", str(run)).returncode == 0
    assert (run / "ledger.sqlite").stat().st_size == 0, "a reader must not initialise it"
    cost = speed("cost", str(run))
    assert cost.returncode == 2 and "holds no call table" in cost.stderr
    # deleting it is the knowing way to start a new ledger
    (run / "ledger.sqlite").unlink()
    assert speed("run", str(cfg), "-o", "extra.numbers.count=7").returncode == 0


# --------------------------------------------------------------------------------------------
# errors in words


def test_a_run_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "r").write_text("not a folder")
    proc = speed("run", str(write_config(tmp_path, "r")))
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "run.dir" in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions cannot be tested")
def test_an_unwritable_run_folder_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r").chmod(0o500)
    try:
        proc = speed("run", str(write_config(tmp_path, "r")))
    finally:
        (tmp_path / "r").chmod(0o700)
    assert proc.returncode == 2 and "not writable" in proc.stderr and "chmod" in proc.stderr


def test_a_file_size_limit_is_an_error_in_words(tmp_path):
    cfg = write_config(tmp_path, "r", count=200)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = subprocess.run(
        [sys.executable, "-m", "speed.cli", "run", str(cfg)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr
    assert "speed: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "file-size limit" in proc.stderr
    assert str(tmp_path / "r") in proc.stderr, "the message names the file"


def test_config_errors_are_words_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  dir: x\n seed: [1\n")
    proc = speed("run", str(bad))
    assert proc.returncode == 2 and "bad.yaml' is not valid YAML at line 3, column 2" in proc.stderr
    proc = speed("run", str(tmp_path))
    assert proc.returncode == 2 and "is a folder" in proc.stderr
    proc = speed("run", str(write_config(tmp_path, "r")), "-o", "run.dir=''")
    assert proc.returncode == 2 and "run.dir is empty" in proc.stderr


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = speed("report", str(tmp_path))
    assert proc.returncode == 2 and "is not a run directory" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
