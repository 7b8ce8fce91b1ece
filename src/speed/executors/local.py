"""The default executor: shards run one after another in this process.

The worker is built once per :meth:`LocalExecutor.map` call and gets the run session's backends
(``ctx.llm``), so a model the stage already loaded is not loaded twice, and every call goes through
the run's ledger exactly as if the stage had made it itself. Results are yielded in shard order,
which is also the completion order here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed.executors.base import Executor, Shard, WorkerEnv, WorkerFactory, check_shard_ids

if TYPE_CHECKING:
    from speed.ledger import LedgeredBackend
    from speed.stage import StageContext

logger = logging.getLogger(__name__)


class LocalEnv(WorkerEnv):
    """Backends of the run session (shared with the stage; the session closes them)."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.stage = ctx.name
        self.ledger = ctx.ledger

    def llm(self, role: str, model_path: str | Path | None = None) -> LedgeredBackend:
        return self.ctx.llm(role, model_path)


class LocalExecutor(Executor):
    """Runs shards in order in this process."""

    name = "local"

    def map(
        self, ctx: StageContext, factory: WorkerFactory, shards: Sequence[Shard]
    ) -> Iterator[tuple[str, Any]]:
        check_shard_ids(shards)
        if not shards:
            return
        worker = factory.build(LocalEnv(ctx))
        try:
            for shard in shards:
                try:
                    result = worker.process(shard)
                except Exception as err:
                    err.add_note(f"while processing shard '{shard.id}' of stage '{ctx.name}'")
                    raise
                yield shard.id, result
        finally:
            worker.close()
