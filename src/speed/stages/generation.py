"""The one skeleton of every stage that calls a model: plan -> shards -> worker -> driver writes.

A :class:`GenerationStage` (seed, candidates, judge, revisions, synthesize; the corpus stages to
come) implements two methods:

- :meth:`GenerationStage.plan`, on the driver: the stage's work cut into :class:`~speed.executors.Shard`
  objects (prompts drawn, upstream rows read, per-request seeds fixed), as a pure function of the
  config, the run seed and the upstream stages;
- :meth:`GenerationStage.process`, where the executor puts the worker (this process or a Ray actor):
  render the requests of one shard, generate through the ledgered backends of a :class:`Job`, parse
  each answer against its pydantic schema and filter it; it returns one record per item, kept or
  dropped with a named reason.

The base class does the rest the same way for every such stage: it hands the shards still to do to
``ctx.executor``, writes each finished shard's records (``shards/NNNNN.jsonl``) and then its
completion marker (``shards/NNNNN.done``, with the shard's call counts), and when every shard is
done, :meth:`GenerationStage.finish` runs the cross-shard checks (:meth:`GenerationStage.accept`:
near-dedup for the seed) over all records in shard order, writes ``data.jsonl`` and
``dropped.jsonl`` and returns the stats (``count``, ``drops`` by reason, the stage's own figures,
``shards``, ``calls_this_run``).

Design choices:
- Resume is by shard, for every such stage: a shard whose marker exists is not sent again; a shard
  killed halfway is redone and the ledger replays the calls it finished. Plans are pure functions
  of the seed, so a resumed run plans the same shards without storing them.
- Cross-shard steps (dedup, decontamination) run on the driver, after generation, in shard order,
  so the output is the same whether the run was killed or not and whichever executor ran it.
- The worker gets the run's config and a small, picklable ``context`` the driver computed
  (:meth:`GenerationStage.worker_context`), never the stage context: it may run on another machine.
  It builds the stage class afresh there, so a stage keeps no state between ``plan`` and ``process``.
- The shard size is a class attribute, not a config field: outside synthesis (where
  ``synthesize.shard_size`` shapes the plan) it changes how work is cut, never what is written,
  so it is not part of any stage key.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from speed.executors.base import Shard, Worker, WorkerEnv, WorkerFactory
from speed.io import read_jsonl, write_json, write_jsonl
from speed.stage import Stage, StageContext, StageError

if TYPE_CHECKING:
    from speed.config import SpeedConfig
    from speed.ledger import LedgeredBackend
    from speed.llm.base import Completion, Request

__all__ = ["GenerationStage", "GenerationWorker", "Job", "Plan", "record", "shard_id"]

logger = logging.getLogger(__name__)

#: the folder of a stage's shard records and completion markers
SHARDS = "shards"


def shard_id(i: int) -> str:
    """The id of shard ``i``: zero-padded, so that names sort in shard order."""
    return f"{i:05d}"


def record(row: Mapping[str, Any], drop: str | None = None, detail: str = "") -> dict[str, Any]:
    """One item's outcome as a worker returns it: the output row, and its drop reason if dropped."""
    return {"row": dict(row), "drop": drop, "detail": detail}


@dataclass
class Plan:
    """A stage's work: its shards in order, and figures of the planning for the stats.

    Attributes:
        shards: the shards; their ids name their records and markers.
        stats: what planning found (prompts drawn, repeats skipped), merged into the stage's stats.
    """

    shards: list[Shard]
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_items(cls, items: Sequence[Any], size: int, **stats: Any) -> Plan:
        """Cut ``items`` (picklable, in order) into shards of ``size`` items."""
        size = max(1, size)
        shards = [
            Shard(shard_id(i), list(items[start : start + size]))
            for i, start in enumerate(range(0, len(items), size))
        ]
        return cls(shards, dict(stats))

    def items(self) -> list[Any]:
        """Every item of a plan made by :meth:`of_items`, in order."""
        return [item for shard in self.shards for item in shard.payload]


class Job:
    """What :meth:`GenerationStage.process` sees where it runs: config, context, ledgered models.

    Args:
        env: the worker's environment (where the backends come from).
        cfg: the run's config.
        context: what the driver computed for the workers (:meth:`GenerationStage.worker_context`).
    """

    def __init__(self, env: WorkerEnv, cfg: SpeedConfig, context: Mapping[str, Any]):
        self.env = env
        self.cfg = cfg
        self.context = dict(context)
        self._llms: dict[str, LedgeredBackend] = {}

    def llm(self, role: str) -> LedgeredBackend:
        """The ledgered backend of ``role`` (loaded on first use, then kept for later shards)."""
        if role not in self._llms:
            self._llms[role] = self.env.llm(role)
        return self._llms[role]

    def generate(self, role: str, requests: Sequence[Request]) -> list[Completion]:
        """Answer ``requests`` with ``role``'s backend, all handed over at once, in order."""
        if not requests:
            return []
        return self.llm(role).generate(requests)

    def calls(self) -> dict[str, int]:
        """Calls sent and replayed so far, per role used (``teacher_sent``, ``teacher_replayed``)."""
        out: dict[str, int] = {}
        for role, llm in self._llms.items():
            out[f"{role}_sent"] = llm.sent
            out[f"{role}_replayed"] = llm.replayed
        return out


