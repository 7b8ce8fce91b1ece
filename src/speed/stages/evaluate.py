"""evaluate: score the trained embedder on MTEB's own tasks, beside its base model.

Tasks come from ``evaluate.tasks`` and their data from the local folders of ``evaluate.data_dir``
(or ``$SPEED_EVAL_DIR``): MTEB's task classes with only the loading replaced
(:mod:`speed.evaluation`), so scores match the leaderboard's. The baseline is ``evaluate.baseline``,
or else the model the embedder started from, so the table says whether the data helped. Writes
``results.json`` and ``results.md``.
"""

from __future__ import annotations

from typing import Any

from speed.runner import Stage, StageContext, register


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
        from speed.evaluation import evaluate_model

        section = ctx.cfg.evaluate
        spec = ctx.cfg.models.embedder
        result = evaluate_model(
            ctx.input("embed") / "model",
            section.tasks,
            data_dir=section.data_dir,
            out_dir=ctx.out,
            instructions=section.instructions,
            batch_size=section.batch_size,
            baseline=section.baseline or spec.model,
            model_name="trained",
            threads=spec.threads or ctx.cfg.run.threads,
        )
        scores = {name: t["main_score"] for name, t in result["tasks"].items()}
        base = result.get("baseline", {}).get("tasks", {})
        return {
            "count": len(scores),
            "scores": scores,
            "baseline": {name: t["main_score"] for name, t in base.items()},
            "average": result.get("averages", {}).get("average"),
        }
