"""The dataset card of an export, and the "too easy" figure: how much a query shares with its positive.

Every export (:func:`speed.export.export_run`) writes a card in the form of a Hugging Face dataset
``README.md``: a YAML header (size category, task categories, language, a licence field the user
fills), then what the data is made of, taken from the run folder rather than retold by hand: size
and examples per kind, the corpus it was grounded on, the generators and the stage keys of the
weights they ran with, teacher calls and tokens (:func:`speed.ledger.cost_summary`), each filter
with its drop count, the decontamination targets.

Design choices:
- The run's ``config.yaml`` is read as plain YAML, not validated: the card describes whatever run it
  is given, also one written by another version of speed, or with a section (``corpus``) this
  version does not know.
- The licence is never guessed: it depends on the teacher's terms of use and on the corpus. The
  header says ``other`` with a comment, and the body says what to check.
- "Too easy": a query that repeats its positive's words teaches an embedder little (Promptagator,
  InPars filter such pairs). The figure is the Jaccard overlap of the lower-cased word sets of the
  bare query (``query_text``, without the instruction) and the positive, per kind: the mean, and
  the share of rows above :data:`EASY_OVERLAP`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from speed.io import read_json

#: rows whose query and positive share more than this Jaccard overlap of words count as "too easy"
EASY_OVERLAP = 0.5

#: Hugging Face task categories of each kind of example
TASK_CATEGORIES = {
    "retrieval": "text-retrieval",
    "classification": "text-classification",
    "sts": "sentence-similarity",
    "matching_short": "sentence-similarity",
    "matching_long": "sentence-similarity",
    "bitext": "translation",
}

#: ISO 639-1 codes of the languages a config names most often (the header wants codes)
LANGUAGE_CODES = {
    "english": "en",
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "italian": "it",
    "portuguese": "pt",
    "dutch": "nl",
    "chinese": "zh",
    "japanese": "ja",
    "korean": "ko",
    "russian": "ru",
    "arabic": "ar",
    "hindi": "hi",
}

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: Any) -> set[str]:
    """The lower-cased word set of a text."""
    return set(_WORD.findall(str(text or "").lower()))


def jaccard(a: set[str], b: set[str]) -> float:
    """Jaccard overlap of two word sets (0 when both are empty)."""
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def overlap_by_kind(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind: rows, mean query-positive word overlap, and the share above :data:`EASY_OVERLAP`."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        query = row.get("query_text") or row.get("query")
        score = jaccard(words(query), words(row.get("positive")))
        sums.setdefault(str(row.get("kind") or "unknown"), []).append(score)
    return {
        kind: {
            "rows": len(scores),
            "mean_jaccard": round(sum(scores) / len(scores), 4),
            "share_above": round(sum(s > EASY_OVERLAP for s in scores) / len(scores), 4),
            "threshold": EASY_OVERLAP,
        }
        for kind, scores in sorted(sums.items())
    }


def size_category(n: int) -> str:
    """The ``size_categories`` value of the Hugging Face hub for ``n`` rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def _manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / stage / "manifest.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A config section as a dict; one a plugin added may sit under ``extra``."""
    value = config.get(name)
    if value is None:
        value = (config.get("extra") or {}).get(name)
    return dict(value) if isinstance(value, Mapping) else {}


def card_facts(
    run_dir: str | os.PathLike[str], rows: list[dict[str, Any]], export_format: str
) -> dict[str, Any]:
    """Everything the card says, as data (the figures tests compare with the run)."""
    from speed.ledger import cost_summary

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    synth_cfg = _section(config, "synthesize")
    models = _section(config, "models")
    kinds: dict[str, int] = {}
    for row in rows:
        kind = str(row.get("kind") or "unknown")
        kinds[kind] = kinds.get(kind, 0) + 1
    trained = {"junior": "junior", "senior": "senior", "revisor": "revisor"}
    generators = []
    for role in ("teacher", "junior", "senior", "revisor"):
        found = models.get(role)
        spec: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        stage = trained.get(role)
        manifest = _manifest(run, stage) if stage else {}
        generators.append(
            {
                "role": role,
                "model": spec.get("model"),
                "backend": spec.get("backend"),
                "trained_in": stage if manifest else None,
                "stage_key": manifest.get("key"),
            }
        )
    stage_keys = {
        p.parent.name: _manifest(run, p.parent.name).get("key") for p in sorted(run.glob("*/manifest.json"))
    }
    costs: dict[str, Any] | None = None
    if (run / "ledger.sqlite").is_file():
        costs = cost_summary(run)
    filters = {}
    for stage, key in stage_keys.items():
        drops = (_manifest(run, stage).get("stats") or {}).get("drops")
        if isinstance(drops, Mapping) and key:
            filters[stage] = {str(k): int(v) for k, v in drops.items()}
    evaluate = _section(config, "evaluate")
    language = str(synth_cfg.get("language") or "English")
    corpus = _section(config, "corpus")
    if not corpus.get("paths"):  # the section is always written; no paths: SPEED's ungrounded run
        corpus = {}
    return {
        "rows": len(rows),
        "examples": len({r.get("id") for r in rows}) if all("id" in r for r in rows) else len(rows),
        "by_kind": dict(sorted(kinds.items())),
        "format": export_format,
        "language": language,
        "language_code": LANGUAGE_CODES.get(language.lower()),
        "corpus": corpus or None,
        "generators": generators,
        "stage_keys": stage_keys,
        "teacher": costs,
        "filters": filters,
        "decontamination": {
            "enabled": bool(synth_cfg.get("decontaminate", True)),
            "ngram": synth_cfg.get("decontam_ngram"),
            "targets": list(evaluate.get("tasks") or []),
        },
        "negative_removed": dict(
            (_manifest(run, "synthesize").get("stats") or {}).get("negative_removed") or {}
        ),
        "too_easy": overlap_by_kind(rows),
        "run": str(run),
        "seed": _section(config, "run").get("seed"),
    }


