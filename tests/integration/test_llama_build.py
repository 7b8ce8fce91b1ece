"""llama.cpp as built by `make setup` runs on the machine running the tests, in process and as a server.

These fail (never skip) on a build made for another CPU: with the old fixed AVX-512 flags on an
AVX2-only machine, the first matrix product dies of SIGILL. Under CI a missing llama-cpp-python fails
too (tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from speed import hardware
from speed.llm import Request, Sampling
from speed.llm.llamacpp import LlamaCppBackend
from speed.llm.server import LlamaCppServerBackend

pytestmark = pytest.mark.slow


def test_the_installed_build_was_made_for_this_cpu(need_llama_cpp: None) -> None:
    marker = hardware.installed_build()
    if marker is None:
        pytest.fail("no build marker: llama-cpp-python was not installed by `make setup` (speed.hardware)")
    assert marker["key"] == hardware.build_key(extra_cmake=marker.get("extra_cmake_args", ""))
    assert "-DGGML_NATIVE=ON" in marker["cmake_args"]
    lib = hardware.llama_lib_dir()
    assert lib is not None and any(lib.glob("libggml-cpu*"))


def test_a_packaged_gguf_generates_in_process(need_llama_cpp: None, smollm2_gguf: Path) -> None:
    with LlamaCppBackend(str(smollm2_gguf), threads=1, n_ctx=512) as backend:
        (comp,) = backend.generate([Request.chat("Name a colour.", sampling=Sampling(max_tokens=8, seed=1))])
    assert comp.error is None and comp.text.strip() and comp.tokens_out > 0


def test_a_packaged_gguf_generates_through_the_server(
    need_llama_cpp: None, smollm2_gguf: Path, tmp_path: Path
) -> None:
    backend = LlamaCppServerBackend(str(smollm2_gguf), threads=1, n_ctx=512, log_path=tmp_path / "server.log")
    try:
        (comp,) = backend.generate([Request.chat("Name a colour.", sampling=Sampling(max_tokens=8, seed=1))])
    finally:
        backend.close()
    assert comp.error is None and comp.text.strip() and comp.tokens_out > 0


def test_doctor_says_the_quickstart_can_run_here(need_llama_cpp: None) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "speed.cli", "doctor", str(root / "configs" / "quickstart.yaml")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "llama.cpp runs" in done.stdout and "FAIL" not in done.stdout


def test_doctor_fails_and_names_the_fix_when_eval_data_is_missing(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "speed.cli", "doctor", str(root / "configs" / "quickstart.yaml"),
         "--no-llama", "-o", f"evaluate.data_dir={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout and "evaluation data" in done.stdout and "fix:" in done.stdout
