"""The alignment stages with real models: a llama.cpp teacher server and SmolLM2-135M as the base.

brainstorm -> seed -> junior -> candidates -> judge -> senior -> revisions -> revisor at small
counts, through the Runner, on one thread. The teacher is ``backend: llamacpp_server`` with a
packaged model (``$SPEED_TEST_TEACHER``, default qwen2.5-coder-0.5b-instruct: its schema-constrained
JSON survives the filters, SmolLM2's mostly does not); the junior, senior and revisor start from
SmolLM2-135M-Instruct and generate with the hf backend. Kinds with short outputs (STS, short
matching) keep the teacher's answers within a few hundred tokens. A 135M model sampled at SPEED's
temperature 1.0 after a few SFT steps rarely writes valid JSON, so the candidates are sampled at 0.7
and top_p 0.9 here, and the judge (a 0.5B teacher, with a strong bias for the first candidate shown)
sees only the candidates that parse (``judge.unparseable: drop``), to leave it something to prefer.
About 10-20 minutes on 2 cores.

Checked: every stage writes its manifest, the trainers their adapters and merged models; teacher
calls are counted per stage; the senior prefers the judge's chosen over rejected more than the junior
does (its DPO loss on its pairs is below log 2, the loss of the junior against itself); a rerun
skips every stage and sends no call (ledger unchanged).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from speed.config import load_config
from speed.io import read_json, read_jsonl
from speed.ledger import Ledger
from speed.runner import Runner

pytestmark = pytest.mark.slow

STAGES = ["brainstorm", "seed", "junior", "candidates", "judge", "senior", "revisions", "revisor"]
TEACHER = os.environ.get("SPEED_TEST_TEACHER", "qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="module")
def models_ready() -> None:
    import importlib.util

    from speed.models import PACKAGED, is_installed

    for name in (TEACHER, "smollm2-135m-instruct"):
        if not is_installed(name):
            pytest.skip(f"packaged model {name} is not installed: {PACKAGED[name].install_command}")
    for module in ("llama_cpp", "uvicorn", "trl", "peft"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install 'speed[llamacpp,train]'")


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "alignment.yaml"
    path.write_text(
        f"""
run: {{dir: {tmp_path / "run"}, seed: 11, threads: 1}}
pipeline: {{stages: {STAGES}}}
models:
  teacher: {{backend: llamacpp_server, model: {TEACHER}, threads: 1, n_ctx: 4096, max_tokens: 320,
             batch_size: 4, timeout_s: 600}}
  junior: {{backend: hf, model: smollm2-135m-instruct, max_tokens: 256, top_p: 0.9, batch_size: 8}}
  senior: {{backend: hf, max_tokens: 256, top_p: 0.9, batch_size: 8}}
  revisor: {{backend: hf, model: smollm2-135m-instruct, max_tokens: 256}}
brainstorm: {{kinds: [matching_short, sts], calls_per_kind: 3, tasks_per_call: 5, keep_per_call: null}}
seed: {{num_examples: 16, kind_mix: {{matching_short: 1, sts: 1}}}}
junior: {{max_steps: 10, batch_size: 2, per_device_batch_size: 2, max_length: 768, learning_rate: 0.0005}}
candidates: {{num_prompts: 6, k: 4, temperature: 0.7}}
judge: {{unparseable: drop}}
senior: {{max_steps: 4, batch_size: 2, per_device_batch_size: 2, max_length: 768, learning_rate: 0.0005}}
revisions: {{num_prompts: 3}}
revisor: {{max_steps: 2, batch_size: 2, per_device_batch_size: 2, max_length: 1536, learning_rate: 0.0005}}
"""
    )
    return path


def test_alignment_stages_with_real_models(tmp_path: Path, models_ready: None) -> None:
    import torch

    from speed.training.dpo import preference_loss

    torch.set_num_threads(1)
    cfg_path = write_config(tmp_path)
    statuses = Runner(load_config(cfg_path)).run()
    assert [s.state for s in statuses] == ["done"] * len(STAGES)
    run = tmp_path / "run"
    manifests = {s: read_json(run / s / "manifest.json") for s in STAGES}

    # teacher calls are counted where they were made, and only there
    for stage in ("brainstorm", "seed", "judge", "revisions"):
        assert manifests[stage]["calls"]["teacher"]["calls"] > 0, stage
    assert manifests["brainstorm"]["calls"]["teacher"]["calls"] == 3  # matching_short only; sts is fixed
    for stage in ("junior", "candidates", "senior", "revisor"):
        assert "teacher" not in manifests[stage]["calls"], stage
    assert manifests["candidates"]["calls"]["junior"]["calls"] == manifests["candidates"]["stats"]["count"]

    for stage in ("junior", "senior", "revisor"):
        assert (run / stage / "adapter" / "adapter_config.json").is_file(), stage
        assert (run / stage / "merged" / "model.safetensors").is_file(), stage
        stats = manifests[stage]["stats"]
        assert stats["steps"] > 0 and math.isfinite(stats["loss_last"]), stage

    seed = read_jsonl(run / "seed" / "data.jsonl")
    assert seed and all(r["raw"] and r["example"] for r in seed)

    # the senior moved towards the teacher's choices: DPO loss on its pairs below the junior's log 2
    pairs = read_jsonl(run / "judge" / "data.jsonl")
    score = preference_loss(run / "senior" / "merged", run / "junior" / "merged", pairs, beta=0.1, threads=1)
    assert score.loss < math.log(2), score
    assert score.margin > 0, score
    losses = read_json(run / "senior" / "train_result.json")["losses"]
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)

    # a rerun finds every stage done: nothing runs, no call is sent
    ledger = Ledger(run / "ledger.sqlite")
    rows = len(ledger.rows(limit=100_000))
    statuses = Runner(load_config(cfg_path)).run()
    assert all(s.state == "done" for s in statuses)
    assert len(ledger.rows(limit=100_000)) == rows
    for s in STAGES:
        assert read_json(run / s / "manifest.json")["finished_at"] == manifests[s]["finished_at"]
