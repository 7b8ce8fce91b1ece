"""Exports of a run's synthetic data in the formats other trainers read.

``speed export RUN --format FORMAT OUT`` calls :func:`export_run`. The source is the synthesize
stage's output (sharded Parquet, one row per training row with its provenance); each format is
written so that its consumer's own loader reads it unchanged:

- ``hf``: a Hugging Face ``datasets.Dataset`` with every column (training rows and provenance:
  kind, task, attributes, raw and revised outputs), saved with ``save_to_disk``; load it with
  ``datasets.load_from_disk(OUT)``.
- ``sentence-transformers``: a ``datasets.DatasetDict`` saved with ``save_to_disk`` whose datasets
  hold exactly the columns sentence-transformers' losses take, in order: ``triplets`` (``anchor``,
  ``positive``, ``negative``) for examples with a hard negative and ``pairs`` (``anchor``,
  ``positive``) for those without (the matching kinds). ``anchor`` carries the E5 instruction
  (``Instruct: {task}\\nQuery: {query}``). Pass the loaded ``DatasetDict`` as ``train_dataset`` of a
  ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss(scale=50)``: it trains on both,
  each batch from one of them (a loss over a batch needs one column layout).
- ``flagembedding``: JSON lines ``{"query", "pos": [..], "neg": [..], "prompt"}``, FlagEmbedding's
  fine-tuning format; ``query`` is the bare query and ``prompt`` the task instruction, so train with
  ``--query_instruction_for_retrieval ''`` (any non-None value makes FlagEmbedding use each row's
  prompt) and ``--query_instruction_format 'Instruct: {}\\nQuery: {}'`` to get E5's query format.
  FlagEmbedding needs at least one negative per row; an example without a hard negative gets the
  positive of another example, drawn with a fixed seed (a random negative, as its ``hn_mine`` tool
  would give), and the count is logged.

Every format also gets a dataset card (:mod:`speed.card`): ``README.md`` inside the exported
folder (a flagembedding ``.jsonl`` file gets ``NAME.README.md`` beside it), a Hugging Face dataset
card whose YAML header the hub reads and whose body says what the data is made of.

Design choices: an export never overwrites an existing path unless asked; it is written to a
temporary sibling and renamed, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from speed.card import write_card
from speed.formats import parse_query
from speed.io import read_rows
from speed.suggest import did_you_mean

logger = logging.getLogger(__name__)

ExportFormat = Literal["hf", "sentence-transformers", "flagembedding"]
FORMATS: tuple[str, ...] = ("hf", "sentence-transformers", "flagembedding")

#: columns every synthesized training row has
REQUIRED = ("query", "positive")


class ExportError(ValueError):
    """An export that cannot be written; the message says why and what to do."""


def _datasets() -> Any:
    from speed.llm.registry import require

    return require("datasets", extra="train", what="exporting to the hf / sentence-transformers formats")


def load_synthesized(run_dir: str | os.PathLike[str], stage: str = "synthesize") -> list[dict[str, Any]]:
    """The training rows a finished synthesize stage wrote, in order.

    Raises:
        ExportError: the stage has not finished in ``run_dir`` or its rows lack required columns.
    """
    folder = Path(run_dir) / stage
    if not (folder / "manifest.json").exists():
        raise ExportError(
            f"no finished '{stage}' stage in {run_dir}; run `speed run CONFIG --until {stage}` first"
        )
    rows = read_rows(folder)
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED if not row.get(c)]
        if missing:
            raise ExportError(f"{folder}: row {i} has no {', '.join(missing)}; is it a synthesize output?")
    return rows


def _bare_query(row: dict[str, Any]) -> str:
    """The query without the instruction (``query_text``, or ``query`` with the E5 prefix cut)."""
    text = row.get("query_text")
    if text:
        return str(text)
    return parse_query(str(row["query"]))[1]


def to_sentence_transformers(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Columns per dataset: ``triplets`` (anchor, positive, negative) and ``pairs`` (anchor, positive).

    Empty datasets are left out.
    """
    triplets: dict[str, list[str]] = {"anchor": [], "positive": [], "negative": []}
    pairs: dict[str, list[str]] = {"anchor": [], "positive": []}
    for row in rows:
        target = triplets if row.get("negative") else pairs
        target["anchor"].append(str(row["query"]))
        target["positive"].append(str(row["positive"]))
        if target is triplets:
            triplets["negative"].append(str(row["negative"]))
    return {name: cols for name, cols in (("triplets", triplets), ("pairs", pairs)) if cols["anchor"]}


