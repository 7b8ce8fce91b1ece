"""speed study: the interval arithmetic, the table, the source planning and the equal-size sets.

No model runs here: the planning is the real stage code on a run folder with finished upstream
manifests, the sets are cut from real Parquet parts written by synthesize's own writer, and the
table is built from known per-seed scores so that every figure can be checked by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from speed.config import ConfigError, load_config
from speed.io import write_json
from speed.ledger import Ledger
from speed.llm.base import Completion, Request
from speed.stage import StageContext
from speed.stages.synthesize import shard_prompts, training_rows, write_part
from speed.study import (
    SOURCE_STAGES,
    StudyRunner,
    build_table,
    markdown_table,
    mean_interval,
    paired_difference,
    plot_table,
    training_sets,
)
from speed.study.stats import t_quantile

# --------------------------------------------------------------------------------------------
# intervals


def test_mean_interval_is_students_t() -> None:
    got = mean_interval([1.0, 2.0, 3.0])
    # sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3)
    assert got["mean"] == pytest.approx(2.0)
    assert got["sd"] == pytest.approx(1.0)
    assert got["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert got["low"] == pytest.approx(2.0 - 2.484138, rel=1e-5)
    assert got["high"] == pytest.approx(2.0 + 2.484138, rel=1e-5)
    assert t_quantile(1) == pytest.approx(12.7062, rel=1e-4)


def test_one_seed_has_no_interval_and_none_has_no_mean() -> None:
    one = mean_interval([0.7])
    assert one["mean"] == 0.7 and one["low"] is None and one["half_width"] is None and one["n"] == 1
    assert mean_interval([])["mean"] is None
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        t_quantile(0)


def test_paired_difference_pairs_by_seed() -> None:
    a = {0: 0.50, 1: 0.60, 2: 0.70, 7: 0.99}  # seed 7 has no partner: left out
    b = {0: 0.40, 1: 0.45, 2: 0.50}
    d = paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.15)
    assert d["half_width"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), rel=1e-5)
    assert d["beyond_noise"] is True
    # the same means with seeds that disagree: not beyond noise
    noisy = paired_difference({0: 0.9, 1: 0.3, 2: 0.6}, {0: 0.4, 1: 0.5, 2: 0.45})
    assert noisy["beyond_noise"] is False
    assert paired_difference({0: 0.9}, {0: 0.1})["beyond_noise"] is None


# --------------------------------------------------------------------------------------------
# the table


def _scores(sts: float, cls: float) -> dict[str, Any]:
    return {
        "tasks": {"STSBenchmark": sts, "Banking77Classification": cls},
        "categories": {"STS": sts, "Classification": cls},
        "average": (sts + cls) / 2,
    }


PER_SEED = {
    "minilm": {
        "senior+revisor": {0: _scores(0.80, 0.70), 1: _scores(0.82, 0.72), 2: _scores(0.84, 0.74)},
        "junior": {0: _scores(0.78, 0.68), 1: _scores(0.79, 0.69), 2: _scores(0.80, 0.70)},
    }
}
SOURCES = {
    "senior+revisor": {
        "examples": 40,
        "rows": 44,
        "teacher_calls": {"alignment": 30, "generation": 0, "per_example": 0.75},
    },
    "junior": {
        "examples": 40,
        "rows": 43,
        "teacher_calls": {"alignment": 20, "generation": 0, "per_example": 0.5},
    },
}


def test_table_means_intervals_and_pairs() -> None:
    table = build_table(
        PER_SEED,
        SOURCES,
        [("senior+revisor", "junior"), ("senior+revisor", "teacher")],
        {"minilm": _scores(0.82, 0.80)},
        {"seeds": [0, 1, 2]},
    )
    block = table["embedders"]["minilm"]
    full = block["scores"]["senior+revisor"]
    assert full["tasks"]["STSBenchmark"]["mean"] == pytest.approx(0.82)
    assert full["categories"]["Classification"]["mean"] == pytest.approx(0.72)
    assert full["average"]["mean"] == pytest.approx(0.77)
    assert full["average"]["half_width"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    # teacher has no scores: its pair is left out, not reported as zero
    assert [(p["a"], p["b"]) for p in block["pairs"]] == [("senior+revisor", "junior")]
    pair = block["pairs"][0]
    # per-seed differences of the averages: 0.75-0.73, 0.77-0.74, 0.79-0.75
    assert pair["average"]["mean"] == pytest.approx(0.03)
    assert pair["average"]["half_width"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert pair["STS"]["mean"] == pytest.approx(0.03)
    assert pair["average"]["beyond_noise"] is True
    assert block["untrained"]["average"] == pytest.approx(0.81)
    assert table["sources"]["junior"]["teacher_calls"]["per_example"] == 0.5

    md = markdown_table(table)
    assert "| senior+revisor | 82.00 ± 4.97 |" in md
    assert "| senior+revisor - junior | +3.00 |" in md
    assert "| (untrained) | 82.00 | 80.00 |" in md
    assert "| junior | 40 | " not in md  # prompts unknown in this table: an empty cell, not a guess


def test_plot_is_a_png(tmp_path: Path) -> None:
    table = build_table(PER_SEED, SOURCES, [], {"minilm": _scores(0.82, 0.80)})
    path = plot_table(table, tmp_path / "plot.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# the sources: planning and keys


def _cfg(tmp_path: Path, *overrides: str) -> Any:
    return load_config(
        None,
        [
            f"run.dir={tmp_path / 'run'}",
            "study.num_examples=10",
            "study.oversample=1.2",
            "study.shard_size=5",
            "synthesize.kind_mix={sts: 1, retrieval: 1, classification: 1}",
            *overrides,
        ],
    )


def _ctx(cfg: Any, cls: type, key: str = "k") -> StageContext:
    run = Path(cfg.run.dir)
    for stage in ("brainstorm", "junior", "senior", "revisor"):
        write_json(run / stage / "manifest.json", {"stage": stage, "key": f"key-{stage}"})
    return StageContext(cfg, run, cls.name, key, run / ".work" / cls.name, cls.reads, None)  # type: ignore[arg-type]


POOL = {
    "sts": ["Retrieve semantically similar text."],
    "retrieval": ["Given a recipe question, retrieve recipes.", "Given a law question, retrieve statutes."],
    "classification": ["Classify a review's sentiment.", "Classify a news headline's topic."],
}


def test_every_source_plans_the_same_prompts(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    plans = {}
    seeds = {}
    for source, cls in SOURCE_STAGES.items():
        stage = cls()
        shards = stage.shards(_ctx(cfg, cls))
        prompts = [p for s in shards for p in shard_prompts(s.payload, POOL, "English")]
        plans[source] = [(p["index"], p["kind"], p["task"], p["prompt"]) for p in prompts]
        seeds[source] = [p["seed"] for p in prompts]
    first = plans["teacher"]
    assert len(first) == 12  # ceil(10 x 1.2), in shards of 5
    assert len({kind for _, kind, _, _ in first}) == 3
    for source, plan in plans.items():
        assert plan == first, source
    # only the writer differs: the requests of different writers are seeded apart, and a source
    # with the revisor asks its writer what the source without it asked (replayed from the ledger)
    assert seeds["junior"] != seeds["senior"] != seeds["teacher"] != seeds["untuned"]
    assert seeds["senior"] == seeds["senior+revisor"]
    assert seeds["junior"] == seeds["junior+revisor"]


def test_sources_read_what_their_writer_needs(tmp_path: Path) -> None:
    runner = StudyRunner(_cfg(tmp_path, "study.sources=[teacher, untuned, senior+revisor]"))
    assert runner.source_targets() == ["study/teacher", "study/untuned", "study/senior+revisor"]
    # teacher-only and untuned data need brainstorming only: no alignment stage runs for them
    assert runner.closure("study/untuned") == ["brainstorm", "study/untuned"]
    full = runner.closure("study/senior+revisor")
    assert {"seed", "junior", "judge", "senior", "revisions", "revisor"} <= set(full)
    assert not {"synthesize", "embed", "evaluate"} & set(full)
    assert [c.name for c in runner.select(until=["study/teacher", "study/untuned"])] == [
        "brainstorm",
        "study/teacher",
        "study/untuned",
    ]
    # the untuned writer runs its spec's own model, the junior source the trained one
    assert (
        SOURCE_STAGES["untuned"]().weights_key(_ctx(runner.cfg, SOURCE_STAGES["untuned"]), "junior") == "base"
    )
    junior = SOURCE_STAGES["junior"]
    assert junior().weights_key(_ctx(runner.cfg, junior), "junior") == "key-junior"


def test_source_keys_follow_the_data_not_the_training(tmp_path: Path) -> None:
    keys = StudyRunner(_cfg(tmp_path)).keys
    other_training = StudyRunner(
        _cfg(tmp_path, "study.seeds=[5, 6]", "study.pairs=[[junior, untuned]]", "study.keep_models=true")
    ).keys
    assert keys == other_training
    more = StudyRunner(_cfg(tmp_path, "study.num_examples=11")).keys
    assert more["study/teacher"] != keys["study/teacher"]
    assert more["senior"] == keys["senior"]  # the pipeline's own stages are untouched


def test_a_source_needs_its_stages_in_the_pipeline(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "pipeline.stages=[brainstorm, seed, junior]", "study.sources=[junior, senior]")
    with pytest.raises(ConfigError, match="'senior' needs the stage"):
        StudyRunner(cfg)


def test_study_config_names_a_mistyped_source_and_embed_key() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'senior\\+revisor'"):
        load_config(None, ["study.pairs=[[senior+reviser, junior]]"])
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(None, ["study.embedders=[{name: a, model: m, embed: {lora_rank: 8}}]"])
    with pytest.raises(ConfigError, match="used twice"):
        load_config(None, ["study.embedders=[{name: a, model: m}, {name: a, model: n}]"])


# --------------------------------------------------------------------------------------------
# equal-size sets


def _write_source(folder: Path, kept: list[tuple[int, str]]) -> None:
    rows = []
    for index, kind in kept:
        record = {
            "index": index,
            "kind": kind,
            "task": "Retrieve semantically similar text.",
            "attributes": {},
            "prompt": f"prompt {index}",
            "raw_output": "{}",
            "revisor_output": None,
            "revised": False,
        }
        example = {"S1": f"first {folder.name} {index}", "S2": f"second {index}", "S3": f"third {index}"}
        rows += training_rows("00000", record, example)
    write_part(folder / "data", "00000", rows)


def test_training_sets_are_cut_to_one_size_in_plan_order(tmp_path: Path) -> None:
    _write_source(tmp_path / "a", [(0, "sts"), (1, "sts"), (3, "sts"), (5, "sts")])
    _write_source(tmp_path / "b", [(2, "sts"), (3, "sts"), (5, "sts")])
    size, rows, info = training_sets({"a": tmp_path / "a", "b": tmp_path / "b"}, num_examples=10)
    assert size == 3  # b kept 3: every source is cut to it
    # the prompts both kept (3, 5) come first, then a's own in plan order (0, not 1)
    assert info["a"]["prompts"] == [0, 3, 5] and info["b"]["prompts"] == [2, 3, 5]
    assert info["a"]["kept"] == 4 and info["a"]["examples"] == 3
    # an example's training rows stay together, and the trainer gets the bare query
    assert info["a"]["rows"] == len(rows["a"]) and {r["id"] for r in rows["a"]} == {
        "00000-0",
        "00000-3",
        "00000-5",
    }
    assert all(r["query"] == r["query_text"] for r in rows["a"])
    assert all(not r["query"].startswith("Instruct:") for r in rows["b"])
    size2, _, info2 = training_sets({"a": tmp_path / "a", "b": tmp_path / "b"}, num_examples=2)
    assert size2 == 2 and info2["a"]["prompts"] == info2["b"]["prompts"] == [3, 5]


# --------------------------------------------------------------------------------------------
# the run report


def test_report_shows_the_study(tmp_path: Path) -> None:
    from fakerun import TEACHER_CALLS, make_fake_run
    from speed.report import build_report

    run = make_fake_run(tmp_path / "run")
    table = build_table(PER_SEED, SOURCES, [("senior+revisor", "junior")], {"minilm": _scores(0.82, 0.80)})
    table["conditions"] = {"examples_per_source": 40, "seeds": [0, 1, 2], "tasks": ["STSBenchmark"]}
    write_json(run / "study" / "table.json", table)
    assert plot_table(table, run / "study" / "study_plot.png") is not None
    # the teacher wrote the study's teacher-only data: real calls in the run's ledger
    ledger = Ledger(run / "ledger.sqlite")
    req = Request.chat("write an example")
    done = Completion(texts=["{}"], tokens_in=10, tokens_out=10, latency_s=0.1)
    ledger.record("study/teacher", "teacher", "m", [(req.key("teacher", "m"), req, done)])
    ledger.close()
    build_report(run)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    study = summary["study"]
    assert study["examples_per_source"] == 40
    full = study["embedders"]["minilm"]["scores"]["senior+revisor"]
    assert full["average"]["mean"] == pytest.approx(0.77) and full["seeds"] == 3
    assert study["embedders"]["minilm"]["pairs"][0]["beyond_noise"] is True
    assert study["sources"]["junior"]["teacher_calls_per_example"] == 0.5
    page = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="study"' in page and "senior+revisor − junior" in page
    assert "[72.03, 81.97]" in page  # 77 ± 4.302653 x 2 / sqrt(3), x100
    assert 'alt="study/study_plot.png"' in page
    # the run's own teacher cost never counts a study's sources
    assert summary["costs"]["teacher_total"]["calls"] == TEACHER_CALLS
    assert summary["costs"]["teacher_ledger_total"]["calls"] == TEACHER_CALLS + 1
