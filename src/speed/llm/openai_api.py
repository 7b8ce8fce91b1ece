"""A client for any OpenAI-compatible chat-completions server.

The teacher of the paper is GPT-4o behind the OpenAI API; the same client talks to vLLM's server,
llama.cpp's server (see :mod:`speed.llm.server`), Ollama and other hosted APIs.

Design choices:
- Plain ``httpx`` rather than the ``openai`` SDK: the SDK retries on its own and hides the raw body,
  and we need both under our control (garbage bodies are counted drops, not crashes).
- Concurrency is a thread pool of ``concurrency`` workers sharing one connection pool; a shared
  limiter spaces request starts ``60 / requests_per_minute`` seconds apart. A batch is queued whole,
  so ``concurrency`` requests stay in flight until the queue is empty (no wave waits for its slowest
  request), and :meth:`OpenAIBackend.generate_as_ready` reports each answer on the calling thread
  as it arrives, for the ledger to store at once.
- Retries use tenacity (exponential backoff with jitter, honouring ``Retry-After`` in seconds or as
  an HTTP date, capped at ``retry_max_s``) on 429, 5xx, timeouts and dropped connections. Every failed
  attempt is counted by cause in ``Completion.failures`` (429, 5xx, timeout, dropped), which the
  ledger sums. When retries run out the endpoint is taken as dead: the call raises
  :class:`~speed.llm.base.BackendError` naming the endpoint (without credentials) and the last error,
  and the other requests of the batch stop retrying at once. Answers that arrived before (or that
  were already in flight and still arrive) are reported first: they are paid for. The request that
  failed, and those stopped mid-retry, are reported too, as completions with ``error`` and their
  attempts, so that the ledger counts every try sent. On Ctrl-C, nothing more is sent and the
  answers already received are reported before the interrupt goes on.
- A 200 answer that is not JSON, or has no usable ``choices``, becomes a completion with ``error``
  (a counted drop, retried on the next run because the ledger never replays errors). A 400/413/422
  rejects one request: also a drop. 401/403/404 mean a wrong key, URL or model name for every
  request: a :class:`~speed.llm.base.BackendError`.
- ``n`` samples: sent as ``n``. A server that answers with fewer choices (llama.cpp's server ignores
  ``n``) is remembered and asked once per missing sample, with ``seed + i`` so seeded samples differ.
- A JSON schema goes in ``response_format``: ``{"type": "json_schema", ...}`` (OpenAI, vLLM) or
  ``{"type": "json_object", "schema": ...}`` (llama-cpp-python's server), chosen by ``schema_mode``.
  A server that rejects the first form (400/422 naming ``response_format``) is sent the second from
  then on, so any of these servers works with the default.
- The API key is read from the environment variable named by ``api_key_env`` and only ever placed in
  the Authorization header: never logged, never in the ledger, never in an error message.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import tenacity

from speed.llm.base import Backend, BackendError, Completion, OnReady, Request, gather

if TYPE_CHECKING:
    from speed.config import OpenAISpec

logger = logging.getLogger(__name__)

#: how often the dispatch loop wakes while it waits for answers (to act on a pending Ctrl-C)
_WAKE_S = 0.5

DEFAULT_BASE_URL = "https://api.openai.com/v1"

SchemaMode = Literal["json_schema", "json_object", "none"]


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to log and to put in errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class _RetryableStatus(Exception):
    """An HTTP answer worth retrying (429, 5xx)."""

    def __init__(self, status: int, body: str, retry_after: float | None):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.retry_after = retry_after


class _Aborted(Exception):
    """Another request of the batch found the endpoint dead."""


class _Failed(Exception):
    """A request that ended without an answer: what it cost (``comp``, with ``error``) and why."""

    def __init__(self, comp: Completion, cause: BackendError | _Aborted):
        super().__init__(comp.error)
        self.comp = comp
        self.cause = cause


class _RateLimiter:
    """Spaces request starts evenly: at most ``rpm`` per minute over all threads."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: a number, or an HTTP date (RFC 9110)."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _cause(err: BaseException) -> str:
    """The cause an attempt failed of, one of :data:`~speed.llm.base.FAILURE_CAUSES`."""
    if isinstance(err, _RetryableStatus):
        return "429" if err.status == 429 else "5xx"
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    return "dropped"  # refused, reset, or closed before the whole answer came


