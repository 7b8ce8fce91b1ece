"""llama.cpp in this process (llama-cpp-python): GGUF models on CPU, no server, no HTTP.

Design choices:
- One :class:`llama_cpp.Llama` per backend, used by one request at a time (a lock guards it):
  llama.cpp on a small CPU is fastest with one sequence and a thread count that fits the machine
  (``threads``; one thread often beats two on a busy 2-core machine, see MODELS.md).
- A JSON schema becomes a grammar (``response_format={"type": "json_object", "schema": ...}``), so
  the output follows the schema token by token.
- ``n`` samples are ``n`` calls. A request's ``seed`` makes its samples reproducible (sample ``i``
  uses ``seed + i``); without one, each sample draws a fresh seed.
- OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): on a shared machine spinning
  threads made 2 threads 10-20x slower than 1; passively they are not (see :func:`_passive_openmp`).
- The AMX crash of MODELS.md: a build with AMX kernels loads weights with ``use_extra_bufts=False``
  (passed when the installed llama-cpp-python accepts it, otherwise set on the model parameters);
  speed's own build is compiled without AMX.
- Sampling follows the request only, as an OpenAI API would: llama.cpp's own extras (top-k 40,
  min-p 0.05) are off unless ``options`` sets ``top_k``, ``min_p`` or ``repeat_penalty``.
- An ``Illegal instruction`` (a llama.cpp build for another CPU) would end this process without a
  word, so the model is first run once in a child process (:func:`speed.hardware.check_llama_runs`,
  remembered per build, CPU and model); a child killed by a signal becomes a :class:`BackendError`
  that names the signal, the CPU's features and the rebuild command.
- ``deterministic``: llama-cpp-python keeps the previous prompt's KV cache and evaluates only what
  follows the common prefix; the cached part was computed in a batch of another shape, which can
  change the floats and so a sampled token. Deterministic mode evaluates every prompt from scratch
  (the same request, the same text, whatever came before); off by default.
- A prompt longer than the context, or a schema the grammar converter refuses, is a counted drop
  for that request (``Completion.error``), not a crash of the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from speed import hardware
from speed.llm.base import Backend, BackendError, Completion, OnReady, Request, gather
from speed.llm.registry import require
from speed.models import resolve_gguf

if TYPE_CHECKING:
    from speed.config import LlamaCppSpec

logger = logging.getLogger(__name__)

_PATCH_LOCK = threading.Lock()


def _passive_openmp() -> None:
    """Ask OpenMP to sleep, not spin, while its threads wait (unless the user chose otherwise).

    llama.cpp's threads meet at a barrier after every operation. Spinning there is fastest on an idle
    machine, but when another process holds one of the cores each barrier waits for a time slice:
    on a busy 2-core machine 2 threads fell from ~40 to ~2.5 tokens/s with spinning, and 1 thread
    lost nothing with the passive policy (bench/generation.py). The policy is read once, when the
    OpenMP runtime starts, so it only helps if llama_cpp is not imported yet.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    if "llama_cpp" in sys.modules:
        logger.debug("llama_cpp already imported; OMP_WAIT_POLICY=PASSIVE would come too late")
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def without_extra_bufts_on_amx(llama_cpp: Any) -> Callable[[], None] | None:
    """On a llama.cpp built with AMX kernels, make the default model parameters load weights
    without extra buffer types (the ``Illegal instruction`` crash of MODELS.md).

    Returns the undo, or None where the build has no AMX and nothing was patched.
    """
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    if "AMX_INT8 = 1" not in info:
        return None
    original = llama_cpp.llama_model_default_params

    def patched() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = patched
    return lambda: setattr(llama_cpp, "llama_model_default_params", original)


@contextlib.contextmanager
def _no_extra_bufts(llama_cpp: Any) -> Iterator[dict[str, Any]]:
    """Keyword arguments (or a temporary patch) that load weights without extra buffer types."""
    params = inspect.signature(llama_cpp.Llama.__init__).parameters
    if "use_extra_bufts" in params:
        yield {"use_extra_bufts": False}
        return
    with _PATCH_LOCK:
        undo = without_extra_bufts_on_amx(llama_cpp)
        try:
            yield {}
        finally:
            if undo is not None:
                undo()


