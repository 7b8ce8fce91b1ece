"""Every task kind, end to end with a real packaged model through llama.cpp: brainstorm, generate,
parse and filter.

Qwen2.5-Coder-0.5B-Instruct (the PyPI-packaged GGUF of MODELS.md) runs on one CPU thread with the
kind's JSON schema as a grammar and SPEED's sampling (temperature 1.0), as the synthesis stages run
it. The model is small and its examples are often shallow or copied (S2 = S1), which the filters
drop: the test asks for ``NEEDED`` kept examples within ``MAX_ATTEMPTS`` prompts per kind. To keep
it to minutes, lengths are set to SPEED's shortest values (50-word documents, classification inputs
of at least 10 words); every other attribute is sampled.
"""

from __future__ import annotations

import random

import pytest

from speed.config import LlamaCppSpec
from speed.data.filters import DropCounter, default_filters, first_failure
from speed.llm import Request, Sampling, load_backend
from speed.tasks import TaskList, get_kind, kind_names, strict_schema

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b-instruct"
NEEDED = 5
MAX_ATTEMPTS = 30  # the loop stops at NEEDED; retrieval needs the most (5 kept of 15 here, 2026-12-08)
TOPIC = "Home/Energy at home/Heat pumps"
SHORTEST = {"retrieval": {"num_words": 50}, "classification": {"input_length": "at least 10 words"}}
MAX_TOKENS = {"retrieval": 400, "classification": 250, "matching_long": 400}


@pytest.fixture(scope="module")
def backend():
    spec = LlamaCppSpec(model=MODEL, n_ctx=4096)
    with load_backend(spec, threads=1) as b:
        yield b


def _tasks(backend, kind) -> list[str]:
    if not kind.brainstormed:
        return list(kind.fixed_tasks)
    request = Request.chat(
        kind.brainstorm_prompt(TOPIC, n=5),
        sampling=Sampling(temperature=1.0, max_tokens=300, seed=1),
        schema=strict_schema(TaskList),
    )
    (completion,) = backend.generate([request])
    assert completion.error is None, completion.error
    parsed = kind.parse_tasks(completion.text)
    assert parsed.ok, f"{parsed.reason}: {parsed.detail}\n{completion.text}"
    return parsed.value.tasks


@pytest.mark.parametrize("name", kind_names())
def test_kind_yields_examples_that_parse_and_pass_the_filters(backend, name):
    kind = get_kind(name)
    tasks = _tasks(backend, kind)
    rng = random.Random(0)
    filters = default_filters()
    counter = DropCounter(name)
    rows = []
    for attempt in range(MAX_ATTEMPTS):
        if counter.kept >= NEEDED:
            break
        task = tasks[attempt % len(tasks)]
        attributes = kind.sample_attributes(rng) | SHORTEST.get(name, {})
        sampling = Sampling(temperature=1.0, max_tokens=MAX_TOKENS.get(name, 200), seed=100 + attempt)
        request = Request.chat(
            kind.generation_prompt(task, attributes), sampling=sampling, schema=kind.json_schema()
        )
        (completion,) = backend.generate([request])
        result = kind.parse(completion.text)
        if not result.ok:
            counter.drop(result.reason or "parse", result.detail)
            continue
        if first_failure(result.value, kind, attributes, filters, counter) is None:
            counter.keep()
            rows.extend(kind.to_rows(task, result.value))
    counter.log_summary()
    assert counter.kept >= NEEDED, f"{name}: {counter.as_dict()}"
    for row in rows:
        assert row["query"].startswith("Instruct: ") and "\nQuery: " in row["query"] and row["positive"]
        assert (row["negative"] is not None) == (kind.negative_field is not None)
