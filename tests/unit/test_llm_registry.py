"""load_backend: lazy imports, install hints, threads, plugin backends reached from a config."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from speed.config import (
    ConfigError,
    HFSpec,
    LocalSpec,
    ModelSpec,
    Section,
    VLLMSpec,
    load_config,
    parse_model_spec,
    spec_classes,
)
from speed.llm import Backend, Completion, MissingDependencyError, Request, load_backend, register_backend
from speed.llm.registry import backend_names, require


def test_the_union_of_specs_and_the_backends_are_one_set() -> None:
    assert set(backend_names()) == set(spec_classes())
    assert {"openai", "llamacpp_server", "llamacpp", "hf", "vllm"} <= set(backend_names())


def test_unknown_backend_names_the_near_one_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"models\.teacher\.backend.*'llamacp'.*Did you mean 'llamacpp'"):
        load_config(None, ["models.teacher.backend=llamacp"])


def test_a_spec_of_another_class_is_refused() -> None:
    # a spec whose class does not match its backend cannot come from a config; code that builds one
    # by hand gets a TypeError naming the class, not an AttributeError deep in from_spec
    spec = HFSpec.model_construct(backend="vllm", model="m")
    with pytest.raises(TypeError, match="VLLMSpec"):
        load_backend(spec)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_missing_gives_the_install_hint() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'speed\[vllm\]'"):
        load_backend(VLLMSpec(model="some/model"))


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [("llamacpp", "llama_cpp", "llamacpp"), ("hf", "torch", "train")],
)
def test_missing_library_gives_the_install_hint(
    backend: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        load_backend(parse_model_spec({"backend": backend, "model": "smollm2-135m-instruct"}))
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


class _EchoOptions(Section):
    prefix: str = ""


class _EchoSpec(LocalSpec):
    backend: Literal["echo"] = "echo"
    options: _EchoOptions = Field(default_factory=_EchoOptions)


class _Echo(Backend):
    name = "echo"

    def __init__(self, model: str, threads: int, prefix: str = ""):
        self.model_id = model
        self.threads = threads
        self.prefix = prefix

    @classmethod
    def from_spec(
        cls, spec: _EchoSpec, *, threads: int | None = None, model_path: str | None = None
    ) -> _Echo:
        return cls(model_path or spec.model or "", threads or 0, spec.options.prefix)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [Completion(texts=[self.prefix + r.messages[-1]["content"]] * r.sampling.n) for r in requests]


def test_plugin_backend_is_reached_from_a_config() -> None:
    register_backend("echo", __name__, "_Echo", spec=_EchoSpec)
    assert "echo" in backend_names() and spec_classes()["echo"] is _EchoSpec
    cfg = load_config(
        None, ["models.junior.backend=echo", "models.junior.model=base", "models.junior.options.prefix=E-"]
    )
    assert isinstance(cfg.models.junior, _EchoSpec)
    backend = load_backend(cfg.models.junior, threads=3)
    assert isinstance(backend, _Echo) and backend.threads == 3 and backend.model_id == "base"
    assert backend.generate([Request.chat("hi")])[0].text == "E-hi"
    # the role's own threads win over the run-wide default; model_path replaces the model
    spec = parse_model_spec({"backend": "echo", "model": "base", "threads": 2})
    backend = load_backend(spec, threads=3, model_path="runs/x/junior/adapter")
    assert backend.threads == 2 and backend.model_id == "runs/x/junior/adapter"
    # one thread when nothing says otherwise
    assert load_backend(parse_model_spec({"backend": "echo", "model": "base"})).threads == 1
    # its options are checked when the config loads, as a built-in backend's are
    with pytest.raises(
        ConfigError, match=r"models\.junior\.options\.prefx.*\(backend 'echo'\).*Did you mean 'prefix'"
    ):
        load_config(None, ["models.junior.backend=echo", "models.junior.options.prefx=>"])


def test_register_backend_refuses_a_spec_of_another_backend() -> None:
    with pytest.raises(TypeError, match="Literal\\['other'\\]"):
        register_backend("other", __name__, "_Echo", spec=_EchoSpec)
    assert "other" not in backend_names() and "other" not in spec_classes()
    with pytest.raises(TypeError, match="not a subclass"):
        register_backend("other", __name__, "_Echo", spec=ModelSpec)
    with pytest.raises(TypeError, match="base of the per-backend specs"):
        ModelSpec(backend="hf")


def test_a_plugin_in_the_config_registers_its_backend_before_the_roles_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "speed_plugin_shout.py").write_text(
        "from typing import Literal\n"
        "from speed.config import ModelSpec\n"
        "from speed.llm import register_backend\n"
        "class ShoutSpec(ModelSpec):\n"
        "    backend: Literal['shout'] = 'shout'\n"
        "    volume: int = 11\n"
        "register_backend('shout', __name__, 'ShoutBackend', spec=ShoutSpec)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text(
        "pipeline:\n  plugins: [speed_plugin_shout]\nmodels:\n  teacher:\n    backend: shout\n    volume: 12\n"
    )
    cfg = load_config(config)
    assert (
        type(cfg.models.teacher).__name__ == "ShoutSpec" and cfg.models.teacher.model_dump()["volume"] == 12
    )
    with pytest.raises(ConfigError, match=r"'models\.teacher\.volume' \(backend 'shout'\).*valid integer"):
        load_config(config, ["models.teacher.volume=loud"])


def test_importing_speed_llm_stays_light() -> None:
    import subprocess

    code = "import sys, speed.llm, speed.models; print([m for m in ('torch','llama_cpp','vllm','transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