class LlamaCppBackend(Backend):
    """A GGUF model run by llama.cpp in this process.

    Args:
        model: a packaged model name, a GGUF file or folder, or a hub repo (with ``file``).
        file: which GGUF of a folder or repo.
        threads: CPU threads for generation and prompt processing.
        n_ctx: context length.
        adapter: a GGUF LoRA adapter file.
        model_id: label of the model in the ledger; defaults to ``model``.
        n_batch: prompt tokens processed per step.
        flash_attn: llama.cpp's flash attention.
        verbose: let llama.cpp print its own logs to stderr.
        top_k: top-k cut (0: off).
        min_p: min-p cut (0: off).
        repeat_penalty: repetition penalty (1: off).
        deterministic: evaluate every prompt from scratch (no reuse of the previous prompt's cache).

    Example:
        >>> backend = LlamaCppBackend("smollm2-135m-instruct", threads=1)  # doctest: +SKIP
        >>> backend.generate([Request.chat("Say hi")])[0].text  # doctest: +SKIP
    """

    name = "llamacpp"

    def __init__(
        self,
        model: str,
        *,
        file: str | None = None,
        threads: int = 1,
        n_ctx: int = 4096,
        adapter: str | None = None,
        model_id: str | None = None,
        n_batch: int = 512,
        flash_attn: bool = False,
        verbose: bool = False,
        top_k: int = 0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        deterministic: bool = False,
    ):
        _passive_openmp()
        llama_cpp = require("llama_cpp", extra="llamacpp", what="the llamacpp backend")
        if adapter and not adapter.endswith(".gguf"):
            raise ValueError(
                f"adapter '{adapter}' (model spec field 'adapter'): llama.cpp applies GGUF LoRA adapters "
                "only; merge the adapter and use backend 'hf', or convert it to GGUF"
            )
        self.gguf = resolve_gguf(model, file=file)
        self.model_id = model_id or model
        self.threads = threads
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.deterministic = deterministic
        self._sampler = {"top_k": top_k, "min_p": min_p, "repeat_penalty": repeat_penalty}
        kwargs: dict[str, Any] = dict(
            model_path=str(self.gguf),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=min(n_batch, n_ctx),
            flash_attn=flash_attn,
            verbose=verbose,
        )
        if adapter:
            kwargs["lora_path"] = adapter
        try:
            # an Illegal instruction in llama.cpp would kill this process with no word: ask a child first
            hardware.check_llama_runs(self.gguf)
        except hardware.LlamaCrash as err:
            raise BackendError(str(err)) from None
        logger.info("loading %s with llama.cpp (%d thread(s), n_ctx %d)", self.gguf.name, threads, n_ctx)
        try:
            with _no_extra_bufts(llama_cpp) as extra:
                self.llm = llama_cpp.Llama(**kwargs, **extra)
        except ValueError as err:  # llama-cpp-python reports a failed load as ValueError
            raise BackendError(f"llama.cpp could not load {self.gguf}: {err}") from err
        self._closed = False

    @classmethod
    def from_spec(
        cls, spec: LlamaCppSpec, *, threads: int | None = None, model_path: str | None = None
    ) -> LlamaCppBackend:
        """Load the spec's model (or ``model_path``: trained weights, converted to GGUF once if merged)."""
        model = model_path or spec.model
        if not model:
            raise ValueError("model spec field 'model' is empty: backend 'llamacpp' needs a GGUF model")
        if model_path:
            from speed.llm.gguf import gguf_for

            model = gguf_for(model_path)
        return cls(
            model,
            file=spec.file,
            threads=threads or spec.threads or 1,
            n_ctx=spec.n_ctx,
            adapter=spec.adapter,
            **spec.options.model_dump(),
        )

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer each request in turn."""
        return gather(self, requests)

    def generate_as_ready(self, requests: Sequence[Request], on_ready: OnReady) -> None:
        """Answer each request in turn, reporting each as it is done (for the ledger to keep)."""
        if self._closed:
            raise BackendError(f"the llamacpp backend for {self.gguf.name} is closed")
        with self._lock:
            for i, req in enumerate(requests):
                on_ready([(i, self._one(req))])

    def _one(self, req: Request) -> Completion:
        start = time.monotonic()
        s = req.sampling
        comp = Completion(attempts=0)
        kwargs: dict[str, Any] = dict(
            messages=[dict(m) for m in req.messages],
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            **self._sampler,
        )
        if req.schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": req.schema}
        for i in range(s.n):
            seed = s.seed + i if s.seed is not None else self._rng.randrange(2**31)
            comp.attempts += 1
            if self.deterministic:
                self.llm.reset()  # no prefix reuse: the prompt is evaluated as a fresh one
            try:
                out = self.llm.create_chat_completion(seed=seed, **kwargs)
            except (ValueError, RuntimeError) as err:
                # too long a prompt, a schema the grammar converter refuses: this request only
                comp.error = f"llama.cpp refused the request: {err}"
                comp.texts, comp.finish_reasons = [], []
                break
            choice = out["choices"][0]
            comp.texts.append(choice["message"].get("content") or "")
            comp.finish_reasons.append(choice.get("finish_reason") or "unknown")
            usage = out.get("usage") or {}
            if i == 0:
                comp.tokens_in = int(usage.get("prompt_tokens") or 0)
            comp.tokens_out += int(usage.get("completion_tokens") or 0)
        comp.latency_s = time.monotonic() - start
        return comp

    def close(self) -> None:
        """Free the model. Safe to call twice."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.llm.close()
        del self.llm
