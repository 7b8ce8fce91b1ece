"""``speed study CONFIG``: does the pipeline's data train better embedders, at what teacher cost?

One call does it all, resumably, under the run folder's lock:

1. the pipeline's stages that the chosen sources need (up to the revisor at most) and one
   synthesis per source into ``RUN/study/SOURCE`` (:mod:`speed.study.sources`), through the run's
   runner: finished stages are skipped, teacher calls are replayed from the ledger;
2. equal-size training sets (:func:`speed.study.sources.training_sets`);
3. for every seed, embedder and source: train (:func:`speed.training.contrastive.train_embedder`),
   evaluate on ``study.tasks`` with MTEB's own tasks (:func:`speed.evaluation.evaluate_model`), keep
   the scores in ``RUN/study/evals/EMBEDDER/SOURCE/seedN.json`` and delete the model. A result whose
   fingerprint (the source's key, the set size, the embedder's model and config, the seed, the
   tasks) still matches is read back instead of retrained, so a stopped study resumes where it was
   and a seed added later costs only that seed;
4. ``RUN/study/table.json``, ``table.md`` and ``study_plot.png`` (:mod:`speed.study.table`).

Design choices:
- Seeds are the outer loop: a study stopped early still holds whole tables for its first seeds.
- Each embedder is also scored once before training (``untrained``), built the way training builds
  it (pooling, EOS; LoRA adds nothing before a step), so a decoder LLM's untrained row is the
  same architecture as its trained rows.
- Teacher calls per final example count, for each source, the calls of the stages its writer
  needed (seed, judge, revisions) plus its own generation calls, over the examples it kept.
  Brainstorming is shared by every source and left out, as in the paper's figures.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speed import __version__
from speed.config import STUDY_PAIRS, EmbedConfig, HFSpec, SpeedConfig
from speed.io import DamagedFileError, atomic_write, read_json, write_json
from speed.stage import StageError
from speed.study.sources import STUDY_DIR, StudyRunner, fingerprint, shared_prompts, training_sets
from speed.study.table import build_table, markdown_table, plot_table, scores_of

logger = logging.getLogger(__name__)

__all__ = ["StudyEmbedderSpec", "check_study", "resolve_embedders", "run_study"]


@dataclass(frozen=True)
class StudyEmbedderSpec:
    """An embedder of the study, resolved: its label, model, training config and evaluation mode."""

    name: str
    model: str
    embed: EmbedConfig
    instructions: bool


def resolve_embedders(cfg: SpeedConfig) -> list[StudyEmbedderSpec]:
    """``study.embedders`` with their ``embed`` overrides applied; by default ``models.embedder``
    with the ``embed`` section and ``evaluate.instructions``.

    Raises:
        ConfigError: no embedder model is named.
    """
    from speed.config import ConfigError

    if not cfg.study.embedders:
        if not cfg.models.embedder.model:
            raise ConfigError(
                "study.embedders is empty and models.embedder.model is not set; name an embedder, e.g. "
                "study.embedders: [{name: minilm, model: sentence-transformers/all-MiniLM-L6-v2}]"
            )
        return [
            StudyEmbedderSpec("embedder", cfg.models.embedder.model, cfg.embed, cfg.evaluate.instructions)
        ]
    out = []
    for e in cfg.study.embedders:
        embed = EmbedConfig.model_validate({**cfg.embed.model_dump(), **e.embed})
        instructions = embed.use_instructions if e.instructions is None else e.instructions
        out.append(StudyEmbedderSpec(e.name, e.model, embed, instructions))
    return out


def check_study(cfg: SpeedConfig) -> None:
    """What the training and evaluation need, checked before any stage runs.

    Raises:
        PreflightError: the evaluation data, a task or an embedder's model is missing.
    """
    from speed.preflight import PreflightError, check_eval, check_model

    probe = cfg.model_copy(deep=True)
    probe.evaluate.tasks = list(cfg.study.tasks)
    checks = [c for c in check_eval(probe) if c.required and not c.ok]
    for e in resolve_embedders(cfg):
        check = check_model("embedder", HFSpec(model=e.model))
        if check is not None and not check.ok:
            check.name = f"study.embedders[{e.name}].model"
            checks.append(check)
    if checks:
        lines = [f"  {c.name}: {c.detail}" + (f"\n    fix: {c.fix}" if c.fix else "") for c in checks]
        raise PreflightError(
            f"{len(checks)} check(s) failed before the study started; nothing was run or written:\n"
            + "\n".join(lines)
        )


def run_study(cfg: SpeedConfig, *, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the study of ``cfg`` in its run folder (resuming); return ``table.json``'s content.

    Args:
        cfg: the run's config with its ``study`` section.
        on_start: called once the run's lock is held (the CLI starts the log file there).

    Raises:
        ConfigError: a bad study section, or a failed preflight (PreflightError).
        RunLockedError: another process writes the run folder.
        StageError: a source kept no example.
    """
    runner = StudyRunner(cfg)
    check_study(cfg)
    out: dict[str, Any] = {}

    def train_and_evaluate() -> None:
        out.update(_train_and_evaluate(cfg, runner))

    runner.run(until=runner.source_targets(), on_start=on_start, then=train_and_evaluate)
    return out


