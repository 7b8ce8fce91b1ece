"""A local llama.cpp server that speed starts, talks to over HTTP, and stops.

``backend: llamacpp_server`` runs the model in its own process on 127.0.0.1 and sends requests to it
with the OpenAI-compatible client (:mod:`speed.llm.openai_api`), so the teacher of the quickstart and
the trained generators are called exactly as an API teacher would be: same retries, same ledger,
same cost report. ``speed serve MODEL`` (:func:`serve`) starts the same server in the foreground for
other programs.

Two engines serve (option ``engine``):
- ``native``: llama.cpp's own ``llama-server``, built for this CPU from the llama.cpp sources that
  llama-cpp-python vendors (``python -m speed.hardware build-server``, run by ``make setup``). It
  decodes ``parallel`` requests together (continuous batching over ``--parallel`` slots), which is
  what makes a 135M model worth serving on two cores: one stream leaves the cores waiting on memory.
  Each slot gets ``n_ctx`` tokens (llama-server divides ``-c`` by the slot count, so it is given
  ``n_ctx * parallel``), and the client keeps ``parallel`` requests in flight unless the spec sets
  ``concurrency``.
- ``python``: llama-cpp-python's server (``llama_cpp.server``, the ``[server]`` extra), one request at
  a time. ``auto`` (the default) takes ``native`` when the binary exists and says in the log why it
  falls back to ``python`` otherwise.

Design choices:
- A free port is taken from the OS (bind to port 0); if another process grabs it before the server
  binds, start-up is retried on a new port.
- Start-up waits until ``GET /v1/models`` answers; a server that exits first raises with the tail of
  its log, and one killed by a signal says which (SIGILL: a llama.cpp build for another CPU, with this
  CPU's features and the rebuild command; :func:`speed.hardware.describe_signal_death`). The log goes to a file (``log_path``, default ``$SPEED_CACHE/logs/``), never to our stdout.
- The server runs in its own process group and is stopped (SIGTERM to the group, then SIGKILL) by
  :meth:`LlamaCppServer.stop`: on ``close()``, on leaving a ``with`` block (errors and Ctrl-C
  included) and at interpreter exit (``atexit``). If our process is killed outright, a watchdog in
  the server process (:mod:`speed.llm._server_child`) ends it within a second or two.
- The server's OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): spinning
  threads made 2 threads 10-20x slower than 1 on a busy 2-core machine.
- llama-cpp-python's server runs one request at a time and ignores ``n`` (the client then asks once
  per sample); a concurrency of 2 keeps one request queued so the model never waits on HTTP.
- Sampling follows the request only, as an OpenAI API would: both servers' own extras (top-k 40,
  min-p 0.05, and llama-cpp-python's repeat penalty 1.1) are turned off unless ``options`` sets them.
  The request's ``seed`` is passed on: the same request alone on the server gives the same text.
- The schema becomes a grammar in both engines, so the output follows it. It is sent in the form
  each engine documents: ``{"type": "json_schema", "json_schema": {"schema": ...}}`` to llama-server
  (tools/server/README.md), ``{"type": "json_object", "schema": ...}`` to llama-cpp-python's server.
  ``options.schema_mode: none`` drops it, to study free output.
- Trained weights (a merged transformers folder, as the stages pass them) are converted to GGUF once
  and cached beside the folder (:func:`speed.llm.gguf.gguf_for`).
- Determinism: every request carries its seed, but llama-server's slots decode together, and a
  prompt reuses the KV cache of an earlier one: both change the matrix shapes, hence the floats,
  hence now and then a sampled token. Measured with Qwen2.5-0.5B and 2 slots, 150 tokens: 5 of 6
  seeded answers differed between the batch sent in one order and in the other; with 1 slot and
  ``cache_prompt: false``, 6 of 6 were identical across orders and batch compositions.
  ``options.deterministic`` asks for that (it costs the slots' throughput); off by default, and
  the run report says per role which one promises the same text.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from speed import hardware
from speed.llm.base import Backend, BackendError, Completion, OnReady, Request, gather
from speed.llm.openai_api import OpenAIBackend, SchemaMode
from speed.llm.registry import require_installed
from speed.models import cache_dir, resolve_gguf

if TYPE_CHECKING:
    from speed.config import LlamaCppServerSpec

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[LlamaCppServer] = weakref.WeakSet()
_ATEXIT_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


def _register_atexit() -> None:
    global _ATEXIT_REGISTERED
    with _ATEXIT_LOCK:
        if not _ATEXIT_REGISTERED:
            atexit.register(_stop_all)
            _ATEXIT_REGISTERED = True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LlamaCppServer:
    """One ``llama_cpp.server`` process serving one GGUF model.

    Args:
        gguf: the GGUF file.
        threads: CPU threads for generation and prompt processing.
        n_ctx: context length.
        host: address to bind; 127.0.0.1 keeps the server private to this machine.
        port: port to bind; None takes a free one.
        alias: the model name the server answers to.
        log_path: file for the server's output; None: ``$SPEED_CACHE/logs/llama-server-<alias>-<pid>.log``.
        startup_timeout_s: how long to wait for the first answer.
        lora_path: a GGUF LoRA adapter to apply.
        extra_args: more server arguments (``["--n_batch", "256"]`` for the python engine,
            ``["-b", "512"]`` for the native one).
        engine: ``native`` (llama.cpp's ``llama-server`` binary) or ``python`` (llama-cpp-python's).
        parallel: slots of the native server (requests decoded together); the python engine has one.
        binary: the ``llama-server`` binary (native engine); None: this machine's build
            (:func:`speed.hardware.find_server`).

    Example:
        >>> with LlamaCppServer(resolve_gguf("smollm2-135m-instruct")) as server:  # doctest: +SKIP
        ...     print(server.base_url)
    """

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        *,
        threads: int = 1,
        n_ctx: int = 4096,
        host: str = "127.0.0.1",
        port: int | None = None,
        alias: str = "local",
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 180.0,
        lora_path: str | None = None,
        extra_args: Sequence[str] = (),
        engine: str = "python",
        parallel: int = 1,
        binary: str | os.PathLike[str] | None = None,
    ):
        if engine not in ("native", "python"):
            raise ValueError(f"engine '{engine}' is not one of native, python (option 'engine')")
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise BackendError(f"GGUF file {self.gguf} does not exist")
        self.threads = threads
        self.n_ctx = n_ctx
        self.host = host
        self.port = port
        self._fixed_port = port is not None
        self.alias = alias
        safe_alias = "".join(c if c.isalnum() or c in "-_." else "_" for c in alias)
        self.log_path = (
            Path(log_path)
            if log_path
            else cache_dir() / "logs" / f"llama-server-{safe_alias}-{os.getpid()}.log"
        )
        self.startup_timeout_s = startup_timeout_s
        self.lora_path = lora_path
        self.extra_args = list(extra_args)
        self.engine = engine
        self.parallel = max(1, parallel) if engine == "native" else 1
        self.binary: Path | None = None
        if engine == "native":
            found = Path(binary) if binary else hardware.find_server()
            if found is None or not found.is_file():
                raise BackendError(
                    f"the native llama.cpp server is not built for this CPU (looked for "
                    f"{binary or hardware.server_path()}); build it with: PYTHONPATH=src python -m "
                    "speed.hardware build-server (make setup does), or set option engine: python"
                )
            self.binary = found
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def base_url(self) -> str:
        """The OpenAI API root of the server, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self.port is None:
            raise BackendError("the llama.cpp server has not been started")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    def _command(self) -> list[str]:
        watchdog = [sys.executable, "-m", "speed.llm._server_child", "--parent-pid", str(os.getpid())]
        if self.engine == "native":
            return [*watchdog, "--exec", "--", *self._native_args()]
        return [*watchdog, "--", *self._python_args()]

    def _native_args(self) -> list[str]:
        assert self.binary is not None
        args = [
            str(self.binary),
            "--model", str(self.gguf),
            "--alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--threads", str(self.threads),
            "--threads-batch", str(self.threads),
            # llama-server splits -c over its slots; each request gets n_ctx
            "--ctx-size", str(self.n_ctx * self.parallel),
            "--parallel", str(self.parallel),
            "--cont-batching",
            "--no-webui",
            "--metrics",  # /metrics: busy slots per decode, tokens, for tests and benchmarks
        ]  # fmt: skip
        if self.lora_path:
            args += ["--lora", self.lora_path]
        return args + self.extra_args

    def _python_args(self) -> list[str]:
        args = [
            "--model", str(self.gguf),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_threads", str(self.threads),
            "--n_threads_batch", str(self.threads),
            "--n_ctx", str(self.n_ctx),
            "--interrupt_requests", "False",
        ]  # fmt: skip
        if self.lora_path:
            args += ["--lora_path", self.lora_path]
        return args + self.extra_args

    def start(self) -> LlamaCppServer:
        """Start the process and wait until it answers.

        Raises:
            BackendError: the server exited or did not answer in time (with the tail of its log).
        """
        if self.engine == "python":
            require_installed(
                ("llama_cpp", "uvicorn", "fastapi", "sse_starlette"),
                extra="llamacpp",
                what="the llamacpp_server backend",
            )
        if self.is_running():
            return self
        _register_atexit()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            if not self._fixed_port:
                self.port = free_port(self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1")
            try:
                self._spawn_and_wait()
                return self
            except BackendError as err:
                if "address already in use" in str(err).lower() and not self._fixed_port and attempt < 2:
                    logger.info("port %s was taken before the server bound it; trying another", self.port)
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process' life
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        # sleep, not spin, at llama.cpp's barriers: spinning threads crawl when the cores are shared
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        logger.info(
            "starting llama.cpp server (%s engine, %d slot(s)) for %s on %s:%s (%d thread(s)); log: %s",
            self.engine, self.parallel, self.gguf.name, self.host, self.port, self.threads, self.log_path,
        )  # fmt: skip
        self.process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stopped as a whole, no terminal Ctrl-C
        )
        _LIVE.add(self)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            with httpx.Client(timeout=2.0) as client:
                while True:
                    code = self.process.poll()
                    if code is not None:
                        raise BackendError(f"{self.exit_words('while starting')}; {self.log_words()}")
                    try:
                        if client.get(f"{self.base_url}/models").status_code == 200:
                            logger.info("llama.cpp server ready at %s", self.base_url)
                            return
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise BackendError(
                            f"the llama.cpp server for {self.gguf.name} did not answer within "
                            f"{self.startup_timeout_s:.0f}s; {self.log_words()}"
                        )
                    time.sleep(0.25)
        except BaseException:
            self.stop()
            raise

    def exit_words(self, when: str = "") -> str:
        """How the process ended, in words: its exit code, or the signal that killed it and why."""
        code = self.process.returncode if self.process is not None else None
        what = f"the llama.cpp server for {self.gguf.name}"
        words = hardware.describe_signal_death(code, what)
        if words is None:
            words = f"{what} exited with code {code}"
        return f"{words} ({when})" if when else words

    def log_words(self, lines: int = 30) -> str:
        """The end of the server's log for an error message; says so when the log is empty."""
        tail = self.log_tail(lines)
        if not tail.strip():
            return f"its log {self.log_path} is empty (it died before writing a line)"
        return f"the end of its log {self.log_path}:\n{tail}"

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and its process group. Safe to call twice."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            logger.info("stopping llama.cpp server at port %s", self.port)
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; for fault tests."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout_s=2.0)


