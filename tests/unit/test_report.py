"""The run report: figures in summary.json, escaping of model text, partial and broken runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fakerun import (
    CHANGED,
    DROPS,
    DURATIONS,
    FINAL,
    KINDS,
    LABELS_STATS,
    SCORES,
    TEACHER_CALLS,
    TEACHER_TOKENS,
    XSS,
    make_fake_run,
)
from speed.io import write_json
from speed.report import build_report


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text(encoding="utf-8"))


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    run = make_fake_run(tmp_path / "run")
    build_report(run)
    return run


def test_report_files_are_written(full_run: Path) -> None:
    page = (full_run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    # self-contained: no external resources of any kind
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert '<link rel="stylesheet"' not in page
    assert not list(full_run.glob(".*.tmp")), "atomic writes left a temporary file"


def test_stage_figures(full_run: Path) -> None:
    s = _summary(full_run)
    assert s["complete"] is True
    stages = {st["name"]: st for st in s["stages"]}
    assert list(stages) == list(DURATIONS)
    assert all(st["state"] == "done" for st in stages.values())
    assert stages["junior"]["duration_s"] == DURATIONS["junior"]
    assert s["total_duration_s"] == pytest.approx(sum(DURATIONS.values()))
    assert stages["synthesize"]["count"] == FINAL
    assert stages["synthesize"]["drops"] == DROPS
    assert stages["synthesize"]["drops_total"] == sum(DROPS.values())
    assert stages["synthesize"]["stats"] == {"shards": 1, "negative_removed": {"too_short": 2}}
    assert stages["seed"]["calls"]["teacher"]["calls"] == 10
    assert stages["seed"]["calls"]["teacher"]["errors"] == 1
    assert stages["synthesize"]["calls"]["revisor"]["calls"] == 15


def test_teacher_costs_and_e5_comparison(full_run: Path) -> None:
    c = _summary(full_run)["costs"]
    assert c["teacher_total"]["calls"] == TEACHER_CALLS
    assert c["teacher_total"]["tokens_in"] + c["teacher_total"]["tokens_out"] == TEACHER_TOKENS
    assert set(c["teacher_by_stage"]) == {"brainstorm", "seed", "judge", "revisions"}
    assert c["teacher_by_stage"]["judge"] == {
        "calls": 5,
        "tokens_in": 6000,
        "tokens_out": 300,
        "errors": 0,
        "latency_s": 2.5,
        "attempts": 5,
        "failed_attempts": {"429": 0, "5xx": 0, "timeout": 0, "dropped": 0},
    }
    assert c["final_examples"] == FINAL
    assert c["teacher_calls_per_example"] == pytest.approx(TEACHER_CALLS / FINAL)
    assert c["teacher_tokens_per_example"] == pytest.approx(TEACHER_TOKENS / FINAL)
    # E5-style: one teacher call per final example at the mean of the 10 answered seed calls
    e5 = c["e5_style"]
    assert e5["basis"] == "seed"
    assert e5["calls"] == FINAL
    assert e5["mean_tokens_in_per_call"] == 300
    assert e5["mean_tokens_out_per_call"] == 200
    assert e5["tokens"] == FINAL * 500
    assert c["savings"]["calls_ratio"] == pytest.approx(FINAL / TEACHER_CALLS)
    assert c["savings"]["tokens_ratio"] == pytest.approx(FINAL * 500 / TEACHER_TOKENS)


def test_examples_and_drops(full_run: Path) -> None:
    ex = _summary(full_run)["examples"]
    assert ex["total"] == FINAL
    assert ex["by_kind"] == KINDS
    assert list(ex["by_kind"]) == ["retrieval", "classification", "sts"]  # most first
    assert ex["drops"] == DROPS
    assert ex["kept_fraction"] == pytest.approx(FINAL / (FINAL + sum(DROPS.values())))
    assert ex["revised"] == CHANGED
    assert ex["negative_removed"] == {"too_short": 2}
    page = (full_run / "report.html").read_text(encoding="utf-8")
    assert re.search(r'id="negative-removed">Kept without their hard negative[^<]*: 2 \(too_short 2\)', page)
    assert _summary(full_run)["judge"]["verdicts"] == 7


def test_eval_scores(full_run: Path) -> None:
    ev = _summary(full_run)["eval"]
    assert ev["model"] == "embed/model"
    assert ev["baseline"] == "all-MiniLM-L6-v2"
    assert ev["scale"] == "0-1"
    assert set(ev["tasks"]) == set(SCORES)
    sts = ev["tasks"]["STSBenchmark"]
    assert (sts["type"], sts["metric"]) == ("STS", "cosine_spearman")
    assert sts["model"] == 0.82 and sts["baseline"] == 0.71
    assert sts["delta"] == pytest.approx(0.11)
    assert ev["averages"]["average"]["model"] == pytest.approx((0.82 + 0.64 + 0.79) / 3)
    page = (full_run / "report.html").read_text(encoding="utf-8")
    # shown x100 like MTEB's leaderboard, with the delta signed
    assert "82.00" in page and "71.00" in page and "+11.00" in page


def test_scale_study_and_plot(full_run: Path) -> None:
    s = _summary(full_run)
    assert s["plots"] == ["evaluate/scale/scale_plot.png"]
    assert [p["n"] for p in s["scale"]["points"]] == [100, 200, 400]
    assert s["scale"]["fit"] == {"a": 0.268, "b": 0.0721, "r2": 0.99}
    page = (full_run / "report.html").read_text(encoding="utf-8")
    assert 'src="data:image/png;base64,iVBORw0KGgo' in page
    assert page.count("<img ") == 1
    assert "70.00" in page  # n=400 average, x100


def test_large_plot_is_linked_not_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speed.report import render

    monkeypatch.setattr(render, "MAX_EMBED_BYTES", 10)
    run = make_fake_run(tmp_path / "run")
    build_report(run)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert 'src="evaluate/scale/scale_plot.png"' in page
    assert "data:image/png" not in page


def test_model_text_is_escaped(full_run: Path) -> None:
    page = (full_run / "report.html").read_text(encoding="utf-8")
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a document &amp; more" in page
    # the page's only script is its own, allowed by hash in the Content Security Policy
    assert page.count("<script>") == 1
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]+=*'", page)


def test_sample_and_verdicts_in_page(full_run: Path) -> None:
    page = (full_run / "report.html").read_text(encoding="utf-8")
    # every example of this small run is in the sample, each kind in the filter
    assert page.count('<tr data-kind="') == FINAL
    for kind in KINDS:
        assert f'<option value="{kind}">' in page
    assert page.count('<pre class="text chosen">') == 7
    assert "follows the length guideline" in page
    assert page.count('data-changed="yes"') == CHANGED
    # the senior's and the revisor's texts side by side, from the stage's own columns
    assert page.count("draft p") >= FINAL - 1  # every senior output but the one with markup
    assert re.search(r'<pre class="text changed">[^<]*q 2 about retrieval', page)
    assert "not revised" in page
    assert '<pre class="text">""</pre>' not in page and '<pre class="text changed">true</pre>' not in page


def test_sample_is_capped_per_kind(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run")
    build_report(run, sample_per_kind=2, judge_samples=3)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count('<tr data-kind="') == 2 * len(KINDS)
    assert page.count('<pre class="text chosen">') == 3
    assert _summary(run)["examples"]["by_kind"] == KINDS  # counts still cover every row


@pytest.mark.parametrize(
    "stages",
    [
        (),
        ("brainstorm",),
        ("brainstorm", "seed"),
        ("brainstorm", "seed", "junior", "synthesize"),
    ],
)
def test_partial_runs(tmp_path: Path, stages: tuple[str, ...]) -> None:
    run = make_fake_run(tmp_path / "run", stages=stages)
    (run / ".work" / "junior").mkdir(parents=True)  # a stage stopped halfway
    build_report(run)
    s = _summary(run)
    assert s["complete"] is False
    states = {st["name"]: st["state"] for st in s["stages"]}
    for name in stages:
        assert states[name] == "done"
    if "junior" not in stages:
        assert states["junior"] == "incomplete"
    assert states["evaluate"] == "pending"
    assert s["eval"] is None
    assert s["warnings"] == []
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "No evaluation results yet." in page
    if "synthesize" not in stages:
        assert s["costs"]["final_examples"] is None and s["costs"]["e5_style"] is None
        assert "The synthesize stage has not finished." in page
    else:
        assert s["examples"]["by_kind"] == KINDS


def test_empty_dir_without_ledger(tmp_path: Path) -> None:
    build_report(tmp_path)
    s = _summary(tmp_path)
    assert s["stages"] == [] and s["costs"]["teacher_total"]["calls"] == 0
    assert not (tmp_path / "ledger.sqlite").exists(), "the report must not create a ledger"


def test_missing_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_broken_files_give_warnings_not_errors(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run")
    (run / "seed" / "manifest.json").write_text("{not json", encoding="utf-8")
    (run / "evaluate" / "results.json").write_text("[1, 2", encoding="utf-8")
    # a half-written second part beside the good one
    good = run / "synthesize" / "data" / "part-00000.parquet"
    (good.parent / "part-00001.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (run / "ledger.sqlite").write_bytes(b"this is not an SQLite database" * 100)
    for wal in run.glob("ledger.sqlite-*"):
        wal.unlink()
    build_report(run)
    s = _summary(run)
    states = {st["name"]: st["state"] for st in s["stages"]}
    assert states["seed"] == "unreadable"
    assert s["eval"] is None
    assert s["examples"]["by_kind"] == KINDS
    assert s["costs"]["teacher_total"]["calls"] == 0
    text = "\n".join(s["warnings"])
    assert "seed/manifest.json" in text
    assert "results.json" in text
    assert "part-00001.parquet is unreadable" in text
    assert "ledger" in text
    assert "Warnings" in (run / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "results",
    [
        {"STSBenchmark": 0.8, "SciFact": 0.6},
        {"model": {"STSBenchmark": 0.8, "SciFact": 0.6}, "baseline": {"STSBenchmark": 0.7}},
        {"model": "m", "tasks": {"STSBenchmark": {"main_score": 0.8}, "SciFact": 0.6}},
    ],
)
def test_eval_reader_is_tolerant(tmp_path: Path, results: dict) -> None:
    run = make_fake_run(tmp_path / "run", stages=("brainstorm",))
    (run / "evaluate").mkdir()
    write_json(run / "evaluate" / "results.json", results)
    build_report(run)
    ev = _summary(run)["eval"]
    assert ev["tasks"]["STSBenchmark"]["model"] == 0.8
    assert ev["tasks"]["SciFact"]["model"] == 0.6
    assert ev["averages"]["average"]["model"] == pytest.approx(0.7)


def test_reads_what_the_evaluation_module_writes(tmp_path: Path) -> None:
    results = pytest.importorskip("speed.evaluation.results")
    run = make_fake_run(tmp_path / "run", stages=("brainstorm",))
    tasks = {"STSBenchmark": {"type": "STS", "main_score_name": "cosine_spearman", "main_score": 0.8}}
    base = {"STSBenchmark": {"type": "STS", "main_score_name": "cosine_spearman", "main_score": 0.75}}
    results.write_results(
        run / "evaluate",
        {"model": "trained", "tasks": tasks, "averages": results.category_averages(tasks)},
        {"model": "base", "tasks": base, "averages": results.category_averages(base)},
    )
    build_report(run)
    ev = _summary(run)["eval"]
    assert (ev["model"], ev["baseline"]) == ("trained", "base")
    assert ev["tasks"]["STSBenchmark"]["delta"] == pytest.approx(0.05)
    assert ev["averages"]["STS"]["baseline"] == pytest.approx(0.75)


def test_report_of_a_real_runner_run(tmp_path: Path) -> None:
    """Stages and states come from the runner's own plan when the run's config loads."""
    from speed.config import load_config
    from speed.runner import Runner

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        f"run: {{dir: {tmp_path / 'run'}}}\n"
        "pipeline: {stages: [numbers, total], plugins: [toy_stages]}\n"
        "extra: {numbers: {count: 4}}\n",
        encoding="utf-8",
    )
    Runner(load_config(cfg_file)).run(only="numbers")
    run = tmp_path / "run"
    build_report(run)
    s = _summary(run)
    assert [(st["name"], st["state"]) for st in s["stages"]] == [("numbers", "done"), ("total", "pending")]
    assert s["costs"]["teacher_by_stage"]["numbers"]["calls"] == 4
    assert s["stages"][0]["calls"]["teacher"]["tokens_in"] == 12


def test_failed_tries_reach_the_report_cost_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from speed.cli import _print_status, main
    from speed.io import read_json
    from speed.ledger import Ledger
    from speed.llm import Completion, Request

    run = make_fake_run(tmp_path / "run")
    ledger = Ledger(run / "ledger.sqlite")
    req = Request.chat("a seed request that needed retries")
    comp = Completion(texts=["ok"], tokens_in=3, tokens_out=2, attempts=4, failures={"429": 2, "timeout": 1})
    key = req.key("teacher", "m")
    ledger.record("seed", "teacher", "m", [(key, req, comp)])
    ledger.use(read_json(run / "seed" / "manifest.json")["key"], [key])
    ledger.close()
    build_report(run)

    c = _summary(run)["costs"]
    assert c["teacher_by_stage"]["seed"]["failed_attempts"] == {
        "429": 2,
        "5xx": 0,
        "timeout": 1,
        "dropped": 0,
    }
    page = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="teacher-connection"' in page and "429 2, 5xx 0, timeout 1, dropped 0" in page

    assert main(["cost", str(run)]) == 0
    out = capsys.readouterr().out
    assert "failed tries by cause: 429: 2, timeout: 1" in out
    # speed status: its table, then the line on the teacher connection (the fake run has no config)
    _print_status([], run, None)
    out = capsys.readouterr().out
    assert "failed tries by cause: 429: 2, timeout: 1" in out and "teacher connection:" in out


def test_report_says_which_roles_are_deterministic(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run")
    (run / "config.yaml").write_text(
        "models:\n"
        "  teacher: {backend: llamacpp_server, model: m, options: {deterministic: true}}\n"
        "  junior: {backend: llamacpp_server, model: m}\n"
    )
    build_report(run)
    det = _summary(run)["determinism"]
    assert det["teacher"] is None
    assert "slots" in det["junior"] and set(det) == {"teacher", "junior", "senior", "revisor"}
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<b>teacher</b>: deterministic" in page and "<b>junior</b>: not promised" in page


def test_labels_block_counts_drops_swaps_and_mined_negatives(full_run: Path) -> None:
    labels = _summary(full_run)["labels"]
    assert labels["checked"] == 5 and labels["drops"] == LABELS_STATS["drops"]
    assert labels["relabel"]["swap"] == 1 and labels["mining"]["mined"] == 3
    page = (full_run / "report.html").read_text(encoding="utf-8")
    block = page[page.index('<section id="labels">') : page.index('<section id="eval">')]
    assert "relabel (teacher)" in block and "round trip (embedder, top 3)" in block
    assert "mined negatives (mined, from the pool)" in block
    assert re.search(r"<td>swap</td><td class=\"num\">1</td>", block)


def test_no_labels_block_when_the_stage_checked_nothing(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run", ("synthesize",))
    build_report(run)
    assert _summary(run)["labels"] is None
    assert '<section id="labels">' not in (run / "report.html").read_text(encoding="utf-8")