# --------------------------------------------------------------------------------------------


def _teacher_calls(manifest: Mapping[str, Any] | None) -> int:
    if not manifest:
        return 0
    return int(manifest.get("calls", {}).get("teacher", {}).get("calls", 0))


def _source_figures(
    runner: StudyRunner, source: str, stage: str, info: Mapping[str, Any], size: int
) -> dict[str, Any]:
    from speed.card import jaccard, words

    run_dir = runner.run_dir
    manifest = read_json(run_dir / stage / "manifest.json")
    stats = manifest.get("stats", {})
    alignment = {
        up: _teacher_calls(read_json(run_dir / up / "manifest.json"))
        for up in runner.closure(stage)
        if up not in (stage, "brainstorm")
    }
    generation = _teacher_calls(manifest)
    total = sum(alignment.values()) + generation
    overlaps = [
        jaccard(words(str(r.get("query_text") or r.get("query") or "")), words(str(r.get("positive") or "")))
        for r in info.get("_rows", [])
    ]
    generated = stats.get("generated") or 0
    return {
        "stage_key": manifest.get("key"),
        "generated": generated,
        "kept": stats.get("count"),
        "kept_rate": (stats.get("count", 0) / generated) if generated else None,
        "revised": stats.get("revisions", {}).get("used"),
        "drops": stats.get("drops", {}),
        "examples": info["examples"],
        "rows": info["rows"],
        "per_kind": info["per_kind"],
        "query_positive_overlap": (sum(overlaps) / len(overlaps)) if overlaps else None,
        "teacher_calls": {
            "alignment": sum(alignment.values()),
            "alignment_by_stage": alignment,
            "generation": generation,
            "total": total,
            # over the source's final examples: all it kept, not only the ones the equal cut used
            "per_example": (total / stats["count"]) if stats.get("count") else None,
        },
    }


