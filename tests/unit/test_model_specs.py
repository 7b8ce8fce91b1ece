"""Model specs: one typed class per backend, checked when the config loads; the shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from speed.config import (
    ROLES,
    ConfigError,
    LlamaCppServerOptions,
    OpenAISpec,
    VLLMSpec,
    load_config,
    parse_model_spec,
    spec_classes,
)
from speed.runner import Runner, _hash, spec_identity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["quickstart", "paper"])
def test_shipped_configs_load_and_every_role_has_its_backends_spec(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    for role in ROLES:
        spec = getattr(cfg.models, role)
        assert type(spec) is spec_classes()[spec.backend], role
        # what the run writes into config.yaml reads back as the same spec
        assert parse_model_spec(spec.model_dump(mode="json")) == spec, role
    Runner(cfg)  # the stage graph and every stage key are built from the loaded config


def test_paper_options_are_typed_engine_arguments() -> None:
    cfg = load_config(CONFIGS / "paper.yaml")
    junior = cfg.models.junior
    assert isinstance(junior, VLLMSpec) and junior.options.gpu_memory_utilization == 0.85
    assert junior.options.to_engine_args() == {"gpu_memory_utilization": 0.85}
    assert isinstance(cfg.models.teacher, OpenAISpec) and cfg.models.teacher.requests_per_minute == 3000


# The model-spec part of stage keys, as the one flat ModelSpec computed it before specs were typed
# per backend (speed at commit 9bfeda2, `_hash(spec_identity(spec))` per role). Typed specs must
# hash the same, or every existing run would redo every stage that uses a model.
FLAT_SPEC_HASHES = {
    "quickstart": {
        "teacher": "ae2af7a0a29a891d",
        "junior": "73134a318b78caed",
        "senior": "1020b1db85a12883",
        "revisor": "73134a318b78caed",
        "embedder": "ffcbc5c970f58f89",
    },
    "paper": {
        "teacher": "cfe1841d5fc44856",
        "junior": "38215384fe2f2eb5",
        "senior": "35ae7d37a4ccf6c5",
        "revisor": "38215384fe2f2eb5",
        "embedder": "8564f8b7ee5b93c3",
    },
}


#: the quickstart's models as they were at that commit (the quickstart has since moved its generators
#: to llama.cpp's server, a deliberate change of its keys)
QUICKSTART_MODELS_THEN = """
models:
  teacher: {backend: llamacpp_server, model: qwen2.5-coder-0.5b-instruct, temperature: 1.0,
            max_tokens: 320, n_ctx: 4096, batch_size: 4, timeout_s: 600}
  junior: {backend: hf, model: smollm2-135m-instruct, max_tokens: 256, top_p: 0.9, batch_size: 8}
  senior: {backend: hf, max_tokens: 256, top_p: 0.9, batch_size: 8}
  revisor: {backend: hf, model: smollm2-135m-instruct, max_tokens: 256, top_p: 0.9, batch_size: 8}
  embedder: {model: sentence-transformers/all-MiniLM-L6-v2, threads: 2}
