"""evaluate: score the trained embedder on MTEB's own tasks, beside its base model.

Tasks come from ``evaluate.tasks`` and their data from the local folders of ``evaluate.data_dir``
(or ``$SPEED_EVAL_DIR``): MTEB's task classes with only the loading replaced
(:mod:`speed.evaluation`), so scores match the leaderboard's. The baseline is ``evaluate.baseline``,
or else the model the embedder started from, so the table says whether the data helped. Writes
``results.json`` and ``results.md``.

A baseline's scores depend only on its weights, the tasks and their data, so they are cached under
``$SPEED_CACHE/eval`` (default ``~/.cache/speed/eval``), keyed by a fingerprint of all three: a
second run on the same machine evaluates only the model it trained. A baseline that is not a local
folder or a packaged model (a hub name) is never cached, as its weights may change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from speed.io import read_json, write_json
from speed.stage import Stage, StageContext, register

logger = logging.getLogger(__name__)


def _fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of every file in a folder: cheap, and changes with the content."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime))
        for p in folder.rglob("*")
        if p.is_file()
    )


def baseline_cache_path(
    model: str, tasks: list[str], data_dir: Path, batch_size: int, precision: str
) -> Path | None:
    """Where the baseline's result for these tasks is cached, or None when it must not be."""
    import mteb

    from speed.evaluation import TASKS
    from speed.models import cache_dir, resolve_hf

    folder = Path(resolve_hf(model))
    if not folder.is_dir():
        return None
    payload = {
        "model": _fingerprint(folder),
        "tasks": sorted(tasks),
        "data": {t: _fingerprint(data_dir / TASKS[t].folder) for t in tasks},
        "data_dir": str(data_dir.resolve()),
        "mteb": getattr(mteb, "__version__", "?"),
        "batch_size": batch_size,
        "precision": precision,
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "eval" / f"baseline-{key}.json"


@register
class Evaluate(Stage):
    name = "evaluate"
    reads = ("embed",)
    roles = ("embedder",)

    def check(self, ctx: StageContext) -> None:
        from speed.evaluation import resolve_task_names
        from speed.paths import eval_data_dir

        resolve_task_names(ctx.cfg.evaluate.tasks)  # an unknown name fails here, with "did you mean"
        eval_data_dir(ctx.cfg.evaluate.data_dir)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.evaluation import evaluate_model, resolve_task_names
        from speed.paths import eval_data_dir
        from speed.precision import resolve_precision

        section = ctx.cfg.evaluate
        spec = ctx.cfg.models.embedder
        threads = spec.threads or ctx.cfg.run.threads
        precision = resolve_precision(section.precision)
        baseline: Any = section.baseline or spec.model
        cached = None
        if baseline:
            tasks = resolve_task_names(section.tasks)
            cached = baseline_cache_path(
                baseline, tasks, eval_data_dir(section.data_dir), section.batch_size, precision
            )
            if cached is not None and cached.exists():
                logger.info("baseline %s: scores from the cache %s", baseline, cached)
                baseline = read_json(cached)
            elif cached is not None:
                baseline = evaluate_model(
                    baseline,
                    tasks,
                    data_dir=section.data_dir,
                    batch_size=section.batch_size,
                    threads=threads,
                    precision=precision,
                )
                write_json(cached, baseline)
        result = evaluate_model(
            ctx.input("embed") / "model",
            section.tasks,
            data_dir=section.data_dir,
            out_dir=ctx.out,
            instructions=section.instructions,
            batch_size=section.batch_size,
            baseline=baseline,
            model_name="trained",
            threads=threads,
            precision=precision,
        )
        scores = {name: t["main_score"] for name, t in result["tasks"].items()}
        base = result.get("baseline", {}).get("tasks", {})
        return {
            "count": len(scores),
            "scores": scores,
            "baseline": {name: t["main_score"] for name, t in base.items()},
            "average": result.get("averages", {}).get("average"),
        }
