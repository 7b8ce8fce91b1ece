"""The runner: the stage graph, keys, the run session, manifests, resume.

Stages import only :mod:`speed.stage` (their base class, registry and context); this module sits
above them and plans and runs them. The names a plugin needs (``Stage``, ``StageContext``,
``StageError``, ``register``) are also importable from here, as before.

A run is a directory. Each stage writes into ``RUN/.work/NAME/`` and, when its ``run`` returns,
``manifest.json`` is written last and the folder is renamed to ``RUN/NAME/``. So a stage folder with
a manifest is complete by construction, and a stage killed at any point is simply not done.

A stage's *key* is a hash of its config section, the hashes of its prompt templates, the model specs
of the roles it uses, the run seed, its code version and its upstream stages' keys. A stage whose
manifest holds the current key is skipped; any change reruns it and, through the upstream keys,
everything downstream.

Resume inside a stage has two layers:
- the work folder survives a crash and is kept when its key matches, so a stage that writes shards
  with completion markers (synthesis) redoes only unfinished shards;
- every LLM call goes through the ledger, so finished calls are replayed, not sent again.

Runtime knobs of a model spec (threads, concurrency, rate limits, timeouts, batch size, endpoint
URL: ``ModelSpec.runtime_fields``) are left out of keys: they change how fast a stage runs, not what
it writes.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from speed import __version__
from speed.budget import Budget
from speed.config import ConfigError, ModelSpec, SpeedConfig
from speed.io import DamagedFileError, read_json, write_json
from speed.ledger import Ledger, LedgeredBackend
from speed.preflight import preflight
from speed.roles import RoleBackends
from speed.runlock import RunLock
from speed.stage import (
    MANIFEST,
    Stage,
    StageContext,
    StageError,
    _dump,
    _hash,
    load_stages,
    register,
)
from speed.suggest import did_you_mean

__all__ = [
    "MANIFEST",
    "RunSession",
    "Runner",
    "Stage",
    "StageContext",
    "StageError",
    "StageStatus",
    "builtin_stage_order",
    "data_files_problem",
    "describe_data_files",
    "load_stages",
    "order_stages",
    "register",
    "setup_logging",
    "spec_identity",
    "stage_keys",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# keys and plans


def spec_identity(spec: ModelSpec) -> dict[str, Any]:
    """The parts of a model spec that determine outputs (:meth:`ModelSpec.identity`)."""
    return spec.identity()


State = Literal["done", "stale", "pending", "damaged"]


@dataclass
class StageStatus:
    """Where one stage stands in a run.

    ``damaged``: the stage finished once, but its manifest no longer parses or a data file no longer
    matches the row count and sha256 its manifest recorded (``problem`` says which); the runner redoes
    it, replaying its calls from the ledger.
    """

    name: str
    key: str
    state: State
    manifest: dict[str, Any] | None = None
    problem: str | None = None


#: the files of a stage that hold its examples: hashed into the manifest, checked before reuse
def _data_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in ("data.jsonl", "*.parquet") for p in folder.rglob(pattern) if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(path: Path) -> int | None:
    """Rows of a data file: JSON lines, or a Parquet file's row count from its footer."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception:  # pyarrow raises several kinds for a damaged footer; the hash still tells
            return None
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def describe_data_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Row count, size and sha256 of each data file of a stage folder, by relative path."""
    return {
        str(p.relative_to(folder)): {"rows": _rows(p), "bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _data_files(folder)
    }


def data_files_problem(folder: Path, manifest: Mapping[str, Any]) -> str | None:
    """Why the data files of a finished stage no longer match its manifest, or None when they do.

    Manifests written before data files were recorded have nothing to check against (None).
    """
    recorded = manifest.get("data_files")
    if not isinstance(recorded, dict):
        return None
    for rel, want in recorded.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if not isinstance(want, dict):
            return f"{folder / MANIFEST} records no size or hash for {rel}"
        size = path.stat().st_size
        if size != want.get("bytes") or _sha256(path) != want.get("sha256"):
            rows = _rows(path)
            return (
                f"{path} changed since the stage finished ({rows} rows and {size} bytes now, "
                f"{want.get('rows')} rows and {want.get('bytes')} bytes recorded)"
            )
    return None


def order_stages(cfg: SpeedConfig, registry: dict[str, type[Stage]]) -> list[type[Stage]]:
    """The configured stages in dependency order; errors name unknown or missing stages."""
    names = cfg.pipeline.stages if cfg.pipeline.stages is not None else list(registry)
    for n in names:
        if n not in registry:
            hint = did_you_mean(n, registry)
            raise ConfigError(f"pipeline.stages: unknown stage '{n}'.{hint} Known: {', '.join(registry)}")
    chosen = {n: registry[n] for n in names}
    for cls in chosen.values():
        for up in cls.reads:
            if up not in chosen:
                raise ConfigError(
                    f"pipeline.stages: stage '{cls.name}' reads '{up}', which is not in the pipeline; add it"
                )
    return _dependency_order(chosen)


def builtin_stage_order() -> list[str]:
    """The names of the built-in stages in the order a full run takes them (upstream first).

    The one source of the pipeline's order for readers that have no config to plan with (the
    report of a run whose config cannot be loaded): it comes from the stage registry, so it can
    never name a stage that does not exist.
    """
    return [cls.name for cls in _dependency_order(load_stages())]


def _dependency_order(chosen: Mapping[str, type[Stage]]) -> list[type[Stage]]:
    """``chosen`` with every stage after the stages it reads, in registration order otherwise."""
    ordered: list[type[Stage]] = []
    seen: set[str] = set()

    def visit(cls: type[Stage], path: tuple[str, ...]) -> None:
        if cls.name in seen:
            return
        if cls.name in path:
            raise ConfigError(f"stage cycle: {' -> '.join((*path, cls.name))}")
        for up in cls.reads:
            visit(chosen[up], (*path, cls.name))
        seen.add(cls.name)
        ordered.append(cls)

    for cls in chosen.values():
        visit(cls, ())
    return ordered


def stage_keys(cfg: SpeedConfig, stages: Sequence[type[Stage]]) -> dict[str, str]:
    """Key of every stage (upstream keys first)."""
    keys: dict[str, str] = {}
    for cls in stages:
        stage = cls()
        section = cls.section or cls.name
        payload = {
            "stage": cls.name,
            "version": cls.version,
            "seed": cfg.run.seed,
            "section": _dump(cfg.section(section)),
            "templates": stage.template_hashes(cfg),
            "models": {r: spec_identity(getattr(cfg.models, r)) for r in cls.roles},
            "upstream": {up: keys[up] for up in cls.reads},
        }
        keys[cls.name] = _hash(payload)
    return keys


# --------------------------------------------------------------------------------------------
class RunSession:
    """Resources shared by the stages of one invocation: ledger, backends, executor.

    Backends are started once (a local teacher server serves every stage) and closed when the
    session ends, also on error or Ctrl-C.
    """

    def __init__(self, cfg: SpeedConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.ledger = Ledger(run_dir / "ledger.sqlite")
        self._stack = ExitStack()
        self.budget = Budget(cfg.run.budget, self.ledger) if cfg.run.budget.active else None
        self.roles = RoleBackends(cfg, run_dir, budget=self.budget)
        self._stack.callback(self.roles.close)
        self._executor: Any = None

    def llm(
        self,
        role: str,
        stage: str,
        model_path: str | Path | None = None,
        stage_key: str | None = None,
        reads: tuple[str, ...] = (),
    ) -> LedgeredBackend:
        """The ledgered backend of ``role`` for ``stage`` (see :meth:`RoleBackends.ledgered`)."""
        return self.roles.ledgered(
            role, ledger=self.ledger, stage=stage, reads=reads, stage_key=stage_key, model_path=model_path
        )

    def release(self, role: str) -> None:
        """Close a role's backends early (free memory before training)."""
        self.roles.release(role)

    def executor(self) -> Any:
        if self._executor is None:
            from speed.executors import make_executor

            self._executor = make_executor(self.cfg)
            self._stack.callback(self._executor.close)
        return self._executor

    def close(self) -> None:
        self._stack.close()
        self.ledger.close()