def render_card(facts: Mapping[str, Any]) -> str:
    """The card: YAML header, then the body in Markdown."""
    cats = sorted({TASK_CATEGORIES.get(k, "sentence-similarity") for k in facts["by_kind"]})
    header: dict[str, Any] = {}
    if facts["language_code"]:
        header["language"] = [facts["language_code"]]
    header["size_categories"] = [size_category(facts["rows"])]
    header["task_categories"] = cats
    header["tags"] = ["synthetic", "embeddings", "speed", "SPEED-2410.18634"]
    header["pretty_name"] = f"speed synthetic embedding data ({Path(facts['run']).name})"
    lines = [
        "---",
        "# licence: set it before you publish. 'other' until you do: the teacher's terms of use and",
        "# the corpus' licence may bind generated data (see the Licence section)",
        "license: other",
        yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {header['pretty_name']}",
        "",
        "Synthetic training data for text embedders, generated by [speed](https://arxiv.org/abs/2410.18634)"
        " (SPEED: small generators aligned by a teacher LLM), exported as "
        f"`{facts['format']}` from the run `{facts['run']}`.",
        "",
        "## Size",
        "",
        f"{facts['rows']} training rows from {facts['examples']} generated examples"
        f"{'' if not facts['language'] else ', in ' + facts['language']}.",
        "",
        f"| kind | rows | mean query-positive word overlap | share above {EASY_OVERLAP} (too easy) |",
        "|---|---:|---:|---:|",
    ]
    for kind, n in facts["by_kind"].items():
        easy = facts["too_easy"].get(kind, {})
        lines.append(
            f"| {kind} | {n} | {easy.get('mean_jaccard', 0):.3f} | {easy.get('share_above', 0):.1%} |"
        )
    lines += ["", "## Corpus", ""]
    corpus = facts["corpus"]
    if corpus:
        lines.append("Generation was grounded on this corpus (the run's `corpus` section):")
        lines.append("")
        lines += [f"- `{k}`: {v}" for k, v in corpus.items()]
    else:
        lines.append("None: ungrounded generation from brainstormed tasks (SPEED's default).")
    lines += ["", "## Generators", "", "| role | model | backend | weights trained in stage (key) |"]
    lines.append("|---|---|---|---|")
    for g in facts["generators"]:
        trained = f"{g['trained_in']} (`{g['stage_key']}`)" if g["trained_in"] else "-"
        lines.append(
            f"| {g['role']} | {g['model'] or '(trained in the run)'} | {g['backend'] or ''} | {trained} |"
        )
    keys = ", ".join(f"{s} `{k}`" for s, k in facts["stage_keys"].items())
    lines += ["", f"Stage keys of the run: {keys or 'none'}. Run seed: {facts['seed']}."]
    lines += ["", "## Teacher calls and tokens", ""]
    teacher = facts["teacher"]
    if teacher:
        lines += ["| stage | calls | tokens in | tokens out |", "|---|---:|---:|---:|"]
        for stage, t in teacher["teacher_by_stage"].items():
            lines.append(f"| {stage} | {t['calls']} | {t['tokens_in']} | {t['tokens_out']} |")
        t = teacher["teacher_total"]
        lines.append(f"| total | {t['calls']} | {t['tokens_in']} | {t['tokens_out']} |")
    else:
        lines.append("No call ledger in the run folder.")
    lines += ["", "## Filters", ""]
    if facts["filters"]:
        lines += ["| stage | filter (drop reason) | dropped |", "|---|---|---:|"]
        for stage, drops in facts["filters"].items():
            for reason, n in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"| {stage} | {reason} | {n} |")
    else:
        lines.append("No drops recorded.")
    removed = facts.get("negative_removed") or {}
    if removed:
        why = ", ".join(
            f"{reason} {n}" for reason, n in sorted(removed.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        lines += [
            "",
            f"Kept without their hard negative, which alone failed a filter: {sum(removed.values())} "
            f"examples ({why}); they train as (query, positive) pairs, with in-batch and any mined "
            "negatives (`synthesize.keep_without_negative`).",
        ]
    decon = facts["decontamination"]
    lines += ["", "## Decontamination", ""]
    if decon["enabled"] and decon["targets"]:
        lines.append(
            f"Examples sharing a {decon['ngram'] or 13}-word n-gram with the evaluation data of "
            f"{', '.join(decon['targets'])} were dropped (drop reason `contaminated`, above)."
        )
    else:
        lines.append("Off: the data was not checked against any evaluation set.")
    lines += [
        "",
        "## Licence",
        "",
        "Not set (`license: other` above). Before publishing, check the teacher's terms of use for "
        "generated output, the licences of the generator models, and the corpus' licence, then set "
        "`license` in the header.",
        "",
    ]
    return "\n".join(lines)


def write_card(
    path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    rows: list[dict[str, Any]],
    export_format: str,
) -> dict[str, Any]:
    """Write the card of ``rows`` exported from ``run_dir`` to ``path``; return its facts."""
    facts = card_facts(run_dir, rows, export_format)
    Path(path).write_text(render_card(facts), encoding="utf-8")
    return facts
