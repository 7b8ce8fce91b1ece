"""llama.cpp in process on the packaged SmolLM2-135M (one thread)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from speed.config import LlamaCppSpec
from speed.ledger import Ledger, LedgeredBackend
from speed.llm import Request, Sampling, load_backend
from speed.llm.llamacpp import LlamaCppBackend

pytestmark = pytest.mark.slow

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llama_cpp")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "user_query": {"type": "string", "maxLength": 80},
        "label": {"type": "string", "enum": ["positive", "negative"]},
    },
    "required": ["user_query", "label"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def backend(smollm2_gguf: Path) -> Any:
    spec = LlamaCppSpec(model="smollm2-135m-instruct", n_ctx=1024)
    with load_backend(spec, threads=1) as b:
        assert isinstance(b, LlamaCppBackend)
        yield b


def test_schema_constrained_output_validates(backend: LlamaCppBackend) -> None:
    reqs = [
        Request.chat(f"Write a search query about {t} and its sentiment label as JSON.", schema=SCHEMA,
                     sampling=Sampling(max_tokens=64, seed=i))
        for i, t in enumerate(["cheap flights", "broken phones"])
    ]  # fmt: skip
    for comp in backend.generate(reqs):
        assert comp.error is None and comp.finish_reasons == ["stop"]
        # llama-cpp-python's schema grammar admits raw control characters inside strings
        jsonschema.validate(json.loads(comp.text, strict=False), SCHEMA)


def test_samples_differ_and_seeds_repeat(backend: LlamaCppBackend) -> None:
    req = Request.chat("Name an animal.", sampling=Sampling(max_tokens=12, n=4, seed=7))
    first, again = backend.generate([req, req])
    assert len(first.texts) == 4 and len(set(first.texts)) > 1
    assert first.texts == again.texts
    unseeded = backend.generate([Request.chat("Name an animal.", sampling=Sampling(max_tokens=12, n=4))])[0]
    assert len(set(unseeded.texts)) > 1


def test_tokens_in_the_ledger_and_long_prompt_is_a_drop(backend: LlamaCppBackend, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledgered = LedgeredBackend(backend, ledger, role="junior", stage="candidates")
    ok, too_long = ledgered.generate(
        [Request.chat("Say hi.", sampling=Sampling(max_tokens=8)), Request.chat("word " * 2000)]
    )
    assert ok.error is None and ok.tokens_in > 0 and ok.tokens_out > 0
    assert too_long.error is not None and "context window" in too_long.error
    totals = ledger.totals()
    assert (totals.calls, totals.errors, totals.tokens_in, totals.tokens_out) == (
        1,
        1,
        ok.tokens_in,
        ok.tokens_out,
    )


def test_deterministic_request_gets_the_same_text_whatever_came_before(smollm2_gguf: Path) -> None:
    req = Request.chat("Describe a city in one sentence.", sampling=Sampling(max_tokens=24, seed=3))
    other = Request.chat(
        "Describe a city and its river in one sentence.", sampling=Sampling(max_tokens=24, seed=4)
    )
    with LlamaCppBackend("smollm2-135m-instruct", threads=1, n_ctx=512, deterministic=True) as det:
        alone = det.generate([req])[0].texts
        after_other = det.generate([other, req])[1].texts  # shares a prefix that would be reused
        assert alone == after_other and alone[0]
