"""One interface for every way of running an LLM.

A stage never talks to llama.cpp, transformers, vLLM or an HTTP API directly: it asks the run for a
role ("teacher", "junior", ...) and gets a :class:`Backend`. Requests are plain frozen data so that
they can be hashed into the call ledger (the same request is answered once, then replayed) and
shipped to Ray workers unchanged.

Design choices:
- ``generate`` takes a batch and returns one :class:`Completion` per request, in order. Batching is
  the backend's business (continuous batching in vLLM, concurrency for HTTP, padding for HF): a
  caller hands over every request it has at once and the backend keeps as many in flight as its
  engine takes.
- ``generate_as_ready`` is the same call, but hands answers to a callback as they become ready,
  in groups of those that are ready together, so that the call ledger can store each answer the
  moment it arrives instead of when the slowest request of the batch is done. Its default waits for
  ``generate`` and reports everything at once (right for vLLM, which returns the whole batch
  together); backends that finish requests one by one (HTTP, llama.cpp, HF batches) override it.
  A backend that overrides it implements ``generate`` with :func:`gather`.
- A request that the model answered badly is not an exception: the completion carries ``error`` and
  the stage counts it as a drop. Exceptions are for the backend itself failing (dead endpoint after
  retries, out of memory), and carry the endpoint or model in their message.
- ``n`` samples per request are one completion with ``n`` texts, as in the OpenAI API.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request. Defaults are SPEED's generation settings."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """One chat request.

    Args:
        messages: chat messages as ``({"role": ..., "content": ...}, ...)``.
        sampling: how to sample.
        schema: optional JSON schema the output must follow (constrained decoding where the
            backend supports it; otherwise only a hint and the parser validates).
    """

    messages: tuple[dict[str, str], ...]
    sampling: Sampling = field(default_factory=Sampling)
    schema: dict[str, Any] | None = None

    @classmethod
    def chat(
        cls,
        user: str,
        system: str | None = None,
        sampling: Sampling | None = None,
        schema: dict[str, Any] | None = None,
    ) -> Request:
        """Build a request from a user prompt and an optional system prompt."""
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        return cls(messages=tuple(messages), sampling=sampling or Sampling(), schema=schema)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["messages"] = [dict(m) for m in self.messages]
        d["sampling"]["stop"] = list(self.sampling.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        s = dict(d.get("sampling") or {})
        s["stop"] = tuple(s.get("stop") or ())
        return cls(
            messages=tuple(dict(m) for m in d["messages"]),
            sampling=Sampling(**s),
            schema=d.get("schema"),
        )

    def key(self, role: str, model: str) -> str:
        """Hash of everything that determines the answer: the ledger's primary key."""
        payload = {"role": role, "model": model, **self.to_dict()}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


#: why an attempt of an HTTP request failed: rate limited (429), a server error (5xx), no answer
#: within the timeout, or a connection refused, reset or closed before the whole answer came
FAILURE_CAUSES: tuple[str, ...] = ("429", "5xx", "timeout", "dropped")


@dataclass
class Completion:
    """The answer to one request.

    Attributes:
        texts: one text per sample (``len(texts) == request.sampling.n`` unless ``error``).
        finish_reasons: one per text ("stop", "length", ...).
        tokens_in: prompt tokens (counted once per request).
        tokens_out: generated tokens over all samples.
        error: why this request has no usable answer, or None. Such completions are recorded in
            the ledger but never replayed, so a rerun asks again.
        attempts: how many times the backend sent the request (retries included).
        latency_s: wall time spent on the request, retries included.
        failures: the attempts that failed, by cause (see :data:`FAILURE_CAUSES`): an answered
            request that needed two tries after a 429 has ``{"429": 1}``; the ledger sums them.
    """

    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None
    attempts: int = 1
    latency_s: float = 0.0
    cached: bool = False
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The first sample's text ("" when there is none)."""
        return self.texts[0] if self.texts else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class BackendError(RuntimeError):
    """The backend itself failed (endpoint dead after retries, model missing, out of memory)."""


#: receives answers as they become ready: ``[(index in the batch, completion), ...]``
OnReady = Callable[[list[tuple[int, Completion]]], None]


class Backend(ABC):
    """Runs one model. Subclasses implement :meth:`generate`; :meth:`close` frees resources.

    Backends that finish requests one by one also override :meth:`generate_as_ready`.
    """

    #: short name used in configs ("openai", "llamacpp", "hf", "vllm", ...)
    name: str = "base"

    #: a label of the model for the ledger and logs (never an API key or a URL with credentials)
    model_id: str = ""

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer each request; the result has one completion per request, in order."""

    def generate_as_ready(self, requests: Sequence[Request], on_ready: OnReady) -> None:
        """Answer each request, handing answers to ``on_ready`` as soon as they are ready.

        ``on_ready`` is called on the calling thread (so it may use thread-bound resources such as
        an SQLite connection) with the ``(index, completion)`` pairs that became ready together;
        each index is reported exactly once. When the backend fails, every answer it received
        before the failure has been reported by the time the exception propagates: answers are
        paid for and must not be lost. The default calls :meth:`generate` and reports all at once.

        Args:
            requests: the batch, all of it: the backend decides how many are in flight.
            on_ready: receives ``[(index into requests, completion), ...]``.

        Raises:
            BackendError: the backend itself failed, or answered a wrong number of requests.
        """
        comps = self.generate(requests)
        if len(comps) != len(requests):
            raise BackendError(
                f"backend {self.name} returned {len(comps)} completions for {len(requests)} requests"
            )
        if comps:
            on_ready(list(enumerate(comps)))

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Free the model or connections. Safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gather(backend: Backend, requests: Sequence[Request]) -> list[Completion]:
    """``generate`` for a backend that implements :meth:`Backend.generate_as_ready`: all answers, in order.

    Raises:
        BackendError: the backend reported some index twice, out of range, or not at all.
    """
    out: list[Completion | None] = [None] * len(requests)

    def keep(ready: list[tuple[int, Completion]]) -> None:
        for i, comp in ready:
            if not 0 <= i < len(out) or out[i] is not None:
                raise BackendError(
                    f"backend {backend.name} reported answer {i} of {len(out)} twice or out of range"
                )
            out[i] = comp

    backend.generate_as_ready(requests, keep)
    missing = sum(c is None for c in out)
    if missing:
        raise BackendError(f"backend {backend.name} left {missing} of {len(out)} requests unanswered")
    return [c for c in out if c is not None]
