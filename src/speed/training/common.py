"""What the SFT and DPO trainers share: loading, LoRA, losses, saving.

Design choices:
- One result type, :class:`TrainResult`: the adapter folder (small, what the paper's LoRA produces),
  the merged folder (the base with the adapter folded in, what generation backends load: vLLM,
  llama.cpp after conversion and plain transformers all read a merged model) and the loss of every
  optimizer step.
- Precision is chosen from the hardware by :mod:`speed.precision` (the policy evaluation uses too).
  TRL's configs default to bf16 even on CPUs that emulate it slowly, and to gradient
  checkpointing, which small models on CPU do not need; both are set explicitly.
- Trainable (master) weights are fp32 on CPU; on a GPU with bf16 the base weights load in bf16
  and PEFT keeps the adapter in fp32.
- Losses are read from the trainer's logs (``logging_steps=1``) through a callback that writes to
  the module logger; the trainer's own printing callback is removed (no ``print`` in library code).
- Inputs are checked before a model is loaded: a missing or non-string field names the row and the
  field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed.precision import choose_precision, device_name

if TYPE_CHECKING:
    from speed.config import LoRATrainingConfig

logger = logging.getLogger(__name__)


_INSTALL_HINT = "training needs torch, transformers, peft, trl and datasets: pip install 'speed[train]'"


class TrainingInputError(ValueError):
    """Training rows that cannot be used; the message names the row and the field."""


@dataclass
class TrainResult:
    """What a trainer leaves behind.

    Attributes:
        adapter_dir: the LoRA adapter (``adapter_config.json`` + weights) and tokenizer.
        merged_dir: the base model with the adapter merged in, plus tokenizer; load it for generation.
        losses: the training loss of each optimizer step, in order.
        steps: optimizer steps taken.
        rows: training rows used.
        seconds: wall time of training (loading and saving excluded).
        device: ``cpu`` or ``cuda``.
        precision: ``bf16`` or ``fp32``.
        metrics: other per-step logs of the trainer (DPO: reward margins and accuracies), by name.
    """

    adapter_dir: Path
    merged_dir: Path
    losses: list[float]
    steps: int
    rows: int
    seconds: float
    device: str
    precision: str
    metrics: dict[str, list[float]] = field(default_factory=dict)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_stats(self, root: Path | None = None) -> dict[str, Any]:
        """A JSON-ready summary for a stage manifest (paths relative to ``root`` when given)."""

        def rel(p: Path) -> str:
            if root is not None:
                try:
                    return str(p.resolve().relative_to(root.resolve()))
                except ValueError:
                    pass
            return str(p)

        return {
            "steps": self.steps,
            "rows": self.rows,
            "loss_first": self.first_loss,
            "loss_last": self.last_loss,
            "seconds": round(self.seconds, 2),
            "device": self.device,
            "precision": self.precision,
            "adapter_dir": rel(self.adapter_dir),
            "merged_dir": rel(self.merged_dir),
        }

    def save(self, path: Path) -> None:
        """Write the result (losses included) as JSON."""
        from speed.io import write_json

        data = asdict(self)
        # relative to the file, so that a moved or copied run stays consistent
        for name in ("adapter_dir", "merged_dir"):
            folder = Path(data[name])
            try:
                data[name] = str(folder.resolve().relative_to(Path(path).parent.resolve()))
            except ValueError:
                data[name] = str(folder)
        write_json(path, data)


def require_training_stack() -> None:
    """Raise ImportError with the install hint when the training libraries are missing."""
    try:
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err


def check_rows(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], what: str) -> None:
    """Every row has every field as a non-empty string.

    Raises:
        TrainingInputError: naming the first bad row and field.
    """
    if not rows:
        raise TrainingInputError(f"{what}: no training rows; the upstream stage wrote none")
    for i, row in enumerate(rows):
        for name in fields:
            value = row.get(name) if isinstance(row, Mapping) else None
            if not isinstance(value, str) or not value.strip():
                raise TrainingInputError(
                    f"{what}: row {i} has no non-empty string field '{name}' "
                    f"(got {type(value).__name__}); rows need fields {list(fields)}"
                )


# --------------------------------------------------------------------------------------------
# conversational rows (TRL's format, shared by SFT and DPO)


def prompt_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The prompt side of a TRL conversational row: the user's message, after ``system`` if given."""
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def answer_messages(text: str) -> list[dict[str, str]]:
    """The answer side of a TRL conversational row (a completion, a chosen or rejected answer)."""
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------------------------
# hardware


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch (None: leave torch's choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# models


#: the chat template given to a base model's tokenizer (SPEED fine-tunes LLaMA-3-8B *base*): ChatML,
#: as the hf backend uses for such models, plus the eos token after each assistant turn, so that the
#: trained model ends its answers with a token every backend stops on. It is saved with the
#: adapter and the merged model, so generation frames prompts exactly as training did.
BASE_MODEL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
    # the newline is an expression: transformers renders with trim_blocks, which eats one after a tag
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of ``path`` with a pad token (eos when the model has none) and a chat template
    (:data:`BASE_MODEL_CHAT_TEMPLATE` when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        logger.warning(
            "tokenizer of %s has no chat template (a base model): training with ChatML turns ended by "
            "eos; the template is saved with the trained model",
            path,
        )
        tok.chat_template = BASE_MODEL_CHAT_TEMPLATE
    return tok


def load_causal_lm(path: str | Path, device: str, precision: str) -> Any:
    """A causal LM for LoRA training: fp32 weights on CPU, bf16 on a bf16 GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if (device == "cuda" and precision == "bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def saved_dtype(path: str | Path) -> Any:
    """The dtype a checkpoint was saved in (so that the merged model keeps it), fp32 if unknown."""
    import torch

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def lora_config(r: int, alpha: int, dropout: float, target_modules: str | list[str]) -> Any:
    """A PEFT LoRA config for causal LM training."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def accumulation(batch_size: int, per_device: int, what: str) -> int:
    """Gradient accumulation steps that make ``batch_size`` from ``per_device`` rows.

    Raises:
        TrainingInputError: ``batch_size`` is not a multiple of ``per_device``.
    """
    per_device = min(per_device, batch_size)
    if batch_size % per_device:
        raise TrainingInputError(
            f"{what}.batch_size {batch_size} is not a multiple of {what}.per_device_batch_size "
            f"{per_device}; make it one"
        )
    return batch_size // per_device


def trainer_args(
    *,
    out_dir: Path,
    cfg: LoRATrainingConfig,
    seed: int,
    device: str,
    precision: str,
    what: str,
) -> dict[str, Any]:
    """Keyword arguments shared by TRL's SFTConfig and DPOConfig."""
    import dataclasses

    from transformers import TrainingArguments

    per_device = min(cfg.per_device_batch_size, cfg.batch_size)
    # transformers 5.2x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    )
    return {
        "output_dir": str(out_dir / "trainer"),
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation(cfg.batch_size, per_device, what),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps > 0 else -1,
        "max_length": cfg.max_length,
        # transformers 5: a float below 1 is a ratio of the total steps (warmup_ratio is gone)
        "warmup_steps": float(getattr(cfg, "warmup_ratio", 0.0)),
        "lr_scheduler_type": "linear",
        "seed": seed,
        "data_seed": seed,
        "bf16": precision == "bf16",
        "fp16": False,
        "use_cpu": device == "cpu",
        checkpointing: cfg.gradient_checkpointing,
        "logging_steps": 1,
        # a NaN step would otherwise be logged as the mean of the finite ones, hiding it from check_losses
        "logging_nan_inf_filter": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
    }


def quiet_trainer(trainer: Any, log_prefix: str) -> Any:
    """Replace the trainer's printing callback by a loss recorder; return the recorder.

    The recorder has ``losses`` (one per optimizer step) and ``metrics`` (other logged values).
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    recorder = loss_recorder(log_prefix)
    trainer.add_callback(recorder)
    return recorder


def loss_recorder(prefix: str) -> Any:
    """A trainer callback that keeps every logged loss and metric and logs progress (the one loss
    logger of every trainer here: SFT, DPO, contrastive); check its ``losses`` with
    :func:`check_losses`."""
    return _loss_recorder_class()(prefix)


def _loss_recorder_class() -> type:
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
        """Keeps every logged loss and metric; logs progress through the module logger."""

        def __init__(self, prefix: str):
            self.prefix = prefix
            self.losses: list[float] = []
            self.metrics: dict[str, list[float]] = {}
            self._t0 = time.time()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary
            loss = float(logs["loss"])
            self.losses.append(loss)
            for k, v in logs.items():
                if k not in ("loss", "epoch", "step") and isinstance(v, int | float):
                    self.metrics.setdefault(k, []).append(float(v))
            if not getattr(state, "is_world_process_zero", True):
                return  # one log line per step, not one per process
            logger.info(
                "%s step %d/%d loss %.4f (%.1fs)",
                self.prefix,
                state.global_step,
                state.max_steps,
                loss,
                time.time() - self._t0,
            )

    return LossRecorder


def drop_long_prompts(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int, what: str, system: str | None = None
) -> list[Mapping[str, Any]]:
    """Rows whose chat-formatted prompt leaves room for completion tokens within ``max_length``.

    TRL truncates the end of a sequence, so a prompt of ``max_length`` tokens or more leaves no
    completion token to learn from and the trainer silently drops the row (or, when every row is
    dropped, fails with an obscure sampler error). Such rows are removed here and counted.

    Raises:
        TrainingInputError: no row is left; the message says how long the prompts are.
    """
    kept, lengths = [], []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        n = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        lengths.append(n)
        if n < max_length:
            kept.append(row)
    if not kept:
        raise TrainingInputError(
            f"{what}: every prompt is at least {what}.max_length = {max_length} tokens long (shortest "
            f"{min(lengths)}), so no completion token would be trained on; raise {what}.max_length"
        )
    if len(kept) < len(rows):
        logger.warning(
            "%s: %d of %d rows dropped: prompt longer than %s.max_length = %d tokens",
            what,
            len(rows) - len(kept),
            len(rows),
            what,
            max_length,
        )
    return kept


def check_losses(losses: Sequence[float], what: str) -> None:
    """Raise when training produced no loss or a non-finite one (a diverged or empty run)."""
    if not losses:
        raise RuntimeError(f"{what}: the trainer logged no loss; were there any training rows left?")
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise RuntimeError(
            f"{what}: loss is not finite at step {bad[0] + 1} ({losses[bad[0]]}); lower the learning "
            "rate or use precision fp32"
        )


def train_and_save(
    trainer: Any,
    recorder: Any,
    tokenizer: Any,
    base: str | Path,
    out_dir: Path,
    rows: int,
    device: str,
    precision: str,
    what: str,
) -> TrainResult:
    """Run a TRL trainer, check its losses, save adapter and merged model, write
    ``train_result.json``; what SFT and DPO share after building their trainer.

    Raises:
        RuntimeError: a non-finite loss.
    """
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    check_losses(recorder.losses, what)
    adapter_dir, merged_dir = save_adapter_and_merged(trainer.model, tokenizer, out_dir, saved_dtype(base))
    result = TrainResult(
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        losses=recorder.losses,
        steps=trainer.state.global_step,
        rows=rows,
        seconds=seconds,
        device=device,
        precision=precision,
        metrics=recorder.metrics,
    )
    result.save(out_dir / "train_result.json")
    return result


@dataclass
class LoRARun:
    """What LoRA SFT and DPO set up alike before building their TRL trainer, and how they finish.

    Build it with :meth:`start`; pass :meth:`trainer_args` and :meth:`peft_config` to the trainer,
    then :meth:`train` it.
    """

    base: str | Path
    cfg: LoRATrainingConfig
    out_dir: Path
    seed: int
    what: str
    device: str
    precision: str
    tokenizer: Any
    model: Any
    rows: list[Mapping[str, Any]]

    @classmethod
    def start(
        cls,
        base: str | Path,
        rows: Sequence[Mapping[str, Any]],
        cfg: LoRATrainingConfig,
        out_dir: str | Path,
        seed: int,
        *,
        threads: int | None,
        system: str | None,
        what: str,
    ) -> LoRARun:
        """Seed torch, pick device and precision, load tokenizer and model, drop rows too long."""
        require_training_stack()
        import torch

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        set_threads(threads)
        torch.manual_seed(seed)
        device = device_name()
        precision = choose_precision(cfg.precision, device)
        tokenizer = load_tokenizer(base)
        model = load_causal_lm(base, device, precision)
        kept = drop_long_prompts(rows, tokenizer, cfg.max_length, what, system)
        return cls(base, cfg, out_dir, seed, what, device, precision, tokenizer, model, kept)

    def trainer_args(self) -> dict[str, Any]:
        """The keyword arguments of TRL's SFTConfig and DPOConfig this run shares."""
        return trainer_args(
            out_dir=self.out_dir,
            cfg=self.cfg,
            seed=self.seed,
            device=self.device,
            precision=self.precision,
            what=self.what,
        )

    def peft_config(self) -> Any:
        """The LoRA adapter the config asks for."""
        c = self.cfg
        return lora_config(c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules)

    def train(self, trainer: Any, method: str) -> TrainResult:
        """Train (logging ``method``, e.g. "SFT" or "DPO (beta 0.1)"), check the losses, save."""
        recorder = quiet_trainer(trainer, self.what)
        logger.info(
            "%s: LoRA %s of %s on %d rows, %s, %s, lr %g, batch %d",
            self.what,
            method,
            self.base,
            len(self.rows),
            self.device,
            self.precision,
            self.cfg.learning_rate,
            self.cfg.batch_size,
        )
        return train_and_save(
            trainer,
            recorder,
            self.tokenizer,
            self.base,
            self.out_dir,
            len(self.rows),
            self.device,
            self.precision,
            self.what,
        )


def save_adapter_and_merged(model: Any, tokenizer: Any, out_dir: Path, dtype: Any) -> tuple[Path, Path]:
    """Save the PEFT adapter and the merged model (in ``dtype``), each with the tokenizer.

    Both are written to temporary folders first and renamed, so a folder that exists is whole.
    """
    adapter_dir = out_dir / "adapter"
    merged_dir = out_dir / "merged"
    for final in (adapter_dir, merged_dir):
        if final.exists():
            shutil.rmtree(final)
    tmp_adapter = out_dir / ".adapter.tmp"
    tmp_merged = out_dir / ".merged.tmp"
    for tmp in (tmp_adapter, tmp_merged):
        shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp_adapter))
    tokenizer.save_pretrained(str(tmp_adapter))
    os.replace(tmp_adapter, adapter_dir)

    merged = model.merge_and_unload()
    merged = merged.to("cpu").to(dtype)
    merged.config.use_cache = True
    merged.save_pretrained(str(tmp_merged), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_merged))
    os.replace(tmp_merged, merged_dir)
    return adapter_dir, merged_dir
