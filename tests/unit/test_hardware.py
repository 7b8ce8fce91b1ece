"""The CPU facts, the per-CPU llama.cpp wheel cache, and the words for a process killed by a signal."""

from __future__ import annotations

import signal
import stat
import sys
from pathlib import Path

import pytest

from speed import hardware
from speed.llm.base import BackendError


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_sigill_is_explained_with_this_cpus_features_and_the_fix() -> None:
    words = hardware.describe_signal_death(-signal.SIGILL, "the llama.cpp server")
    assert words is not None
    assert "SIGILL" in words and "Illegal instruction" in words
    assert "does not match this CPU" in words and "make llama-rebuild" in words
    cpu = hardware.cpu_info()
    if cpu.features():  # x86 or ARM: the message lists what the CPU has and lacks
        first = next(iter(cpu.features()))
        assert first in words


def test_other_deaths_name_their_signal_and_normal_exits_are_not_signals() -> None:
    assert hardware.describe_signal_death(1, "x") is None
    assert hardware.describe_signal_death(0, "x") is None
    assert hardware.describe_signal_death(None, "x") is None
    assert "SIGKILL" in (hardware.describe_signal_death(-9, "x") or "")
    assert "SIGSEGV" in (hardware.describe_signal_death(-signal.SIGSEGV, "x") or "")


def test_native_build_keeps_amx_out_and_the_key_follows_the_build() -> None:
    cpu = hardware.cpu_info()
    args = hardware.llama_cmake_args(cpu)
    assert "-DGGML_NATIVE=ON" in args
    if cpu.is_x86:
        assert "-DGGML_AMX_INT8=OFF" in args
        # -march=native alone would switch AMX on where the CPU has it: the flags must say no
        if hardware._compiler_accepts(list(hardware.NO_AMX_FLAGS)):
            assert set(hardware.NO_AMX_FLAGS) <= set(hardware.native_flags(cpu))
            assert "-mno-amx-int8" in hardware.native_target(cpu)
    key = hardware.build_key(cpu)
    assert key == hardware.build_key(cpu)
    assert key.startswith(f"{cpu.arch}-{cpu.level()}-")
    assert hardware.build_key(cpu, "-DGGML_CUDA=ON") != key
    assert hardware.build_key(cpu, version="0.0.1") != key


def test_a_wheel_is_reused_only_from_this_cpus_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path))
    name = f"llama_cpp_python-{hardware.LLAMA_CPP_VERSION}-py3-none-linux_x86_64.whl"
    other = tmp_path / "x86_64-avx512-000000000000"
    other.mkdir()
    (other / name).write_bytes(b"built elsewhere")
    # a pip that fails: if the cache lookup wrongly took the other CPU's wheel we would not get here
    fail = _script(tmp_path / "pip", "echo no build in this test >&2; exit 3")
    with pytest.raises(SystemExit, match="the build failed"):
        hardware.build_llama_wheel([fail], log=lambda *_: None)
    mine = tmp_path / hardware.build_key()
    assert mine != other and mine.is_dir()
    assert not list(mine.glob("*.whl")), "a failed build leaves no wheel to be taken as done"
    (mine / name).write_bytes(b"built here")
    wheel, built = hardware.build_llama_wheel([fail], log=lambda *_: None)
    assert (wheel, built) == (mine / name, False)


def test_a_probe_killed_by_sigill_becomes_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path / "wheels"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    crash = _script(tmp_path / "python", "kill -ILL $$")
    with pytest.raises(hardware.LlamaCrash, match="SIGILL") as err:
        hardware.check_llama_runs(model, python=crash)
    assert "does not match this CPU" in str(err.value) and model.name in str(err.value)
    assert not list((tmp_path / "wheels").parent.rglob("*.ok")), "a crash is never remembered as a pass"
    # an ordinary failure (a bad model) is left for the real load to explain
    assert hardware.check_llama_runs(model, python=_script(tmp_path / "py2", "exit 1")) is False


def test_the_server_child_killed_by_sigill_names_the_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from speed.llm import server as server_mod

    # the real start-up path (spawn, poll, error), with a child that dies as a wrong build does
    monkeypatch.setattr(server_mod, "require_installed", lambda *a, **k: None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    class Crashing(server_mod.LlamaCppServer):
        def _command(self) -> list[str]:
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]

    srv = Crashing(gguf, log_path=tmp_path / "server.log", startup_timeout_s=30)
    with pytest.raises(BackendError) as err:
        srv.start()
    text = str(err.value)
    assert "SIGILL" in text and "Illegal instruction" in text and "make llama-rebuild" in text
    assert "is empty" in text, "an empty log is said to be empty, never the whole message"
    assert not srv.is_running()


def test_cpu_info_reads_this_machine() -> None:
    cpu = hardware.cpu_info()
    assert cpu.arch
    if Path("/proc/cpuinfo").exists():
        assert cpu.flags, "Linux lists the CPU's flags"
    if cpu.is_x86:
        assert set(cpu.features()) == set(hardware.X86_FEATURES)
        # the level this machine reports is backed by its flags (the ladder itself is tested below)
        level = cpu.level()
        assert level == "x86-64" or {"amx": "amx_int8", "avx512": "avx512f"}.get(level, level) in cpu.flags
        if "avx2" in cpu.flags:
            assert level in ("amx", "avx512", "avx2")


