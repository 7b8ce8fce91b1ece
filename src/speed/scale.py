"""Scale study: how embedding quality grows with the number of synthetic examples.

It trains (:mod:`speed.training`) and evaluates (:mod:`speed.evaluation`), so it sits above both:
neither of them imports the other.

SPEED reports that quality grows log-linearly with the amount of synthetic data. This module checks
that on our own data: it trains one embedder per size on nested subsets (each subset is the first
``n`` rows of one seeded shuffle, so a larger set contains every smaller one and sizes differ only in
quantity), evaluates each, and fits ``score = a + b ln(n)`` by least squares (numpy) for the average
and for each task.

Outputs in ``out_dir``: ``scale_study.json`` (points, fits, conditions), ``scale_plot.png`` (matplotlib,
Agg canvas, no global backend change), and ``evals/n{size}/results.{json,md}`` per size. A size whose
results already exist is not retrained, so a stopped study resumes. Trained models are deleted after
evaluation unless ``keep_models``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed.config import EmbedConfig
from speed.evaluation.mteb_eval import evaluate_model
from speed.evaluation.registry import resolve_task_names
from speed.evaluation.results import write_results
from speed.io import atomic_write
from speed.training.contrastive import train_embedder

logger = logging.getLogger(__name__)


def fit_log_linear(sizes: Sequence[float], scores: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of ``score = a + b ln(n)``.

    Args:
        sizes: Training set sizes (all > 0).
        scores: The score at each size.

    Returns:
        ``{"a", "b", "r2", "n_points"}``; with fewer than two distinct sizes ``b`` and ``r2`` are NaN.

    Raises:
        ValueError: lengths differ or a size is not positive.
    """
    import numpy as np

    if len(sizes) != len(scores):
        raise ValueError(f"{len(sizes)} sizes but {len(scores)} scores")
    if any(n <= 0 for n in sizes):
        raise ValueError(f"sizes must be positive to take ln(n), got {list(sizes)}")
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.asarray(scores, dtype=float)
    if len(set(sizes)) < 2:
        return {
            "a": float(y.mean()) if len(y) else math.nan,
            "b": math.nan,
            "r2": math.nan,
            "n_points": len(y),
        }
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"a": float(a), "b": float(b), "r2": r2, "n_points": len(y)}


