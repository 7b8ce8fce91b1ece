"""DPO of the junior into the senior generator.

SPEED (arXiv 2410.18634) has the junior sample several candidates per prompt and the teacher name the
best and the worst; best = chosen, worst = rejected. The senior is the junior trained with DPO on
those pairs: beta 0.1 (best of 0.05-0.3), lr 1e-5, batch 16.

Design choices:
- TRL's ``DPOTrainer`` with a PEFT ``LoraConfig`` on the junior's *merged* model. With
  ``peft_config`` and no ``ref_model`` TRL keeps no second copy of the weights: the reference policy
  is the same model with its adapter switched off, i.e. exactly the junior. (A ``PeftModel`` passed
  together with ``peft_config``, or ``ref_model=model``, is refused by TRL; neither is done here.)
- Rows are conversational (prompt as a user message, chosen and rejected as assistant replies), so
  the chat template frames them as at generation time, and the loss is on the replies only.
- :func:`preference_loss` measures the DPO loss and the preference accuracy of a trained policy
  against its reference on any pairs, outside the trainer; the integration test and the benchmark
  use it to check that the senior prefers what the teacher preferred.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speed.config import DPOConfig
from speed.precision import device_name
from speed.training.common import (
    LoRARun,
    TrainingInputError,
    TrainResult,
    answer_messages,
    check_rows,
    load_tokenizer,
    prompt_messages,
    require_training_stack,
    set_threads,
)

logger = logging.getLogger(__name__)


def to_conversational(rows: Sequence[Mapping[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
    """Plain ``{prompt, chosen, rejected}`` rows as TRL conversational preference rows."""
    return [
        {
            "prompt": prompt_messages(row["prompt"], system),
            "chosen": answer_messages(row["chosen"]),
            "rejected": answer_messages(row["rejected"]),
        }
        for row in rows
    ]


def _check_pairs(rows: Sequence[Mapping[str, Any]], what: str) -> None:
    check_rows(rows, ("prompt", "chosen", "rejected"), what)
    same = [i for i, r in enumerate(rows) if r["chosen"] == r["rejected"]]
    if same:
        raise TrainingInputError(
            f"{what}: row {same[0]} has chosen == rejected ({len(same)} such rows); such a pair carries "
            "no preference: drop it upstream"
        )


def train_dpo(
    model: str | Path,
    rows: Sequence[Mapping[str, Any]],
    cfg: DPOConfig,
    out_dir: str | Path,
    seed: int,
    *,
    threads: int | None = None,
    system: str | None = None,
    what: str = "senior",
) -> TrainResult:
    """Train a LoRA adapter on ``model`` with DPO; the reference is ``model`` itself (adapter off).

    Args:
        model: the junior's merged model folder (the policy's start and the reference).
        rows: ``{"prompt": str, "chosen": str, "rejected": str}`` each; other keys are ignored.
        cfg: the DPO section (``senior``).
        out_dir: where ``adapter/``, ``merged/`` and ``train_result.json`` are written.
        seed: seed of LoRA init and data order.
        threads: torch CPU threads (None: torch's default).
        system: an optional system message (must match the one used in SFT and generation).
        what: the config section name, used in messages.

    Returns:
        The saved artifacts, per-step losses, and per-step ``rewards/margins`` and
        ``rewards/accuracies`` (among others) in ``metrics``.

    Raises:
        TrainingInputError: empty rows, a missing field, chosen == rejected, a batch size that does
            not divide, or a tokenizer without a chat template.
        RuntimeError: a non-finite loss.
    """
    _check_pairs(rows, what)
    run = LoRARun.start(model, rows, cfg, out_dir, seed, threads=threads, system=system, what=what)
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=run.model,
        ref_model=None,
        args=TRLDPOConfig(**run.trainer_args(), beta=cfg.beta),
        train_dataset=Dataset.from_list(to_conversational(run.rows, system)),
        processing_class=run.tokenizer,
        peft_config=run.peft_config(),
    )
    return run.train(trainer, f"DPO (beta {cfg.beta:g})")


# --------------------------------------------------------------------------------------------
# measuring preferences outside the trainer


@dataclass
class PreferenceScore:
    """DPO loss and preference accuracy of a policy against a reference on some pairs.

    Attributes:
        loss: mean of ``-log sigmoid(beta * margin)``; ``log 2`` (0.693) when policy == reference.
        accuracy: fraction of pairs with a positive margin (the policy moved towards chosen).
        margin: mean implicit reward margin ``(pc - rc) - (pr - rr)`` in nats (before beta).
        pairs: pairs scored.
    """

    loss: float
    accuracy: float
    margin: float
    pairs: int


def completion_logps(
    model: Any, tokenizer: Any, prompt: str, completions: Sequence[str], system: str | None = None
) -> list[float]:
    """Sum of token log-probabilities of each completion after ``prompt``, in the chat format."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    out = []
    for completion in completions:
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}], return_dict=False
        )
        n = len(prompt_ids)
        if full[:n] != prompt_ids:  # a template that rewrites the prompt: fall back to the longest prefix
            n = next((i for i, (a, b) in enumerate(zip(full, prompt_ids, strict=False)) if a != b), n)
        ids = torch.tensor([full], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
        out.append(float(logps[n - 1 :].sum()))
    return out


def preference_loss(
    policy: str | Path,
    reference: str | Path,
    rows: Sequence[Mapping[str, Any]],
    beta: float = 0.1,
    *,
    system: str | None = None,
    threads: int | None = None,
) -> PreferenceScore:
    """Score ``policy`` against ``reference`` on preference pairs (fp32, CPU or GPU).

    Args:
        policy: a merged model folder (the senior).
        reference: the folder it was trained from (the junior).
        rows: ``{"prompt", "chosen", "rejected"}`` pairs.
        beta: DPO beta.
        system: the system message used in training, if any.
        threads: torch CPU threads.
    """
    _check_pairs(rows, "preference_loss")
    require_training_stack()
    import torch
    from transformers import AutoModelForCausalLM

    set_threads(threads)
    device = device_name()
    tokenizer = load_tokenizer(policy)
    margins = []
    logps: dict[str, list[list[float]]] = {}
    for name, path in (("policy", policy), ("reference", reference)):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.to(device)  # type: ignore[arg-type]  # transformers' typing of .to is too narrow
        model.eval()
        logps[name] = [
            completion_logps(model, tokenizer, r["prompt"], [r["chosen"], r["rejected"]], system)
            for r in rows
        ]
        del model
    for (pc, pr), (rc, rr) in zip(logps["policy"], logps["reference"], strict=True):
        margins.append((pc - rc) - (pr - rr))
    losses = [math.log1p(math.exp(-beta * m)) if -beta * m < 30 else -beta * m for m in margins]
    return PreferenceScore(
        loss=sum(losses) / len(losses),
        accuracy=sum(m > 0 for m in margins) / len(margins),
        margin=sum(margins) / len(margins),
        pairs=len(margins),
    )