class OpenAIBackend(Backend):
    """Chat completions over HTTP, with retries, rate and concurrency limits.

    Args:
        model: the model name the server knows (``gpt-4o``; any name for llama.cpp's server).
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key: the key (read from the environment by :meth:`from_spec`); None sends no header.
        concurrency: requests in flight at once.
        requests_per_minute: rate limit on request starts (retries included); None: no limit.
        timeout_s: timeout of one HTTP request.
        max_retries: retries after the first try, on 429, 5xx, timeouts and dropped connections.
        retry_initial_s: first backoff; it doubles per retry, with jitter.
        retry_max_s: cap on one backoff.
        schema_mode: how a JSON schema is sent (see the module docstring); "none" drops it.
        strict_schema: OpenAI's ``strict`` flag (the schema must then set additionalProperties false).
        extra_body: fields added to every request body (``top_k`` for vLLM, ...).
        model_id: label of the model in the ledger; defaults to ``model``.
        max_n: the most samples one HTTP request asks for (llama-server refuses ``n`` above its slot
            count); more are asked in further requests with ``seed + i``. None: no limit.

    Example:
        >>> backend = OpenAIBackend("gpt-4o", api_key=os.environ["OPENAI_API_KEY"])  # doctest: +SKIP
        >>> backend.generate([Request.chat("Say hi")])[0].text  # doctest: +SKIP
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        concurrency: int = 8,
        requests_per_minute: float | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 6,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        schema_mode: SchemaMode = "json_schema",
        strict_schema: bool = False,
        extra_body: dict[str, Any] | None = None,
        model_id: str | None = None,
        max_n: int | None = None,
    ):
        if schema_mode not in ("json_schema", "json_object", "none"):
            raise ValueError(
                f"schema_mode '{schema_mode}' is not one of json_schema, json_object, none "
                "(model spec field 'options.schema_mode')"
            )
        self.model = model
        self.model_id = model_id or model
        self.base_url = base_url.rstrip("/")
        self.endpoint = redact_url(self.base_url)
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.schema_mode: SchemaMode = schema_mode
        self.strict_schema = strict_schema
        self.extra_body = dict(extra_body or {})
        self.max_n = max_n
        self._limiter = _RateLimiter(requests_per_minute)
        # jitter up to the first backoff spreads retries of concurrent requests apart
        self._backoff = tenacity.wait_exponential_jitter(
            multiplier=retry_initial_s, jitter=retry_initial_s, max=retry_max_s
        )
        self._mode_lock = threading.Lock()
        self._n_supported: bool | None = None  # learnt from the first answer to n > 1
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def from_spec(
        cls, spec: OpenAISpec, *, threads: int | None = None, model_path: str | None = None
    ) -> OpenAIBackend:
        """Build from a model spec; the key is read from the variable ``spec.api_key_env`` names.

        Raises:
            ValueError: no model name, or ``api_key_env`` names an unset variable.
        """
        model = model_path or spec.model
        if not model:
            raise ValueError(
                "model spec field 'model' is empty: backend 'openai' needs the model name the server "
                "knows (e.g. gpt-4o)"
            )
        api_key = None
        if spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise ValueError(
                    f"environment variable {spec.api_key_env} (model spec field 'api_key_env') is not set; "
                    f"export {spec.api_key_env}=<your key>, or set api_key_env to null for a server "
                    "that needs no key"
                )
        return cls(
            model,
            base_url=spec.base_url or DEFAULT_BASE_URL,
            api_key=api_key,
            concurrency=spec.concurrency,
            requests_per_minute=spec.requests_per_minute,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            **spec.options.model_dump(),
        )

    # -- the interface -----------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer each request; raises :class:`BackendError` when the endpoint is dead."""
        return gather(self, requests)

    def generate_as_ready(self, requests: Sequence[Request], on_ready: OnReady) -> None:
        """Send every request, ``concurrency`` at a time, reporting each answer as it arrives.

        Raises:
            BackendError: the endpoint is dead (after the answers received before are reported).
        """
        if self._closed:
            raise BackendError(f"backend for {self.endpoint} is closed")
        if not requests:
            return
        abort = threading.Event()
        if len(requests) == 1 or self.concurrency == 1:
            for i, req in enumerate(requests):
                try:
                    comp = self._one(req, abort)
                except _Failed as failed:
                    on_ready([(i, failed.comp)])  # its tries count, though nothing came of them
                    raise failed.cause from None
                on_ready([(i, comp)])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="speed-http")
        # every request is queued at once: the pool keeps `concurrency` in flight, and a slow
        # request holds up only its own worker, never the next ones
        index: dict[Future[Completion], int] = {
            self._pool.submit(self._one, req, abort): i for i, req in enumerate(requests)
        }
        pending = set(index)
        reported: set[int] = set()
        failure: BaseException | None = None
        try:
            while pending:
                # a bounded wait: a Ctrl-C that the kernel hands to a worker thread only sets a flag,
                # which the main thread acts on when it next runs Python code
                done, pending = wait(pending, timeout=_WAKE_S, return_when=FIRST_COMPLETED)
                ready: list[tuple[int, Completion]] = []
                for fut in done:
                    if fut.cancelled():
                        continue
                    err = fut.exception()
                    if err is None:
                        ready.append((index[fut], fut.result()))
                        continue
                    if isinstance(err, _Failed):
                        if err.comp.attempts:
                            ready.append((index[fut], err.comp))  # tries sent count, unanswered
                        err = err.cause
                    if not isinstance(err, _Aborted) and failure is None:
                        # the first real failure wins; queued requests are dropped, those in flight
                        # stop retrying, and answers still arriving are reported below
                        failure = err
                        abort.set()
                        for other in pending:
                            other.cancel()
                if ready:
                    ready.sort(key=lambda pair: pair[0])
                    on_ready(ready)
                    reported.update(i for i, _ in ready)
        except BaseException:
            # Ctrl-C while waiting, or on_ready failing: nothing more is sent, and answers already
            # here are still reported (they are paid for) before the error goes on
            abort.set()
            for fut in index:
                fut.cancel()
            self._report_received(index, reported, on_ready)
            raise
        if failure is not None:
            raise failure

    def _report_received(
        self, index: dict[Future[Completion], int], reported: set[int], on_ready: OnReady
    ) -> None:
        """Report the answers that arrived but were not reported yet, when a batch is cut short."""
        late: list[tuple[int, Completion]] = []
        for fut, i in index.items():
            if i in reported or not fut.done() or fut.cancelled():
                continue
            err = fut.exception()
            if err is None:
                late.append((i, fut.result()))
            elif isinstance(err, _Failed) and err.comp.attempts:
                late.append((i, err.comp))
        late.sort(key=lambda pair: pair[0])
        if not late:
            return
        try:
            on_ready(late)
        except Exception:
            # the error that cut the batch short matters more; say what could not be kept
            logger.exception("%s: %d answer(s) received could not be reported", self.endpoint, len(late))

    def close(self) -> None:
        """Close connections and worker threads. Safe to call twice.

        Requests still in flight (after an interrupt) are not waited for: queued ones are cancelled,
        and a worker blocked on a server that does not answer ends with that request (its timeout, or
        the server's end); the CLI's entry point does not wait for it either (:func:`speed.cli.entry`).
        """
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- one request -------------------------------------------------------------------------

    def _body(self, req: Request, n: int, seed: int | None) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in req.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if n != 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        if s.stop:
            body["stop"] = list(s.stop)
        if req.schema is not None and self.schema_mode != "none":
            if self.schema_mode == "json_schema":
                name = re.sub(r"[^A-Za-z0-9_-]", "_", str(req.schema.get("title") or "output"))[:64]
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": req.schema, "strict": self.strict_schema},
                }
            else:
                body["response_format"] = {"type": "json_object", "schema": req.schema}
        body.update(self.extra_body)
        return body

    def _one(self, req: Request, abort: threading.Event) -> Completion:
        """One request, all its samples; raises :class:`_Failed` (with what it cost) when it fails."""
        if abort.is_set():
            raise _Aborted
        start = time.monotonic()
        comp = Completion(attempts=0)
        try:
            self._ask(req, abort, comp)
        except (BackendError, _Aborted) as err:
            comp.error = (
                f"unanswered: {err}"
                if isinstance(err, BackendError)
                else f"unanswered: stopped after {comp.attempts} attempt(s), the endpoint was found dead"
            )
            comp.texts, comp.finish_reasons = [], []
            comp.latency_s = time.monotonic() - start
            raise _Failed(comp, err) from None
        if comp.error:
            comp.texts, comp.finish_reasons = [], []
        comp.latency_s = time.monotonic() - start
        return comp

    def _ask(self, req: Request, abort: threading.Event, comp: Completion) -> None:
        """Fill ``comp`` with the samples of ``req``, or with the reason they could not be had."""
        n = req.sampling.n
        seed = req.sampling.seed
        while len(comp.texts) < n:
            missing = n - len(comp.texts)
            ask = missing if self._n_supported is not False else 1
            if self.max_n:
                ask = min(ask, self.max_n)
            call_seed = None if seed is None else seed + len(comp.texts)
            sent_mode = self.schema_mode
            data = self._post(self._body(req, ask, call_seed), abort, comp)
            if isinstance(data, str) and self._schema_refused(req, data, sent_mode):
                continue  # asked again with the schema in the form the server knows
            if isinstance(data, str):
                comp.error = data
                break
            error = self._take(data, comp, first=not comp.texts)
            if error:
                comp.error = error
                break
            got = len(data["choices"])
            if ask > 1 and self._n_supported is None:
                self._n_supported = got >= ask
                if not self._n_supported:
                    logger.info(
                        "%s answered n=%d with %d choice(s); asking once per sample from now on",
                        self.endpoint,
                        ask,
                        got,
                    )

    def _schema_refused(self, req: Request, reason: str, sent_mode: str) -> bool:
        """Whether a rejection was of the ``json_schema`` form (then switch to ``json_object``)."""
        if req.schema is None or sent_mode != "json_schema" or not reason.startswith("rejected"):
            return False
        if "response_format" not in reason and "json_schema" not in reason:
            return False
        with self._mode_lock:
            if self.schema_mode == "json_schema":
                logger.warning(
                    "%s refused response_format type json_schema; sending {'type': 'json_object', "
                    "'schema': ...} from now on (set options.schema_mode to skip this probe)",
                    self.endpoint,
                )
                self.schema_mode = "json_object"
        return True

    def _take(self, data: dict[str, Any], comp: Completion, first: bool) -> str | None:
        """Append the choices of one answer to ``comp``; a reason when the answer is unusable."""
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            return "garbage: the answer has no 'choices'"
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                return "garbage: a choice has no 'message'"
            content = message.get("content")
            if content is None:
                content = ""
            if not isinstance(content, str):
                return f"garbage: message content is {type(content).__name__}, not text"
            comp.texts.append(content)
            comp.finish_reasons.append(str(choice.get("finish_reason") or "unknown"))
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        if first:
            comp.tokens_in = int(usage.get("prompt_tokens") or 0)
        comp.tokens_out += int(usage.get("completion_tokens") or 0)
        return None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryableStatus) and exc.retry_after is not None:
            wait = max(wait, min(exc.retry_after, self.retry_max_s))
        return wait

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s: attempt %d failed (%s); retrying in %.1fs",
            self.endpoint,
            state.attempt_number,
            self._describe(exc),
            state.next_action.sleep if state.next_action else 0.0,
        )

    def _describe(self, exc: BaseException | None) -> str:
        if exc is None:
            return "no error"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, _RetryableStatus):
            text = str(exc)  # "HTTP 503: <body>": the class name is ours, not the user's business
        if isinstance(exc, httpx.TimeoutException):
            text += f" (no answer within timeout_s={self.timeout_s:g}s)"
        # httpx messages may quote the URL; keep credentials of a base_url out of logs and errors
        return text.replace(self.base_url, self.endpoint)

    def _post(self, body: dict[str, Any], abort: threading.Event, comp: Completion) -> dict[str, Any] | str:
        """POST one body with retries: the parsed answer, or a drop reason.

        Every try is added to ``comp.attempts`` and every failed one to ``comp.failures`` by cause,
        also when the tries run out (then :class:`BackendError`) or the batch is aborted.
        """
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1) | tenacity.stop_when_event_set(abort),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type((_RetryableStatus, httpx.TransportError)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        tries = 0
        try:
            for attempt in retrying:
                with attempt:
                    if abort.is_set():
                        raise _Aborted
                    tries = attempt.retry_state.attempt_number
                    self._limiter.acquire()
                    comp.attempts += 1
                    try:
                        resp = self._client.post(f"{self.base_url}/chat/completions", json=body)
                        status = resp.status_code
                        if status == 429 or status >= 500:
                            raise _RetryableStatus(status, resp.text, _retry_after(resp))
                    except (_RetryableStatus, httpx.TransportError) as err:
                        cause = _cause(err)
                        comp.failures[cause] = comp.failures.get(cause, 0) + 1
                        raise
        except (_RetryableStatus, httpx.TransportError) as err:
            if abort.is_set():
                raise _Aborted from err
            raise BackendError(
                f"endpoint {self.endpoint} (model '{self.model}') failed after {tries} attempt(s); "
                f"last error: {self._describe(err)}. Check that the server is up, or raise "
                "max_retries/timeout_s in the model spec."
            ) from None
        if status in (401, 403, 404):
            raise BackendError(
                f"endpoint {self.endpoint} refused model '{self.model}' with HTTP {status}: "
                f"{resp.text[:300]}. Check base_url, the model name and the API key variable."
            )
        if status >= 400:
            return f"rejected: HTTP {status}: {resp.text[:300]}"
        try:
            data = resp.json()
        except ValueError:
            snippet = resp.text[:80].replace("\n", " ")
            return f"garbage: the answer is not JSON ({snippet!r})"
        if not isinstance(data, dict):
            return f"garbage: the answer is JSON {type(data).__name__}, not an object"
        return data
