"""Supervised fine-tuning with LoRA: the junior generator and the data revisor.

SPEED fine-tunes a small base model on the teacher's outputs: the junior on (generation prompt ->
seed example), lr 1e-4, batch 16; the revisor on (generation prompt + generated example -> the
teacher's revision), lr 5e-6, batch 24. Both are :func:`train_sft` with a different config.

Design choices:
- TRL's ``SFTTrainer`` with a PEFT ``LoraConfig``; the rows go in TRL's *conversational
  prompt-completion* format (the prompt as a user message, the completion as the assistant's reply),
  so the model's own chat template frames them exactly as a chat backend will at generation time,
  and the loss is on the completion only (TRL's ``completion_only_loss`` for prompt-completion data).
  The template's end-of-turn token ends each completion, so the model learns to stop.
- Rows are not shuffled into an order of our own: TRL's sampler shuffles with ``seed``.
- The result holds both the adapter (what the paper trains) and a merged model (what generation
  backends load). The merged model keeps the dtype the base was saved in.
- See :mod:`speed.training.common` for precision, devices and loss logging.

Example::

    from speed.config import SFTConfig
    from speed.training.sft import train_sft

    result = train_sft("path/to/base", [{"prompt": "Write JSON.", "completion": "{}"}],
                       SFTConfig(max_steps=2, batch_size=1), out_dir=Path("out"), seed=0)
    print(result.merged_dir, result.losses)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed.config import SFTConfig
from speed.training.common import LoRARun, TrainResult, answer_messages, check_rows, prompt_messages

logger = logging.getLogger(__name__)


def to_conversational(rows: Sequence[Mapping[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
    """Plain ``{prompt, completion}`` rows as TRL conversational prompt-completion rows.

    Args:
        rows: rows with string fields ``prompt`` and ``completion``.
        system: an optional system message put before every prompt.
    """
    return [
        {"prompt": prompt_messages(row["prompt"], system), "completion": answer_messages(row["completion"])}
        for row in rows
    ]


def train_sft(
    base_model: str | Path,
    rows: Sequence[Mapping[str, Any]],
    cfg: SFTConfig,
    out_dir: str | Path,
    seed: int,
    *,
    threads: int | None = None,
    system: str | None = None,
    what: str = "sft",
) -> TrainResult:
    """Fine-tune ``base_model`` with LoRA on prompt -> completion rows.

    Args:
        base_model: a transformers model folder (resolve packaged names with
            :func:`speed.models.resolve_hf` first) or a hub name.
        rows: ``{"prompt": str, "completion": str}`` each; other keys are ignored.
        cfg: the SFT section (``junior`` or ``revisor``).
        out_dir: where ``adapter/``, ``merged/`` and ``train_result.json`` are written.
        seed: seed of LoRA init, data order and dropout.
        threads: torch CPU threads (None: torch's default).
        system: an optional system message (the same must then be used at generation).
        what: the config section name, used in messages (``junior``, ``revisor``).

    Returns:
        The saved artifacts and per-step losses.

    Raises:
        TrainingInputError: empty rows, a missing or empty field, a batch size that does not divide,
            or a tokenizer without a chat template.
        RuntimeError: a non-finite loss.
    """
    check_rows(rows, ("prompt", "completion"), what)
    run = LoRARun.start(base_model, rows, cfg, out_dir, seed, threads=threads, system=system, what=what)
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=run.model,
        args=TRLSFTConfig(**run.trainer_args(), completion_only_loss=True, packing=False),
        train_dataset=Dataset.from_list(to_conversational(run.rows, system)),
        processing_class=run.tokenizer,
        peft_config=run.peft_config(),
    )
    return run.train(trainer, "SFT")
