"""junior: LoRA SFT of the junior generator on the teacher's seed examples (SPEED: lr 1e-4, batch 16).

Each seed row becomes (generation prompt -> the example as compact JSON, keys in schema order), so
the junior learns to answer a generation prompt with the JSON object alone. The base model is
``models.junior.model``: a packaged name (converted once to a transformers folder by
:func:`speed.models.resolve_hf`), a local folder or a hub name (:func:`speed.stages.alignment.role_model`).

Output: ``adapter/`` (the LoRA adapter), ``merged/`` (the base with the adapter merged in: what the
candidates stage generates with and what the senior starts from), ``train_result.json`` (per-step
losses). Local models of every role are closed before training to free memory.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any, ClassVar

from speed.stage import Stage, StageContext, register
from speed.stages.alignment import free_local_models, require_rows, role_model

logger = logging.getLogger(__name__)


def sft_rows(seed_rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """(generation prompt, example JSON) pairs from seed rows; the completion is what the teacher
    wrote (a grounded example's positive is the passage its prompt shows, never written)."""
    from speed.tasks import example_json, get_kind

    return [
        {"prompt": r["prompt"], "completion": example_json(get_kind(r["kind"]).generated(r["example"]))}
        for r in seed_rows
    ]


class SFTStage(Stage):
    """LoRA SFT of the role's base model on rows built from one upstream stage (junior, revisor)."""

    #: fields every upstream row must carry
    fields: ClassVar[tuple[str, ...]]

    @abstractmethod
    def training_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
        """``{prompt, completion}`` pairs from the upstream rows."""

    def check(self, ctx: StageContext) -> None:
        require_rows(ctx, self.reads[0], self.fields)
        role_model(ctx, self.roles[0])

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from speed.training.sft import train_sft

        role = self.roles[0]
        rows = self.training_rows(require_rows(ctx, self.reads[0], self.fields))
        base = role_model(ctx, role)
        free_local_models(ctx)
        spec = getattr(ctx.cfg.models, role)
        result = train_sft(
            base,
            rows,
            ctx.cfg.section(self.section or self.name),
            ctx.out,
            seed=ctx.cfg.run.seed,
            threads=spec.threads or ctx.cfg.run.threads,
            what=self.name,
        )
        return {"count": len(rows), "base": str(spec.model), **result.to_stats(ctx.out)}


@register
class Junior(SFTStage):
    """SFT of the junior on seed examples."""

    name = "junior"
    reads = ("seed",)
    roles = ("junior",)
    fields = ("prompt", "example")

    def training_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
        return sft_rows(rows)
