"""The study's table: scores per source over seeds, paired differences, costs; as JSON, markdown, a plot.

:func:`build_table` is pure: it takes the per-seed evaluation results and the per-source figures the
study gathered and returns the ``table.json`` structure, so its arithmetic is tested without
training anything. Scores stay on MTEB's 0-1 scale in the JSON; the markdown and the plot show them
x100, as MTEB's leaderboard does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed.study.stats import mean_interval, paired_difference

__all__ = ["build_table", "markdown_table", "plot_table", "scores_of"]


def scores_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """Task scores, category averages and the average of an ``evaluate_model`` result."""
    averages = dict(result.get("averages", {}))
    return {
        "tasks": {name: float(t["main_score"]) for name, t in result["tasks"].items()},
        "categories": {k: float(v) for k, v in averages.items() if k != "average"},
        "average": float(averages["average"]) if "average" in averages else math.nan,
    }


def _metric(scores: Mapping[str, Any], metric: str) -> float | None:
    """``average``, ``task:NAME`` or ``category:NAME`` of one seed's scores."""
    if metric == "average":
        return scores.get("average")
    kind, _, name = metric.partition(":")
    value = scores.get("tasks" if kind == "task" else "categories", {}).get(name)
    return None if value is None else float(value)


def build_table(
    per_seed: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]],
    sources: Mapping[str, Mapping[str, Any]],
    pairs: Sequence[tuple[str, str]],
    untrained: Mapping[str, Mapping[str, Any]] | None = None,
    conditions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The study's table from per-seed scores.

    Args:
        per_seed: embedder -> source -> seed -> :func:`scores_of` of that trained model.
        sources: source -> its figures (examples, teacher calls, drops, ...), copied as they are.
        pairs: (a, b) comparisons; each is reported as ``a - b`` paired by seed, on the average and
            on each category. Pairs naming a source without scores are left out.
        untrained: embedder -> :func:`scores_of` of the model before training (one evaluation).
        conditions: how the study ran (sizes, seeds, tasks, models, machine), copied as given.

    Returns:
        ``{"conditions", "sources", "embedders": {name: {"untrained", "scores": {source:
        {"average", "categories", "tasks", "seeds"}}, "pairs": [...]}}}``, every score an interval
        of :func:`speed.study.stats.mean_interval`.
    """
    embedders: dict[str, Any] = {}
    for emb, by_source in per_seed.items():
        scores: dict[str, Any] = {}
        for source, seeds in by_source.items():
            if not seeds:
                continue
            first = next(iter(seeds.values()))
            tasks = list(first["tasks"])
            categories = list(first["categories"])
            scores[source] = {
                "average": mean_interval([s["average"] for s in seeds.values()]),
                "categories": {
                    c: mean_interval([s["categories"][c] for s in seeds.values() if c in s["categories"]])
                    for c in categories
                },
                "tasks": {
                    t: mean_interval([s["tasks"][t] for s in seeds.values() if t in s["tasks"]])
                    for t in tasks
                },
                "seeds": {str(seed): dict(s) for seed, s in sorted(seeds.items())},
            }
        compared = []
        for a, b in pairs:
            if a not in by_source or b not in by_source or not by_source[a] or not by_source[b]:
                continue
            categories = list(next(iter(by_source[a].values()))["categories"])
            entry: dict[str, Any] = {"a": a, "b": b}
            for metric in ["average", *(f"category:{c}" for c in categories)]:
                diff = paired_difference(
                    _per_seed(by_source[a], metric),
                    _per_seed(by_source[b], metric),
                )
                entry["average" if metric == "average" else metric.split(":", 1)[1]] = diff
            compared.append(entry)
        embedders[emb] = {
            "untrained": dict(untrained[emb]) if untrained and emb in untrained else None,
            "scores": scores,
            "pairs": compared,
        }
    return {"conditions": dict(conditions or {}), "sources": dict(sources), "embedders": embedders}


def _per_seed(seeds: Mapping[int, Mapping[str, Any]], metric: str) -> dict[int, float]:
    out = {}
    for seed, scores in seeds.items():
        value = _metric(scores, metric)
        if value is not None and not math.isnan(value):
            out[int(seed)] = value
    return out


# --------------------------------------------------------------------------------------------
# markdown


def _cell(interval: Mapping[str, Any] | None) -> str:
    if not interval or interval.get("mean") is None:
        return ""
    text = f"{100 * interval['mean']:.2f}"
    if interval.get("half_width") is not None:
        text += f" ± {100 * interval['half_width']:.2f}"
    return text


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(table: Mapping[str, Any]) -> str:
    """The study as markdown: per embedder, scores (x100, mean ± 95% half-width over seeds) per
    source beside its teacher calls per example, then the paired differences; then the sources'
    data figures and the conditions."""
    lines: list[str] = []
    sources = table.get("sources", {})
    for emb, block in table.get("embedders", {}).items():
        scores = block["scores"]
        if not scores:
            continue
        first = next(iter(scores.values()))
        tasks = list(first["tasks"])
        categories = list(first["categories"])
        n_seeds = max(len(s["seeds"]) for s in scores.values())
        lines.append(f"### {emb}: score x100, mean ± 95% t-interval half-width over {n_seeds} seed(s)")
        lines.append("")
        header = ["source", *tasks]
        if len(categories) > 1 and len(categories) < len(tasks):
            header += [f"{c} avg" for c in categories]
        header += ["average", "teacher calls / example", "examples"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for source, s in scores.items():
            cost = sources.get(source, {}).get("teacher_calls", {})
            row = [source, *(_cell(s["tasks"].get(t)) for t in tasks)]
            if len(categories) > 1 and len(categories) < len(tasks):
                row += [_cell(s["categories"].get(c)) for c in categories]
            row += [
                _cell(s["average"]),
                _num(cost.get("per_example")),
                _num(sources.get(source, {}).get("examples")),
            ]
            lines.append("| " + " | ".join(row) + " |")
        base = block.get("untrained")
        if base:
            row = [
                "(untrained)",
                *(_num(100 * base["tasks"][t]) if t in base["tasks"] else "" for t in tasks),
            ]
            if len(categories) > 1 and len(categories) < len(tasks):
                row += [_num(100 * base["categories"].get(c, math.nan)) for c in categories]
            row += [_num(100 * base["average"]), "", ""]
            lines.append("| " + " | ".join(row) + " |")
        if block.get("pairs"):
            lines += [
                "",
                "| a - b (average, x100) | mean | 95% interval | seeds | beyond noise |",
                "|---|---|---|---|---|",
            ]
            for p in block["pairs"]:
                d = p["average"]
                interval = (
                    f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
                    if d.get("low") is not None
                    else "n/a (1 seed)"
                )
                mean = f"{100 * d['mean']:+.2f}" if d.get("mean") is not None else ""
                verdict = {True: "yes", False: "no", None: ""}[d.get("beyond_noise")]
                lines.append(f"| {p['a']} - {p['b']} | {mean} | {interval} | {len(d['seeds'])} | {verdict} |")
        lines.append("")
    if sources:
        lines += [
            "### data per source",
            "",
            "| source | prompts | kept | kept rate | examples used | rows | teacher calls (alignment + generation) | drops |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for source, f in sources.items():
            cost = f.get("teacher_calls", {})
            drops = ", ".join(
                f"{k} {v}" for k, v in sorted(f.get("drops", {}).items(), key=lambda kv: -kv[1])
            )
            lines.append(
                f"| {source} | {_num(f.get('generated'))} | {_num(f.get('kept'))} | "
                f"{_num(f.get('kept_rate'))} | {_num(f.get('examples'))} | {_num(f.get('rows'))} | "
                f"{_num(cost.get('alignment'))} + {_num(cost.get('generation'))} | {drops} |"
            )
        lines.append("")
    cond = table.get("conditions", {})
    if cond:
        lines += ["### conditions", ""]
        lines += [f"- {k}: {v}" for k, v in cond.items()]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plot


def plot_table(table: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Average score (x100) per source with its 95% interval, one panel per embedder, the untrained
    model as a dashed line. Returns the PNG written, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    blocks = [(emb, b) for emb, b in table.get("embedders", {}).items() if b["scores"]]
    if not blocks:
        return None
    fig = Figure(figsize=(4.5 * len(blocks) + 1, 4), dpi=120)
    FigureCanvasAgg(fig)
    for i, (emb, block) in enumerate(blocks, start=1):
        ax = fig.add_subplot(1, len(blocks), i)
        names = list(block["scores"])
        means = [100 * block["scores"][s]["average"]["mean"] for s in names]
        errs = [100 * (block["scores"][s]["average"]["half_width"] or 0.0) for s in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=[f"C{j}" for j in range(len(names))])
        base = block.get("untrained")
        if base and not math.isnan(base["average"]):
            ax.axhline(
                100 * base["average"],
                color="grey",
                linestyle="--",
                label=f"untrained {100 * base['average']:.2f}",
            )
            ax.legend(fontsize=7)
        low = min([*means, *([100 * base["average"]] if base else [])])
        high = max(m + e for m, e in zip(means, errs, strict=True))
        ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1)), high + 0.1 * (high - low + 1))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("average main score x100 (95% CI over seeds)")
        ax.set_title(emb, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
