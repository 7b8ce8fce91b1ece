"""The synthesize stage on a tiny Llama trained in the test to write STS and matching JSON.

The upstream stages (brainstorm, senior, revisor) are stand-ins from ``tests/plugins/synth_stubs.py``
that copy prepared folders (``tests/synth_helpers.py``), so the real synthesize stage runs unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from synth_helpers import prepare_upstream, write_config


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return prepare_upstream(tmp_path_factory.mktemp("synth"))


# --------------------------------------------------------------------------------------------
# the plan


def test_apportion_gives_exact_shares_of_the_kind_mix():
    from speed.config import SynthesizeConfig
    from speed.stages.synthesize import apportion, plan_kinds

    mix = SynthesizeConfig().kind_mix  # SPEED 7:7:7:2
    assert apportion(230, mix) == {
        "retrieval": 70,
        "classification": 70,
        "sts": 70,
        "matching_short": 10,
        "matching_long": 10,
    }
    counts = apportion(7, {"a": 1, "b": 1, "c": 0})
    assert counts == {"a": 4, "b": 3} and sum(counts.values()) == 7
    kinds = plan_kinds(1000, mix, random.Random(1))
    assert kinds.count("sts") == round(1000 * 7 / 23) and len(kinds) == 1000
    assert kinds != sorted(kinds)  # shuffled
    assert plan_kinds(1000, mix, random.Random(1)) == kinds


def test_kind_mix_refuses_negative_or_empty_weights():
    from pydantic import ValidationError

    from speed.config import SpeedConfig

    with pytest.raises(ValidationError, match=r"synthesize.kind_mix\['sts'\] is -1"):
        SpeedConfig.model_validate({"synthesize": {"kind_mix": {"sts": -1, "retrieval": 1}}})
    with pytest.raises(ValidationError, match="no kind a positive weight"):
        SpeedConfig.model_validate({"synthesize": {"kind_mix": {"sts": 0}}})


# --------------------------------------------------------------------------------------------
# the stage, in this process


def test_synthesize_writes_rows_with_provenance_and_counts_every_drop(tmp_path, upstream):
    from speed.config import load_config
    from speed.export import export_run
    from speed.io import read_jsonl, read_rows
    from speed.runner import Runner

    cfg = load_config(write_config(tmp_path, "run", upstream))
    statuses = Runner(cfg).run()
    assert [s.state for s in statuses] == ["done"] * 4
    folder = tmp_path / "run" / "synthesize"
    manifest = json.loads((folder / "manifest.json").read_text())
    stats = manifest["stats"]
    assert stats["shards"] == {"total": 4, "run": 4, "resumed": 0}
    # every prompt is either kept or dropped under a named reason
    assert stats["generated"] == 24
    assert stats["count"] + sum(stats["drops"].values()) == 24
    assert stats["count"] > 0 and stats["drops"]
    assert set(stats["per_kind"]) <= {"sts", "matching_short"}
    # the senior and the revisor were both called, through the ledger, once per prompt
    assert manifest["calls"]["senior"]["calls"] == 24
    assert 0 < manifest["calls"]["revisor"]["calls"] <= 24

    rows = read_rows(folder)
    assert len(rows) == stats["rows"] == stats["count"]
    row = rows[0]
    for column in (
        "kind",
        "task",
        "attributes",
        "prompt",
        "raw_output",
        "revisor_output",
        "revised",
        "example",
    ):
        assert column in row
    assert row["query"].startswith("Instruct: ") and row["query"].endswith(row["query_text"])
    assert sum(r["revised"] for r in rows) == stats["revisions"]["used"]
    sts = [r for r in rows if r["kind"] == "sts"]
    # an STS example whose S3 alone failed a filter is kept as a pair (keep_without_negative)
    pairs = [r for r in sts if not json.loads(r["example"])["S3"]]
    assert all(r["negative"] for r in sts if r not in pairs)
    assert all(r["negative"] is None for r in pairs)
    assert pairs and sum(stats["negative_removed"].values()) == len(pairs)
    assert set(stats["negative_removed"]) <= {"placeholder_text", "too_short", "positive_equals_negative"}
    assert all(r["negative"] is None for r in rows if r["kind"] == "matching_short")

    # nothing kept repeats an evaluation sentence; what the writer reproduced was dropped
    eval_sentences = {
        json.loads(line)["sentence1"].lower()
        for line in (Path(upstream["eval"]) / "sts/STSBenchmark/test.jsonl").read_text().splitlines()
    }
    for r in rows:
        assert not {v.lower() for v in json.loads(r["example"]).values()} & eval_sentences
    records = [rec for p in sorted((folder / "shards").glob("*.jsonl")) for rec in read_jsonl(p)]
    assert len(records) == 24
    hits = [
        r
        for r in records
        if r["drop"] is None and {v.lower() for v in r["example"].values()} & eval_sentences
    ]
    assert stats["drops"].get("contaminated", 0) >= len(hits)
    # every shard has its marker and was processed once
    assert sorted(p.stem for p in (folder / "shards").glob("*.done")) == ["00000", "00001", "00002", "00003"]
    assert (folder / "shards" / "processed.log").read_text().split() == ["00000", "00001", "00002", "00003"]

    fe = export_run(tmp_path / "run", "flagembedding", tmp_path / "fe.jsonl")
    assert len(fe.read_text().splitlines()) == len(rows)


def test_turning_the_revisor_off_reruns_but_replays_the_senior(tmp_path, upstream):
    from speed.config import load_config
    from speed.io import read_rows
    from speed.runner import Runner

    path = write_config(tmp_path, "run", upstream)
    Runner(load_config(path)).run()
    before = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())["stats"]
    assert before["calls_this_run"]["senior_sent"] == 24

    cfg = load_config(path, ["synthesize.revise=false"])
    assert [s.state for s in Runner(cfg).status()][-1] == "stale"
    Runner(cfg).run()
    stats = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())["stats"]
    # the senior's answers come from the ledger; no revisor is loaded or called
    assert stats["calls_this_run"] == {"senior_sent": 0, "senior_replayed": 24}
    assert stats["revisions"]["used"] == 0
    assert not any(r["revised"] for r in read_rows(tmp_path / "run" / "synthesize"))


def test_a_retrained_senior_is_asked_anew_not_replayed(tmp_path, upstream):
    from speed.config import load_config
    from speed.runner import Runner

    path = write_config(tmp_path, "run", upstream)
    Runner(load_config(path)).run()
    # the upstream stages' section changes: new senior and revisor keys, same folders in the run
    Runner(load_config(path, ["extra.stubs.retrained=1"])).run()
    stats = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())["stats"]
    assert stats["calls_this_run"]["senior_sent"] == 24 and stats["calls_this_run"]["senior_replayed"] == 0


def test_missing_inputs_fail_before_any_call(tmp_path, upstream):
    from speed.config import ConfigError, load_config
    from speed.ledger import Ledger
    from speed.runner import Runner, StageError

    cfg = load_config(
        write_config(tmp_path, "run", upstream),
        ["synthesize.kind_mix={sts: 1, retrieval: 1}"],
    )
    with pytest.raises(StageError, match=r"no brainstormed task for kind\(s\) \['retrieval'\]"):
        Runner(cfg).run()
    cfg = load_config(write_config(tmp_path, "run2", upstream), ["evaluate.data_dir=/nonexistent/eval"])
    # the runner's preflight refuses it before the stage starts (ConfigError), naming the same fix
    with pytest.raises(ConfigError, match=r"synthesize\.decontaminate: false"):
        Runner(cfg).run()
    # the first run's stand-in upstream stages ran and synthesize sent nothing; the second was refused
    # before any stage started, so nothing of it was written at all
    assert (tmp_path / "run" / "brainstorm" / "manifest.json").exists()
    assert Ledger(tmp_path / "run" / "ledger.sqlite").rows(limit=1000) == []
    assert not (tmp_path / "run" / ".work" / "synthesize" / "shards").exists()
    assert not (tmp_path / "run2" / "ledger.sqlite").exists()
    assert not (tmp_path / "run2" / "brainstorm").exists()