class GenerationWorker(Worker):
    """Runs a :class:`GenerationStage`'s :meth:`~GenerationStage.process` on each shard it gets.

    Args:
        env: where the models come from.
        stage: the stage class (importable by its module path where the worker runs).
        cfg: the run's config.
        context: the stage's worker context.
    """

    def __init__(
        self,
        env: WorkerEnv,
        *,
        stage: type[GenerationStage],
        cfg: SpeedConfig,
        context: Mapping[str, Any],
    ):
        super().__init__(env)
        self.stage = stage()
        self.job = Job(env, cfg, context)

    def process(self, shard: Shard) -> dict[str, Any]:
        before = self.job.calls()
        result = dict(self.stage.process(self.job, shard.payload))
        if "records" not in result:
            raise TypeError(f"{type(self.stage).__name__}.process must return a dict with 'records'")
        after = self.job.calls()
        result["calls"] = {k: v - before.get(k, 0) for k, v in after.items()}
        return result


class GenerationStage(Stage):
    """A stage that calls models: planned on the driver, generated in shards, written by the driver.

    Subclasses implement :meth:`plan` and :meth:`process`; the hooks :meth:`worker_context`,
    :meth:`accept` and :meth:`summarize` (or all of :meth:`finish`) shape the rest.
    """

    #: items per shard (see the module docstring for why this is not a config field)
    shard_size: ClassVar[int] = 256
    #: roles whose local models are closed once every shard is done (generators, not the teacher,
    #: whose server serves the next stages)
    release_after: ClassVar[tuple[str, ...]] = ()
    #: what went wrong when nothing was kept, for the error (``no usable verdict``)
    nothing_kept: ClassVar[str] = "nothing was kept"

    @abstractmethod
    def plan(self, ctx: StageContext) -> Plan:
        """The stage's shards, a pure function of the config, the run seed and the upstream stages."""

    @abstractmethod
    def process(self, job: Job, payload: Any) -> dict[str, Any]:
        """Render, generate, parse and filter one shard (runs in the worker).

        Returns:
            ``{"records": [...]}`` with one :func:`record` per item, plus any figures of the shard
            (kept in its marker).
        """

    # -- hooks ---------------------------------------------------------------------------------

    def worker_context(self, ctx: StageContext) -> dict[str, Any]:
        """What the worker needs from the driver besides the config (picklable; default nothing)."""
        return {}

    def accept(self, ctx: StageContext) -> Callable[[dict[str, Any]], str | None] | None:
        """A check run on the driver over every row the workers kept, in shard order: it returns a
        drop reason or None. Default None: no cross-shard check."""
        return None

    def summarize(
        self, ctx: StageContext, kept: list[dict[str, Any]], dropped: list[dict[str, Any]], plan: Plan
    ) -> dict[str, Any]:
        """The stage's own figures for its stats (default: those of its plan)."""
        return dict(plan.stats)

    # -- the skeleton --------------------------------------------------------------------------

    def run(self, ctx: StageContext) -> dict[str, Any]:
        plan = self.plan(ctx)
        folder = ctx.out / SHARDS
        folder.mkdir(parents=True, exist_ok=True)
        todo = [s for s in plan.shards if not (folder / f"{s.id}.done").exists()]
        total = len(plan.shards)
        logger.info(
            "%s: %d shards; %d done before, %d to run on the %s executor",
            ctx.name,
            total,
            total - len(todo),
            len(todo),
            ctx.cfg.executor.kind,
        )
        factory = WorkerFactory(
            GenerationWorker, {"stage": type(self), "cfg": ctx.cfg, "context": self.worker_context(ctx)}
        )
        calls: dict[str, int] = {}
        done = total - len(todo)
        for sid, result in ctx.progress(ctx.executor.map(ctx, factory, todo), total=len(todo), desc="shards"):
            write_jsonl(folder / f"{sid}.jsonl", result["records"])
            summary = {k: v for k, v in result.items() if k != "records"}
            write_json(folder / f"{sid}.done", summary)  # the shard is done once this exists
            with open(folder / "processed.log", "a", encoding="utf-8") as log:
                log.write(f"{sid}\n")
            for k, v in result["calls"].items():
                calls[k] = calls.get(k, 0) + v
            done += 1
            logger.info("%s: shard %s done (%d/%d)", ctx.name, sid, done, total)
        for role in self.release_after:
            ctx.session.release(role)
        stats = self.finish(ctx, [s.id for s in plan.shards], plan)
        stats["shards"] = {"total": total, "run": len(todo), "resumed": total - len(todo)}
        stats["calls_this_run"] = calls
        return stats

    def finish(self, ctx: StageContext, ids: Sequence[str], plan: Plan) -> dict[str, Any]:
        """Run :meth:`accept` over the records of every shard in order; write ``data.jsonl`` (kept
        rows) and ``dropped.jsonl`` (the others, with ``reason``); return the stats.

        Raises:
            StageError: nothing was kept.
        """
        from speed.data.filters import DropCounter

        folder = ctx.out / SHARDS
        accept = self.accept(ctx)
        counter = DropCounter(ctx.name)
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for sid in ids:
            for rec in read_jsonl(folder / f"{sid}.jsonl"):
                row, reason, detail = rec["row"], rec["drop"], rec.get("detail", "")
                if reason is None and accept is not None:
                    reason = accept(row)
                if reason is None:
                    counter.keep()
                    kept.append(row)
                    continue
                counter.drop(reason, detail)
                dropped.append({**row, "reason": reason, **({"detail": detail} if detail else {})})
        write_jsonl(ctx.out / "data.jsonl", kept)
        write_jsonl(ctx.out / "dropped.jsonl", dropped)
        counter.log_summary()
        if not kept:
            raise StageError(
                f"stage '{ctx.name}': {self.nothing_kept} (drops: {dict(counter.reasons)}); look at "
                f"{ctx.out / 'dropped.jsonl'}"
            )
        return {
            "count": len(kept),
            **self.summarize(ctx, kept, dropped, plan),
            "drops": dict(counter.reasons),
        }
