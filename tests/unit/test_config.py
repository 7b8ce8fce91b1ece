"""Config loading: YAML plus dotted overrides fill the same typed sections; typos are named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from speed.config import ConfigError, load_config


def test_defaults_are_the_papers_values():
    cfg = load_config()
    assert cfg.senior.beta == 0.1
    assert cfg.senior.learning_rate == 1e-5
    assert cfg.junior.learning_rate == 1e-4 and cfg.junior.batch_size == 16
    assert cfg.revisor.learning_rate == 5e-6 and cfg.revisor.batch_size == 24
    assert cfg.embed.temperature == 0.02
    assert cfg.candidates.k == 5
    assert cfg.judge.temperature == 0.0


def test_yaml_and_overrides_fill_the_same_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed:\n  num_examples: 10\nmodels:\n  teacher:\n    backend: llamacpp_server\n")
    cfg = load_config(path, ["seed.num_examples=200", "models.teacher.model=qwen2.5-coder-0.5b-instruct"])
    assert cfg.seed.num_examples == 200
    assert cfg.models.teacher.backend == "llamacpp_server"
    assert cfg.models.teacher.model == "qwen2.5-coder-0.5b-instruct"


def test_misspelt_yaml_key_names_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("brainstrom:\n  calls_per_kind: 3\n")
    with pytest.raises(ConfigError, match=r"'brainstrom'.*Did you mean 'brainstorm'\?"):
        load_config(path)


def test_misspelt_nested_yaml_key_names_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("senior:\n  betta: 0.2\n")
    with pytest.raises(ConfigError, match=r"senior\.betta.*Did you mean 'beta'\?"):
        load_config(path)


def test_misspelt_override_names_the_nearest():
    with pytest.raises(ConfigError, match=r"seed\.num_exampels.*Did you mean 'num_examples'\?"):
        load_config(None, ["seed.num_exampels=5"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"config key 'senior\.beta'"):
        load_config(None, ["senior.beta=high"])


def test_unknown_kind_in_mix_is_refused():
    with pytest.raises(ConfigError, match="retrieval"):
        load_config(None, ["synthesize.kind_mix={retreival: 1}"])


def test_cli_exits_nonzero_naming_the_misspelt_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "speed.cli", "run", str(path), "-o", "seed.num_exampels=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "num_exampels" in proc.stderr
    assert "num_examples" in proc.stderr.split("num_exampels", 1)[1]
    assert not (tmp_path / "run").exists()


def test_a_role_without_backend_tweaks_the_default_spec():
    cfg = load_config(None, ["models.teacher.threads=7", "models.embedder.model=my/embedder"])
    assert (cfg.models.teacher.backend, cfg.models.teacher.model, cfg.models.teacher.threads) == (
        "openai",
        "gpt-4o",
        7,
    )
    assert (cfg.models.embedder.backend, cfg.models.embedder.model) == ("hf", "my/embedder")
    # naming a backend starts a spec of its own: the default's API key variable does not leak in
    own = load_config(None, ["models.teacher.backend=llamacpp_server", "models.teacher.model=m"])
    assert (
        own.models.teacher.backend == "llamacpp_server"
        and "api_key_env" not in own.models.teacher.model_dump()
    )
    # a tweak is checked against the default's backend: the default teacher (openai) has no n_ctx
    with pytest.raises(ConfigError, match=r"'models\.teacher\.n_ctx' \(backend 'openai'\)"):
        load_config(None, ["models.teacher.n_ctx=2048"])


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ("seed.num_examples=true", "seed.num_examples", "valid integer"),  # a bool is not a count
        ("seed.num_examples=-3", "seed.num_examples", "greater than 0"),
        ("brainstorm.calls_per_kind=0", "brainstorm.calls_per_kind", "greater than 0"),
        ("models.teacher.temperature=-0.5", "models.teacher.temperature", "greater than or equal to 0"),
        ("models.teacher.top_p=0", "models.teacher.top_p", "greater than 0"),
        ("models.teacher.top_p=1.5", "models.teacher.top_p", "less than or equal to 1"),
        ("synthesize.kind_mix={}", "synthesize.kind_mix", "no kind a positive weight"),
        ("synthesize.kind_mix={retrievl: 1}", "synthesize.kind_mix", "Did you mean 'retrieval'"),
        ("run.dir=''", "run.dir", "run.dir is empty"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_field(override, field, why):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"'{field}'" in str(err.value) and why in str(err.value)


def test_a_context_too_small_to_hold_a_prompt_is_refused():
    with pytest.raises(ConfigError, match=r"'models.teacher.n_ctx'.*256"):
        load_config(None, ["models.teacher.backend=llamacpp_server", "models.teacher.n_ctx=64"])


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  dir: x\n seed: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml' is not valid YAML at line 3, column 2"):
        load_config(path)


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
