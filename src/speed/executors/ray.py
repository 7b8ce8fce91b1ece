"""The Ray executor: ``ray.data`` over shards, an actor pool with one model replica per actor.

Shards become the rows of a Ray dataset (one block each) and go through
``Dataset.map_batches(<callable class>, compute=ActorPoolStrategy(size=num_workers), batch_size=1)``
with ``num_cpus`` / ``num_gpus`` per actor from :class:`~speed.config.ExecutorConfig`. Each actor
builds the stage's worker once (loading its models: a vLLM engine per GPU, a llama.cpp or
transformers model per CPU slot) and then processes the shards Ray Data streams to it. Results come
back to the driver as shards finish; the stage, on the driver, writes them. The same code runs
with a local Ray (``executor.address: null``: a new Ray of its own, sized for the pool, stopped at
the end) and with a cluster (``executor.address: auto`` or ``HOST:6379``, from a node of the
cluster; with Ray's token authentication, the driver needs the cluster's token as any Ray driver
does: ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``).

The ledger on Ray -- the design choice:
    Every call is still counted and replayed, at the granularity of single calls, through a small
    *ledger server*: a Ray actor pinned (hard node affinity) to the driver's node that opens the
    run's SQLite ledger and answers ``lookup`` / ``record``. Workers wrap their backends in the
    usual :class:`~speed.ledger.LedgeredBackend`, with a :class:`RemoteLedger` that forwards to the
    server; one round trip per chunk of ``batch_size`` requests, negligible next to generation.
    Why not let workers open the SQLite file: SQLite's WAL needs shared memory, so it is only safe
    between processes of one host, never over NFS; a run on a cluster would corrupt or lock it.
    Why not have the driver look cached answers up before sending a shard: the revisor's requests
    depend on the senior's answers, so the driver cannot know them in advance, and a shard killed
    halfway would lose all its finished calls. With the server, a killed run replays every call
    that finished before the kill, on any cluster, and the run folder needs no shared filesystem
    (only model weights must be readable by the workers; see below).

Requirements on a cluster: ``speed`` (with the backend's extra) installed on every node, and model
folders trained in the run (senior, revisor) readable at the same path on every node (a shared
filesystem, or the run copied there). Run ``speed`` on a node of the cluster (usually the head):
the ledger server is pinned to the driver's node, so a Ray Client driver (``ray://`` address, off
the cluster) is not supported.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from speed.executors.base import Executor, Shard, Worker, WorkerEnv, WorkerFactory, check_shard_ids

if TYPE_CHECKING:
    from speed.config import SpeedConfig
    from speed.ledger import LedgeredBackend
    from speed.llm.base import Completion, Request
    from speed.roles import RoleBackends
    from speed.stage import StageContext

logger = logging.getLogger(__name__)


def _ray() -> Any:
    from speed.llm.registry import require

    return require("ray", extra="ray", what="the ray executor (executor.kind: ray)")


def _ray_data() -> Any:
    from speed.llm.registry import require

    return require("ray.data", extra="ray", what="the ray executor (executor.kind: ray)")


# --------------------------------------------------------------------------------------------
# the ledger server and its client


class LedgerServer:
    """Owns the run's SQLite ledger on the driver's node; workers call it (a Ray actor)."""

    def __init__(self, path: str):
        from speed.ledger import Ledger

        self.ledger = Ledger(path)

    def lookup(self, keys: list[str]) -> dict[str, Completion]:
        return self.ledger.lookup(keys)

    def record(self, stage: str, role: str, model: str, items: list[tuple[str, Request, Completion]]) -> None:
        self.ledger.record(stage, role, model, items)

    def use(self, stage_key: str, keys: list[str]) -> None:
        self.ledger.use(stage_key, keys)

    def ping(self) -> str:
        return str(self.ledger.path)


class RemoteLedger:
    """The ledger methods :class:`~speed.ledger.LedgeredBackend` uses, sent to a LedgerServer."""

    def __init__(self, handle: Any):
        self.handle = handle

    def lookup(self, keys: Sequence[str]) -> dict[str, Completion]:
        return cast("dict[str, Completion]", _ray().get(self.handle.lookup.remote(list(keys))))

    def record(
        self, stage: str, role: str, model: str, items: Sequence[tuple[str, Request, Completion]]
    ) -> None:
        _ray().get(self.handle.record.remote(stage, role, model, list(items)))

    def use(self, stage_key: str, keys: Sequence[str]) -> None:
        _ray().get(self.handle.use.remote(stage_key, list(keys)))


# --------------------------------------------------------------------------------------------
# the worker side


class RayEnv(WorkerEnv):
    """Backends loaded in the actor, every call ledgered through the run's ledger server.

    The backends come from the same factory as the run session's (:class:`speed.roles.RoleBackends`),
    so the actor loads the weights the driver would and labels them the same way in the ledger.

    Args:
        cfg: the run's config (model specs, thread count).
        stage: the stage the calls are recorded under.
        stage_key: the key of the stage run, which the calls are noted as used by.
        run_dir: the run directory as the driver sees it (trained weights and their ledger labels).
        ledger: handle of the :class:`LedgerServer`.
        reads: the stages the stage reads (they decide which weights a role runs with).
    """

    def __init__(
        self,
        cfg: SpeedConfig,
        stage: str,
        stage_key: str,
        run_dir: str,
        ledger: Any,
        reads: tuple[str, ...] = (),
    ):
        self.cfg = cfg
        self.stage = stage
        self.stage_key = stage_key
        self.run_dir = run_dir
        self.reads = reads
        self.ledger = RemoteLedger(ledger)
        self._roles: RoleBackends | None = None

    def llm(self, role: str, model_path: str | Path | None = None) -> LedgeredBackend:
        from speed.roles import RoleBackends

        if self._roles is None:  # built in the actor: the env itself travels by pickle
            self._roles = RoleBackends(self.cfg, self.run_dir)
        return self._roles.ledgered(
            role,
            ledger=self.ledger,
            stage=self.stage,
            reads=self.reads,
            stage_key=self.stage_key,
            model_path=model_path,
        )

    def close(self) -> None:
        if self._roles is not None:
            self._roles.close()


class ShardActor:
    """The callable class Ray Data runs in each actor: builds the worker once, then maps shards.

    A failed shard is returned as an error row (with its traceback) instead of raised, so that
    Ray does not retry it and the driver can name the shard in its error.
    """

    def __init__(self, factory: WorkerFactory, env: RayEnv):
        self.env = env
        self.worker: Worker = factory.build(env)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results, errors = [], []
        for payload in batch["payload"]:
            shard: Shard = pickle.loads(payload)
            try:
                results.append(pickle.dumps(self.worker.process(shard)))
                errors.append("")
            except Exception:
                results.append(b"")
                errors.append(traceback.format_exc())
        return {
            "shard_id": np.asarray(batch["shard_id"]),
            "result": np.array(results, dtype=object),
            "error": np.array(errors, dtype=object),
        }

    def __del__(self) -> None:
        try:
            self.worker.close()
            self.env.close()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


# --------------------------------------------------------------------------------------------
# the executor


class RayExecutor(Executor):
    """Runs shards on a Ray actor pool (``executor.kind: ray``).

    Args:
        cfg: the run's config; ``cfg.executor`` gives the address, workers and resources.
    """

    name = "ray"

    def __init__(self, cfg: SpeedConfig):
        self.cfg = cfg
        self.ex = cfg.executor
        self._started = False
        self._server: Any = None
        self._server_path: str | None = None

    def _init(self) -> Any:
        ray = _ray()
        if ray.is_initialized():
            return ray
        if self.ex.address is None:
            # a local Ray: declare at least the CPUs the pool needs (logical units on a small box)
            need = int(self.ex.num_workers * self.ex.cpus_per_worker + 0.999)
            # "local": a new Ray of our own, never one that happens to run on this machine
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, need),
                include_dashboard=False,
                log_to_driver=True,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=self.ex.address, logging_level=logging.WARNING)
        self._started = True
        logger.info("ray started (%s)", self.ex.address or "local")
        return ray

    def _check_resources(self, ray: Any, workers: int) -> None:
        have = ray.cluster_resources()
        for res, per, field in (
            ("CPU", self.ex.cpus_per_worker, "cpus_per_worker"),
            ("GPU", self.ex.gpus_per_worker, "gpus_per_worker"),
        ):
            need = workers * per
            if need > have.get(res, 0.0) + 1e-9:
                msg = (
                    f"executor: {workers} workers x executor.{field}={per:g} need {need:g} {res}, "
                    f"but the Ray cluster has {have.get(res, 0.0):g}; lower executor.num_workers or "
                    f"executor.{field}, or add nodes"
                )
                if self.ex.address is None:
                    raise RuntimeError(msg)
                logger.warning("%s (waiting for the autoscaler, if any)", msg)

    def _ledger_server(self, ray: Any, path: str) -> Any:
        if self._server is not None and self._server_path == path:
            return self._server
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        server = (
            ray.remote(LedgerServer)
            .options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            )
            .remote(path)
        )
        ray.get(server.ping.remote())
        self._server, self._server_path = server, path
        return server

    def map(
        self, ctx: StageContext, factory: WorkerFactory, shards: Sequence[Shard]
    ) -> Iterator[tuple[str, Any]]:
        check_shard_ids(shards)
        if not shards:
            return
        if ctx.cfg.run.budget.active and "teacher" in getattr(factory.kwargs.get("stage"), "roles", ()):
            from speed.executors.local import LocalExecutor

            # run.budget's reservations live in the driver, where workers could not keep them
            # together; a teacher stage waits on the teacher's endpoint, not on local compute, so
            # the driver runs its shards itself
            logger.info("%s: run.budget is kept on the driver; its teacher shards run there", ctx.name)
            yield from LocalExecutor().map(ctx, factory, shards)
            return
        ray = self._init()
        ray_data = _ray_data()
        workers = min(self.ex.num_workers, len(shards))
        self._check_resources(ray, workers)
        data_ctx = ray_data.DataContext.get_current()
        data_ctx.enable_progress_bars = sys.stderr.isatty()
        server = self._ledger_server(ray, str(Path(ctx.ledger.path).resolve()))
        env = RayEnv(ctx.cfg, ctx.name, ctx.key, str(ctx.run_dir), server, ctx.reads)
        items = [{"shard_id": s.id, "payload": pickle.dumps(s)} for s in shards]
        ds = ray_data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            ShardActor,
            fn_constructor_kwargs={"factory": factory, "env": env},
            batch_size=1,
            compute=ray_data.ActorPoolStrategy(size=workers),
            num_cpus=self.ex.cpus_per_worker,
            num_gpus=self.ex.gpus_per_worker or None,
            zero_copy_batch=False,
        )
        logger.info(
            "ray: %d shards on %d workers (%g CPU, %g GPU each)",
            len(shards),
            workers,
            self.ex.cpus_per_worker,
            self.ex.gpus_per_worker,
        )
        for row in ds.iter_rows():
            shard_id = str(row["shard_id"])
            if row["error"]:
                raise RuntimeError(
                    f"shard '{shard_id}' of stage '{ctx.name}' failed on a Ray worker:\n{row['error']}"
                )
            yield shard_id, pickle.loads(row["result"])

    def close(self) -> None:
        if self._server is not None:
            try:
                _ray().kill(self._server)
            except Exception as err:  # the cluster may already be gone
                logger.debug("could not stop the ledger server: %s", err)
            self._server = None
        if self._started:
            _ray().shutdown()
            self._started = False