_OPTIONS: dict[str, Any] = {
    "engine": "auto",
    "parallel": 4,
    "binary": None,
    "schema_mode": None,
    "log_path": None,
    "startup_timeout_s": 180.0,
    "extra_args": [],
    "retry_initial_s": 1.0,
    "retry_max_s": 30.0,
    "top_k": 0,
    "min_p": 0.0,
    "repeat_penalty": 1.0,
    "deterministic": False,
}


class LlamaCppServerBackend(Backend):
    """A llama.cpp server of our own, spoken to through the OpenAI-compatible client.

    Args:
        model: a packaged model name, a GGUF file or folder, or a hub repo (with ``file``).
        file: which GGUF of a folder or repo.
        threads: CPU threads of the server.
        n_ctx: context length.
        adapter: a GGUF LoRA adapter.
        concurrency: requests in flight; None: the native server's slot count (``parallel``), 2 for
            the python engine (it runs one at a time; 2 keeps it busy).
        timeout_s: timeout of one request (a queued request waits for the ones before it).
        max_retries: retries per request on errors and dropped connections.
        model_id: label of the model in the ledger; defaults to ``model``.
        **options: ``engine`` (``auto``: native when built, else python; ``native``; ``python``),
            ``parallel`` (slots of the native server, default 4), ``binary`` (a ``llama-server``
            to use instead of this machine's build), ``schema_mode`` (None: the engine's form;
            ``none``: no schema, free output), ``log_path``, ``startup_timeout_s``, ``extra_args``,
            ``retry_initial_s``, ``retry_max_s``, and the sampler extras ``top_k`` (0: off),
            ``min_p`` (0: off), ``repeat_penalty`` (1: off), sent with every request, and
            ``deterministic`` (one slot and no prompt cache, so that the same seeded request gets
            the same text whatever else is in flight; see the module docstring).
    """

    name = "llamacpp_server"

    def __init__(
        self,
        model: str,
        *,
        file: str | None = None,
        threads: int = 1,
        n_ctx: int = 4096,
        adapter: str | None = None,
        concurrency: int | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 6,
        model_id: str | None = None,
        **options: Any,
    ):
        opts = dict(_OPTIONS)
        opts.update(options)
        if adapter and not adapter.endswith(".gguf"):
            raise ValueError(
                f"adapter '{adapter}' (model spec field 'adapter'): llama.cpp applies GGUF LoRA adapters "
                "only; merge the adapter and use backend 'hf', or convert it to GGUF"
            )
        gguf = resolve_gguf(model, file=file)
        self.model_id = model_id or model
        engine = choose_engine(opts["engine"], opts["binary"])
        parallel = int(opts["parallel"]) if engine == "native" else 1
        extra_body = {k: opts[k] for k in ("top_k", "min_p", "repeat_penalty")}
        if opts["deterministic"]:
            # batched decoding and a reused prompt cache change the floats, hence the sampled text
            if parallel > 1:
                logger.info("%s: deterministic, so 1 slot instead of %d", self.model_id, parallel)
            parallel = 1
            if engine == "native":
                extra_body["cache_prompt"] = False
            else:
                logger.warning(
                    "%s: llama-cpp-python's server reuses the previous prompt's cache, so the same "
                    "request may get another text; use engine native for deterministic output",
                    self.model_id,
                )
        if concurrency is None:
            concurrency = parallel if engine == "native" else 2
        elif engine == "python":
            concurrency = min(concurrency, 2)  # more only queues in front of a one-request server
        schema_mode: SchemaMode = opts["schema_mode"] or (
            "json_schema" if engine == "native" else "json_object"
        )
        self.server = LlamaCppServer(
            gguf,
            threads=threads,
            n_ctx=n_ctx,
            alias=Path(model).name if os.sep in model else model,
            log_path=opts["log_path"],
            startup_timeout_s=opts["startup_timeout_s"],
            lora_path=adapter,
            extra_args=opts["extra_args"],
            engine=engine,
            parallel=parallel,
            binary=opts["binary"],
        ).start()
        try:
            self.client = OpenAIBackend(
                self.server.alias,
                base_url=self.server.base_url,
                concurrency=concurrency,
                timeout_s=timeout_s,
                max_retries=max_retries,
                retry_initial_s=opts["retry_initial_s"],
                retry_max_s=opts["retry_max_s"],
                schema_mode=schema_mode,
                extra_body=extra_body,
                model_id=self.model_id,
                max_n=parallel if engine == "native" else None,
            )
        except BaseException:
            self.server.stop()
            raise

    @classmethod
    def from_spec(
        cls, spec: LlamaCppServerSpec, *, threads: int | None = None, model_path: str | None = None
    ) -> LlamaCppServerBackend:
        """Start a server for the spec's model (or ``model_path``: trained weights of the run).

        A merged transformers folder is converted to GGUF first, once (:func:`speed.llm.gguf.gguf_for`).
        The client keeps the server's slot count in flight unless the spec sets ``concurrency``.
        """
        model = model_path or spec.model
        if model_path:
            from speed.llm.gguf import gguf_for

            model = str(gguf_for(model_path))
        if not model:
            raise ValueError(
                "model spec field 'model' is empty: backend 'llamacpp_server' needs a GGUF model"
            )
        return cls(
            model,
            file=spec.file,
            threads=threads or spec.threads or 1,
            n_ctx=spec.n_ctx,
            adapter=spec.adapter,
            concurrency=spec.concurrency if "concurrency" in spec.model_fields_set else None,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            **spec.options.model_dump(),
        )

    @property
    def base_url(self) -> str:
        """The server's API root."""
        return self.server.base_url

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer each request through the server; raises :class:`BackendError` if it died."""
        return gather(self, requests)

    def generate_as_ready(self, requests: Sequence[Request], on_ready: OnReady) -> None:
        """Answer each request through the server, reporting each answer as it arrives."""
        try:
            self.client.generate_as_ready(requests, on_ready)
        except BackendError as err:
            if not self.server.is_running():
                raise BackendError(
                    f"{err} The server process has ended: {self.server.exit_words()}; "
                    f"{self.server.log_words(10)}"
                ) from err
            raise

    def close(self) -> None:
        """Stop the server, then the client (a request in flight then ends at once, with its
        connection). Safe to call twice."""
        self.server.stop()
        self.client.close()


def choose_engine(engine: str, binary: str | None = None) -> str:
    """The engine to run: ``native`` or ``python``; ``auto`` takes native when its binary exists.

    Raises:
        ValueError: an unknown engine name (option ``engine``).
    """
    if engine not in ("auto", "native", "python"):
        raise ValueError(
            f"option 'engine' of backend 'llamacpp_server' is '{engine}'; use auto, native or python"
        )
    if engine != "auto":
        return engine
    if binary or hardware.find_server() is not None:
        return "native"
    logger.warning(
        "llamacpp_server: llama.cpp's own server is not built for this CPU (%s), so llama-cpp-python's "
        "server answers one request at a time; build it with `PYTHONPATH=src python -m speed.hardware "
        "build-server` (make setup does) for parallel slots",
        hardware.server_path(),
    )
    return "python"


def serve(
    model: str,
    port: int | None = None,
    threads: int = 1,
    *,
    host: str = "127.0.0.1",
    n_ctx: int = 4096,
    file: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
    ready: threading.Event | None = None,
    engine: str = "auto",
    parallel: int = 4,
) -> None:
    """Serve a model with llama.cpp's OpenAI-compatible server until Ctrl-C (``speed serve MODEL``).

    Args:
        model: a packaged model name, a GGUF file or folder.
        port: the port; None takes a free one (logged).
        threads: CPU threads.
        host: address to bind; the default keeps the server private to this machine.
        n_ctx: context length.
        file: which GGUF of a folder.
        log_path: the server's log file (default under ``$SPEED_CACHE/logs``).
        ready: set once the server answers (for callers that run this in a thread).
        engine: ``auto`` (native when built), ``native`` or ``python``.
        parallel: slots of the native server.

    Raises:
        BackendError: the server failed to start or exited on its own.
    """
    server = LlamaCppServer(
        resolve_gguf(model, file=file),
        threads=threads,
        n_ctx=n_ctx,
        host=host,
        port=port,
        alias=model if os.sep not in model else Path(model).name,
        log_path=log_path,
        engine=choose_engine(engine),
        parallel=parallel,
    )
    # Ctrl-C may come while the server is still starting (a client can reach it before the
    # readiness check returns): the with block stops it either way
    try:
        with server:
            logger.info(
                "serving %s at %s (model name '%s'); Ctrl-C stops it", model, server.base_url, server.alias
            )
            if ready is not None:
                ready.set()
            assert server.process is not None
            server.process.wait()
            words = f"{server.exit_words('on its own')}; {server.log_words(10)}"
    except KeyboardInterrupt:
        logger.info("stopped")
        return
    raise BackendError(words)
