"""Contrastive training of the embedding model on synthetic (and optionally labelled) data: E5's recipe.

Design choices (E5-mistral, arXiv 2401.00368, which SPEED follows):

- **Loss**: InfoNCE over in-batch negatives plus each row's hard negative, temperature 0.02:
  sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1 / temperature``. Batches are
  drawn with ``BatchSamplers.NO_DUPLICATES`` so that a text never appears twice in a batch (a duplicate
  would be a false negative). With ``mini_batch_size`` set, ``CachedMultipleNegativesRankingLoss``
  (GradCache) gives the same loss and gradients as the full batch in the memory of a mini-batch, which
  is how a 2048 batch fits one GPU.
- **Instructions**: the query side reads ``Instruct: {task}\\nQuery: {query}``; documents (positive, hard
  negative) are bare. A query that already starts with ``Instruct:`` is kept as is.
- **False negatives** (``false_negatives``, off by default as in E5): ``gist`` trains with
  sentence-transformers' ``GISTEmbedLoss``, where a frozen guide model (``guide_model``, by default
  the base model) masks the in-batch negatives it scores above the positive; ``margin`` masks, by the
  trained model's own scores, the in-batch negatives scoring at least ``positive - margin``
  (:class:`speed.training.margin_masked_loss.MarginMaskedMultipleNegativesRankingLoss`).
- **Rows**: mappings with ``query`` (or ``anchor``), ``positive``, optional ``negative`` (or
  ``hard_negative``) and optional ``instruction`` (or ``task``). Rows with and without a hard negative
  become two datasets sampled in proportion to their size (each batch comes from one of them, as a
  loss over a batch needs one shape). Unusable rows are dropped and counted by reason.
- **Models**: a sentence-transformers folder keeps its own pooling (MiniLM: mean) unless ``pooling`` says
  otherwise; a plain transformers folder gets mean pooling (encoders) or last-token pooling with an EOS
  appended to every input (decoder LLMs, as E5-mistral). Decoder LLMs train LoRA adapters (peft, rank
  ``lora_r`` on every linear layer, E5: r 16) that are merged into the saved weights, so the output is
  an ordinary model folder; encoders train fully.
- **Output**: a sentence-transformers model folder plus ``training_stats.json`` (loss history, steps,
  throughput, dropped rows, the config used).

Multi-GPU: launch the same code under ``torchrun --nproc_per_node N`` (or ``accelerate launch``); the
HF Trainer underneath runs DDP. ``batch_size`` stays the global batch (split evenly per device), and
in-batch negatives are gathered across devices (``gather_across_devices``), as E5 did, so the loss
sees the whole global batch. For example::

    torchrun --nproc_per_node 8 -m speed.cli stage embed configs/paper.yaml

Every rank trains; only rank 0 writes the model folder and the stats.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from speed.config import EmbedConfig
from speed.formats import format_query
from speed.io import atomic_write, read_jsonl
from speed.models import resolve_hf
from speed.precision import Chosen, choose_precision, device_name
from speed.training.common import check_losses, loss_recorder

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'speed[train]' (needs torch, transformers, sentence-transformers, peft, datasets)"

QUERY_FIELDS = ("query", "anchor")
POSITIVE_FIELDS = ("positive",)
NEGATIVE_FIELDS = ("negative", "hard_negative")
INSTRUCTION_FIELDS = ("instruction", "task")


class EmbedDataError(ValueError):
    """Training rows that cannot be used at all (none left after checks, unreadable file)."""


@dataclass
class EmbedResult:
    """What a contrastive training run produced.

    Attributes:
        model_dir: The saved sentence-transformers model folder.
        steps: Optimizer steps taken.
        loss_history: Logged training losses, ``{"step", "loss", "learning_rate", "epoch"}`` each.
        rows: Rows trained on, by source (``synthetic``, ``labelled``) and in total.
        dropped: Rows dropped, by reason.
        train_seconds: Wall time of ``trainer.train()``.
        examples_per_second: Training rows processed per second (the HF Trainer's figure).
        pooling: The pooling the model uses.
        lora: Whether LoRA adapters were trained (and merged).
    """

    model_dir: Path
    steps: int
    loss_history: list[dict[str, float]]
    rows: dict[str, int]
    dropped: dict[str, int]
    train_seconds: float
    examples_per_second: float
    pooling: str
    lora: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return self.loss_history[0]["loss"] if self.loss_history else math.nan

    @property
    def last_loss(self) -> float:
        return self.loss_history[-1]["loss"] if self.loss_history else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        return out


# --------------------------------------------------------------------------------------------
# rows


def _first(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = row.get(name)
        if value is not None:
            return value
    return None


def prepare_rows(
    rows: Iterable[Mapping[str, Any]],
    use_instructions: bool = True,
    source: str = "synthetic",
    dropped: Counter[str] | None = None,
) -> list[dict[str, str]]:
    """Turn input rows into training texts: ``anchor`` (the query, with its instruction), ``positive``,
    and ``negative`` when the row has a hard negative.

    Args:
        rows: Mappings with ``query``/``anchor``, ``positive``, optional ``negative``/``hard_negative``,
            optional ``instruction``/``task``.
        use_instructions: Prefix the query with ``Instruct: {instruction}\\nQuery: ``.
        source: Label of where the rows come from, kept in each row for the stats.
        dropped: A counter that receives one count per dropped row, by reason.

    Returns:
        The usable rows; the others are counted in ``dropped``.
    """
    dropped = dropped if dropped is not None else Counter()
    out: list[dict[str, str]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            dropped["not_a_mapping"] += 1
            continue
        query = _first(row, QUERY_FIELDS)
        positive = _first(row, POSITIVE_FIELDS)
        if not isinstance(query, str) or not query.strip():
            dropped["no_query"] += 1
            continue
        if not isinstance(positive, str) or not positive.strip():
            dropped["no_positive"] += 1
            continue
        negative = _first(row, NEGATIVE_FIELDS)
        instruction = _first(row, INSTRUCTION_FIELDS) if use_instructions else None
        item = {
            "anchor": format_query(instruction if isinstance(instruction, str) else None, query),
            "positive": positive.strip(),
            "source": source,
        }
        if isinstance(negative, str) and negative.strip():
            if negative.strip() == item["positive"]:
                dropped["negative_equals_positive"] += 1
                continue
            item["negative"] = negative.strip()
        out.append(item)
    return out


def read_jsonl_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (labelled data to mix in).

    Raises:
        EmbedDataError: the file is missing or a line is not a JSON object; names file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise EmbedDataError(f"embed.extra_data: file '{p}' not found; list JSONL files of training rows")
    try:
        return read_jsonl(p, error=EmbedDataError)
    except EmbedDataError as err:
        raise EmbedDataError(f"embed.extra_data: {err}") from None


def _datasets(rows: list[dict[str, str]]) -> Any:
    """One dataset per row shape: ``triplets`` (with a hard negative) and ``pairs`` (without)."""
    from datasets import Dataset

    triplets = [r for r in rows if "negative" in r]
    pairs = [r for r in rows if "negative" not in r]
    out = {}
    if triplets:
        out["triplets"] = Dataset.from_dict(
            {c: [r[c] for r in triplets] for c in ("anchor", "positive", "negative")}
        )
    if pairs:
        out["pairs"] = Dataset.from_dict({c: [r[c] for r in pairs] for c in ("anchor", "positive")})
    if len(out) == 1:
        return next(iter(out.values()))
    return out


# --------------------------------------------------------------------------------------------
# models


def _is_decoder(config: Any) -> bool:
    """True for decoder-only LLMs (Llama, Mistral, Qwen...), False for encoders (BERT, MiniLM...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def append_eos(tokenizer: Any) -> bool:
    """Make ``tokenizer`` end every encoded text with its EOS token (E5's last-token pooling reads it).

    The change lives in the tokenizer's post-processor, so it is saved with the model and applies at
    evaluation time too. Returns whether the EOS is now appended.
    """
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        logger.warning("tokenizer has no EOS token; last-token pooling reads the last text token instead")
        return False
    probe = tokenizer("a")["input_ids"]
    if probe and probe[-1] == eos_id:
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        logger.warning("slow tokenizer: cannot append EOS through a post-processor")
        return False
    from tokenizers.processors import TemplateProcessing

    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    adds_bos = bool(probe) and bos_id is not None and probe[0] == bos_id
    prefix = f"{bos}:0 " if adds_bos else ""
    specials = [(eos, eos_id)] + ([(bos, bos_id)] if adds_bos else [])
    backend.post_processor = TemplateProcessing(
        single=f"{prefix}$A:0 {eos}:0",
        pair=f"{prefix}$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=specials,
    )
    ok = tokenizer("a")["input_ids"][-1] == eos_id
    if not ok:
        logger.warning(
            "could not make the tokenizer append EOS; last-token pooling reads the last text token"
        )
    return ok


def embed_precision(device: str | None) -> Chosen:
    """The precision of embedding training on ``device`` (None: the automatic one).

    The shared policy (:func:`speed.precision.choose_precision`, ``auto``) on a CUDA device; fp32 on
    CPU even where the CPU has bf16 units, as this trainer has always done: ``embed`` has no
    precision field to opt in with, and adding one would change every embed stage key.
    """
    on_gpu = device != "cpu" and device_name() == "cuda"
    return choose_precision("auto", device or "cuda") if on_gpu else "fp32"


def build_model(
    model: str | os.PathLike[str],
    cfg: EmbedConfig,
    device: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load or assemble the SentenceTransformer to train, with pooling and LoRA as ``cfg`` says.

    Args:
        model: A sentence-transformers folder, a transformers folder, or a packaged/hub model name.
        cfg: The embedding config (pooling, max_length, lora_r, ...).
        device: Torch device; None: automatic.

    Returns:
        The model and a description: ``{"pooling", "decoder", "lora", "eos_appended"}``.
    """
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling
        from transformers import AutoConfig
    except ImportError as err:
        raise ImportError(f"embedding training needs sentence-transformers: {INSTALL_HINT}") from err
    from sentence_transformers.base.modules import Normalize, Transformer

    path = resolve_hf(model)
    is_st_folder = (Path(path) / "modules.json").is_file()
    info: dict[str, Any] = {"decoder": False, "lora": False, "eos_appended": False}
    if is_st_folder:
        st = SentenceTransformer(path, device=device)
        hf_config = st.transformers_model.config if st.transformers_model is not None else None
        info["decoder"] = _is_decoder(hf_config)
        pooling = next((m for m in st if isinstance(m, Pooling)), None)
        if pooling is None:
            raise ValueError(f"model '{model}' has no Pooling module; embed.pooling cannot apply to it")
        if cfg.pooling != "auto" and pooling.pooling_mode != cfg.pooling:
            logger.warning(
                "model '%s' was trained with %s pooling; switching to embed.pooling=%s",
                model,
                pooling.pooling_mode,
                cfg.pooling,
            )
            pooling.pooling_mode = cfg.pooling
        info["pooling"] = pooling.pooling_mode
        # never lengthen: positions past what the model was trained on would be untrained
        if st.max_seq_length is None or st.max_seq_length > cfg.max_length:
            st.max_seq_length = cfg.max_length
    else:
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except OSError as err:
            raise OSError(
                f"cannot load model '{model}' for embedding training ({err}); pass a local folder or a "
                "packaged model name (models.embedder.model)"
            ) from err
        info["decoder"] = _is_decoder(hf_config)
        mode = cfg.pooling if cfg.pooling != "auto" else ("lasttoken" if info["decoder"] else "mean")
        max_len = min(
            cfg.max_length, getattr(hf_config, "max_position_embeddings", cfg.max_length) or cfg.max_length
        )
        model_kwargs: dict[str, Any] = {}
        if info["decoder"] and embed_precision(device) == "bf16":
            import torch

            model_kwargs["dtype"] = torch.bfloat16
        transformer = Transformer(path, max_seq_length=max_len, model_kwargs=model_kwargs)
        tokenizer = transformer.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if info["decoder"]:
            tokenizer.padding_side = "right"
            info["eos_appended"] = append_eos(tokenizer)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)
        st = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)
        info["pooling"] = mode
    if info["decoder"] and cfg.lora_r:
        _add_lora(st, cfg)
        info["lora"] = True
    elif cfg.lora_r and not info["decoder"]:
        logger.info("encoder model: full fine-tuning (embed.lora_r applies to decoder LLMs only)")
    return st, info


def _add_lora(st: Any, cfg: EmbedConfig) -> None:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as err:
        raise ImportError(f"LoRA training of a decoder embedder needs peft: {INSTALL_HINT}") from err
    transformer = st[0]
    lora = LoraConfig(
        r=int(cfg.lora_r or 16),
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type=TaskType.FEATURE_EXTRACTION,
    )
    transformer.model = get_peft_model(transformer.model, lora)
    trainable, total = transformer.model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d: %d of %d parameters trainable (%.2f%%)", lora.r, trainable, total, 100 * trainable / total
    )


def _merge_lora(st: Any) -> None:
    transformer = st[0]
    if hasattr(transformer.model, "merge_and_unload"):
        transformer.model = transformer.model.merge_and_unload()


# --------------------------------------------------------------------------------------------
# training


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing; pass whichever exists."""
    import dataclasses

    from sentence_transformers import SentenceTransformerTrainingArguments

    names = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled}


def _gist_loss(
    st: Any, model: str | os.PathLike[str], cfg: EmbedConfig, device: str | None, gather: bool
) -> Any:
    """GISTEmbedLoss (or its GradCache form): a frozen guide model masks the negatives it scores
    above the positive (less ``false_negative_margin``); the guide is ``guide_model`` or the base
    model as loaded before training."""
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss, GISTEmbedLoss

    guide, _ = build_model(cfg.guide_model or model, cfg.model_copy(update={"lora_r": None}), device=device)
    guide.eval()
    for param in guide.parameters():
        param.requires_grad_(False)
    common: dict[str, Any] = {
        "temperature": cfg.temperature,
        "margin_strategy": "absolute",
        "margin": cfg.false_negative_margin,
        "gather_across_devices": gather,
    }
    if cfg.mini_batch_size:
        return CachedGISTEmbedLoss(st, guide, mini_batch_size=cfg.mini_batch_size, **common)
    return GISTEmbedLoss(st, guide, **common)


def _false_negative_stats(loss: Any) -> dict[str, Any]:
    """What the false-negative control did, for the stats (the margin mask counts its masks)."""
    if hasattr(loss, "masked") and hasattr(loss, "seen"):
        return {"false_negatives_masked": loss.masked, "in_batch_negatives_seen": loss.seen}
    return {}


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_embedder(
    rows: Iterable[Mapping[str, Any]],
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: EmbedConfig | None = None,
    *,
    extra_rows: Iterable[Mapping[str, Any]] | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str | None = None,
    logging_steps: int | None = None,
    callbacks: list[Any] | None = None,
    progress: bool = False,
) -> EmbedResult:
    """Train an embedding model contrastively (E5 recipe) and save it.

    Args:
        rows: Training rows (synthetic data): ``query``, ``positive``, optional ``negative``, optional
            ``instruction``/``task``.
        model: The model to start from: a sentence-transformers or transformers folder, or a packaged
            model name (``models.embedder.model``).
        out_dir: Folder to save the trained model in (created; its contents are replaced).
        cfg: The ``embed`` config section; None: the paper's defaults.
        extra_rows: Labelled rows to mix in, beside those read from ``cfg.extra_data``.
        seed: Seed of sampling and initialisation (``run.seed``).
        threads: If set, ``torch.set_num_threads(threads)`` (``run.threads``).
        device: ``cpu``, ``cuda`` or None (automatic).
        logging_steps: Steps between loss records; None: every step up to 200 steps, then 1/200th.
        callbacks: Extra ``transformers.TrainerCallback`` objects (progress, stop).
        progress: Show the HF Trainer's progress bar (for the CLI); losses are logged either way.

    Returns:
        An ``EmbedResult``; ``training_stats.json`` in ``out_dir`` holds the same.

    Raises:
        EmbedDataError: no usable row is left after the checks (the counts by reason are given).
    """
    cfg = cfg or EmbedConfig.model_validate({})
    try:
        import torch
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )
    except ImportError as err:
        raise ImportError(f"embedding training needs sentence-transformers: {INSTALL_HINT}") from err

    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    dropped: Counter[str] = Counter()
    train_rows = prepare_rows(rows, cfg.use_instructions, "synthetic", dropped)
    labelled: list[Mapping[str, Any]] = list(extra_rows or [])
    for path in cfg.extra_data:
        labelled.extend(read_jsonl_rows(path))
    train_rows += prepare_rows(labelled, cfg.use_instructions, "labelled", dropped)
    if dropped:
        logger.warning("dropped %d training rows: %s", sum(dropped.values()), dict(dropped))
    if not train_rows:
        raise EmbedDataError(
            f"no usable training rows (dropped: {dict(dropped) or 'none given'}); each row needs a non-empty "
            "'query' and 'positive' (and optionally 'negative', 'instruction')"
        )
    by_source = Counter(r["source"] for r in train_rows)
    random.Random(seed).shuffle(train_rows)
    train_dataset = _datasets(train_rows)

    world = _world_size()
    if cfg.batch_size % world:
        raise ValueError(
            f"embed.batch_size={cfg.batch_size} is not divisible by the {world} processes; "
            "set it to a multiple of the number of GPUs"
        )
    per_device = cfg.batch_size // world
    largest = max(
        len(d) for d in (train_dataset.values() if isinstance(train_dataset, dict) else [train_dataset])
    )
    if per_device > largest:
        logger.warning(
            "embed.batch_size=%d exceeds the %d rows per process; using batch size %d",
            cfg.batch_size,
            largest,
            max(1, largest),
        )
        per_device = max(1, largest)

    st, info = build_model(model, cfg, device=device)
    scale = 1.0 / cfg.temperature
    gather = world > 1
    loss: Any
    if cfg.false_negatives == "gist":
        loss = _gist_loss(st, model, cfg, device, gather)
    elif cfg.false_negatives == "margin":
        from speed.training.margin_masked_loss import MarginMaskedMultipleNegativesRankingLoss

        loss = MarginMaskedMultipleNegativesRankingLoss(
            st, scale=scale, margin=cfg.false_negative_margin, gather_across_devices=gather
        )
    elif cfg.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(
            st, scale=scale, mini_batch_size=cfg.mini_batch_size, gather_across_devices=gather
        )
    else:
        loss = MultipleNegativesRankingLoss(st, scale=scale, gather_across_devices=gather)

    n_rows = len(train_rows)
    steps_per_epoch = max(1, math.ceil(n_rows / (per_device * world)))
    planned = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.warmup_steps >= planned:
        logger.warning(
            "embed.warmup_steps=%d >= the %d planned steps: the learning rate never reaches its peak; "
            "lower embed.warmup_steps for a run this short",
            cfg.warmup_steps,
            planned,
        )
    if logging_steps is None:
        logging_steps = max(1, planned // 200)
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    bf16 = embed_precision(device) == "bf16"

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="speed-embed-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=per_device,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            lr_scheduler_type="linear",
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
            **_checkpointing_kwargs(cfg.gradient_checkpointing),
            bf16=bf16,
            use_cpu=use_cpu,
            save_strategy="no",
            logging_steps=logging_steps,
            # the Trainer would log a NaN step as the mean of the finite ones; check_losses must see it
            logging_nan_inf_filter=False,
            logging_first_step=True,
            report_to="none",
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
        )
        if cfg.gradient_checkpointing and info["lora"]:
            st[0].model.enable_input_require_grads()
        trainer = SentenceTransformerTrainer(
            model=st, args=args, train_dataset=train_dataset, loss=loss, callbacks=callbacks
        )
        # the library reports through logging; progress bars are the caller's choice
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        if not progress:
            trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        recorder = loss_recorder("embed")
        trainer.add_callback(recorder)
        output = trainer.train()
        # the check SFT and DPO make too: a diverged run must not be saved as a trained model
        check_losses(recorder.losses, "embed")
        history = [
            {
                "step": float(e["step"]),
                "loss": float(e["loss"]),
                "learning_rate": float(e.get("learning_rate", math.nan)),
                "epoch": float(e.get("epoch", math.nan)),
            }
            for e in trainer.state.log_history
            if "loss" in e
        ]
        steps = int(trainer.state.global_step)
    seconds = time.monotonic() - start
    metrics = output.metrics
    runtime = float(metrics.get("train_runtime", seconds))

    if info["lora"] and cfg.merge_lora:
        _merge_lora(st)
    result = EmbedResult(
        model_dir=out,
        steps=steps,
        loss_history=history,
        rows={**dict(by_source), "total": n_rows},
        dropped=dict(dropped),
        train_seconds=runtime,
        examples_per_second=float(metrics.get("train_samples_per_second", 0.0)),
        pooling=str(info["pooling"]),
        lora=bool(info["lora"]),
        extra={
            "decoder": info["decoder"],
            "eos_appended": info["eos_appended"],
            "per_device_batch_size": per_device,
            "world_size": world,
            "lora_merged": bool(info["lora"] and cfg.merge_lora),
            "loss": type(loss).__name__,
            "scale": scale,
            **_false_negative_stats(loss),
        },
    )
    if _is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        st.save(str(out), create_model_card=False)
        stats = {
            **result.to_dict(),
            "config": cfg.model_dump(mode="json"),
            "base_model": str(model),
            "seed": seed,
        }
        with atomic_write(out / "training_stats.json") as fh:
            fh.write(json.dumps(stats, indent=2) + "\n")
    logger.info(
        "trained %s for %d steps on %d rows in %.0f s (%.1f rows/s); loss %.4f -> %.4f; saved to %s",
        model,
        steps,
        n_rows,
        runtime,
        result.examples_per_second,
        result.first_loss,
        result.last_loss,
        out,
    )
    return result
