"""A role's model: which weights it runs with in a stage, and its backend wrapped in the call ledger.

Both questions are answered here once, for the driver (:class:`speed.runner.RunSession`) and for
executor workers (:class:`speed.executors.ray.RayEnv`) alike, so a stage and a Ray actor load the same
weights and label them the same way in the ledger.

Design choices:
- Which weights: a role trained in the pipeline (junior, senior, revisor, embedder) runs with the
  folder its training stage left in the run *when the stage at hand reads that training stage*;
  otherwise with its spec's ``model`` (a packaged name, a hub name or a local path, which the backend
  resolves). Tying it to the stage's declared ``reads`` keeps the rule explicit and safe: the runner
  only starts a stage once the stages it reads are done under their current keys, so the weights it
  gets are never a stale folder of an earlier run. (The junior stage reads ``seed``, not ``junior``,
  so it fine-tunes the junior's base model; candidates reads ``junior`` and so samples the trained
  junior.)
- The ledger label of weights trained in the run is their path relative to the run directory plus the
  key of the stage that trained them (:func:`ledger_model_id`), so a copied run replays on another
  machine and a retrained model is asked anew.
- :class:`RoleBackends` loads each (role, weights) backend once and closes them together; every
  backend it hands out is wrapped in :class:`~speed.ledger.LedgeredBackend`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speed.budget import Budget
    from speed.config import ModelSpec, SpeedConfig
    from speed.ledger import Ledger, LedgeredBackend
    from speed.llm.base import Backend

logger = logging.getLogger(__name__)

#: the stage that trains each role in the run, and the folder of its output that holds the weights
TRAINED_BY: Mapping[str, tuple[str, str]] = {
    "junior": ("junior", "merged"),
    "senior": ("senior", "merged"),
    "revisor": ("revisor", "merged"),
    "embedder": ("embed", "model"),
}


def role_weights(run_dir: str | Path, role: str, reads: Collection[str]) -> Path | None:
    """Where ``role``'s weights trained in this run live, for a stage that reads ``reads``.

    Args:
        run_dir: the run directory.
        role: teacher, junior, senior, revisor or embedder.
        reads: the stages the asking stage reads (its ``Stage.reads``).

    Returns:
        The folder the role's training stage wrote (``RUN/junior/merged``, ...) when the asking stage
        reads that stage; None when the role runs with its spec's own ``model`` (packaged, hub or a
        local path), as the teacher always does.
    """
    trained = TRAINED_BY.get(role)
    if trained is None or trained[0] not in reads:
        return None
    stage, folder = trained
    return Path(run_dir) / stage / folder


def weights_problem(path: Path) -> str | None:
    """Why ``path`` holds no weights a backend can load, or None when it does.

    Weights are a transformers folder (``config.json``), a PEFT adapter (``adapter_config.json``) or
    a GGUF beside them (for the llama.cpp backends).
    """
    if not path.is_dir():
        return f"{path} does not exist"
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    if any(path.glob("*.gguf")):
        return None
    return f"{path} holds no model (no config.json, adapter_config.json or .gguf)"


def ledger_model_id(run_dir: str | Path, model_path: str | Path | None) -> str | None:
    """The ledger label of weights: ``run:<relative path>@<key>`` inside the run, else the path.

    The key is that of the stage that trained the weights (its manifest's), so a retrained model
    under the same folder is asked anew, never answered from the old weights' calls; the relative
    path lets a copied run replay on another machine. Returns None when ``model_path`` is None (the
    backend's own ``model_id`` is used then).
    """
    if model_path is None:
        return None
    run = Path(run_dir).resolve()
    try:
        rel = Path(model_path).resolve().relative_to(run)
    except ValueError:
        return str(model_path)
    manifest = run / rel.parts[0] / "manifest.json"
    key = json.loads(manifest.read_text(encoding="utf-8")).get("key") if manifest.is_file() else None
    return f"run:{rel}" + (f"@{key}" if key else "")


class RoleBackends:
    """The backends of a run's roles in one process, each loaded once, all closed together.

    Args:
        cfg: the run's config (the roles' specs and ``run.threads``).
        run_dir: the run directory, as the driver sees it (for the weights trained in the run and
            their ledger labels; a Ray worker reads them at the same path).
        budget: the run's budget, handed to the teacher's backends (:mod:`speed.budget`); None
            where ``run.budget`` sets no limit.
    """

    def __init__(self, cfg: SpeedConfig, run_dir: str | Path, budget: Budget | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.budget = budget
        self._backends: dict[tuple[str, str | None], Backend] = {}

    def ledgered(
        self,
        role: str,
        *,
        ledger: Ledger | Any,
        stage: str,
        reads: Collection[str] = (),
        stage_key: str | None = None,
        model_path: str | Path | None = None,
    ) -> LedgeredBackend:
        """The backend of ``role`` for a stage, every call through ``ledger`` under the stage's name.

        Args:
            role: the role (a field of ``models``).
            ledger: the run's ledger, or a proxy with its ``lookup``, ``record`` and ``use`` methods.
            stage: the stage the calls are recorded under.
            reads: the stages that stage reads; they decide the weights (:func:`role_weights`).
            stage_key: the key of the stage run, which the calls are noted as used by.
            model_path: weights to load instead of those :func:`role_weights` gives.
        """
        from speed.budget import BUDGETED_ROLE
        from speed.ledger import LedgeredBackend

        budget = self.budget if role == BUDGETED_ROLE else None
        if role == BUDGETED_ROLE and budget is None and self.cfg.run.budget.active:
            # a limit the user set must never silently not apply
            from speed.config import ConfigError

            raise ConfigError(
                f"run.budget limits the teacher, but stage '{stage}' asks for it where the budget is not "
                "kept (a Ray worker); run the teacher stages with executor.kind: local, or drop run.budget"
            )
        spec: ModelSpec = getattr(self.cfg.models, role)
        weights = model_path if model_path is not None else role_weights(self.run_dir, role, reads)
        path = str(weights) if weights is not None else None
        cache_key = (role, path)
        if cache_key not in self._backends:
            from speed.llm import load_backend

            self._backends[cache_key] = load_backend(
                spec, threads=spec.threads or self.cfg.run.threads, model_path=path
            )
        backend = self._backends[cache_key]
        return LedgeredBackend(
            backend,
            ledger,
            role,
            stage,
            flush_every=spec.batch_size,
            model_id=ledger_model_id(self.run_dir, path) or backend.model_id,
            stage_key=stage_key,
            budget=budget,
        )

    def release(self, role: str) -> None:
        """Close a role's backends early (free memory before training)."""
        for key in [k for k in self._backends if k[0] == role]:
            self._backends.pop(key).close()

    def close(self) -> None:
        """Close every backend loaded here, the last loaded first; one failing does not keep the
        others open."""
        with ExitStack() as stack:
            for backend in self._backends.values():
                stack.callback(backend.close)
            self._backends.clear()
