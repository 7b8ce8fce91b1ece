"""Shared fixtures: real packaged models and a real llama.cpp server for integration tests.

Fixtures (all session-scoped, built on first use only, so unit tests never pay for them):

- ``smollm2_gguf``: the GGUF file of the packaged SmolLM2-135M-Instruct (:func:`speed.models.resolve_gguf`).
- ``smollm2_hf``: the same model converted once to a safetensors folder (:func:`speed.models.resolve_hf`).
- ``llama_server``: the base URL (``http://127.0.0.1:PORT/v1``) of a real ``llama_cpp.server`` process
  serving SmolLM2-135M with one thread (or the packaged model named by ``$SPEED_TEST_SERVER_MODEL``),
  stopped at the end of the session. Talk to it with the ``openai`` backend, e.g.
  ``parse_model_spec(llama_server_spec)``.
- ``llama_server_spec``: the fields of a model spec (:class:`speed.config.OpenAISpec`) for that server (backend
  ``openai``, model name, ``base_url``, one request at a time, few retries).

They skip (with the pip command in the reason) when llama-cpp-python or the model package is missing,
except under CI (``CI=true``), where `make setup` installed everything: a missing piece there is a
broken setup and fails the test instead of hiding it as a skip.
Tests that kill a server must start their own (:class:`speed.llm.server.LlamaCppServer`), never this one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from needs import skip_or_fail

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SERVER_MODEL_ENV = "SPEED_TEST_SERVER_MODEL"


def _need_packaged(name: str) -> None:
    from speed.models import PACKAGED, is_installed

    if not is_installed(name):
        skip_or_fail(f"packaged model {name} is not installed: {PACKAGED[name].install_command}")


def _need_llama_cpp(server: bool = False) -> None:
    modules = ["llama_cpp"] + (["uvicorn", "fastapi", "sse_starlette"] if server else [])
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed: pip install 'speed[llamacpp]'")


@pytest.fixture(scope="session")
def need_llama_cpp() -> None:
    """llama-cpp-python with its server extra (skips where absent, fails under CI)."""
    _need_llama_cpp(server=True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file of the packaged SmolLM2-135M-Instruct."""
    from speed.models import resolve_gguf

    _need_packaged("smollm2-135m-instruct")
    return resolve_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder with its tokenizer (converted once, cached)."""
    from speed.models import resolve_hf

    _need_packaged("smollm2-135m-instruct")
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("converting the GGUF needs transformers and gguf: pip install 'speed[train]'")
    return Path(resolve_hf("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real llama.cpp server on 127.0.0.1 serving a packaged model (one thread)."""
    from speed.llm.server import LlamaCppServer
    from speed.models import resolve_gguf

    name = os.environ.get(SERVER_MODEL_ENV, "smollm2-135m-instruct")
    _need_llama_cpp(server=True)
    _need_packaged(name)
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    server = LlamaCppServer(resolve_gguf(name), threads=1, n_ctx=2048, alias=name, log_path=log)
    with server:
        yield server.base_url


@pytest.fixture(scope="session")
def llama_server_spec(llama_server: str) -> dict[str, Any]:
    """Model spec fields for the ``llama_server`` through the openai backend."""
    return {
        "backend": "openai",
        "model": os.environ.get(SERVER_MODEL_ENV, "smollm2-135m-instruct"),
        "base_url": llama_server,
        "concurrency": 1,
        "max_retries": 2,
        "timeout_s": 120.0,
        "options": {
            "schema_mode": "json_object",
            "retry_initial_s": 0.2,
            "retry_max_s": 2.0,
            # sample as the request says, as the llamacpp_server backend does (no top-k/min-p extras)
            "extra_body": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
        },
    }