# --------------------------------------------------------------------------------------------
# the runner


class Runner:
    """Plans and runs the stages of one config in its run directory."""

    def __init__(self, cfg: SpeedConfig, registry: dict[str, type[Stage]] | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.registry = registry if registry is not None else load_stages(cfg.pipeline.plugins)
        self.stages = order_stages(cfg, self.registry)
        self.keys = stage_keys(cfg, self.stages)

    def status(self) -> list[StageStatus]:
        """Each stage's state: done (manifest with the current key and data files that match it),
        stale (another key), damaged (see :class:`StageStatus`), pending."""
        return [self._stage_status(cls.name) for cls in self.stages]

    def _stage_status(self, name: str) -> StageStatus:
        key = self.keys[name]
        mpath = self.run_dir / name / MANIFEST
        if not mpath.exists():
            return StageStatus(name, key, "pending")
        try:
            manifest = read_json(mpath)
        except DamagedFileError as err:
            return StageStatus(name, key, "damaged", None, str(err))
        if not isinstance(manifest, dict):
            return StageStatus(name, key, "damaged", None, f"'{mpath}' is damaged: not a JSON object")
        if manifest.get("key") != key:
            return StageStatus(name, key, "stale", manifest)
        problem = data_files_problem(self.run_dir / name, manifest)
        return StageStatus(name, key, "damaged" if problem else "done", manifest, problem)

    def select(self, only: str | None = None, until: str | Sequence[str] | None = None) -> list[type[Stage]]:
        names = [c.name for c in self.stages]
        targets = [until] if isinstance(until, str) else list(until or ())
        for flag, value in (("--only", only), *(("--until", t) for t in targets)):
            if value is not None and value not in names:
                hint = did_you_mean(value, names)
                raise ConfigError(
                    f"{flag}: no stage '{value}' in this pipeline.{hint} Stages: {', '.join(names)}"
                )
        if only is not None:
            return [self.registry[only]]
        if targets:
            needed: set[str] = set()

            def add(n: str) -> None:
                if n not in needed:
                    needed.add(n)
                    for up in self.registry[n].reads:
                        add(up)

            for target in targets:
                add(target)
            return [c for c in self.stages if c.name in needed]
        return list(self.stages)

    def run(
        self,
        only: str | None = None,
        until: str | Sequence[str] | None = None,
        *,
        on_start: Callable[[], None] | None = None,
        then: Callable[[], None] | None = None,
    ) -> list[StageStatus]:
        """Run what is not done; return the final statuses.

        Everything that can refuse the command is checked before the run folder is touched: the
        stage selection, the inputs of the stages to run, and the preflight (models, files,
        evaluation data, a writable folder, a readable ledger; :func:`speed.preflight.preflight`).
        Only then is the folder's lock taken and ``config.yaml`` written, so a refused command
        never creates the folder nor marks a finished run's stages stale.

        Args:
            only: run this stage only (its inputs must be done).
            until: run this stage (or these stages) and the stages it needs.
            on_start: called once the lock is held, before the first stage (the CLI starts the
                run's log file there).
            then: called still under the lock once the stages are done and the run's backends
                closed (``speed study`` trains and evaluates there).

        Raises:
            ConfigError: an unknown stage; a failed preflight check (PreflightError).
            StageError: a stage to run needs one that is not done and not to be run.
            RunLockedError: another process writes this run folder.
        """
        selected = self.select(only, until)
        states = {s.name: s for s in self.status()}
        planned = {cls.name for cls in selected if states[cls.name].state != "done"}
        for cls in selected:
            for up in cls.reads if cls.name in planned else ():
                if states[up].state != "done" and up not in planned:
                    raise StageError(
                        f"stage '{cls.name}' needs '{up}', which is {states[up].state}; "
                        f"run `speed run CONFIG --until {cls.name}` to build it"
                    )
        preflight(self.cfg, [cls for cls in selected if cls.name in planned], self.run_dir)
        with RunLock(self.run_dir):
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml(), encoding="utf-8")
            if on_start is not None:
                on_start()
            # read again under the lock: a writer that held it until now may have finished stages
            states = {s.name: s for s in self.status()}
            session = RunSession(self.cfg, self.run_dir)
            try:
                for cls in selected:
                    state = states[cls.name]
                    if state.state == "done":
                        logger.info("stage %-11s done (key %s), skipped", cls.name, self.keys[cls.name])
                        continue
                    if state.state == "damaged":
                        logger.warning("stage %-11s is damaged (%s); redoing it", cls.name, state.problem)
                    for up in cls.reads:
                        if states[up].state != "done":
                            raise StageError(
                                f"stage '{cls.name}' needs '{up}', which is {states[up].state}; "
                                f"run `speed run CONFIG --until {cls.name}` to build it"
                            )
                    self._run_stage(cls, session)
                    states[cls.name] = self._stage_status(cls.name)
            finally:
                session.close()
            if then is not None:
                then()
        return self.status()

    def _run_stage(self, cls: type[Stage], session: RunSession) -> None:
        key = self.keys[cls.name]
        work = self.run_dir / ".work" / cls.name
        keyfile = work / "KEY"
        if work.exists() and not (keyfile.exists() and keyfile.read_text().strip() == key):
            shutil.rmtree(work)
        resumed = work.exists()
        work.mkdir(parents=True, exist_ok=True)
        keyfile.write_text(key)
        if resumed and self._finished_in(work, key):
            logger.info("stage %-11s finished before a crash; committing it", cls.name)
            self._commit(cls.name, work)
            return

        stage = cls()
        ctx = StageContext(
            self.cfg, self.run_dir, cls.name, key, work, cls.reads, session, cls.section or cls.name
        )
        logger.info("stage %-11s %s (key %s)", cls.name, "resuming" if resumed else "starting", key)
        t0 = time.time()
        stage.check(ctx)
        stats = stage.run(ctx) or {}
        elapsed = time.time() - t0
        calls = session.ledger.usage(key)
        if not calls:  # a stage that made its LedgeredBackend without its key: all calls by name
            calls = {r: t for (st, r), t in session.ledger.breakdown().items() if st == cls.name}
        manifest: dict[str, Any] = {
            "stage": cls.name,
            "key": key,
            "speed_version": __version__,
            "upstream": {up: self.keys[up] for up in cls.reads},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "duration_s": round(elapsed, 3),
            "resumed": resumed,
            "stats": stats,
            "calls": {role: t.to_dict() for role, t in calls.items()},
            "files": sorted(
                str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and p.name != "KEY"
            ),
            # checked before the stage is reused: a cut or edited data file makes it damaged, not done
            "data_files": describe_data_files(work),
        }
        write_json(work / MANIFEST, manifest)  # last: the stage is done once this exists
        self._commit(cls.name, work)
        teacher = manifest["calls"].get("teacher", {}).get("calls", 0)
        logger.info(
            "stage %-11s done in %.1fs: %s%s",
            cls.name,
            elapsed,
            ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, int | float)) or "no stats",
            f", teacher calls {teacher}" if teacher else "",
        )

    @staticmethod
    def _finished_in(work: Path, key: str) -> bool:
        """Whether a work folder holds a whole finished stage of ``key`` (killed before its commit)."""
        try:
            manifest = read_json(work / MANIFEST)
        except (FileNotFoundError, DamagedFileError):
            return False
        return (
            isinstance(manifest, dict)
            and manifest.get("key") == key
            and data_files_problem(work, manifest) is None
        )

    def _commit(self, name: str, work: Path) -> None:
        # the work folder keeps its KEY until it is renamed: a crash before the rename leaves a
        # finished stage that the rerun commits (a work folder without KEY would be thrown away)
        final = self.run_dir / name
        final.parent.mkdir(parents=True, exist_ok=True)  # a nested stage name (study/teacher)
        if final.exists():
            trash = self.run_dir / ".work" / f"{name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
            work.rename(final)
            shutil.rmtree(trash)
        else:
            work.rename(final)
        (final / "KEY").unlink(missing_ok=True)


def setup_logging(run_dir: Path | None, level: str = "INFO") -> None:
    """Concise log on the terminal; the full one in ``RUN/logs/run.log``."""
    root = logging.getLogger("speed")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / "run.log", encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    root.propagate = False
