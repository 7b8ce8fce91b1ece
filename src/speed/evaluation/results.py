"""Score tables: per-task main scores, category averages, a model beside its baseline.

The results JSON keeps MTEB's full score dictionary of each task beside the main score, so nothing
MTEB computed is lost; the table shows main scores only, times 100 as MTEB's leaderboard does.
Category averages follow MTEB's task types (STS, Classification, Clustering, Retrieval, Reranking);
the overall average is over tasks, as MTEB averages, not over categories.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed.io import atomic_write

#: Order of categories in tables, as in MTEB's English benchmark.
CATEGORY_ORDER = ["Classification", "Clustering", "PairClassification", "Reranking", "Retrieval", "STS"]


def category_averages(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean main score per task type, plus ``"average"`` over all tasks."""
    by_type: dict[str, list[float]] = {}
    for entry in tasks.values():
        by_type.setdefault(str(entry["type"]), []).append(float(entry["main_score"]))
    ordered = sorted(by_type, key=lambda t: (CATEGORY_ORDER.index(t) if t in CATEGORY_ORDER else 99, t))
    out = {t: sum(by_type[t]) / len(by_type[t]) for t in ordered}
    scores = [float(e["main_score"]) for e in tasks.values()]
    out["average"] = sum(scores) / len(scores) if scores else math.nan
    return out


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return ""
    return f"{100 * (a - b):+.2f}"


def markdown_table(result: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """A markdown table of per-task main scores (x100) and category averages, beside a baseline.

    Args:
        result: What ``evaluate_model`` returns for the model (``model``, ``tasks``, ``averages``).
        baseline: The same for the baseline model, or None.
    """
    tasks = result["tasks"]
    base_tasks = (baseline or {}).get("tasks", {})
    header = ["task", "type", "metric", str(result.get("model", "model"))]
    if baseline:
        header += [f"{baseline.get('model', 'baseline')} (baseline)", "delta"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in tasks.items():
        row = [name, str(entry["type"]), str(entry["main_score_name"]), _fmt(entry["main_score"])]
        if baseline:
            other = base_tasks.get(name, {}).get("main_score")
            row += [_fmt(other), _delta(entry["main_score"], other)]
        lines.append("| " + " | ".join(row) + " |")
    averages = result["averages"]
    base_avg = (baseline or {}).get("averages", {})
    for category, value in averages.items():
        label = f"**{category} average**" if category != "average" else "**average (all tasks)**"
        row = [label, "", "", _fmt(value)]
        if baseline:
            row += [_fmt(base_avg.get(category)), _delta(value, base_avg.get(category))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | os.PathLike[str], result: Mapping[str, Any], baseline: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.json`` (model, and baseline when given) and ``results.md`` into ``out_dir``.

    Returns:
        The paths written, by kind (``json``, ``markdown``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(result)
    if baseline is not None:
        payload["baseline"] = baseline
    json_path = out / "results.json"
    with atomic_write(json_path) as fh:
        fh.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
    md_path = out / "results.md"
    md_path.write_text(markdown_table(result, baseline), encoding="utf-8")
    return {"json": json_path, "markdown": md_path}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def main_scores(result: Mapping[str, Any], tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Task name -> main score of an ``evaluate_model`` result (optionally only some tasks)."""
    names = tasks if tasks is not None else list(result["tasks"])
    return {n: float(result["tasks"][n]["main_score"]) for n in names}
