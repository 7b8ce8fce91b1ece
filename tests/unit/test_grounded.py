"""Grounded generation: prompts built on a corpus passage, whose positive is the passage itself."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from speed.config import ConfigError, load_config
from speed.io import read_json, read_jsonl
from speed.llm.base import Backend, Completion, Request
from speed.runner import Runner
from speed.stages.alignment import Grounding, sample_prompts
from speed.tasks import get_kind
from speed.tasks.grounded import first_sentence, grounded_kind

PASSAGE = {
    "id": "d1#0",
    "title": "Vitamin D and bone density",
    "text": "Vitamin D supplements raised lumbar bone density in older women over two years. "
    "The effect was largest in those with low baseline serum levels.",
}


def test_grounded_prompt_shows_the_passage_and_the_positive_is_the_passage() -> None:
    kind = grounded_kind("retrieval")
    attributes = kind.ground(kind.sample_attributes(random.Random(0)), PASSAGE)
    prompt = kind.generation_prompt("Given a health claim, find the study that tests it.", attributes)
    assert PASSAGE["text"] in prompt and f"Title: {PASSAGE['title']}" in prompt
    assert "Given a health claim" in prompt
    assert '"positive_document"' not in prompt  # the generator never writes the positive
    answer = json.dumps({"user_query": "does vitamin d help bones", "hard_negative_document": "Calcium ..."})
    parsed = kind.parse(answer)
    assert parsed.value is not None
    whole = kind.complete(parsed.value, attributes)
    assert list(whole) == ["user_query", "positive_document", "hard_negative_document"]
    assert whole["positive_document"] == PASSAGE["text"]
    (row,) = kind.to_rows("find the study", whole)
    assert row["positive"] == PASSAGE["text"] and row["negative"] == "Calcium ..."
    assert kind.generated(whole) == json.loads(answer)


def test_grounded_guidelines_shuffle_over_their_own_lines() -> None:
    kind = grounded_kind("retrieval")
    for seed in range(5):
        order = kind.sample_attributes(random.Random(seed))["guideline_order"]
        assert sorted(order) == list(range(kind.num_guidelines()))


def test_hard_negative_is_asked_about_as_long_as_the_passage() -> None:
    kind = grounded_kind("retrieval")
    long = {**PASSAGE, "text": " ".join(["word"] * 187)}
    attributes = kind.ground(kind.sample_attributes(random.Random(0)), long)
    assert attributes["num_words"] == 190
    assert kind.requested_words(attributes) == {"hard_negative_document": 190}


def test_short_matching_positive_is_the_title_or_the_first_sentence() -> None:
    kind = grounded_kind("matching_short")
    with_title = kind.ground({"language": "English"}, PASSAGE)
    assert kind.complete({"input": "x"}, with_title)["positive_document"] == PASSAGE["title"]
    untitled = kind.ground({"language": "English"}, {**PASSAGE, "title": None})
    prompt = kind.generation_prompt("Pair a claim with its finding.", untitled)
    target = first_sentence(PASSAGE["text"])
    assert target == "Vitamin D supplements raised lumbar bone density in older women over two years."
    assert f"Target text: {target}" in prompt
    assert kind.complete({"input": "x"}, untitled)["positive_document"] == target


def test_sampling_without_a_corpus_is_unchanged_and_with_one_grounds_only_its_kinds() -> None:
    pool = {"retrieval": ["Find a study."], "classification": ["Classify a review."]}
    mix = {"retrieval": 1, "classification": 1}
    plain, _ = sample_prompts(pool, 8, mix, random.Random(1))
    again, _ = sample_prompts(pool, 8, mix, random.Random(1), grounding=None)
    assert plain == again and all("passage" not in p.attributes for p in plain)
    passages = tuple({"id": f"p{i}", "text": f"passage number {i} " * 20, "title": None} for i in range(4))
    grounded, _ = sample_prompts(
        pool, 8, mix, random.Random(1), grounding=Grounding(passages, frozenset({"retrieval"}))
    )
    kinds = {p.kind for p in grounded}
    assert kinds == {"retrieval_grounded", "classification"}
    for p in grounded:
        if p.kind == "retrieval_grounded":
            assert p.attributes["passage"] in passages and p.attributes["passage"]["text"].strip() in p.prompt
        else:
            assert "passage" not in p.attributes


def test_grounded_kinds_are_found_but_not_listed_for_configs() -> None:
    from speed.tasks import kind_names

    assert "retrieval_grounded" not in kind_names()
    assert get_kind("retrieval_grounded").fields() == ("user_query", "hard_negative_document")


def test_synthesized_training_row_of_a_grounded_example_has_the_passage_as_positive() -> None:
    from speed.stages.synthesize import plan_shard, training_rows

    prompts = plan_shard(
        ["retrieval", "classification"],
        0,
        {"retrieval": ["Find the study."], "classification": ["Classify it."]},
        random.Random(0),
        "English",
        [1, 2],
        [3, 4],
        [PASSAGE, None],
    )
    assert [p["kind"] for p in prompts] == ["retrieval_grounded", "classification"]
    rec = {**prompts[0], "raw_output": "{}", "revisor_output": None, "revised": False}
    example = {"user_query": "vitamin d bones", "hard_negative_document": "A text on calcium."}
    (row,) = training_rows("00000", rec, example)
    assert row["positive"] == PASSAGE["text"] and row["query_text"] == "vitamin d bones"
    assert json.loads(row["example"])["positive_document"] == PASSAGE["text"]


# -- brainstorm and seed on a corpus, with a scripted teacher ---------------------------------------


class SchemaTeacher(Backend):
    """Answers by the request's JSON schema: tasks, or random words per example field."""

    name = "fake"
    model_id = "fake-teacher"

    def __init__(self) -> None:
        self.calls: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out = []
        for req in requests:
            self.calls.append(req)
            props = (req.schema or {}).get("properties", {})
            rng = random.Random(req.sampling.seed)
            if "tasks" in props:
                text = json.dumps({"tasks": [f"Given a claim, find evidence, angle {rng.random()}."]})
            else:
                text = json.dumps(
                    {f: " ".join(f"w{rng.randint(0, 10**6)}" for _ in range(60)) for f in props}
                )
            out.append(Completion(texts=[text], finish_reasons=["stop"], tokens_in=10, tokens_out=20))
        return out


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> SchemaTeacher:
    made = SchemaTeacher()
    monkeypatch.setattr("speed.llm.load_backend", lambda spec, **_: made)
    return made