def _read_result(path: Path, fp: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except DamagedFileError:
        return None
    return dict(saved) if isinstance(saved, dict) and saved.get("fingerprint") == fp else None


def _untrained(
    emb: StudyEmbedderSpec, tasks: list[str], cfg: SpeedConfig, folder: Path, threads: int, precision: str
) -> dict[str, Any]:
    """The embedder's scores before training (built as training builds it), cached by fingerprint."""
    from speed.evaluation import evaluate_model
    from speed.training.contrastive import build_model

    fp = fingerprint(
        {"model": emb.model, "embed": emb.embed.model_dump(mode="json"), "tasks": tasks,
         "instructions": emb.instructions, "precision": precision, "version": __version__}
    )  # fmt: skip
    path = folder / "untrained.json"
    saved = _read_result(path, fp)
    if saved is not None:
        return dict(saved["scores"])
    st, _ = build_model(emb.model, emb.embed.model_copy(update={"lora_r": None}))
    if precision == "bf16":  # as the trained models are evaluated (evaluate_model loads them so)
        import torch

        st.to(torch.bfloat16)
    result = evaluate_model(
        st,
        tasks,
        data_dir=cfg.evaluate.data_dir,
        instructions=emb.instructions,
        batch_size=cfg.evaluate.batch_size,
        model_name=f"{emb.name} (untrained)",
        threads=threads,
    )
    scores = scores_of(result)
    write_json(path, {"fingerprint": fp, "scores": scores, "result": result})
    return scores


def _train_and_evaluate(cfg: SpeedConfig, runner: StudyRunner) -> dict[str, Any]:
    from speed.evaluation import evaluate_model, resolve_task_names
    from speed.precision import resolve_precision
    from speed.training.contrastive import train_embedder

    study = cfg.study
    run_dir = runner.run_dir
    root = run_dir / STUDY_DIR
    started = time.time()
    stages = {cls.source: cls.name for cls in runner.source_stages}  # type: ignore[attr-defined]
    size, rows, info = training_sets({s: run_dir / name for s, name in stages.items()}, study.num_examples)
    if size == 0:
        empty = [s for s, i in info.items() if i["kept"] == 0]
        raise StageError(f"speed study: source(s) {empty} kept no example; see RUN/study/SOURCE/shards")
    if size < study.num_examples:
        short = {s: i["kept"] for s, i in info.items() if i["kept"] < study.num_examples}
        logger.warning(
            "study: every source is cut to %d examples, as %s kept fewer than study.num_examples=%d; "
            "raise study.oversample to reach it",
            size,
            short,
            study.num_examples,
        )
    for s in info:
        info[s]["_rows"] = rows[s]
    sources = {s: _source_figures(runner, s, stages[s], info[s], size) for s in stages}
    for s in info:
        del info[s]["_rows"]
    tasks = resolve_task_names(study.tasks)
    threads = cfg.models.embedder.threads or cfg.run.threads
    precision = resolve_precision(cfg.evaluate.precision)
    embedders = resolve_embedders(cfg)
    device = None if cfg.models.embedder.device == "auto" else cfg.models.embedder.device

    untrained = {
        e.name: _untrained(e, tasks, cfg, root / "evals" / e.name, threads, precision) for e in embedders
    }
    per_seed: dict[str, dict[str, dict[int, dict[str, Any]]]] = {
        e.name: {s: {} for s in stages} for e in embedders
    }
    training: dict[str, dict[str, dict[str, Any]]] = {e.name: {s: {} for s in stages} for e in embedders}
    total = len(study.seeds) * len(embedders) * len(stages)
    table: dict[str, Any] = {}
    done = 0

    def write_table(seeds_done: list[int]) -> dict[str, Any]:
        """Build the table of the seeds done and write table.json, table.md and the plot."""
        pairs: list[tuple[str, str]] = [(a, b) for a, b in study.pairs] if study.pairs is not None else [
            (a, b) for a, b in STUDY_PAIRS if a in stages and b in stages
        ]  # fmt: skip
        conditions = {
            "examples_per_source": size,
            "num_examples_asked": study.num_examples,
            "prompts_planned": max(s["generated"] or 0 for s in sources.values()),
            "prompts_shared_by_all_sources": len(shared_prompts(info)),
            "seeds": list(seeds_done),
            "tasks": tasks,
            "embedders": {
                e.name: {
                    "model": e.model,
                    "instructions": e.instructions,
                    "lora_r": e.embed.lora_r,
                    "pooling": e.embed.pooling,
                    "batch_size": e.embed.batch_size,
                    "learning_rate": e.embed.learning_rate,
                    "epochs": e.embed.epochs,
                    "max_steps": e.embed.max_steps,
                }
                for e in embedders
            },
            "writers": {
                "teacher": cfg.models.teacher.model,
                "generator base": cfg.models.junior.model,
                "revisor base": cfg.models.revisor.model,
            },
            "run_seed": cfg.run.seed,
            "threads": threads,
            "precision": precision,
            "speed_version": __version__,
            "train_and_eval_seconds": round(time.time() - started, 1),
        }
        table = build_table(per_seed, sources, pairs, untrained, conditions)
        for emb_name, block in table["embedders"].items():
            for source, entry in block["scores"].items():
                entry["training"] = training[emb_name][source]
        write_json(root / "table.json", table)
        with atomic_write(root / "table.md") as fh:
            fh.write(markdown_table(table))
        plot = plot_table(table, root / "study_plot.png")
        table["paths"] = {
            "json": str(root / "table.json"),
            "markdown": str(root / "table.md"),
            "plot": str(plot) if plot else None,
        }
        return table

    for seed in study.seeds:
        for emb in embedders:
            for source in stages:
                done += 1
                fp = fingerprint(
                    {
                        "source_key": sources[source]["stage_key"],
                        "size": size,
                        "examples": fingerprint(info[source]["prompts"]),
                        "model": emb.model,
                        "embed": emb.embed.model_dump(mode="json"),
                        "instructions": emb.instructions,
                        "seed": seed,
                        "tasks": tasks,
                        "precision": precision,
                    }
                )
                path = root / "evals" / emb.name / source / f"seed{seed}.json"
                saved = _read_result(path, fp)
                if saved is None:
                    logger.info(
                        "study %d/%d: %s on %s, seed %d: training", done, total, emb.name, source, seed
                    )
                    model_dir = root / "models" / emb.name / source / f"seed{seed}"
                    trained = train_embedder(
                        rows[source],
                        emb.model,
                        model_dir,
                        emb.embed,
                        seed=seed,
                        threads=threads,
                        device=device,
                    )
                    result = evaluate_model(
                        str(model_dir),
                        tasks,
                        data_dir=cfg.evaluate.data_dir,
                        instructions=emb.instructions,
                        batch_size=cfg.evaluate.batch_size,
                        model_name=f"{emb.name}/{source}/seed{seed}",
                        device=device,
                        threads=threads,
                        precision=precision,
                    )
                    saved = {
                        "fingerprint": fp,
                        "source": source,
                        "embedder": emb.name,
                        "seed": seed,
                        "training": {
                            "steps": trained.steps,
                            "rows": trained.rows,
                            "first_loss": trained.first_loss,
                            "last_loss": trained.last_loss,
                            "train_seconds": trained.train_seconds,
                        },
                        "scores": scores_of(result),
                        "result": result,
                    }
                    write_json(path, saved)
                    if not study.keep_models:
                        shutil.rmtree(model_dir, ignore_errors=True)
                else:
                    logger.info(
                        "study %d/%d: %s on %s, seed %d: scored before", done, total, emb.name, source, seed
                    )
                per_seed[emb.name][source][seed] = saved["scores"]
                training[emb.name][source][str(seed)] = saved["training"]
        # after every seed: a study stopped later still leaves the table of the seeds it finished
        table = write_table(seeds_done=study.seeds[: study.seeds.index(seed) + 1])
    if not study.keep_models:  # the empty folders of the deleted models
        shutil.rmtree(root / "models", ignore_errors=True)
    logger.info("study: table in %s", root / "table.md")
    return table


def load_table(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/study/table.json``, or None when the run holds no study."""
    path = Path(run_dir) / STUDY_DIR / "table.json"
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text(encoding="utf-8")))
