"""The alignment stages end to end with a scripted teacher and tiny random models (no server, seconds).

The teacher is a fake backend that answers by the request's JSON schema (tasks, examples, verdicts,
revisions); the junior and senior are fakes that write a mix of valid and broken candidates. The
trainers are real (TRL on a tiny Llama built in the test). Backends are swapped in by patching
``speed.llm.load_backend``, which the run session calls for every role.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from speed.config import load_config
from speed.io import read_json, read_jsonl, write_json, write_jsonl
from speed.ledger import Ledger
from speed.llm.base import Backend, Completion, Request
from speed.runner import Runner, StageError
from tiny import tiny_llama

pytest.importorskip("trl")

ALIGNMENT = ["brainstorm", "seed", "junior", "candidates", "judge", "senior", "revisions", "revisor"]
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "vo", "ze") for b in "aeiou"]


def fake_example(fields: Sequence[str], rng: random.Random) -> dict[str, str]:
    """Random words per field: long enough for the length filters, far apart for the similarity ones."""
    out = {}
    for name in fields:
        n = 3 if "label" in name else 160
        out[name] = " ".join(f"{rng.choice(WORDS)}{rng.randint(0, 999)}" for _ in range(n))
    return out


def kind_of_prompt(prompt: str) -> str:
    """The task kind whose fields the generation prompt names (the most fields wins)."""
    from speed.tasks import get_kind, kind_names

    best, score = "retrieval", -1
    for name in kind_names():
        fields = get_kind(name).fields()
        if all(f'"{f}"' in prompt for f in fields) and len(fields) > score:
            best, score = name, len(fields)
    return best


class FakeTeacher(Backend):
    """Answers by schema: brainstorm tasks, examples, verdicts (scripted or 1/2), revisions."""

    name = "fake"
    model_id = "fake-teacher"

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self.verdicts: list[str] = []

    def answer(self, req: Request) -> str:
        props = (req.schema or {}).get("properties", {})
        rng = random.Random(req.sampling.seed)
        user = req.messages[-1]["content"]
        if "subtopics" in props:
            return json.dumps({"subtopics": ["Sub A", "Sub B / C", "Sub A"]})
        if "tasks" in props:
            topic = re.search(r"Topic: (.*)", user)
            about = topic.group(1) if topic else "things"
            return json.dumps({"tasks": [f"Find documents about {about}, angle {i}." for i in range(5)]})
        if "best" in props:
            if self.verdicts:
                return self.verdicts.pop(0)
            return json.dumps({"reason": "1 follows the task, 2 does not", "best": 1, "worst": 2})
        if "revised" in props:
            fields = list(props["revised"]["properties"])
            return json.dumps({"reason": "made it longer", "revised": fake_example(fields, rng)})
        return json.dumps(fake_example(list(props), rng))

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self.calls.extend(requests)
        return [
            Completion(texts=[self.answer(r)], finish_reasons=["stop"], tokens_in=10, tokens_out=20)
            for r in requests
        ]


class FakeGenerator(Backend):
    """A junior/senior: sample 0 is broken, the others valid JSON of the prompt's kind."""

    name = "fake"

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.calls: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        from speed.tasks import get_kind

        self.calls.extend(requests)
        out = []
        for req in requests:
            rng = random.Random(req.sampling.seed)
            fields = get_kind(kind_of_prompt(req.messages[-1]["content"])).fields()
            texts = ["Sure, here is an example: no JSON"] + [
                json.dumps(fake_example(fields, rng)) for _ in range(req.sampling.n - 1)
            ]
            if req.sampling.n == 1:
                texts = [json.dumps(fake_example(fields, rng))]
            out.append(Completion(texts=texts, finish_reasons=["stop"] * len(texts), tokens_out=50))
        return out


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    made: dict[str, Any] = {"teacher": FakeTeacher(), "loads": []}

    def load(spec: Any, *, threads: int | None = None, model_path: str | None = None) -> Backend:
        made["loads"].append((spec.backend, spec.model, model_path))
        if spec.model == "fake-teacher":
            return made["teacher"]
        gen = FakeGenerator(f"fake:{Path(model_path).parent.name if model_path else spec.model}")
        made.setdefault("generators", []).append(gen)
        return gen

    monkeypatch.setattr("speed.llm.load_backend", load)
    return made


