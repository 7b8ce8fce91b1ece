"""The run's figures, gathered from whatever the run directory holds.

Every reader here is tolerant: a run stopped halfway, a stage still running, a corrupt manifest, a
missing ledger or an evaluation file of another shape gives an empty section and a line in
``warnings``, never an exception. The report is a view of the run; it must not be the thing that
fails at the end of a long one.

Design choices:
- The stage list follows the run's own config when the runner can plan it (so that a stage can be
  shown as ``stale``); otherwise the built-in stages in the runner's order
  (:func:`speed.runner.builtin_stage_order`), then any other finished stage folder.
- Teacher costs come from the SQLite ledger through :func:`speed.ledger.cost_summary`, the same numbers
  ``speed cost`` prints. The ledger is only opened when it exists (opening creates it).
- The teacher-only comparison is E5-style generation: one teacher call per final example, each
  costing the mean teacher tokens (in and out) of this run's seed calls, which ask the teacher for
  one example exactly as E5 did. Brainstorming is left out of both sides of that comparison, as in
  the paper's headline figures.
- The synthesized data is streamed (JSON lines or Parquet batches), never loaded whole: a paper-scale
  run has 920K examples. Counts cover every row; the browsable sample is a seeded reservoir per kind.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from speed.card import EASY_OVERLAP, jaccard, words
from speed.config import load_config
from speed.io import iter_jsonl, read_json
from speed.ledger import budget_summary, cost_summary
from speed.runner import Runner, builtin_stage_order

logger = logging.getLogger(__name__)

#: Bump when a field of summary.json changes meaning.
SUMMARY_VERSION = 1


class _Warnings(list[str]):
    def add(self, msg: str) -> None:
        logger.warning("report: %s", msg)
        self.append(msg)


# --------------------------------------------------------------------------------------------
# stages


def _read_manifest(path: Path, warnings: _Warnings) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        warnings.add(f"{path} is unreadable ({err}); its stage is shown as unreadable")
        return {}
    if not isinstance(data, dict):
        warnings.add(f"{path} is not a JSON object; its stage is shown as unreadable")
        return {}
    return data


def _planned_states(run_dir: Path) -> tuple[list[str], dict[str, str]] | None:
    """Stage names and states from the runner, when the run's config can be loaded and planned."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    try:
        cfg = load_config(cfg_path, [f"run.dir={run_dir}"])
        statuses = Runner(cfg).status()
    except Exception as err:  # any failure here only costs the 'stale' state
        logger.debug("report: cannot plan the run's stages (%s); listing stage folders instead", err)
        return None
    return [s.name for s in statuses], {s.name: s.state for s in statuses}


#: the roles that generate text (the embedder only encodes)
GENERATING_ROLES = ("teacher", "junior", "senior", "revisor")


def collect_determinism(run_dir: Path, warnings: _Warnings) -> dict[str, str | None] | None:
    """Per generating role: None when the same request gets the same text, else why it may not.

    Read from the run's config.yaml (:meth:`speed.config.ModelSpec.nondeterminism`); None when the
    run has no readable config.
    """
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    try:
        cfg = load_config(cfg_path, [f"run.dir={run_dir}"])
    except Exception as err:
        warnings.add(f"cannot read {cfg_path} to say which roles are deterministic: {err}")
        return None
    return {role: getattr(cfg.models, role).nondeterminism() for role in GENERATING_ROLES}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _drops(stats: Mapping[str, Any]) -> dict[str, int]:
    drops = stats.get("drops")
    if not isinstance(drops, Mapping):
        return {}
    return {str(k): int(v) for k, v in drops.items() if _num(v) is not None}


