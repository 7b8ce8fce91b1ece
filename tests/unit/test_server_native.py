"""The native engine of ``llamacpp_server`` without a model: its command, the engine choice, and the
watchdog process passing on how the binary died (a stand-in binary: a shell script)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from speed.llm.base import BackendError
from speed.llm.server import LlamaCppServer, choose_engine


def _binary(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_native_command_gives_each_slot_n_ctx_and_runs_under_the_watchdog(tmp_path: Path, gguf: Path) -> None:
    binary = _binary(tmp_path / "llama-server", "exit 0")
    srv = LlamaCppServer(
        gguf, engine="native", parallel=3, n_ctx=1000, threads=2, binary=binary, lora_path="a.gguf", port=1234
    )
    cmd = srv._command()
    assert cmd[1:3] == ["-m", "speed.llm._server_child"] and "--exec" in cmd
    args = cmd[cmd.index("--") + 1 :]
    assert args[0] == str(binary)
    assert args[args.index("--ctx-size") + 1] == "3000", "llama-server divides -c over the slots"
    assert args[args.index("--parallel") + 1] == "3"
    assert args[args.index("--lora") + 1] == "a.gguf"
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--threads") + 1] == "2"
    assert "--cont-batching" in args and "--no-webui" in args
    # the python engine has one slot, whatever parallel says
    assert LlamaCppServer(gguf, engine="python", parallel=4).parallel == 1


def test_auto_takes_native_only_when_built_and_says_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("SPEED_LLAMA_SERVER", raising=False)
    with caplog.at_level(logging.WARNING, logger="speed.llm.server"):
        assert choose_engine("auto") == "python"
    assert "build-server" in caplog.text
    monkeypatch.setenv("SPEED_LLAMA_SERVER", str(_binary(tmp_path / "llama-server", "exit 0")))
    assert choose_engine("auto") == "native"
    assert choose_engine("python") == "python"
    with pytest.raises(ValueError, match="auto, native or python"):
        choose_engine("nativ")


def test_native_engine_missing_binary_names_the_build_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf: Path
) -> None:
    monkeypatch.setenv("SPEED_WHEEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("SPEED_LLAMA_SERVER", raising=False)
    with pytest.raises(BackendError, match="build-server"):
        LlamaCppServer(gguf, engine="native")


def test_a_native_server_killed_by_sigill_is_named_through_the_watchdog(tmp_path: Path, gguf: Path) -> None:
    # the binary dies as a build for another CPU does; the watchdog process between us and it must
    # die of the same signal, so the error can say SIGILL and how to rebuild
    binary = _binary(tmp_path / "llama-server", "kill -ILL $$")
    srv = LlamaCppServer(
        gguf, engine="native", binary=binary, log_path=tmp_path / "s.log", startup_timeout_s=60
    )
    with pytest.raises(BackendError) as err:
        srv.start()
    assert "SIGILL" in str(err.value) and "make llama-rebuild" in str(err.value)
    assert not srv.is_running()


def test_a_native_server_exit_code_is_passed_on(tmp_path: Path, gguf: Path) -> None:
    binary = _binary(tmp_path / "llama-server", "echo 'error: unknown argument' >&2; exit 7")
    srv = LlamaCppServer(
        gguf, engine="native", binary=binary, log_path=tmp_path / "s.log", startup_timeout_s=60
    )
    with pytest.raises(BackendError, match="exited with code 7") as err:
        srv.start()
    assert "unknown argument" in str(err.value), "the log's end is in the message"
