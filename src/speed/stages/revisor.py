"""revisor: LoRA SFT of the data revisor on the teacher's revisions (SPEED: lr 5e-6, batch 24).

Each revision row becomes (revisor prompt: the generation prompt and the senior's output as written
-> the teacher's revised example as compact JSON), so the revisor learns to map an example to its
fixed version in one pass. The base model is ``models.revisor.model`` (resolved like the junior's).

Output: ``adapter/``, ``merged/`` (what synthesis runs the revisor with) and ``train_result.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.runner import Stage, StageContext, register
from speed.stages.alignment import free_local_models, require_rows
from speed.stages.junior import base_model

logger = logging.getLogger(__name__)


def revisor_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """(revisor prompt, revised example JSON) pairs from revision rows."""
    from speed.tasks import example_json, revisor_prompt

    return [
        {"prompt": revisor_prompt(r["prompt"], r["senior"]), "completion": example_json(r["revised"])}
        for r in rows
    ]


@register
class Revisor(Stage):
    """SFT of the data revisor."""

    name = "revisor"
    reads = ("revisions",)
    roles = ("revisor",)
    templates = ("revisor",)

    def check(self, ctx: StageContext) -> None:
        require_rows(ctx, "revisions", ("prompt", "senior", "revised"))
        base_model(ctx, "revisor")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.training.sft import train_sft

        rows = revisor_rows(require_rows(ctx, "revisions", ("prompt", "senior", "revised")))
        base = base_model(ctx, "revisor")
        free_local_models(ctx)
        spec = ctx.cfg.models.revisor
        result = train_sft(
            base,
            rows,
            ctx.cfg.revisor,
            ctx.out,
            seed=ctx.cfg.run.seed,
            threads=spec.threads or ctx.cfg.run.threads,
            what="revisor",
        )
        return {"count": len(rows), "base": str(spec.model), **result.to_stats(ctx.out)}