def collect_stages(run_dir: Path, warnings: _Warnings) -> list[dict[str, Any]]:
    """One entry per stage: state, time, count, drops and calls per role (from its manifest)."""
    planned = _planned_states(run_dir)
    if planned is not None:
        names, states = planned
    else:
        names, states = [], {}
    found = sorted(p.parent.name for p in run_dir.glob("*/manifest.json"))
    working = (
        sorted(p.name for p in (run_dir / ".work").iterdir() if p.is_dir() and not p.name.endswith(".old"))
        if (run_dir / ".work").is_dir()
        else []
    )
    known = set(found) | set(working)
    if planned is None:
        # the paper's pipeline (stages not started yet are pending), then plugin stages; a run of
        # plugin stages only lists what it has
        order = builtin_stage_order()
        extra = sorted(known - set(order))
        names = [*order, *extra] if known & set(order) else extra
    else:
        # folders of stages the config no longer plans are still part of the run
        names = [*names, *sorted(known - set(names))]
    out = []
    for name in names:
        manifest = _read_manifest(run_dir / name / "manifest.json", warnings)
        if manifest is None:
            # a work folder without manifest: running now, or stopped before it finished
            state = "incomplete" if name in working else states.get(name, "pending")
        elif not manifest:
            state = "unreadable"
        else:
            state = states.get(name, "done")
        m = manifest or {}
        stats: Mapping[str, Any] = m["stats"] if isinstance(m.get("stats"), Mapping) else {}
        calls: Mapping[str, Any] = m["calls"] if isinstance(m.get("calls"), Mapping) else {}
        drops = _drops(stats)
        out.append(
            {
                "name": name,
                "state": state,
                "duration_s": _num(m.get("duration_s")),
                "finished_at": m.get("finished_at"),
                "resumed": m.get("resumed"),
                "key": m.get("key"),
                "count": int(stats["count"]) if _num(stats.get("count")) is not None else None,
                "drops": drops,
                "drops_total": sum(drops.values()),
                "stats": {k: v for k, v in stats.items() if k not in ("count", "drops")},
                "calls": {str(r): dict(t) for r, t in calls.items() if isinstance(t, Mapping)},
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# costs


def collect_costs(run_dir: Path, warnings: _Warnings) -> dict[str, Any]:
    """Teacher calls and tokens per stage and per final example, beside an E5-style teacher-only run."""
    empty: dict[str, Any] = {
        "teacher_by_stage": {},
        "teacher_total": {"calls": 0, "tokens_in": 0, "tokens_out": 0, "errors": 0, "latency_s": 0.0},
        "final_examples": None,
        "teacher_calls_per_example": None,
        "teacher_tokens_per_example": None,
        "e5_style": None,
        "savings": None,
        "budget": None,
    }
    if not (run_dir / "ledger.sqlite").exists():
        return empty
    try:
        cost = dict(cost_summary(run_dir))
    except Exception as err:
        warnings.add(f"cannot read the call ledger {run_dir / 'ledger.sqlite'} ({err}); costs left out")
        return empty
    out = {**empty, **cost}
    try:
        out["budget"] = budget_summary(run_dir)
    except Exception as err:
        warnings.add(f"cannot read run.budget of {run_dir / 'config.yaml'} ({err}); budget left out")
    total = out["teacher_total"]
    final = out.get("final_examples")
    tokens = int(total.get("tokens_in", 0)) + int(total.get("tokens_out", 0))
    if final:
        out["teacher_tokens_per_example"] = tokens / final

    # E5-style: one teacher call per final example at this run's mean tokens per seed call
    basis, ref = "seed", out["teacher_by_stage"].get("seed")
    if not ref or not ref.get("calls"):
        basis, ref = "all teacher calls", total
    if final and ref and ref.get("calls"):
        mean_in = ref["tokens_in"] / ref["calls"]
        mean_out = ref["tokens_out"] / ref["calls"]
        e5 = {
            "calls": int(final),
            "tokens_in": round(final * mean_in),
            "tokens_out": round(final * mean_out),
            "tokens": round(final * (mean_in + mean_out)),
            "mean_tokens_in_per_call": mean_in,
            "mean_tokens_out_per_call": mean_out,
            "basis": basis,
        }
        out["e5_style"] = e5
        out["savings"] = {
            "calls_ratio": e5["calls"] / total["calls"] if total.get("calls") else None,
            "tokens_ratio": e5["tokens"] / tokens if tokens else None,
        }
    return out


# --------------------------------------------------------------------------------------------
# data


def iter_stage_rows(folder: Path, warnings: _Warnings) -> Iterator[dict[str, Any]]:
    """Rows of a stage, streamed, in :func:`speed.io.read_rows`'s layout (JSONL, else Parquet shards).

    A malformed JSON line is skipped and counted in ``warnings`` instead of stopping the report.
    """
    jsonl = folder / "data.jsonl"
    if jsonl.exists():
        bad: Counter[str] = Counter()
        yield from iter_jsonl(jsonl, skipped=bad)
        if bad:
            warnings.add(f"{jsonl}: {sum(bad.values())} malformed lines skipped")
        return
    shards = sorted(folder.glob("**/*.parquet"))
    if not shards:
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        warnings.add(f"{folder} holds Parquet shards but pyarrow is missing (pip install pyarrow)")
        return
    for shard in shards:
        try:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        except Exception as err:
            warnings.add(f"{shard} is unreadable ({err}); skipped")


def _reservoir_add(bucket: list[Any], seen: int, item: Any, size: int, rng: random.Random) -> None:
    """Algorithm R: keep a uniform sample of ``size`` among the ``seen`` items so far."""
    if len(bucket) < size:
        bucket.append(item)
    else:
        j = rng.randrange(seen)
        if j < size:
            bucket[j] = item


def _canonical(value: Any) -> Any:
    """A value as JSON data when it is JSON text, so that formatting alone is not a change."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value.strip()
    return value


def revision_changed(row: Mapping[str, Any]) -> bool:
    """Whether the revisor's version was used and differs (as data, not formatting) from the senior's.

    Reads the synthesize stage's columns: ``raw_output`` (the senior's text), ``revisor_output``
    (the revisor's text) and ``revised`` (whether the revisor's version became the example).
    """
    if not row.get("revised") or row.get("revisor_output") in (None, ""):
        return False
    return bool(_canonical(row.get("revisor_output")) != _canonical(row.get("raw_output")))


def _drop_reason(row: Mapping[str, Any]) -> str | None:
    for field in ("drop_reason", "drop", "dropped"):
        value = row.get(field)
        if value:
            return str(value) if not isinstance(value, bool) else "dropped"
    return None


def collect_examples(
    run_dir: Path, stages: list[dict[str, Any]], sample_per_kind: int, warnings: _Warnings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Examples per kind and drops per reason of the synthesize stage, and a sample per kind."""
    folder = run_dir / "synthesize"
    stage = next((s for s in stages if s["name"] == "synthesize"), None)
    drops = dict(stage["drops"]) if stage else {}
    by_kind: Counter[str] = Counter()
    overlaps: dict[str, list[float]] = {}
    row_drops: Counter[str] = Counter()
    revised = 0
    samples: dict[str, list[dict[str, Any]]] = {}
    rng = random.Random(0)
    if (folder / "manifest.json").exists():
        for row in iter_stage_rows(folder, warnings):
            reason = _drop_reason(row)
            if reason is not None:
                row_drops[reason] += 1
                continue
            kind = str(row.get("kind") or "unknown")
            by_kind[kind] += 1
            overlaps.setdefault(kind, []).append(
                jaccard(words(row.get("query_text") or row.get("query")), words(row.get("positive")))
            )
            revised += revision_changed(row)
            _reservoir_add(samples.setdefault(kind, []), by_kind[kind], row, sample_per_kind, rng)
    # drops counted in the stats win; rows marked dropped add reasons the stats lack
    for reason, n in row_drops.items():
        drops.setdefault(reason, n)
    total = sum(by_kind.values())
    dropped = sum(drops.values())
    summary = {
        "total": total if (folder / "manifest.json").exists() else None,
        "count_in_manifest": stage["count"] if stage else None,
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0]))),
        "drops": dict(sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "drops_total": dropped,
        "kept_fraction": total / (total + dropped) if total + dropped else None,
        "revised": revised,
        # kept as (query, positive) pairs: their negative alone failed a filter
        "negative_removed": dict((stage or {}).get("stats", {}).get("negative_removed") or {}),
        "sample_per_kind": sample_per_kind,
        # "too easy": queries that repeat their positive's words (speed.card)
        "too_easy": {
            kind: {
                "mean_jaccard": round(sum(v) / len(v), 4),
                "share_above": round(sum(x > EASY_OVERLAP for x in v) / len(v), 4),
                "threshold": EASY_OVERLAP,
            }
            for kind, v in sorted(overlaps.items())
        },
    }
    sample = [row for kind in sorted(samples) for row in samples[kind]]
    return summary, sample


