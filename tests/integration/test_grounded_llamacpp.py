"""Grounded seed data with the real packaged teacher: brainstorm and seed on a tiny corpus.

Qwen2.5-Coder-0.5B-Instruct served by llama.cpp (as configs/quickstart.yaml runs it) brainstorms
retrieval tasks on excerpts of six SciFact abstracts and writes seed examples for sampled passages,
under the grounded kind's JSON schema. The test shows that grounded seed examples come out of a real
model: some parse and pass the filters, and every kept one has its passage as the positive. It
prints the figures (prompts, kept, drops by reason); it does not ask for a rate, which a 0.5B model
at temperature 1.0 does not promise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from needs import skip_or_fail
from speed.config import load_config
from speed.io import read_json, read_jsonl
from speed.paths import EvalDataNotFoundError, eval_data_dir
from speed.runner import Runner

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b-instruct"
DOCS = 6
PROMPTS = 6


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    try:
        source = eval_data_dir() / "retrieval" / "SciFact" / "corpus.jsonl"
    except EvalDataNotFoundError as err:
        skip_or_fail(str(err))
    rows = []
    with open(source, encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == DOCS:
                break
    path = tmp_path / "docs" / "abstracts.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path.parent


def test_teacher_writes_grounded_seed_examples(tmp_path: Path, corpus: Path) -> None:
    from speed.models import is_installed

    if not is_installed(MODEL):
        skip_or_fail(f"the packaged model {MODEL} is not installed (make setup)")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        f"""
run: {{dir: {tmp_path / "run"}, seed: 0, threads: 2}}
pipeline: {{stages: [brainstorm, seed]}}
models:
  teacher:
    backend: llamacpp_server
    model: {MODEL}
    max_tokens: 300
    n_ctx: 4096
    batch_size: 4
    timeout_s: 300
    options: {{parallel: 2}}
corpus:
  paths: [{corpus}]
  id_field: _id
  title_field: title
  chunk_tokens: 120
  chunk_overlap: 20
brainstorm: {{kinds: [retrieval], calls_per_kind: 1, tasks_per_call: 3}}
seed: {{num_examples: {PROMPTS}, kind_mix: {{retrieval: 1}}}}
"""
    )
    Runner(load_config(cfg_path)).run()
    run = tmp_path / "run"
    tasks = read_jsonl(run / "brainstorm" / "data.jsonl")
    assert tasks and all(t["topic"].startswith("corpus: ") for t in tasks)
    kept = read_jsonl(run / "seed" / "data.jsonl")
    dropped = read_jsonl(run / "seed" / "dropped.jsonl")
    stats = read_json(run / "seed" / "manifest.json")["stats"]
    from speed.data.parsing import EMPTY_OUTPUT, NO_JSON, SCHEMA_MISMATCH

    unparsed = (EMPTY_OUTPUT, NO_JSON, SCHEMA_MISMATCH, "generation_error")
    parsed = len(kept) + sum(r["reason"] not in unparsed for r in dropped)
    print(
        f"\ngrounded seed with {MODEL}: {stats['grounded']} prompts, {parsed} parsed, {len(kept)} kept; "
        f"drops {stats['drops']}; tasks: {[t['task'] for t in tasks]}"
    )
    for row in kept[:2]:
        print(json.dumps({"task": row["task"], **row["example"]}, ensure_ascii=False)[:600])
    assert stats["grounded"] == PROMPTS
    assert kept, f"no grounded seed example kept: {stats['drops']}"
    for row in kept:
        assert row["kind"] == "retrieval_grounded"
        assert row["example"]["positive_document"] == row["attributes"]["passage"]["text"]
        assert row["example"]["user_query"].strip()