def _config(tmp_path: Path, corpus: str | None) -> Path:
    section = (
        f"corpus: {{paths: [{corpus}], id_field: _id, title_field: title, sample_size: 4}}" if corpus else ""
    )
    path = tmp_path / "run.yaml"
    path.write_text(
        f"""
run: {{dir: {tmp_path / "run"}, seed: 3, threads: 1}}
pipeline: {{stages: [brainstorm, seed]}}
models:
  teacher: {{backend: openai, model: fake-teacher}}
brainstorm: {{kinds: [retrieval, classification], calls_per_kind: 2}}
seed: {{num_examples: 6, check_language: false, kind_mix: {{retrieval: 2, classification: 1}}}}
{section}
"""
    )
    return path


def _corpus(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "docs" / "corpus.jsonl"
    path.parent.mkdir(exist_ok=True)
    rows = [
        {"_id": f"d{i}", "title": f"Study {i}", "text": " ".join(f"t{i}x{j}" for j in range(40))}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_brainstorm_and_seed_ground_on_the_corpus(tmp_path: Path, teacher: SchemaTeacher) -> None:
    corpus = _corpus(tmp_path)
    Runner(load_config(_config(tmp_path, str(corpus)))).run()
    run = tmp_path / "run"
    sample = {r["id"]: r for r in read_jsonl(run / "corpus" / "sample.jsonl")}
    assert len(sample) == 4

    tasks = read_jsonl(run / "brainstorm" / "data.jsonl")
    retrieval_topics = [r["topic"] for r in tasks if r["kind"] == "retrieval"]
    assert retrieval_topics and all(t.startswith("corpus: ") for t in retrieval_topics)
    assert all(not r["topic"].startswith("corpus") for r in tasks if r["kind"] == "classification")
    brainstorm_prompts = [
        c.messages[-1]["content"] for c in teacher.calls if "tasks" in c.schema["properties"]
    ]
    on_corpus = [p for p in brainstorm_prompts if "excerpts of documents" in p]
    assert len(on_corpus) == 2 and all(any(s["text"][:30] in p for s in sample.values()) for p in on_corpus)

    seeds = read_jsonl(run / "seed" / "data.jsonl")
    grounded = [r for r in seeds if r["kind"] == "retrieval_grounded"]
    assert grounded and {r["kind"] for r in seeds} <= {"retrieval_grounded", "classification"}
    for row in grounded:
        passage = row["attributes"]["passage"]
        assert passage["id"] in sample and passage["text"] in row["prompt"]
        assert row["example"]["positive_document"] == passage["text"]
        assert "positive_document" not in json.loads(row["raw"])
    stats = read_json(run / "seed" / "manifest.json")["stats"]
    assert stats["grounded"] == len(
        [r for r in seeds + read_jsonl(run / "seed" / "dropped.jsonl") if r["kind"] == "retrieval_grounded"]
    )

    from speed.stages.junior import sft_rows

    completions = [json.loads(r["completion"]) for r in sft_rows(grounded)]
    assert all(set(c) == {"user_query", "hard_negative_document"} for c in completions)


def test_corpus_enters_the_keys_only_when_set(tmp_path: Path) -> None:
    plain = Runner(load_config(_config(tmp_path, None))).keys
    corpus = _corpus(tmp_path)
    keys = Runner(load_config(_config(tmp_path, str(corpus)))).keys
    assert keys["brainstorm"] != plain["brainstorm"] and keys["seed"] != plain["seed"]
    _corpus(tmp_path, n=7)
    changed = Runner(load_config(_config(tmp_path, str(corpus)))).keys
    assert changed["brainstorm"] != keys["brainstorm"] and changed["seed"] != keys["seed"]
    # the default corpus section is not in any key: a run without a corpus keeps its keys
    assert Runner(load_config(_config(tmp_path, None), ["corpus.chunk_tokens=100"])).keys == plain


def test_missing_corpus_fails_before_any_call(tmp_path: Path, teacher: SchemaTeacher) -> None:
    with pytest.raises(ConfigError, match=r"corpus.paths\[0\]: '.*nowhere.jsonl' does not exist"):
        Runner(load_config(_config(tmp_path, str(tmp_path / "nowhere.jsonl")))).run()
    assert teacher.calls == []


def test_grounded_examples_parse_in_every_stage_that_parses(tmp_path: Path) -> None:
    """Candidates, revisions and synthesize look a row's kind up by name: the grounded variant's
    schema is what the generator writes, and the revision schema follows it."""
    from speed.stages.revisions import revision_json_schema

    schema: dict[str, Any] = revision_json_schema("retrieval_grounded")
    assert list(schema["properties"]["revised"]["properties"]) == ["user_query", "hard_negative_document"]
