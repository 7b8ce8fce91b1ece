"""embed: train the embedding model on the synthetic data (E5 recipe, :mod:`speed.training.contrastive`).

Reads the training rows of ``labels`` (the rows of ``synthesize``, checked, relabeled and with mined
negatives where ``labels`` says so: query with its instruction, positive, hard negative) and trains ``models.embedder.model`` with the ``embed`` section. The output is an ordinary
sentence-transformers folder, ``model/``, plus ``model/training_stats.json``.
"""

from __future__ import annotations

from typing import Any

from speed.io import read_rows
from speed.stage import Stage, StageContext, StageError, register


@register
class Embed(Stage):
    name = "embed"
    reads = ("labels",)
    roles = ("embedder",)

    def check(self, ctx: StageContext) -> None:
        if not ctx.cfg.models.embedder.model:
            raise StageError(
                "models.embedder.model is not set; name the model to train, e.g. all-MiniLM-L6-v2"
            )

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.training.contrastive import train_embedder

        # the trainer owns the instruction format (embed.use_instructions): hand it the bare query
        rows = [
            {**row, "query": row["query_text"]} if row.get("query_text") else row
            for row in read_rows(ctx.input("labels"))
        ]
        spec = ctx.cfg.models.embedder
        result = train_embedder(
            rows,
            spec.model or "",
            ctx.out / "model",
            ctx.cfg.embed,
            seed=ctx.cfg.run.seed if ctx.section.seed is None else ctx.section.seed,
            threads=spec.threads or ctx.cfg.run.threads,
            device=None if spec.device == "auto" else spec.device,
        )
        return {
            "count": result.rows.get("total", len(rows)),
            "steps": result.steps,
            "first_loss": result.first_loss,
            "last_loss": result.last_loss,
            "examples_per_second": result.examples_per_second,
            "drops": result.dropped,
        }
