"""junior: LoRA SFT of the junior generator on the teacher's seed examples (SPEED: lr 1e-4, batch 16).

Each seed row becomes (generation prompt -> the example as compact JSON, keys in schema order), so
the junior learns to answer a generation prompt with the JSON object alone. The base model is
``models.junior.model``: a packaged name (converted once to a transformers folder by
:func:`speed.models.resolve_hf`), a local folder or a hub name.

Output: ``adapter/`` (the LoRA adapter), ``merged/`` (the base with the adapter merged in: what the
candidates stage generates with and what the senior starts from), ``train_result.json`` (per-step
losses). Local models of every role are closed before training to free memory.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.runner import Stage, StageContext, register
from speed.stages.alignment import free_local_models, require_rows

logger = logging.getLogger(__name__)


def sft_rows(seed_rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """(generation prompt, example JSON) pairs from seed rows."""
    from speed.tasks import example_json

    return [{"prompt": r["prompt"], "completion": example_json(r["example"])} for r in seed_rows]


def base_model(ctx: StageContext, role: str) -> str:
    """The transformers folder (or hub name) of a role's base model.

    Raises:
        StageError: the role's spec names no model.
    """
    from speed.models import resolve_hf
    from speed.runner import StageError

    spec = getattr(ctx.cfg.models, role)
    if not spec.model:
        raise StageError(
            f"stage '{ctx.name}': models.{role}.model is not set; name the base model to fine-tune "
            "(a packaged name such as smollm2-135m-instruct, a folder or a hub name)"
        )
    return resolve_hf(spec.model, file=spec.file)


@register
class Junior(Stage):
    """SFT of the junior on seed examples."""

    name = "junior"
    reads = ("seed",)
    roles = ("junior",)

    def check(self, ctx: StageContext) -> None:
        require_rows(ctx, "seed", ("prompt", "example"))
        base_model(ctx, "junior")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.training.sft import train_sft

        rows = sft_rows(require_rows(ctx, "seed", ("prompt", "example")))
        base = base_model(ctx, "junior")
        free_local_models(ctx)
        spec = ctx.cfg.models.junior
        result = train_sft(
            base,
            rows,
            ctx.cfg.junior,
            ctx.out,
            seed=ctx.cfg.run.seed,
            threads=spec.threads or ctx.cfg.run.threads,
            what="junior",
        )
        return {"count": len(rows), "base": str(spec.model), **result.to_stats(ctx.out)}