@pytest.mark.parametrize(
    ("arch", "flags", "level"),
    [
        ("x86_64", {"sse4_2", "avx", "avx2", "fma"}, "avx2"),
        ("x86_64", {"sse4_2", "avx", "avx2", "avx512f"}, "avx512"),
        ("x86_64", {"avx2", "avx512f", "amx_int8"}, "amx"),
        ("x86_64", {"sse4_2"}, "sse4_2"),
        ("x86_64", set(), "x86-64"),
        ("aarch64", {"asimd", "sve"}, "sve"),
        ("aarch64", {"asimd"}, "neon"),
        ("riscv64", set(), "riscv64"),
    ],
)
def test_cpu_level_is_the_widest_vector_unit(arch: str, flags: set[str], level: str) -> None:
    assert hardware.CpuInfo(arch, "model", frozenset(flags)).level() == level


def _fake_sources(root: Path) -> Path:
    """An unpacked llama-cpp-python archive as far as build-server looks: server sources, converter."""
    src = root / "llama_cpp_python" / "vendor" / "llama.cpp"
    (src / "tools" / "server").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    (src / "convert_hf_to_gguf.py").write_text("# the converter\n")
    (src / "gguf-py" / "gguf").mkdir(parents=True)
    (src / "conversion").mkdir()
    return root / "llama_cpp_python"


def test_build_server_moves_the_binary_in_only_after_a_good_build_and_then_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPEED_LLAMA_SERVER", raising=False)
    monkeypatch.delenv("SPEED_LLAMA_SRC", raising=False)
    source = _fake_sources(tmp_path)
    calls = tmp_path / "calls.txt"
    # a cmake that configures, then dies half-way through the build, as a killed or broken build does
    half = _script(
        tmp_path / "cmake-half",
        f'echo "$@ CFLAGS=$CFLAGS" >> {calls}\n'
        'if [ "$1" = "--build" ]; then mkdir -p "$2/bin"; echo half > "$2/bin/llama-server"; exit 2; fi',
    )
    with pytest.raises(SystemExit, match="the build failed"):
        hardware.build_llama_server([], source=source, cmake=half, log=lambda *_: None)
    target = hardware.server_path()
    assert target.parent.parent.name == hardware.build_key(), "one folder per CPU build key"
    assert not target.exists(), "a failed build leaves no binary to be taken as done"
    assert not list(target.parent.glob(".build-*")), "the build's temporary folder is removed"
    assert hardware.find_server() is None
    configure = calls.read_text().splitlines()[0]
    for flag in (
        "-DLLAMA_CURL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DGGML_NATIVE=ON",
    ):
        assert flag in configure
    if hardware.cpu_info().is_x86 and hardware._compiler_accepts(list(hardware.NO_AMX_FLAGS)):
        assert "-mno-amx-int8" in configure and "-DGGML_AMX_INT8=OFF" in configure

    good = _script(
        tmp_path / "cmake-good",
        f'echo "$@" >> {calls}\n'
        'if [ "$1" = "--build" ]; then mkdir -p "$2/bin"; printf "#!/bin/sh\\necho built\\n" > "$2/bin/llama-server";'
        ' chmod +x "$2/bin/llama-server"; fi',
    )
    path, built = hardware.build_llama_server([], source=source, cmake=good, log=lambda *_: None)
    assert (path, built) == (target, True)
    assert "--target llama-server" in calls.read_text().splitlines()[-1], "only the server is built"
    assert hardware.find_server() == target
    assert hardware.converter_script() == hardware.converter_dir() / "convert_hf_to_gguf.py"
    # present: reused without running cmake (the failing one would raise)
    path, built = hardware.build_llama_server([], source=source, cmake=half, log=lambda *_: None)
    assert (path, built) == (target, False)
    # --force rebuilds, and a failed rebuild keeps the good binary
    with pytest.raises(SystemExit, match="the build failed"):
        hardware.build_llama_server([], source=source, cmake=half, force=True, log=lambda *_: None)
    assert "echo built" in target.read_text()


def test_build_server_refuses_a_folder_without_llama_cpp_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match=r"holds no llama\.cpp sources"):
        hardware.build_llama_server([], source=tmp_path, cmake="false", log=lambda *_: None)


def test_a_benchmark_label_says_which_vector_units_the_figures_ran_on():
    epyc = hardware.CpuInfo("x86_64", "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert epyc.label() == "AMD EPYC (avx512, bf16, no amx)"
    haswell = hardware.CpuInfo("x86_64", "Xeon E5", frozenset({"avx2"}))
    assert haswell.label() == "Xeon E5 (avx2, no bf16, no amx)"
    sapphire = hardware.CpuInfo("x86_64", "Xeon 8480", frozenset({"avx512f", "amx_tile", "amx_int8"}))
    assert sapphire.label() == "Xeon 8480 (amx, no bf16)"