def collect_labels(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the labels stage did (from its manifest stats): rows checked and kept, drops by reason,
    relabel verdicts, round-trip ranks, mined negatives; None when it has not finished or checked
    nothing (all of it off)."""
    stage = next((s for s in stages if s["name"] == "labels" and s["state"] == "done"), None)
    if stage is None or not stage["stats"].get("checked"):
        return None
    stats = stage["stats"]
    return {
        "input": stats.get("input"),
        "checked": stats.get("checked"),
        "count": stage.get("count"),
        "drops": stage.get("drops") or {},
        "relabel": stats.get("relabel"),
        "round_trip": stats.get("round_trip"),
        "mining": stats.get("mining"),
        "seconds_per_1k_checked": stats.get("seconds_per_1k_checked"),
    }


def collect_judgements(run_dir: Path, n: int, warnings: _Warnings) -> tuple[int | None, list[dict[str, Any]]]:
    """The number of judge verdicts and a seeded sample of ``n`` of them."""
    folder = run_dir / "judge"
    if not (folder / "manifest.json").exists():
        return None, []
    rng = random.Random(0)
    sample: list[dict[str, Any]] = []
    seen = 0
    for row in iter_stage_rows(folder, warnings):
        seen += 1
        _reservoir_add(sample, seen, row, n, rng)
    return seen, sample


# --------------------------------------------------------------------------------------------
# evaluation


def _task_scores(obj: Any) -> dict[str, dict[str, Any]]:
    """Task -> {score, type, metric} from an ``evaluate_model`` result or a plain task -> score map."""
    if not isinstance(obj, Mapping):
        return {}
    tasks: Mapping[str, Any] = obj["tasks"] if isinstance(obj.get("tasks"), Mapping) else obj
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        if isinstance(entry, Mapping):
            score = _num(entry.get("main_score", entry.get("score")))
            if score is None:
                continue
            out[str(name)] = {
                "score": score,
                "type": entry.get("type"),
                "metric": entry.get("main_score_name", entry.get("metric")),
            }
        elif _num(entry) is not None:
            out[str(name)] = {"score": float(entry), "type": None, "metric": None}
    return out


def _label(obj: Any, default: str) -> str:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), str):
        return str(obj["model"])
    return default


def _averages(obj: Any, tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    given = obj.get("averages") if isinstance(obj, Mapping) else None
    if isinstance(given, Mapping):
        return {str(k): float(v) for k, v in given.items() if _num(v) is not None}
    if not tasks:
        return {}
    scores = [t["score"] for t in tasks.values()]
    return {"average": sum(scores) / len(scores)}


def collect_eval(run_dir: Path, warnings: _Warnings) -> dict[str, Any] | None:
    """Task scores of the trained model and its baseline from ``evaluate/results.json``.

    Reads MTEB-style results (``{"model", "tasks": {name: {"main_score", ...}}, "averages",
    "baseline": {...}}``) and also plain ``{task: score}`` maps, alone or under ``model`` and
    ``baseline`` keys. Scores are kept on the file's scale.
    """
    candidates = [run_dir / "evaluate" / "results.json", run_dir / ".work" / "evaluate" / "results.json"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        warnings.add(f"{path} is unreadable ({err}); the evaluation table is left out")
        return None
    if not isinstance(data, Mapping):
        warnings.add(f"{path} is not a JSON object; the evaluation table is left out")
        return None
    model_obj: Any = data
    if "tasks" not in data and isinstance(data.get("model"), Mapping):
        model_obj = data["model"]
    base_obj = data.get("baseline")
    model = _task_scores(
        model_obj if "tasks" in model_obj else {k: v for k, v in model_obj.items() if k != "baseline"}
    )
    baseline = _task_scores(base_obj) if isinstance(base_obj, Mapping) else {}
    if not model and not baseline:
        warnings.add(f"{path} holds no task scores in a known shape; the evaluation table is left out")
        return None
    tasks: dict[str, dict[str, Any]] = {}
    for name in [*model, *(n for n in baseline if n not in model)]:
        m, b = model.get(name, {}), baseline.get(name, {})
        ms, bs = m.get("score"), b.get("score")
        tasks[name] = {
            "type": m.get("type") or b.get("type"),
            "metric": m.get("metric") or b.get("metric"),
            "model": ms,
            "baseline": bs,
            "delta": ms - bs if ms is not None and bs is not None else None,
        }
    model_avg, base_avg = _averages(model_obj, model), _averages(base_obj, baseline) if baseline else {}
    averages = {
        cat: {
            "model": model_avg.get(cat),
            "baseline": base_avg.get(cat),
            "delta": (model_avg[cat] - base_avg[cat]) if cat in model_avg and cat in base_avg else None,
        }
        for cat in [*model_avg, *(c for c in base_avg if c not in model_avg)]
    }
    all_scores = [s for t in tasks.values() for s in (t["model"], t["baseline"]) if s is not None]
    return {
        "file": str(path.relative_to(run_dir)),
        "model": _label(model_obj, "model"),
        "baseline": _label(base_obj, "baseline") if baseline else None,
        "instructions": model_obj.get("instructions") if isinstance(model_obj, Mapping) else None,
        "scale": "0-1" if all(abs(s) <= 1.0 for s in all_scores) else "0-100",
        "tasks": tasks,
        "averages": averages,
    }


# --------------------------------------------------------------------------------------------
# plots


def _outside_work(run_dir: Path, path: Path) -> bool:
    return ".work" not in path.relative_to(run_dir).parts


def find_plots(run_dir: Path) -> list[Path]:
    """PNG plots of the run: scale-study plots anywhere (``scale_plot.png``, ``scaling*.png``) and
    any PNG of the evaluate stage; never from unfinished work folders."""
    found = set(run_dir.glob("**/scal*.png")) | set((run_dir / "evaluate").glob("*.png"))
    return sorted((p for p in found if _outside_work(run_dir, p)), key=str)


def collect_scale(run_dir: Path, warnings: _Warnings) -> dict[str, Any] | None:
    """Points and log-linear fit of a scale study (``scale_study.json`` of
    :func:`speed.scale.scale_study`), when the run holds one."""
    paths = sorted(p for p in run_dir.glob("**/scale_study.json") if _outside_work(run_dir, p))
    if not paths:
        return None
    path = paths[0]
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        warnings.add(f"{path} is unreadable ({err}); the scale study is left out")
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("points"), list):
        warnings.add(f"{path} holds no 'points' list; the scale study is left out")
        return None
    points = [
        {"n": int(p["n"]), "average": float(p["average"])}
        for p in data["points"]
        if isinstance(p, Mapping) and _num(p.get("n")) is not None and _num(p.get("average")) is not None
    ]
    fit: Mapping[str, Any] = data["fit"] if isinstance(data.get("fit"), Mapping) else {}
    return {
        "file": str(path.relative_to(run_dir)),
        "tasks": list(data.get("tasks") or []),
        "points": sorted(points, key=lambda p: p["n"]),
        "fit": {k: _num(fit.get(k)) for k in ("a", "b", "r2")},
        "baseline_average": _num(data.get("baseline_average")),
    }


def _interval(obj: Any) -> dict[str, float | None]:
    src = obj if isinstance(obj, Mapping) else {}
    return {k: _num(src.get(k)) for k in ("mean", "low", "high", "half_width")}


def collect_study(run_dir: Path, warnings: _Warnings) -> dict[str, Any] | None:
    """The ablation table of ``speed study`` (``RUN/study/table.json``), when the run holds one:
    per embedder and source the average with its interval and the task means, the untrained
    model's average, the paired differences, and per source its teacher calls per example."""
    path = run_dir / "study" / "table.json"
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        embedders = {}
        for name, block in data["embedders"].items():
            scores: dict[str, dict[str, Any]] = {
                source: {
                    "average": _interval(entry.get("average")),
                    "tasks": {t: _num(i.get("mean")) for t, i in entry.get("tasks", {}).items()},
                    "seeds": len(entry.get("seeds", {})),
                }
                for source, entry in block["scores"].items()
            }
            untrained = block.get("untrained") or {}
            embedders[name] = {
                "scores": scores,
                "tasks": sorted({t for e in scores.values() for t in e["tasks"]}),
                "untrained_average": _num(untrained.get("average")),
                "pairs": [
                    {
                        "a": p["a"],
                        "b": p["b"],
                        **_interval(p.get("average")),
                        "beyond_noise": p.get("average", {}).get("beyond_noise"),
                    }
                    for p in block.get("pairs", [])
                ],
            }
        sources = {
            source: {
                "examples": f.get("examples"),
                "kept_rate": _num(f.get("kept_rate")),
                "teacher_calls_per_example": _num(f.get("teacher_calls", {}).get("per_example")),
            }
            for source, f in data.get("sources", {}).items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.add(f"{path} is unreadable or of another shape ({err}); the study is left out")
        return None
    cond = data.get("conditions", {})
    plot = run_dir / "study" / "study_plot.png"
    return {
        "file": str(path.relative_to(run_dir)),
        "examples_per_source": cond.get("examples_per_source"),
        "seeds": cond.get("seeds"),
        "tasks": cond.get("tasks"),
        "embedders": embedders,
        "sources": sources,
        "plot": str(plot.relative_to(run_dir)) if plot.is_file() else None,
    }


# --------------------------------------------------------------------------------------------


def collect_summary(
    run_dir: Path, sample_per_kind: int = 40, judge_samples: int = 40
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """All figures of a run (the content of ``summary.json``), the example sample and the verdicts.

    Args:
        run_dir: the run directory.
        sample_per_kind: synthesized examples kept per task kind for browsing.
        judge_samples: judge verdicts kept for browsing.

    Returns:
        ``(summary, example_sample, judge_sample)``.
    """
    from speed import __version__

    warnings = _Warnings()
    stages = collect_stages(run_dir, warnings)
    costs = collect_costs(run_dir, warnings)
    examples, sample = collect_examples(run_dir, stages, sample_per_kind, warnings)
    judge_count, verdicts = collect_judgements(run_dir, judge_samples, warnings)
    evaluation = collect_eval(run_dir, warnings)
    plots = find_plots(run_dir)
    scale = collect_scale(run_dir, warnings)
    labels = collect_labels(stages)
    study = collect_study(run_dir, warnings)
    done = [s for s in stages if s["state"] == "done"]
    summary = {
        "summary_version": SUMMARY_VERSION,
        "speed_version": __version__,
        "run_dir": str(run_dir),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": bool(stages) and len(done) == len(stages),
        "stages": stages,
        "total_duration_s": sum(s["duration_s"] or 0.0 for s in stages),
        "costs": costs,
        "examples": examples,
        "judge": {"verdicts": judge_count},
        "eval": evaluation,
        "scale": scale,
        "determinism": collect_determinism(run_dir, warnings),
        "labels": labels,
        "study": study,
        "plots": [str(p.relative_to(run_dir)) for p in plots],
        "warnings": list(warnings),
    }
    return summary, sample, verdicts
