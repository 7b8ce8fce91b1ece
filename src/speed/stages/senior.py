"""senior: DPO of the junior on the judge's pairs (SPEED: beta 0.1, lr 1e-5, batch 16).

The policy starts from the junior's merged model and trains a LoRA adapter; the reference is the same
model with the adapter off, i.e. the junior (:func:`speed.training.dpo.train_dpo`).

Output: ``adapter/``, ``merged/`` (what the revisions stage and synthesis generate with) and
``train_result.json`` (per-step losses, reward margins and accuracies).
"""

from __future__ import annotations

import logging
from typing import Any

from speed.stage import Stage, StageContext, register
from speed.stages.alignment import free_local_models, require_rows, role_model

logger = logging.getLogger(__name__)


@register
class Senior(Stage):
    """DPO of the junior into the senior."""

    name = "senior"
    reads = ("junior", "judge")

    def check(self, ctx: StageContext) -> None:
        require_rows(ctx, "judge", ("prompt", "chosen", "rejected"))
        role_model(ctx, "junior")  # the trained junior, as this stage reads 'junior'

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.training.dpo import train_dpo

        pairs = require_rows(ctx, "judge", ("prompt", "chosen", "rejected"))
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs]
        free_local_models(ctx)
        result = train_dpo(
            role_model(ctx, "junior"),
            rows,
            ctx.cfg.senior,
            ctx.out,
            seed=ctx.cfg.run.seed,
            threads=ctx.cfg.models.junior.threads or ctx.cfg.run.threads,
            what="senior",
        )
        stats = {"count": len(rows), **result.to_stats(ctx.out)}
        for name in ("rewards/margins", "rewards/accuracies"):
            values = result.metrics.get(name)
            if values:
                stats[name.replace("/", "_") + "_last"] = values[-1]
        return stats
