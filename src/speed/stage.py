"""What a stage is: the Stage base class, its registry, and the context it runs in.

This module is the part of the runner that stages import; the runner itself (plans, keys, the run
session, manifests and commits) lives in :mod:`speed.runner` above the stages, so a stage never
imports the machinery that runs it. A stage's context reaches the run session (ledger, backends,
executor) through the :class:`StageSession` protocol, which :class:`speed.runner.RunSession` fulfils.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel

from speed.config import ConfigError, SpeedConfig
from speed.io import read_json
from speed.ledger import Ledger, LedgeredBackend
from speed.tasks import template_hash

T = TypeVar("T")

MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A stage cannot run: missing input, bad upstream data, unknown stage name."""


# --------------------------------------------------------------------------------------------
# stages and their registry


class Stage(ABC):
    """One step of the pipeline.

    Subclasses set ``name``, ``reads`` (upstream stage names), ``roles`` (model roles used),
    ``section`` (config section; defaults to ``name``) and ``templates`` (prompt template names whose
    text is part of the key), and implement :meth:`run`. A stage never knows whether its shards run
    locally or on Ray: it hands work to ``ctx.executor``.
    """

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    roles: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None
    templates: ClassVar[tuple[str, ...]] = ()
    #: bump when the stage's code changes what it writes
    version: ClassVar[int] = 1

    #: config values besides the stage's own section that shape its output: a section name, or a
    #: dotted path into one (``"evaluate.tasks"``); their values enter the key
    extra_sections: ClassVar[tuple[str, ...]] = ()

    def template_names(self, cfg: SpeedConfig) -> tuple[str, ...]:
        """Templates this stage renders under ``cfg`` (default: the class's ``templates``);
        override when the config chooses them (one per task kind, say)."""
        return tuple(self.templates)

    def template_hashes(self, cfg: SpeedConfig) -> dict[str, str]:
        """What shapes the output besides the stage's own section (part of the key): the text of
        each template it renders and the values of its ``extra_sections``. Override to add more
        (a data file's hash), calling ``super()``."""
        hashes = {name: template_hash(name) for name in sorted(set(self.template_names(cfg)))}
        for path in self.extra_sections:
            section, *fields = path.split(".")
            value = cfg.section(section)
            for field in fields:
                value = value[field] if isinstance(value, dict) else getattr(value, field)
            hashes[f"config:{path}"] = _hash(_dump(value))
        return hashes

    def check(self, ctx: StageContext) -> None:  # noqa: B027 - optional hook
        """Fail fast, before any LLM call, when an input is missing or misshaped."""

    @abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the work, writing outputs under ``ctx.out``; return stats for the manifest.

        The stats should hold ``count`` (examples written) and ``drops`` (reason -> count) where
        those apply.
        """


#: every stage class ever registered, in order; a registry is built from it per config
_REGISTERED: list[type[Stage]] = []

S = TypeVar("S", bound=type[Stage])


def register(cls: S) -> S:
    """Class decorator: make a stage known. Built-in stages live in ``speed.stages``; a plugin's
    stages count only for configs that list the plugin in ``pipeline.plugins``."""
    _REGISTERED.append(cls)
    return cls


def load_stages(plugins: Sequence[str] = ()) -> dict[str, type[Stage]]:
    """The stages a config can use: the built-in ones, then those of its plugin modules.

    A plugin stage may replace a built-in one of the same name, for this registry only: the
    registry is rebuilt per config, so one config's plugins never leak into another's run.
    """
    importlib.import_module("speed.stages")
    modules = []
    for mod in plugins:
        try:
            modules.append(importlib.import_module(mod).__name__)
        except ImportError as err:
            raise ConfigError(
                f"pipeline.plugins: cannot import '{mod}' ({err}); is it on PYTHONPATH?"
            ) from err
    registry: dict[str, type[Stage]] = {}
    for cls in _REGISTERED:
        if cls.__module__.startswith("speed.stages."):
            registry[cls.name] = cls
    for module in modules:
        for cls in _REGISTERED:
            if cls.__module__ == module:
                registry[cls.name] = cls
    return registry


# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# hashing (stage keys and template hashes)


def _dump(obj: Any) -> Any:
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj


def _hash(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the context a stage runs in


class StageSession(Protocol):
    """What a stage's context needs of the run session (:class:`speed.runner.RunSession`)."""

    ledger: Ledger

    def llm(
        self,
        role: str,
        stage: str,
        model_path: str | Path | None = None,
        stage_key: str | None = None,
        reads: tuple[str, ...] = (),
    ) -> LedgeredBackend:
        """The ledgered backend of ``role`` for ``stage`` (which reads the stages ``reads``)."""
        ...

    def release(self, role: str) -> None:
        """Close a role's backends early (free memory before training)."""
        ...

    def executor(self) -> Any:
        """The run's executor (local or Ray), started on first use."""
        ...


