"""load_backend: lazy imports, install hints, threads, plugins."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from speed.config import ModelSpec
from speed.llm import Backend, Completion, MissingDependencyError, Request, load_backend, register_backend
from speed.llm.registry import backend_names, require


def test_unknown_backend_names_the_near_one() -> None:
    spec = ModelSpec.model_construct(backend="llamacp", model="m", threads=None, options={})
    with pytest.raises(ValueError, match="Did you mean 'llamacpp'"):
        load_backend(spec)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_missing_gives_the_install_hint() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'speed\[vllm\]'"):
        load_backend(ModelSpec(backend="vllm", model="some/model"))


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [("llamacpp", "llama_cpp", "llamacpp"), ("hf", "torch", "train")],
)
def test_missing_library_gives_the_install_hint(
    backend: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        load_backend(ModelSpec(backend=backend, model="smollm2-135m-instruct"))
    assert f"pip install 'speed[{extra}]'" in str(info.value) and module in str(info.value)
    assert isinstance(info.value, ImportError)


def test_llamacpp_server_checks_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from speed.llm import registry

    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda m: None if m == "uvicorn" else real(m))
    with pytest.raises(MissingDependencyError, match=r"uvicorn.*pip install 'speed\[llamacpp\]'"):
        registry.require_installed(("llama_cpp", "uvicorn"), extra="llamacpp", what="x")


def test_require_returns_the_module() -> None:
    assert require("json", extra="x", what="y").__name__ == "json"


class _Echo(Backend):
    name = "echo"

    def __init__(self, model: str, threads: int):
        self.model_id = model
        self.threads = threads

    @classmethod
    def from_spec(
        cls, spec: ModelSpec, *, threads: int | None = None, model_path: str | None = None
    ) -> _Echo:
        return cls(model_path or spec.model or "", threads or 0)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [Completion(texts=[r.messages[-1]["content"]] * r.sampling.n) for r in requests]


def test_plugin_backend_threads_and_model_path() -> None:
    register_backend("echo", __name__, "_Echo")
    assert "echo" in backend_names()
    spec: Any = ModelSpec.model_construct(backend="echo", model="base", threads=None, options={})
    backend = load_backend(spec, threads=3)
    assert isinstance(backend, _Echo) and backend.threads == 3 and backend.model_id == "base"
    # the role's own threads win over the run-wide default; model_path replaces the model
    spec = ModelSpec.model_construct(backend="echo", model="base", threads=2, options={})
    backend = load_backend(spec, threads=3, model_path="runs/x/junior/adapter")
    assert backend.threads == 2 and backend.model_id == "runs/x/junior/adapter"
    assert backend.generate([Request.chat("hi")])[0].text == "hi"
    # one thread when nothing says otherwise
    spec = ModelSpec.model_construct(backend="echo", model="base", threads=None, options={})
    assert load_backend(spec).threads == 1


def test_importing_speed_llm_stays_light() -> None:
    import subprocess

    code = "import sys, speed.llm, speed.models; print([m for m in ('torch','llama_cpp','vllm','transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
