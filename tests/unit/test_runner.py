"""The stage runner: keys, skip, rerun downstream, atomic manifests, SIGKILL resume, CLI views."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed.config import ConfigError, load_config
from speed.runner import Runner

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def write_config(tmp_path: Path, run: str, count: int = 12, delay: float = 0.0) -> Path:
    path = tmp_path / f"{run}.yaml"
    path.write_text(
        f"""
run: {{dir: {tmp_path / run}, seed: 7}}
pipeline: {{stages: [numbers, total], plugins: [toy_stages]}}
extra: {{numbers: {{count: {count}, delay: {delay}}}}}
"""
    )
    return path


def speed(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "speed.cli", *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


def test_finished_stages_are_skipped_and_changes_rerun_downstream(tmp_path):
    cfg = load_config(write_config(tmp_path, "r"))
    runner = Runner(cfg)
    assert [s.state for s in runner.run()] == ["done", "done"]
    first = (tmp_path / "r" / "total" / "manifest.json").read_text()
    # same config: nothing reruns
    Runner(cfg).run()
    assert (tmp_path / "r" / "total" / "manifest.json").read_text() == first
    # upstream section changed: both stages stale, both rerun
    cfg2 = load_config(write_config(tmp_path, "r", count=13))
    assert [s.state for s in Runner(cfg2).status()] == ["stale", "stale"]
    Runner(cfg2).run()
    total = json.loads((tmp_path / "r" / "total" / "data.jsonl").read_text())
    assert total["n"] == 13
    # the seed is part of every key
    cfg3 = load_config(write_config(tmp_path, "r", count=13), ["run.seed=8"])
    assert [s.state for s in Runner(cfg3).status()] == ["stale", "stale"]


def test_only_and_until(tmp_path):
    cfg = load_config(write_config(tmp_path, "r"))
    Runner(cfg).run(until="numbers")
    assert [s.state for s in Runner(cfg).status()] == ["done", "pending"]
    Runner(cfg).run(only="total")
    assert [s.state for s in Runner(cfg).status()] == ["done", "done"]
    with pytest.raises(ConfigError, match="Did you mean 'total'"):
        Runner(cfg).run(only="totl")


def test_only_refuses_a_stage_whose_input_is_missing(tmp_path):
    proc = speed("run", str(write_config(tmp_path, "r")), "--only", "total")
    assert proc.returncode != 0
    assert "needs 'numbers'" in proc.stderr and "--until total" in proc.stderr


def test_unknown_stage_in_pipeline(tmp_path):
    cfg = load_config(write_config(tmp_path, "r"), ["pipeline.stages=[numbers, totl]"])
    with pytest.raises(ConfigError, match="Did you mean 'total'"):
        Runner(cfg)


def test_sigkill_mid_stage_then_rerun_resumes_the_work_folder(tmp_path):
    """Killed halfway, the same command resumes the stage from its work folder (same key): the
    rows it finished are not asked again, not even replayed, and the data equals an uninterrupted
    run's."""
    ref = speed("run", str(write_config(tmp_path, "ref", count=30)))
    assert ref.returncode == 0, ref.stderr

    cfg = write_config(tmp_path, "killed", count=30)
    env = {
        **os.environ,
        "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "SPEED_TOY_DELAY": "0.1",  # slow, yet the same key as the rerun's
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "speed.cli", "run", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = tmp_path / "killed" / ".work" / "numbers" / "progress.txt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and len(progress.read_text().split()) >= 10:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the slow stage never made progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    run = tmp_path / "killed"
    assert not (run / "numbers" / "manifest.json").exists(), "a killed stage must not be taken as done"
    assert not (run / "numbers").exists()
    status = speed("status", str(run))
    assert status.returncode == 0
    assert "numbers" in status.stdout and "pending" in status.stdout

    again = speed("run", str(cfg))
    assert again.returncode == 0, again.stderr
    for stage in ("numbers", "total"):
        assert (run / stage / "data.jsonl").read_text() == (
            tmp_path / "ref" / stage / "data.jsonl"
        ).read_text()
    manifest = json.loads((run / "numbers" / "manifest.json").read_text())
    stats = manifest["stats"]
    assert manifest["resumed"] is True and stats["resumed_rows"] >= 10
    # finished rows came from the work folder; at most the row in flight at the kill is replayed
    assert stats["resumed_rows"] + stats["sent"] + stats["replayed"] == 30 and stats["replayed"] <= 1


def test_a_stage_that_raised_resumes_its_work_folder_with_the_same_key(tmp_path, monkeypatch):
    import toy_stages

    cfg = load_config(write_config(tmp_path, "r", count=12))
    monkeypatch.setattr(toy_stages, "FAIL_AT", 5)
    with pytest.raises(toy_stages.ToyCrash, match="row 5"):
        Runner(cfg).run()
    work = tmp_path / "r" / ".work" / "numbers"
    assert (work / "KEY").read_text() == Runner(cfg).keys["numbers"]
    assert len((work / "rows.jsonl").read_text().splitlines()) == 5

    monkeypatch.setattr(toy_stages, "FAIL_AT", None)
    Runner(cfg).run()
    manifest = json.loads((tmp_path / "r" / "numbers" / "manifest.json").read_text())
    # rows 0-4 from the work folder: neither sent nor replayed; rows 5-11 sent once
    assert manifest["resumed"] is True
    assert (manifest["stats"]["resumed_rows"], manifest["stats"]["sent"], manifest["stats"]["replayed"]) == (
        5,
        7,
        0,
    )
    Runner(load_config(write_config(tmp_path, "ref", count=12))).run()
    assert (tmp_path / "r" / "numbers" / "data.jsonl").read_text() == (
        tmp_path / "ref" / "numbers" / "data.jsonl"
    ).read_text()

    # another key throws the work folder away: a new attempt starts over (and replays the ledger)
    monkeypatch.setattr(toy_stages, "FAIL_AT", 3)
    other = load_config(write_config(tmp_path, "r", count=13))
    with pytest.raises(toy_stages.ToyCrash):
        Runner(other).run()
    monkeypatch.setattr(toy_stages, "FAIL_AT", None)
    Runner(other).run()
    stats = json.loads((tmp_path / "r" / "numbers" / "manifest.json").read_text())["stats"]
    assert (stats["resumed_rows"], stats["sent"], stats["replayed"]) == (3, 1, 9)


def test_a_crash_between_manifest_and_commit_commits_without_running_again(tmp_path, monkeypatch):
    import toy_stages

    cfg = load_config(write_config(tmp_path, "r", count=4))
    real_commit = Runner._commit

    def crash(self, name, work):
        raise KeyboardInterrupt(f"killed while committing {name}")

    monkeypatch.setattr(Runner, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run()
    work = tmp_path / "r" / ".work" / "numbers"
    assert (work / "manifest.json").exists() and not (tmp_path / "r" / "numbers").exists()

    monkeypatch.setattr(Runner, "_commit", real_commit)
    toy_stages.RUNS.clear()
    assert [s.state for s in Runner(cfg).run()] == ["done", "done"]
    assert toy_stages.RUNS == {"total": 1}, "the finished stage is committed, not run again"
    manifest = json.loads((tmp_path / "r" / "numbers" / "manifest.json").read_text())
    assert manifest["key"] == Runner(cfg).keys["numbers"] and manifest["stats"]["sent"] == 4
    assert not work.exists() and not (tmp_path / "r" / "numbers" / "KEY").exists()


def test_a_crash_inside_the_commit_keeps_the_finished_stage(tmp_path, monkeypatch):
    """Killed after the work folder's KEY would once have been removed but before the rename: the
    rerun still finds a finished stage to commit, not a stale folder to throw away."""
    import toy_stages

    cfg = load_config(write_config(tmp_path, "r", count=4))
    monkeypatch.setattr(
        "speed.runner.Path.rename", lambda self, target: (_ for _ in ()).throw(OSError("killed"))
    )
    with pytest.raises(OSError, match="killed"):
        Runner(cfg).run()
    monkeypatch.undo()
    toy_stages.RUNS.clear()
    Runner(cfg).run()
    assert toy_stages.RUNS == {"total": 1}


def test_status_show_and_cost_on_a_finished_run(tmp_path):
    assert speed("run", str(write_config(tmp_path, "r", count=5))).returncode == 0
    run = str(tmp_path / "r")

    status = speed("status", run)
    assert status.returncode == 0
    lines = {ln.split()[0]: ln.split() for ln in status.stdout.splitlines() if ln.split()}
    assert lines["numbers"][1] == "done" and lines["numbers"][2] == "5" and lines["numbers"][3] == "5"
    assert lines["total"][1] == "done"

    show = speed("show", run, "numbers", "-n", "2")
    assert show.returncode == 0
    assert "5 rows; showing 2" in show.stdout and '"answer"' in show.stdout and "[2]" not in show.stdout
    missing = speed("show", run, "nope")
    assert missing.returncode != 0 and "finished: numbers, total" in missing.stderr

    cost = speed("cost", run, "--json")
    assert cost.returncode == 0
    c = json.loads(cost.stdout)
    assert c["teacher_by_stage"]["numbers"]["calls"] == 5
    assert c["teacher_total"]["tokens_in"] == 15
    table = speed("cost", run)
    assert "numbers" in table.stdout and "total" in table.stdout


def test_status_of_a_folder_that_is_no_run(tmp_path):
    proc = speed("status", str(tmp_path))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def _keys(tmp_path: Path, *overrides: str) -> dict[str, str]:
    from speed.runner import load_stages, order_stages, stage_keys

    cfg = load_config(None, [f"run.dir={tmp_path / 'k'}", *overrides])
    return stage_keys(cfg, order_stages(cfg, load_stages()))


def test_keys_follow_what_shapes_each_stage(tmp_path):
    base = _keys(tmp_path)
    # another section that shapes brainstorming (extra_sections): brainstorm and all downstream move
    topics = _keys(tmp_path, "topics.max_depth=3")
    assert topics["brainstorm"] != base["brainstorm"] and topics["evaluate"] != base["evaluate"]
    # a dotted extra section: the eval task list decides decontamination, so synthesize moves...
    tasks = _keys(tmp_path, "evaluate.tasks=[STSBenchmark]")
    assert tasks["synthesize"] != base["synthesize"] and tasks["senior"] == base["senior"]
    # ...but the eval batch size shapes nothing upstream of evaluate
    batch = _keys(tmp_path, "evaluate.batch_size=8")
    assert batch["synthesize"] == base["synthesize"] and batch["evaluate"] != base["evaluate"]
    # a config-chosen template set: a kind added to the seed mix changes the templates seed renders
    mix = _keys(tmp_path, "seed.kind_mix={retrieval: 1}")
    assert mix["seed"] != base["seed"] and mix["brainstorm"] == base["brainstorm"]
    # runtime fields of a model spec change speed, not output
    assert _keys(tmp_path, "models.teacher.threads=7") == base
    # the embedder's own seed trains the same data again: nothing upstream of embed moves
    seeded = _keys(tmp_path, "embed.seed=1")
    assert seeded["labels"] == base["labels"] and seeded["embed"] != base["embed"]


def test_a_rerun_stage_counts_the_calls_it_used_not_the_superseded_ones(tmp_path):
    from speed.ledger import cost_summary

    Runner(load_config(write_config(tmp_path, "r", count=5))).run()
    Runner(load_config(write_config(tmp_path, "r", count=3))).run()  # new key; 3 calls replayed
    manifest = json.loads((tmp_path / "r" / "numbers" / "manifest.json").read_text())
    assert manifest["stats"]["replayed"] == 3 and manifest["stats"]["sent"] == 0
    assert manifest["calls"]["teacher"]["calls"] == 3
    cost = cost_summary(tmp_path / "r")
    assert cost["teacher_by_stage"]["numbers"]["calls"] == 3 and cost["teacher_total"]["calls"] == 3
    assert cost["teacher_ledger_total"]["calls"] == 5  # what the run directory paid, all told


def test_weights_trained_in_the_run_are_named_by_their_stage_key(tmp_path):
    from speed.roles import ledger_model_id

    (tmp_path / "junior" / "merged").mkdir(parents=True)
    assert ledger_model_id(tmp_path, tmp_path / "junior" / "merged") == "run:junior/merged"
    (tmp_path / "junior" / "manifest.json").write_text(json.dumps({"key": "abc123"}))
    # retrained weights in the same folder get another id, so old answers are never replayed for them
    assert ledger_model_id(tmp_path, tmp_path / "junior" / "merged") == "run:junior/merged@abc123"
    assert ledger_model_id(tmp_path, "/elsewhere/model") == "/elsewhere/model"


def test_builtin_stage_order_is_the_registry_in_dependency_order() -> None:
    from speed.runner import builtin_stage_order, load_stages

    order = builtin_stage_order()
    registry = load_stages()
    assert sorted(order) == sorted(registry)  # every built-in stage once, and nothing else
    for name in order:
        for up in registry[name].reads:
            assert order.index(up) < order.index(name), f"{name} comes before {up}, which it reads"


def test_sigterm_stops_cleanly_keeps_the_answers_and_the_rerun_resumes(tmp_path):
    cfg = write_config(tmp_path, "termed", count=30, delay=0.0)
    env = {
        **os.environ,
        "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "SPEED_TOY_DELAY": "0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "speed.cli", "run", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = tmp_path / "termed" / ".work" / "numbers" / "progress.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and len(progress.read_text().split()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not stop the run within 30 s")
    assert proc.returncode == 143, err
    assert "speed: terminated (SIGTERM)" in err and "Traceback" not in err
    run = tmp_path / "termed"
    assert not (run / "numbers" / "manifest.json").exists(), "an interrupted stage is not done"
    # the lock is free and the answers received are in the ledger: the rerun resumes, sends the rest
    again = speed("run", str(cfg))
    assert again.returncode == 0, again.stderr
    stats = json.loads((run / "numbers" / "manifest.json").read_text())["stats"]
    assert stats["resumed_rows"] >= 5 and stats["resumed_rows"] + stats["sent"] + stats["replayed"] == 30
    assert stats["replayed"] <= 1


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_does_not_wait_for_a_teacher_that_never_answers(tmp_path, sig, code):
    """Stopped while every request waits on the teacher (here for 10 minutes; an API's timeout is
    5), `speed run` ends in seconds: it neither joins the requests in flight nor waits at exit for
    their worker threads. (Before: the backend's close joined them, the run hung until the timeout.)"""
    from fake_openai import FakeOpenAIServer

    server = FakeOpenAIServer(latency_s=600)
    cfg = tmp_path / "hang.yaml"
    cfg.write_text(
        f"""
run: {{dir: {tmp_path / "hang"}, seed: 0}}
pipeline: {{stages: [brainstorm]}}
models:
  teacher: {{backend: openai, model: fake, base_url: "{server.base_url}", concurrency: 4,
             timeout_s: 600, max_retries: 0}}
brainstorm: {{kinds: [retrieval, sts], calls_per_kind: 2}}
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "speed.cli", "run", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.in_flight < 2:
            time.sleep(0.05)
        assert server.in_flight >= 2, "the run never had its requests in flight"
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"signal {sig!r} did not stop a run waiting on its teacher within 30 s")
        assert proc.returncode == code, err
        assert "Traceback" not in err, err
        assert not (tmp_path / "hang" / "brainstorm" / "manifest.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