def write_config(tmp_path: Path, base: Path, extra: str = "") -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""
run: {{dir: {tmp_path / "run"}, seed: 3, threads: 1}}
pipeline: {{stages: {ALIGNMENT}}}
models:
  teacher: {{backend: openai, model: fake-teacher}}
  junior: {{backend: hf, model: {base}}}
  senior: {{backend: hf}}
  revisor: {{backend: hf, model: {base}}}
brainstorm: {{kinds: [retrieval, classification, sts], calls_per_kind: 3}}
seed: {{num_examples: 6, check_language: false, kind_mix: {{retrieval: 1, classification: 1, sts: 1}}}}
junior: {{max_steps: 2, batch_size: 2, per_device_batch_size: 2, max_length: 512, learning_rate: 0.01}}
candidates: {{num_prompts: 4, k: 3}}
senior: {{max_steps: 2, batch_size: 2, per_device_batch_size: 2, max_length: 512, learning_rate: 0.01}}
revisions: {{num_prompts: 3}}
revisor: {{max_steps: 2, batch_size: 2, per_device_batch_size: 2, max_length: 12000, learning_rate: 0.01}}
{extra}
"""
    )
    return cfg


@pytest.fixture
def base(tmp_path: Path) -> Path:
    import torch

    torch.set_num_threads(1)
    return tiny_llama(tmp_path / "tiny")


def test_pipeline_writes_every_stage_and_rerun_sends_nothing(tmp_path: Path, base: Path, fakes) -> None:
    cfg = load_config(write_config(tmp_path, base))
    statuses = Runner(cfg).run()
    assert [s.state for s in statuses] == ["done"] * len(ALIGNMENT)
    run = tmp_path / "run"

    brainstorm = read_jsonl(run / "brainstorm" / "data.jsonl")
    kinds = {r["kind"] for r in brainstorm}
    assert kinds == {"retrieval", "classification", "sts"}
    assert [r["topic"] for r in brainstorm if r["kind"] == "sts"] == [None]
    # keep_per_call = 1: one task per call and kind
    assert sum(r["kind"] == "retrieval" for r in brainstorm) == 3

    seed = read_jsonl(run / "seed" / "data.jsonl")
    assert seed and all({"kind", "task", "attributes", "prompt", "raw", "example"} <= set(r) for r in seed)
    assert all(json.loads(r["raw"]) == r["example"] for r in seed)

    for stage in ("junior", "senior", "revisor"):
        assert (run / stage / "adapter" / "adapter_config.json").is_file()
        assert (run / stage / "merged" / "config.json").is_file()
        stats = read_json(run / stage / "manifest.json")["stats"]
        assert stats["steps"] == 2 and stats["merged_dir"] == "merged"

    candidates = read_jsonl(run / "candidates" / "data.jsonl")
    assert not {r["prompt"] for r in candidates} & {r["prompt"] for r in seed}
    assert all(len(r["candidates"]) == 3 and r["parsed"] == [False, True, True] for r in candidates)

    pairs = read_jsonl(run / "judge" / "data.jsonl")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    # the fake judge always says "1 best, 2 worst" of the shown order; the broken candidate (index
    # 0) may be shown first, and such verdicts must be dropped, never trained on
    assert all(p["best"] != 0 for p in pairs)
    judge_stats = read_json(run / "judge" / "manifest.json")["stats"]
    assert judge_stats["count"] + sum(judge_stats["drops"].values()) == len(candidates)

    revisions = read_jsonl(run / "revisions" / "data.jsonl")
    used = {r["prompt"] for r in seed} | {r["prompt"] for r in candidates}
    assert revisions and not {r["prompt"] for r in revisions} & used

    manifests = {s: read_json(run / s / "manifest.json") for s in ALIGNMENT}
    for stage in ("brainstorm", "seed", "judge", "revisions"):
        assert manifests[stage]["calls"]["teacher"]["calls"] > 0, stage
    for stage in ("junior", "senior", "revisor"):
        assert "teacher" not in manifests[stage]["calls"]
    assert manifests["brainstorm"]["calls"]["teacher"]["calls"] == 6  # 2 brainstormed kinds x 3
    # the candidates came from the junior's merged model in the run
    assert ("hf", str(base), str(run / ".work" / "junior" / "merged")) not in fakes["loads"]
    assert any(p and p.endswith("junior/merged") for _, _, p in fakes["loads"])

    ledger = Ledger(run / "ledger.sqlite")
    before = len(ledger.rows(limit=10_000))
    sent = len(fakes["teacher"].calls)
    statuses = Runner(load_config(write_config(tmp_path, base))).run()
    assert all(s.state == "done" for s in statuses)
    assert len(fakes["teacher"].calls) == sent
    assert len(ledger.rows(limit=10_000)) == before
    assert all(read_json(run / s / "manifest.json")["key"] == manifests[s]["key"] for s in ALIGNMENT)

    # a retrained junior is asked anew, not replayed from the ledger under the same folder name
    fakes["generators"].clear()
    Runner(load_config(write_config(tmp_path, base), ["junior.learning_rate=0.02"])).run()
    assert sum(len(g.calls) for g in fakes["generators"]) > 0
    assert read_json(run / "seed" / "manifest.json")["key"] == manifests["seed"]["key"]
    for stage in ("junior", "candidates", "judge", "senior", "revisions", "revisor"):
        assert read_json(run / stage / "manifest.json")["key"] != manifests[stage]["key"], stage


def _candidates_run(tmp_path: Path, base: Path, rows: list[dict[str, Any]], extra: str = "") -> Runner:
    """A run whose candidates stage is already done with ``rows`` (and a judge stage to run)."""
    cfg = load_config(write_config(tmp_path, base, extra))
    cfg.pipeline.stages = ALIGNMENT
    runner = Runner(cfg)
    folder = tmp_path / "run" / "candidates"
    write_jsonl(folder / "data.jsonl", rows)
    for stage in ("brainstorm", "seed", "junior", "candidates"):
        (tmp_path / "run" / stage).mkdir(parents=True, exist_ok=True)
        write_json(tmp_path / "run" / stage / "manifest.json", {"stage": stage, "key": runner.keys[stage]})
    return runner


def _row(i: int, candidates: list[str], parsed: list[bool]) -> dict[str, Any]:
    return {
        "kind": "retrieval",
        "task": "t",
        "prompt": f"prompt {i}",
        "candidates": candidates,
        "parsed": parsed,
    }


def test_bad_verdicts_are_counted_not_trained_on(tmp_path: Path, base: Path, fakes) -> None:
    ok = ['{"a": "x"}', '{"a": "y"}', '{"a": "z"}']
    rows = [_row(i, ok, [True, True, True]) for i in range(6)]
    rows.append(_row(6, ['{"a": 1}', '{ "a" : 1 }', '{"a":1}'], [True] * 3))  # identical after normalizing
    rows.append(_row(7, ["broken", "also broken", "x"], [False] * 3))  # nothing to prefer
    runner = _candidates_run(tmp_path, base, rows, "judge: {shuffle: false}")
    fakes["teacher"].verdicts = [
        json.dumps({"reason": "same", "best": 2, "worst": 2}),
        json.dumps({"reason": "too far", "best": 7, "worst": 1}),
        "I cannot decide.",
        json.dumps({"reason": "zero", "best": 0, "worst": 1}),
        json.dumps({"reason": "fine", "best": "Candidate 3", "worst": 1}),
        json.dumps({"reason": "fine", "best": 2, "worst": 3}),
    ]
    runner.run(only="judge")
    stats = read_json(tmp_path / "run" / "judge" / "manifest.json")["stats"]
    assert stats["drops"] == {
        "judge_same_index": 1,
        "judge_index_out_of_range": 2,
        "no_json": 1,
        "identical_candidates": 1,
        "no_parseable_candidate": 1,
    }
    pairs = read_jsonl(tmp_path / "run" / "judge" / "data.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(ok[2], ok[0]), (ok[1], ok[2])]
    assert len(fakes["teacher"].calls) == 6  # lists not worth judging cost no call
    assert read_json(tmp_path / "run" / "judge" / "manifest.json")["calls"]["teacher"]["calls"] == 6


def test_unparseable_best_is_dropped_and_shuffle_maps_back(tmp_path: Path, base: Path, fakes) -> None:
    texts = ["broken", '{"a": "good"}', '{"a": "bad"}']
    rows = [_row(i, texts, [False, True, True]) for i in range(12)]
    runner = _candidates_run(tmp_path, base, rows)
    runner.run(only="judge")  # the fake judge answers "best 1, worst 2" of the shown order
    pairs = read_jsonl(tmp_path / "run" / "judge" / "data.jsonl")
    dropped = read_jsonl(tmp_path / "run" / "judge" / "dropped.jsonl")
    for p in pairs:
        assert p["chosen"] == texts[p["order"][0]] and p["rejected"] == texts[p["order"][1]]
        assert p["chosen"] != "broken"
    assert all(d["reason"] == "best_unparseable" and d["order"][0] == 0 for d in dropped)
    assert len(pairs) + len(dropped) == 12
    # the order really varies between calls
    assert len({tuple(p["order"]) for p in pairs} | {tuple(d["order"]) for d in dropped}) > 1
    # the judge saw the candidates in the recorded order, at temperature 0
    orders = {r["prompt"]: r["order"] for r in pairs + dropped}
    for req in fakes["teacher"].calls:
        content = req.messages[-1]["content"]
        order = orders[re.search(r"prompt \d+", content).group(0)]
        assert req.sampling.temperature == 0.0
        shown = [content.index(f"Candidate {j + 1}:\n{texts[i]}") for j, i in enumerate(order)]
        assert shown == sorted(shown)


def test_unparseable_drop_mode_hides_broken_candidates(tmp_path: Path, base: Path, fakes) -> None:
    texts = ["broken", '{"a": "good"}', '{"a": "bad"}']
    runner = _candidates_run(
        tmp_path, base, [_row(0, texts, [False, True, True])], "judge: {unparseable: drop}"
    )
    runner.run(only="judge")
    content = fakes["teacher"].calls[0].messages[-1]["content"]
    assert "broken" not in content and "Candidate 3" not in content
    assert fakes["teacher"].calls[0].schema["properties"]["best"]["enum"] == [1, 2]


def test_seed_checks_its_input_before_any_call(tmp_path: Path, base: Path, fakes) -> None:
    extra = "pipeline: {stages: [brainstorm, seed]}"
    cfg_path = write_config(tmp_path, base)
    text = cfg_path.read_text().replace(f"pipeline: {{stages: {ALIGNMENT}}}", extra)
    text = text.replace(
        "kind_mix: {retrieval: 1, classification: 1, sts: 1}", "kind_mix: {matching_short: 1}"
    )
    cfg_path.write_text(text)
    runner = Runner(load_config(cfg_path))
    runner.run(only="brainstorm")
    sent = len(fakes["teacher"].calls)
    with pytest.raises(StageError, match=r"no brainstormed task for kind\(s\) \['matching_short'\]"):
        runner.run(only="seed")
    assert len(fakes["teacher"].calls) == sent


def test_keys_follow_topics_kinds_and_templates(tmp_path: Path, base: Path) -> None:
    path = write_config(tmp_path, base)
    keys = Runner(load_config(path)).keys
    topics = Runner(load_config(path, ["topics.max_depth=2"])).keys
    assert topics["brainstorm"] != keys["brainstorm"]
    taxonomy = tmp_path / "topics.txt"
    taxonomy.write_text("A/B\nC/D\n")
    own = Runner(load_config(path, [f"topics.source={taxonomy}"])).keys
    taxonomy.write_text("A/B\nC/E\n")
    assert Runner(load_config(path, [f"topics.source={taxonomy}"])).keys["brainstorm"] != own["brainstorm"]
    mix = Runner(load_config(path, ["seed.kind_mix={retrieval: 1}"])).keys
    assert mix["brainstorm"] == keys["brainstorm"] and mix["seed"] != keys["seed"]
    assert mix["candidates"] != keys["candidates"]
    judge = Runner(load_config(path, ["judge.shuffle=false"])).keys
    assert judge["candidates"] == keys["candidates"] and judge["judge"] != keys["judge"]
    assert judge["senior"] != keys["senior"] and judge["revisor"] != keys["revisor"]


def test_drop_mode_counts_lists_left_with_one_parseable(tmp_path: Path, base: Path, fakes) -> None:
    rows = [_row(0, ["broken", '{"a": "good"}', "also broken"], [False, True, False])]
    runner = _candidates_run(
        tmp_path, base, [*rows, _row(1, ['{"a": 1}', '{"a": 2}'], [True, True])], "judge: {unparseable: drop}"
    )
    runner.run(only="judge")
    stats = read_json(tmp_path / "run" / "judge" / "manifest.json")["stats"]
    assert stats["drops"] == {"one_parseable_candidate": 1}
    assert stats["count"] == 1 and len(fakes["teacher"].calls) == 1


def test_brainstorm_domain_keep_and_duplicates(tmp_path: Path, base: Path, fakes) -> None:
    extra = "topics: {domain: Swiss tax law, num_subtopics: 5}"
    path = write_config(tmp_path, base, extra)
    path.write_text(path.read_text().replace("calls_per_kind: 3}", "calls_per_kind: 4, keep_per_call: null}"))
    runner = Runner(load_config(path))
    runner.run(only="brainstorm")
    run = tmp_path / "run"
    rows = read_jsonl(run / "brainstorm" / "data.jsonl")
    topics = {r["topic"] for r in rows if r["topic"]}
    # the slash of a subtopic never adds a level; the repeated subtopic is dropped
    assert topics == {"Swiss tax law/Sub A", "Swiss tax law/Sub B or C"}
    assert (run / "brainstorm" / "subtopics.txt").read_text().split("\n")[:2] == ["Sub A", "Sub B or C"]
    stats = read_json(run / "brainstorm" / "manifest.json")["stats"]
    # 4 calls per kind over 2 topics: the 2 repeated topics bring 5 repeated tasks each
    assert stats["per_kind"] == {"retrieval": 10, "classification": 10, "sts": 1}
    assert stats["drops"] == {"duplicate_task": 20}
    assert read_json(run / "brainstorm" / "manifest.json")["calls"]["teacher"]["calls"] == 1 + 8


def test_both_orders_keeps_only_consistent_verdicts(tmp_path: Path, base: Path, fakes) -> None:
    ok = ['{"a": "x"}', '{"a": "y"}', '{"a": "z"}']
    rows = [_row(i, ok, [True] * 3) for i in range(2)]
    runner = _candidates_run(tmp_path, base, rows, "judge: {shuffle: false, both_orders: true}")
    fakes["teacher"].verdicts = [
        # row 0: shown [0, 1, 2] then [2, 1, 0]; both name candidate 2 best and 0 worst
        json.dumps({"reason": "r", "best": 3, "worst": 1}),
        json.dumps({"reason": "r", "best": 1, "worst": 3}),
        # row 1: a judge that always names the first shown: inconsistent
        json.dumps({"reason": "r", "best": 1, "worst": 2}),
        json.dumps({"reason": "r", "best": 1, "worst": 2}),
    ]
    runner.run(only="judge")
    stats = read_json(tmp_path / "run" / "judge" / "manifest.json")["stats"]
    assert stats["drops"] == {"judge_inconsistent": 1} and stats["calls"] == 4
    pairs = read_jsonl(tmp_path / "run" / "judge" / "data.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(ok[2], ok[0])]


class Crash(RuntimeError):
    """The fault a test injects in the middle of a stage's shards."""


