"""Entry point of the llama.cpp server process that speed starts (``python -m speed.llm._server_child``).

It runs ``llama_cpp.server`` (the same code as ``python -m llama_cpp.server``) with two additions that
only a process of our own can make:

- a watchdog thread that ends the server when the process that started it is gone, so a parent killed
  with SIGKILL (where neither ``atexit`` nor ``finally`` runs) leaves no server eating a core;
- on a llama.cpp build with the AMX kernels, weights are loaded with ``use_extra_bufts = False``, which
  avoids the ``Illegal instruction`` crash of MODELS.md (llama-cpp-python exposes no argument for it).

Usage: ``python -m speed.llm._server_child --parent-pid PID -- <llama_cpp.server arguments>``.
"""

from __future__ import annotations

import os
import runpy
import signal
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


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--parent-pid" or "--" not in argv:
        raise SystemExit("usage: python -m speed.llm._server_child --parent-pid PID -- <server args>")
    parent = int(argv[1])
    server_args = argv[argv.index("--") + 1 :]
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    import llama_cpp

    from speed.llm.llamacpp import without_extra_bufts_on_amx

    without_extra_bufts_on_amx(llama_cpp)
    sys.argv = ["llama_cpp.server", *server_args]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