def plot_scale(study: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Plot average main score (x100) against training size (log axis), with the fitted line.

    Args:
        study: What ``scale_study`` returns (``points``, ``fit``, optional ``baseline_average``).
        path: PNG file to write.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = study["points"]
    ns = np.array([p["n"] for p in points], dtype=float)
    ys = np.array([p["average"] for p in points], dtype=float) * 100
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(ns, ys, color="C0", zorder=3, label="trained")
    fit = study["fit"]
    if not math.isnan(fit.get("b", math.nan)):
        grid = np.geomspace(ns.min(), ns.max(), 100)
        ax.plot(
            grid,
            100 * (fit["a"] + fit["b"] * np.log(grid)),
            color="C1",
            label=f"{100 * fit['a']:.2f} + {100 * fit['b']:.2f} ln(n)  (R² {fit['r2']:.2f})",
        )
    base = study.get("baseline_average")
    if base is not None:
        ax.axhline(100 * base, color="grey", linestyle="--", label=f"baseline {100 * base:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("training examples n (log scale)")
    ax.set_ylabel("average main score x100")
    ax.set_title(f"Scale study: {', '.join(study['tasks'])}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def scale_study(
    train_rows: Sequence[Mapping[str, Any]],
    sizes: Sequence[int],
    model: str | os.PathLike[str],
    tasks: Sequence[str] | str,
    out_dir: str | os.PathLike[str],
    embed_cfg: EmbedConfig | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    baseline: Any = None,
    instructions: bool | None = None,
    batch_size: int = 64,
    seed: int = 0,
    threads: int | None = None,
    device: str | None = None,
    keep_models: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Train on nested subsets of ``train_rows``, evaluate each, fit score = a + b ln(n).

    Args:
        train_rows: Training rows (as for ``train_embedder``).
        sizes: Subset sizes; each at most ``len(train_rows)``.
        model: The model every size starts from.
        tasks: Evaluation tasks or suites.
        out_dir: Folder for the fit, the plot, per-size results (and models if kept).
        embed_cfg: Training config shared by all sizes; None: the paper's defaults.
        data_dir: Evaluation data directory (see ``evaluate_model``).
        baseline: None, a model, or an ``evaluate_model`` result: drawn as a reference line.
        instructions: Evaluate with instructions; None: as ``embed_cfg.use_instructions``.
        batch_size: Encoding batch size of the evaluation.
        seed: Seed of the shuffle that defines the nested subsets, and of training.
        threads: ``torch.set_num_threads`` for training and evaluation.
        device: Torch device.
        keep_models: Keep each size's trained model under ``models/n{size}``.
        precision: ``fp32``, ``bf16`` or ``auto``: weights' dtype while evaluating (see ``evaluate_model``).

    Returns:
        ``{"model", "tasks", "sizes", "seed", "points": [{"n", "average", "scores", "steps",
        "train_seconds", "final_loss"}], "fit": {"a", "b", "r2", "n_points"}, "task_fits": {task: fit},
        "baseline_average", "paths": {"json", "plot"}}``.

    Raises:
        ValueError: no sizes, or a size outside 1..len(train_rows).
    """
    cfg = embed_cfg or EmbedConfig.model_validate({})
    names = resolve_task_names(tasks)
    wanted = sorted({int(n) for n in sizes})
    if not wanted:
        raise ValueError("scale_study: sizes is empty; give at least two training set sizes")
    bad = [n for n in wanted if n < 1 or n > len(train_rows)]
    if bad:
        raise ValueError(
            f"scale_study: sizes {bad} are outside 1..{len(train_rows)} (the number of training rows); "
            "lower them or give more rows"
        )
    if len(wanted) < 2:
        logger.warning("scale_study: one size only, so no slope can be fitted")
    use_instr = cfg.use_instructions if instructions is None else instructions
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)

    baseline_result = None
    if baseline is not None:
        baseline_result = (
            dict(baseline)
            if isinstance(baseline, Mapping)
            else evaluate_model(
                baseline, names, data_dir=data_dir, batch_size=batch_size, device=device, precision=precision
            )
        )

    points: list[dict[str, Any]] = []
    for n in wanted:
        eval_dir = out / "evals" / f"n{n}"
        done = eval_dir / "results.json"
        train_info: dict[str, Any] = {}
        if done.is_file():
            logger.info("scale study: size %d already evaluated, reading %s", n, done)
            result = json.loads(done.read_text(encoding="utf-8"))
            train_info = result.get("training", {})
        else:
            model_dir = out / "models" / f"n{n}"
            subset = [train_rows[i] for i in order[:n]]
            trained = train_embedder(subset, model, model_dir, cfg, seed=seed, threads=threads, device=device)
            train_info = {
                "steps": trained.steps,
                "train_seconds": trained.train_seconds,
                "final_loss": trained.last_loss,
            }
            result = evaluate_model(
                str(model_dir),
                names,
                data_dir=data_dir,
                instructions=use_instr,
                batch_size=batch_size,
                model_name=f"n={n}",
                device=device,
                threads=threads,
                precision=precision,
            )
            result["training"] = train_info
            write_results(eval_dir, result, baseline_result)
            if not keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
        scores = {t: float(result["tasks"][t]["main_score"]) for t in names}
        points.append(
            {
                "n": n,
                "average": sum(scores.values()) / len(scores),
                "scores": scores,
                **{k: train_info.get(k) for k in ("steps", "train_seconds", "final_loss")},
            }
        )
        logger.info("scale study: n=%d average %.4f", n, points[-1]["average"])

    ns = [p["n"] for p in points]
    study: dict[str, Any] = {
        "model": str(model),
        "tasks": names,
        "sizes": wanted,
        "seed": seed,
        "instructions": use_instr,
        "embed_config": cfg.model_dump(mode="json"),
        "points": points,
        "fit": fit_log_linear(ns, [p["average"] for p in points]),
        "task_fits": {t: fit_log_linear(ns, [p["scores"][t] for p in points]) for t in names},
        "baseline_average": (
            sum(float(baseline_result["tasks"][t]["main_score"]) for t in names) / len(names)
            if baseline_result and all(t in baseline_result.get("tasks", {}) for t in names)
            else None
        ),
    }
    json_path = out / "scale_study.json"
    plot_path = plot_scale(study, out / "scale_plot.png")
    study["paths"] = {"json": str(json_path), "plot": str(plot_path)}
    with atomic_write(json_path) as fh:
        fh.write(json.dumps(study, indent=2) + "\n")
    fit = study["fit"]
    logger.info(
        "scale study: score = %.4f + %.4f ln(n) (R² %.3f) over sizes %s",
        fit["a"],
        fit["b"],
        fit["r2"],
        wanted,
    )
    return study
