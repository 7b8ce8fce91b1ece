"""Entry point of the llama.cpp server process that speed starts (``python -m speed.llm._server_child``).

It runs one of the two server engines with a watchdog that only a process of our own can add:

- ``python``: ``llama_cpp.server`` in this process (the same code as ``python -m llama_cpp.server``);
  on a llama.cpp build with the AMX kernels, weights are loaded with ``use_extra_bufts = False``,
  which avoids the ``Illegal instruction`` crash of MODELS.md (llama-cpp-python exposes no argument
  for it).
- ``native`` (``--exec``): llama.cpp's own ``llama-server`` binary as a child in the same process
  group. This process waits for it and ends the way it ended: the same exit code, or the same signal
  raised on itself, so the parent's ``returncode`` (and the SIGILL advice built from it) reads as if
  it had started the binary directly.

In both, a watchdog thread ends the whole process group when the process that started it is gone,
so a parent killed with SIGKILL (where neither ``atexit`` nor ``finally`` runs) leaves no server
eating a core. Linux's ``PR_SET_PDEATHSIG`` would need no extra process, but it fires when the parent
*thread* that forked ends, which in a threaded parent is not the parent's death.

Usage: ``python -m speed.llm._server_child --parent-pid PID [--exec] -- <server arguments>``; with
``--exec`` the first server argument is the binary.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time


def _watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent_pid:
            # the parent died and we were re-parented: end the whole process group
            os.killpg(os.getpgrp(), signal.SIGTERM)
            time.sleep(5)
            os._exit(1)


def _run_binary(cmd: list[str]) -> int:
    """Run the native server until it exits; SIGTERM (from a stop of the group) reaches it too."""
    # our own SIGTERM is the group's stop: wait for the binary to finish its shutdown rather than die
    # first, so the parent's wait() covers the binary's exit
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    code = child.wait()
    if code < 0:
        # die of the same signal, so the parent sees the binary's death and can name it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--parent-pid" or "--" not in argv:
        raise SystemExit(
            "usage: python -m speed.llm._server_child --parent-pid PID [--exec] -- <server args>"
        )
    parent = int(argv[1])
    native = "--exec" in argv[: argv.index("--")]
    server_args = argv[argv.index("--") + 1 :]
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if native:
        raise SystemExit(_run_binary(server_args))
    import llama_cpp

    from speed.llm.llamacpp import without_extra_bufts_on_amx

    without_extra_bufts_on_amx(llama_cpp)
    sys.argv = ["llama_cpp.server", *server_args]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
