"""Executors: where a stage's shards run (this process, or a Ray cluster).

A stage hands ``ctx.executor`` a :class:`WorkerFactory` and a list of :class:`Shard` objects and
gets ``(shard_id, result)`` pairs back as shards finish; it never knows which executor runs them.
``executor.kind`` in the config picks one: ``local`` (default) or ``ray``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from speed.executors.base import Executor, Shard, Worker, WorkerEnv, WorkerFactory
from speed.executors.local import LocalExecutor

if TYPE_CHECKING:
    from speed.config import SpeedConfig

__all__ = [
    "Executor",
    "LocalExecutor",
    "Shard",
    "Worker",
    "WorkerEnv",
    "WorkerFactory",
    "make_executor",
]


def make_executor(cfg: SpeedConfig) -> Executor:
    """The executor ``cfg.executor.kind`` names (Ray is imported only when chosen).

    Raises:
        ValueError: an unknown kind (the config's Literal normally refuses it first).
    """
    kind = cfg.executor.kind
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        from speed.executors.ray import RayExecutor

        return RayExecutor(cfg)
    raise ValueError(f"executor.kind '{kind}' is not one of: local, ray")