@dataclass
class StageContext:
    """What a stage sees: its config, its folders, its inputs, its models."""

    cfg: SpeedConfig
    run_dir: Path
    name: str
    key: str
    out: Path
    reads: tuple[str, ...]
    session: StageSession
    section_name: str = ""

    @property
    def section(self) -> Any:
        """This stage's config section."""
        return self.cfg.section(self.section_name or self.name)

    @property
    def ledger(self) -> Ledger:
        return self.session.ledger

    @property
    def executor(self) -> Any:
        return self.session.executor()

    def input(self, stage: str) -> Path:
        """Folder of a finished upstream stage."""
        if stage not in self.reads:
            raise StageError(f"stage '{self.name}' reads '{stage}' but does not declare it in `reads`")
        folder = self.run_dir / stage
        if not (folder / MANIFEST).exists():
            raise StageError(f"stage '{self.name}' needs '{stage}', which has not finished in {self.run_dir}")
        return folder

    def manifest(self, stage: str) -> dict[str, Any]:
        return dict(read_json(self.input(stage) / MANIFEST))

    def llm(self, role: str, model_path: str | Path | None = None) -> LedgeredBackend:
        """The backend of a role, every call through the ledger under this stage's name.

        Args:
            role: teacher, junior, senior, revisor.
            model_path: weights to load instead of the role's weights for this stage (by default
                those trained in the run when this stage reads their stage, see :meth:`weights`).
        """
        return self.session.llm(role, self.name, model_path, stage_key=self.key, reads=self.reads)

    def weights(self, role: str) -> Path | None:
        """The folder of ``role``'s weights trained in this run, checked, or None when this stage
        runs the role's own ``model`` (:func:`speed.roles.role_weights`).

        Raises:
            StageError: the training stage finished but left no model where the weights belong.
        """
        from speed.roles import role_weights, weights_problem

        path = role_weights(self.run_dir, role, self.reads)
        if path is not None:
            problem = weights_problem(self.input(path.parent.name) / path.name)
            if problem is not None:
                raise StageError(
                    f"stage '{self.name}': no trained {role} model: {problem}; rerun '{path.parent.name}'"
                )
        return path

    def rng(self, salt: str = "") -> random.Random:
        """A random generator seeded by the run seed, this stage and ``salt``."""
        digest = hashlib.sha256(f"{self.cfg.run.seed}/{self.name}/{salt}".encode()).hexdigest()
        return random.Random(int(digest[:16], 16))

    def seed_for(self, *parts: Any) -> int:
        """A stable 31-bit seed for one request or shard."""
        digest = hashlib.sha256(
            "/".join(map(str, (self.cfg.run.seed, self.name, *parts))).encode()
        ).hexdigest()
        return int(digest[:8], 16) & 0x7FFFFFFF

    def progress(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        """Iterate with a progress bar on a terminal, quietly otherwise."""
        from tqdm.auto import tqdm

        yield from tqdm(
            items, total=total, desc=desc or self.name, disable=not sys.stderr.isatty(), leave=False
        )