def to_flagembedding(rows: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """FlagEmbedding rows; an example without a hard negative gets another example's positive."""
    rng = random.Random(seed)
    out, filled = [], 0
    for i, row in enumerate(rows):
        neg = [str(row["negative"])] if row.get("negative") else []
        if not neg and len(rows) > 1:
            j = rng.randrange(len(rows) - 1)
            j += j >= i  # any row but this one
            neg = [str(rows[j]["positive"])]
            filled += 1
        out.append(
            {
                "query": _bare_query(row),
                "pos": [str(row["positive"])],
                "neg": neg,
                "prompt": str(row.get("instruction") or ""),
            }
        )
    if filled:
        logger.info(
            "flagembedding export: %d of %d rows got a random negative (no hard negative)", filled, len(out)
        )
    return out


def _prepare(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another path or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)


def export_run(
    run_dir: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    seed: int = 0,
    stage: str = "synthesize",
) -> Path:
    """Export a run's synthetic data.

    Args:
        run_dir: the run directory (holding a finished ``synthesize`` stage).
        fmt: ``hf``, ``sentence-transformers`` or ``flagembedding``.
        out: a folder for ``hf`` and ``sentence-transformers``; for ``flagembedding`` a ``.jsonl``
            file, or a folder that receives ``train.jsonl``.
        overwrite: replace ``out`` if it exists.
        seed: seed of the random negatives of the ``flagembedding`` format.
        stage: the stage whose rows are exported.

    Returns:
        The written path (the folder, or the JSONL file for ``flagembedding``).

    Raises:
        ExportError: unknown format, unfinished stage, or ``out`` exists without ``overwrite``.

    Example::

        from speed.export import export_run
        export_run("runs/quickstart", "sentence-transformers", "exports/st")
    """
    if fmt not in FORMATS:
        hint = did_you_mean(fmt, FORMATS)
        raise ExportError(f"unknown export format '{fmt}'.{hint} Formats: {', '.join(FORMATS)}")
    rows = load_synthesized(run_dir, stage)
    out = Path(out)
    if fmt == "flagembedding":
        target = out if out.suffix in (".jsonl", ".json") else out / "train.jsonl"
        if target.exists() and not overwrite:
            raise ExportError(
                f"{target} already exists; choose another path or pass overwrite=True (--overwrite)"
            )
        from speed.io import write_jsonl

        n = write_jsonl(target, to_flagembedding(rows, seed=seed))
        # a folder gets its README.md; a file the user named gets NAME.README.md beside it
        card = out / "README.md" if target.parent == out else target.with_suffix(".README.md")
        write_card(card, run_dir, rows, fmt)
        logger.info("exported %d rows to %s (flagembedding), card %s", n, target, card)
        return target

    datasets = _datasets()
    tmp = _prepare(out, overwrite)
    try:
        if fmt == "hf":
            data = datasets.Dataset.from_list([_flat(r) for r in rows])
            data.save_to_disk(str(tmp))
            count = len(data)
        else:
            parts = to_sentence_transformers(rows)
            dd = datasets.DatasetDict(
                {name: datasets.Dataset.from_dict(cols) for name, cols in parts.items()}
            )
            dd.save_to_disk(str(tmp))
            count = sum(len(d) for d in dd.values())
        write_card(tmp / "README.md", run_dir, rows, fmt)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %d rows to %s (%s)", count, out, fmt)
    return out


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Nested values (attributes, parsed example) as JSON text, so every row has one schema."""
    return {k: json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v for k, v in row.items()}
