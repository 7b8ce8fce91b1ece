"""Executors: the same shards give the same results locally and on Ray, calls go through the ledger."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import pytest

from speed.config import SpeedConfig
from speed.executors import LocalExecutor, Shard, Worker, WorkerFactory, make_executor
from speed.ledger import LedgeredBackend
from speed.llm.base import Backend, Completion, Request, Sampling
from speed.runner import RunSession, StageContext


class EchoBackend(Backend):
    """Answers with the request's seed squared: deterministic, instant."""

    name = "echo"
    model_id = "echo-1"

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [
            Completion(texts=[str((r.sampling.seed or 0) ** 2)], tokens_in=2, tokens_out=1) for r in requests
        ]


class SquareWorker(Worker):
    """Squares each number of a shard through a ledgered echo backend; counts its own builds."""

    builds = 0

    def __init__(self, env, offset: int = 0):
        super().__init__(env)
        type(self).builds += 1
        self.offset = offset
        self.llm = LedgeredBackend(EchoBackend(), env.ledger, role="teacher", stage=env.stage, flush_every=2)

    def process(self, shard: Shard) -> dict:
        if shard.payload == "boom":
            raise ValueError("the worker refuses this shard")
        reqs = [Request.chat(f"n={n}", sampling=Sampling(seed=n)) for n in shard.payload]
        texts = [c.text for c in self.llm.generate(reqs)]
        return {
            "values": [int(t) + self.offset for t in texts],
            "pid": os.getpid(),
            "sent": self.llm.sent,
            "replayed": self.llm.replayed,
        }


def make_ctx(tmp_path, **executor) -> tuple[StageContext, RunSession]:
    cfg = SpeedConfig.model_validate({"run": {"dir": str(tmp_path / "run")}, "executor": executor})
    run_dir = tmp_path / "run"
    session = RunSession(cfg, run_dir)
    out = run_dir / ".work" / "toy"
    out.mkdir(parents=True)
    return StageContext(cfg, run_dir, "toy", "k", out, (), session), session


SHARDS = [Shard(f"s{i}", list(range(3 * i, 3 * i + 3))) for i in range(5)]


def test_make_executor_picks_the_configured_kind(tmp_path):
    assert isinstance(make_executor(SpeedConfig()), LocalExecutor)
    ray_cfg = SpeedConfig.model_validate({"executor": {"kind": "ray", "num_workers": 3}})
    executor = make_executor(ray_cfg)
    assert executor.name == "ray"
    executor.close()  # nothing started: a no-op


def test_local_executor_builds_one_worker_and_ledgers_every_call(tmp_path):
    ctx, session = make_ctx(tmp_path)
    SquareWorker.builds = 0
    try:
        out = list(ctx.executor.map(ctx, WorkerFactory(SquareWorker, {"offset": 1}), SHARDS))
        assert [sid for sid, _ in out] == [s.id for s in SHARDS]
        assert out[2][1]["values"] == [n * n + 1 for n in (6, 7, 8)]
        assert SquareWorker.builds == 1
        assert ctx.ledger.totals(stage="toy").calls == 15
        # a second pass replays everything from the ledger
        again = list(ctx.executor.map(ctx, WorkerFactory(SquareWorker, {"offset": 1}), SHARDS))
        assert [r for _, r in again][-1]["replayed"] == 15 and again[-1][1]["sent"] == 0
        assert [r["values"] for _, r in again] == [r["values"] for _, r in out]
    finally:
        session.close()


def test_local_executor_names_the_failed_shard_and_refuses_duplicate_ids(tmp_path):
    ctx, session = make_ctx(tmp_path)
    try:
        with pytest.raises(ValueError, match="refuses") as info:
            list(ctx.executor.map(ctx, WorkerFactory(SquareWorker), [Shard("ok", [1]), Shard("bad", "boom")]))
        assert any("shard 'bad'" in note for note in info.value.__notes__)
        with pytest.raises(ValueError, match="shard id 's0' is used twice"):
            list(ctx.executor.map(ctx, WorkerFactory(SquareWorker), [SHARDS[0], SHARDS[0]]))
    finally:
        session.close()


# --------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle  # Ray's own copy pickles what goes to its actors

    # the worker classes of this test module travel to the actors by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_executor_matches_local_and_shares_the_ledger(tmp_path, local_ray):
    ctx, session = make_ctx(tmp_path / "local")
    try:
        local = dict(ctx.executor.map(ctx, WorkerFactory(SquareWorker, {"offset": 1}), SHARDS))
    finally:
        session.close()

    ctx, session = make_ctx(tmp_path / "ray", kind="ray", num_workers=2, cpus_per_worker=1)
    try:
        executor = ctx.executor
        assert executor.name == "ray"
        remote = dict(executor.map(ctx, WorkerFactory(SquareWorker, {"offset": 1}), SHARDS))
        assert {k: v["values"] for k, v in remote.items()} == {k: v["values"] for k, v in local.items()}
        # every shard ran in a Ray actor, two at most: one replica per actor
        pids = {r["pid"] for r in remote.values()}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        # the workers' calls are in the run's ledger (through the ledger server) ...
        assert ctx.ledger.totals(stage="toy").calls == 15
        # ... and a second pass replays them instead of sending them again
        again = dict(executor.map(ctx, WorkerFactory(SquareWorker, {"offset": 1}), SHARDS))
        assert sum(r["sent"] for r in again.values()) == 0
        assert {k: v["values"] for k, v in again.items()} == {k: v["values"] for k, v in local.items()}
    finally:
        session.close()


@pytest.mark.ray
def test_ray_executor_names_the_failed_shard(tmp_path, local_ray):
    ctx, session = make_ctx(tmp_path, kind="ray", num_workers=1)
    try:
        with pytest.raises(RuntimeError, match=r"shard 'bad' of stage 'toy' failed(.|\n)*refuses"):
            list(ctx.executor.map(ctx, WorkerFactory(SquareWorker), [Shard("ok", [1]), Shard("bad", "boom")]))
    finally:
        session.close()


@pytest.mark.ray
def test_ray_executor_refuses_more_cpus_than_a_local_cluster_has(tmp_path, local_ray):
    ctx, session = make_ctx(tmp_path, kind="ray", num_workers=2, cpus_per_worker=4)
    try:
        with pytest.raises(RuntimeError, match=r"executor.cpus_per_worker=4 need 8 CPU"):
            list(ctx.executor.map(ctx, WorkerFactory(SquareWorker), SHARDS))
    finally:
        session.close()
