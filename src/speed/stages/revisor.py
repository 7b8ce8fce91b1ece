"""revisor: LoRA SFT of the data revisor on the teacher's revisions (SPEED: lr 5e-6, batch 24).

Each revision row becomes (revisor prompt: the generation prompt and the senior's output as written
-> the teacher's revised example as compact JSON), so the revisor learns to map an example to its
fixed version in one pass. The base model is ``models.revisor.model`` (resolved like the junior's).

Output: ``adapter/``, ``merged/`` (what synthesis runs the revisor with) and ``train_result.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from speed.stage import register
from speed.stages.junior import SFTStage

logger = logging.getLogger(__name__)


def revisor_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """(revisor prompt, revised example JSON) pairs from revision rows."""
    from speed.stages.alignment import revisor_prompt
    from speed.tasks import example_json

    return [
        {"prompt": revisor_prompt(r["prompt"], r["senior"]), "completion": example_json(r["revised"])}
        for r in rows
    ]


@register
class Revisor(SFTStage):
    """SFT of the data revisor."""

    name = "revisor"
    reads = ("revisions",)
    roles = ("revisor",)
    templates = ("revisor",)
    fields = ("prompt", "senior", "revised")

    def training_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
        return revisor_rows(rows)