"""


@pytest.mark.parametrize("name", ["quickstart", "paper"])
def test_typed_specs_keep_the_stage_key_part_of_the_flat_spec(name: str, tmp_path: Path) -> None:
    path = CONFIGS / f"{name}.yaml"
    if name == "quickstart":
        path = tmp_path / "quickstart-then.yaml"
        path.write_text(QUICKSTART_MODELS_THEN, encoding="utf-8")
    cfg = load_config(path)
    got = {role: _hash(spec_identity(getattr(cfg.models, role))) for role in ROLES}
    assert got == FLAT_SPEC_HASHES[name]


def test_runtime_fields_stay_out_of_the_key_and_options_enter_it() -> None:
    base = load_config(CONFIGS / "paper.yaml").models.junior
    faster = load_config(CONFIGS / "paper.yaml", ["models.junior.threads=3", "models.junior.batch_size=64"])
    other = load_config(CONFIGS / "paper.yaml", ["models.junior.options.tensor_parallel_size=2"])
    assert spec_identity(faster.models.junior) == spec_identity(base)
    assert spec_identity(other.models.junior) != spec_identity(base)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_option_names_the_role_the_field_and_the_near_one(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "models:\n  junior:\n    backend: vllm\n    options: {gpu_memory_utilisation: 0.8}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "'models.junior.options.gpu_memory_utilisation'" in msg and "(backend 'vllm')" in msg
    assert "Did you mean 'gpu_memory_utilization'?" in msg


def test_a_field_of_another_backend_is_refused_naming_the_backend(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  teacher:\n    backend: openai\n    model: m\n    n_ctx: 2048\n")
    with pytest.raises(ConfigError, match=r"'models\.teacher\.n_ctx' \(backend 'openai'\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("models.junior.options.gpu_memory_utilization=lots", "models.junior.options.gpu_memory_utilization"),
        ("models.junior.options.gpu_memory_utilization=1.5", "models.junior.options.gpu_memory_utilization"),
        ("models.teacher.options.schema_mode=strict", "models.teacher.options.schema_mode"),
        ("models.senior.options.tensor_parallel_size=two", "models.senior.options.tensor_parallel_size"),
    ],
)
def test_a_wrong_typed_option_fails_when_the_config_loads(override: str, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"config key '{where}' \(backend '\w+'\)"):
        load_config(CONFIGS / "paper.yaml", [override])


def test_quickstart_server_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.teacher\.options\.startup_timeout.*Did you mean"):
        load_config(CONFIGS / "quickstart.yaml", ["models.teacher.options.startup_timeout=60"])
    cfg = load_config(CONFIGS / "quickstart.yaml", ["models.teacher.options.startup_timeout_s=60"])
    assert cfg.models.teacher.options.startup_timeout_s == 60  # type: ignore[attr-defined]


def test_vllm_engine_args_cannot_shadow_a_typed_option() -> None:
    with pytest.raises(ConfigError, match=r"engine_args sets gpu_memory_utilization"):
        load_config(CONFIGS / "paper.yaml", ["models.junior.options.engine_args={gpu_memory_utilization: 2}"])
    cfg = load_config(CONFIGS / "paper.yaml", ["models.junior.options.engine_args={swap_space: 8}"])
    assert cfg.models.junior.options.to_engine_args() == {  # type: ignore[attr-defined]
        "gpu_memory_utilization": 0.85,
        "swap_space": 8,
    }


def test_the_embedder_is_a_transformers_model() -> None:
    with pytest.raises(ConfigError, match=r"models\.embedder\.backend"):
        load_config(None, ["models.embedder.backend=vllm"])


def test_server_option_defaults_match_the_backends_own() -> None:
    # LlamaCppServerBackend keeps its defaults for direct construction; the typed options must agree
    from speed.llm import server

    assert LlamaCppServerOptions().model_dump() == server._OPTIONS


@pytest.mark.parametrize("name", ["quickstart", "paper"])
def test_keys_survive_the_round_trip_through_the_runs_config_yaml(name: str, tmp_path: Path) -> None:
    # `speed status RUN` and a resumed run read RUN/config.yaml, where every option is written out:
    # an option at its default must key as one left out, or a finished run shows as stale
    from speed.runner import Runner

    cfg = load_config(CONFIGS / f"{name}.yaml", [f"run.dir={tmp_path / 'run'}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml(), encoding="utf-8")
    assert Runner(load_config(saved)).keys == Runner(cfg).keys


def test_each_local_spec_says_whether_the_same_request_gets_the_same_text() -> None:
    from speed.config import HFSpec, LlamaCppServerSpec, LlamaCppSpec, OpenAISpec

    assert "slots" in (LlamaCppServerSpec(model="m").nondeterminism() or "")
    assert LlamaCppServerSpec(model="m", options={"deterministic": True}).nondeterminism() is None
    python = LlamaCppServerSpec(model="m", options={"deterministic": True, "engine": "python"})
    assert "engine native" in (python.nondeterminism() or "")
    assert LlamaCppSpec(model="m").nondeterminism() is not None
    assert LlamaCppSpec(model="m", options={"deterministic": True}).nondeterminism() is None
    assert HFSpec(model="m", device="cpu", options={"deterministic": True}).nondeterminism() is None
    assert "batch" in (HFSpec(model="m").nondeterminism() or "")
    assert "openai" in (OpenAISpec(model="gpt-4o").nondeterminism() or "")
