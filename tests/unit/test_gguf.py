"""Which weights :func:`speed.llm.gguf.gguf_for` converts, where it keeps the result, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from speed.llm.base import BackendError
from speed.llm.gguf import cached_gguf_path, convert_hf_to_gguf, gguf_for, is_hf_folder


def test_only_a_transformers_folder_without_gguf_is_converted(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert gguf_for(gguf) == str(gguf)
    assert gguf_for("smollm2-135m-instruct") == "smollm2-135m-instruct", "names go to resolve_gguf"
    holding = tmp_path / "merged"
    holding.mkdir()
    (holding / "config.json").write_text("{}")
    (holding / "model.gguf").write_bytes(b"GGUF")
    assert not is_hf_folder(holding) and gguf_for(holding) == str(holding), "a GGUF put beside is used"
    (holding / "model.gguf").unlink()
    assert is_hf_folder(holding)
    assert cached_gguf_path(holding) == tmp_path / "merged-gguf" / "model-q8_0.gguf"
    assert cached_gguf_path(holding, "f16").name == "model-f16.gguf"


def test_a_missing_converter_names_the_command_that_installs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("SPEED_LLAMA_SRC", raising=False)
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(BackendError, match="build-server"):
        gguf_for(folder)
    assert not cached_gguf_path(folder).exists()
    with pytest.raises(ValueError, match="q4_0"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf", outtype="q4_0")


def test_a_failed_conversion_leaves_no_file_and_quotes_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a converter that fails as a real one does on an unknown architecture
    src = tmp_path / "src" / "vendor" / "llama.cpp"
    (src / "gguf-py" / "gguf").mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text(
        "import sys; print('Model FooForCausalLM is not supported'); sys.exit(1)\n"
    )
    monkeypatch.setenv("SPEED_LLAMA_SRC", str(tmp_path / "src"))
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(BackendError, match="FooForCausalLM is not supported"):
        gguf_for(folder)
    out = cached_gguf_path(folder)
    assert not out.exists() and not list(out.parent.glob("*.part")), "no half-written GGUF is left"
