"""Where a stage's shards run: one small base class, one worker interface.

A stage cuts its work into :class:`Shard` objects (plain picklable data: an id and a payload) and
hands them, with a :class:`WorkerFactory`, to ``ctx.executor.map(ctx, factory, shards)``. The
executor builds the worker once per process it uses (so a model replica is loaded once per worker,
not once per shard), feeds it shards and yields ``(shard_id, result)`` as shards finish, in whatever
order they finish. The stage code is the same for every executor; only where the worker lives
changes (this process, a Ray actor on another machine).

Design choices:
- A worker gets its models from a :class:`WorkerEnv`, never from the run session directly: the
  local env hands out the session's backends (one copy of each model in the process), a Ray env
  loads a replica in the actor. Both wrap every backend in the run's call ledger, so calls are
  counted and replayed wherever they run.
- Shards and results cross process boundaries by pickle; keep them small (prompts in, rows out).
  The stage, on the driver, writes what a shard returns: a worker never writes into the run folder,
  which therefore needs no shared filesystem for outputs.
- Which weights a role runs with and how its backend is wrapped in the ledger are decided in one
  place, :mod:`speed.roles` (:class:`~speed.roles.RoleBackends`), for the run session and a Ray env
  alike, so a Ray worker and the local process load the same weights, key the same request the same
  way and replay each other's answers.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speed.ledger import LedgeredBackend
    from speed.stage import StageContext

__all__ = ["Executor", "Shard", "Worker", "WorkerEnv", "WorkerFactory", "check_shard_ids"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One unit of work and of resume.

    Attributes:
        id: unique within the stage run; names the shard's output and completion marker.
        payload: picklable input of the worker (e.g. a list of prompts).
    """

    id: str
    payload: Any


class WorkerEnv(ABC):
    """What a worker sees where it runs: the stage name and ledgered model backends.

    Attributes:
        stage: the stage the calls are recorded under.
        ledger: the run's ledger, or a proxy with its ``lookup`` and ``record`` methods; wrap a
            backend of your own in :class:`~speed.ledger.LedgeredBackend` with it.
    """

    stage: str
    ledger: Any

    @abstractmethod
    def llm(self, role: str, model_path: str | Path | None = None) -> LedgeredBackend:
        """The backend of ``role``, every call ledgered; its weights are those of the role for the
        stage (:func:`speed.roles.role_weights`), or ``model_path`` if given."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what this env loaded (backends it owns)."""


class Worker(ABC):
    """Processes shards; built once per executor worker, so it may hold model replicas.

    Subclasses take their own keyword arguments after ``env`` (passed through
    :class:`WorkerFactory`) and implement :meth:`process`.

    Args:
        env: where the worker gets its models.
    """

    def __init__(self, env: WorkerEnv, **kwargs: Any):
        self.env = env

    @abstractmethod
    def process(self, shard: Shard) -> Any:
        """Do one shard; the return value (picklable) is yielded by the executor."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the worker holds itself (the env's backends are freed by the env)."""


@dataclass(frozen=True)
class WorkerFactory:
    """How to build a worker in any process: a :class:`Worker` subclass and its keyword arguments.

    The class must be importable by its module path where the worker runs (define it at module
    level, not inside a function), and the arguments must be picklable.
    """

    cls: type[Worker]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, env: WorkerEnv) -> Worker:
        return self.cls(env, **dict(self.kwargs))


class Executor(ABC):
    """Runs shards through workers and yields results as shards finish."""

    #: the ``executor.kind`` value that selects this executor
    name: str = "base"

    @abstractmethod
    def map(
        self, ctx: StageContext, factory: WorkerFactory, shards: Sequence[Shard]
    ) -> Iterator[tuple[str, Any]]:
        """Process every shard; yield ``(shard.id, result)`` in completion order.

        Args:
            ctx: the running stage (its config, run directory, ledger, session).
            factory: builds one worker per executor worker.
            shards: the shards still to do; ids must be unique.

        Raises:
            ValueError: two shards share an id.
            RuntimeError: a worker failed on a shard; the message names the shard.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the executor's resources (a Ray runtime it started). Safe to call twice."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_shard_ids(shards: Sequence[Shard]) -> None:
    """Refuse duplicate shard ids (their outputs and markers would overwrite each other)."""
    seen: set[str] = set()
    for shard in shards:
        if shard.id in seen:
            raise ValueError(f"shard id '{shard.id}' is used twice; give every shard a unique id")
        seen.add(shard.id)