def test_every_generation_stage_resumes_by_shard_after_a_crash(
    tmp_path: Path, base: Path, fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after a stage's second shard has generated (its calls are in the ledger, its records
    are not written): the rerun keeps the first shard, replays the second from the ledger and
    sends only the rest; over all runs no request reaches a model twice."""
    from speed.stages.candidates import Candidates
    from speed.stages.judge import Judge
    from speed.stages.revisions import Revisions
    from speed.stages.seed import Seed

    crashes: dict[str, int] = {}
    for cls in (Seed, Candidates, Judge, Revisions):
        monkeypatch.setattr(cls, "shard_size", 2)
        original = cls.process

        def process(
            self: Any, job: Any, payload: Any, _original: Any = original, _name: str = cls.name
        ) -> Any:
            result = _original(self, job, payload)
            crashes[_name] = crashes.get(_name, 0) + 1
            if crashes[_name] == 2:  # once: the second shard of the first attempt
                raise Crash(f"killed in {_name}")
            return result

        monkeypatch.setattr(cls, "process", process)

    run = tmp_path / "run"
    path = write_config(tmp_path, base)
    for stage in ("seed", "candidates", "judge", "revisions"):
        with pytest.raises(Crash, match=f"killed in {stage}"):
            Runner(load_config(path)).run()
        shards = run / ".work" / stage / "shards"
        assert sorted(p.name for p in shards.glob("*.done")) == ["00000.done"], stage
        assert not (run / stage).exists()
    statuses = Runner(load_config(path)).run()
    assert [s.state for s in statuses] == ["done"] * len(ALIGNMENT)

    for stage, total in (("seed", 3), ("candidates", 2), ("judge", 2), ("revisions", 2)):
        stats = read_json(run / stage / "manifest.json")["stats"]
        assert stats["shards"] == {"total": total, "run": total - 1, "resumed": 1}, stage
        # every shard was written once, the first before the crash
        log = (run / stage / "shards" / "processed.log").read_text().split()
        assert log == [f"{i:05d}" for i in range(total)], stage
        # the crashed shard's calls were answered before the crash: replayed, not sent again
        calls = stats["calls_this_run"]
        assert sum(v for k, v in calls.items() if k.endswith("_replayed")) > 0, (stage, calls)
        first = read_json(run / stage / "shards" / "00000.done")["calls"]
        sent = {k: v for k, v in calls.items() if k.endswith("_sent")}
        # the ledger holds the first shard's calls (sent before the crash), the crashed shard's
        # (sent before the crash, replayed now) and the rest (sent now)
        rows = Ledger(run / "ledger.sqlite").rows(stage=stage, limit=10_000)
        assert len(rows) == sum(v for k, v in first.items() if k.endswith("_sent")) + sum(calls.values()), (
            stage
        )
        if total > 2:  # shards after the crashed one were sent in this run
            assert all(v > 0 for v in sent.values()), (stage, calls)

    # no request reached a model twice: every request the fakes received is one ledger row
    received = len(fakes["teacher"].calls) + sum(len(g.calls) for g in fakes.get("generators", []))
    assert received == len(Ledger(run / "ledger.sqlite").rows(limit=100_000))
