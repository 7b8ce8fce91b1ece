"""Readers of the local evaluation folders (the layouts of ``shared/eval``) into what MTEB tasks hold.

Each reader returns exactly the structure that the official task's ``load_data`` would have put in
``task.dataset`` before ``dataset_transform``, so that the official transform, evaluator, splits and
main score run unchanged:

- ``sts``: ``DatasetDict`` of splits with ``sentence1, sentence2, score`` (from ``{split}.jsonl``).
- ``classification``: ``DatasetDict`` of splits with ``text, label`` (from ``{split}.jsonl``).
- ``clustering``: ``{hf_subset: DatasetDict}`` of splits with the raw columns (``text, category``);
  the task's own transform (SIB200 merges its three splits) runs afterwards.
- ``retrieval`` and ``reranking`` (BEIR layout): ``{"default": {split: RetrievalSplitData}}`` with
  ``corpus (id, title, text)``, ``queries (id, text)`` keeping only the queries judged in
  ``qrels/{split}.tsv`` (as MTEB's own loader does; NFCorpus' file holds every split), ``relevant_docs``
  and, for reranking, ``top_ranked`` from ``top_ranked.jsonl``.

Row order is kept as in the files: MTEB's classification undersampling depends on it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from speed.io import iter_jsonl

logger = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """A local evaluation folder is missing a file or holds a malformed one."""


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSON Lines file, naming the file and line of a bad one."""
    return iter_jsonl(path, error=EvalDataError)


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise EvalDataError(
            f"evaluation folder '{folder}' has no '{name}'; it must follow the layout of shared/eval "
            "(see shared/eval/README.md)"
        )
    return path


def _columns(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for i, row in enumerate(read_jsonl(path), 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise EvalDataError(f"{path}: row {i} lacks field(s) {missing}; expected {list(columns)}")
        for c in columns:
            out[c].append(row[c])
    return out


def _split_files(folder: Path, splits: Sequence[str]) -> dict[str, Path]:
    files = {s: folder / f"{s}.jsonl" for s in splits if (folder / f"{s}.jsonl").is_file()}
    if not files:
        raise EvalDataError(
            f"evaluation folder '{folder}' has none of {[f'{s}.jsonl' for s in splits]}; "
            "it must follow the layout of shared/eval"
        )
    return files


def load_pairs(folder: Path, splits: Sequence[str], columns: Sequence[str]) -> Any:
    """A ``DatasetDict`` of the splits found among ``splits``, with the given columns."""
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        {
            split: Dataset.from_dict(_columns(path, columns))
            for split, path in _split_files(folder, splits).items()
        }
    )


def load_sts(folder: Path, splits: Sequence[str]) -> Any:
    """STS layout: ``{split}.jsonl`` with ``sentence1, sentence2, score`` (0-5)."""
    return load_pairs(folder, splits, ("sentence1", "sentence2", "score"))


def load_classification(folder: Path, splits: Sequence[str]) -> Any:
    """Classification layout: ``{split}.jsonl`` with ``text, label``."""
    return load_pairs(folder, splits, ("text", "label"))


def load_clustering(folder: Path, splits: Sequence[str], hf_subsets: Sequence[str]) -> Any:
    """Clustering layout: ``{split}.jsonl`` with ``text, category``, under each HF subset name."""
    data = load_pairs(folder, splits, ("text", "category"))
    return {subset: data for subset in hf_subsets}


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise EvalDataError(f"{path}: the first line must be the header 'query-id\\tcorpus-id\\tscore'")
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 3:
                raise EvalDataError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(row)}")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise EvalDataError(f"{path}:{lineno}: score '{row[2]}' is not a number") from None
            qrels.setdefault(str(row[0]), {})[str(row[1])] = score
    return qrels


def load_beir(folder: Path, splits: Sequence[str], *, top_ranked: bool = False) -> dict[str, dict[str, Any]]:
    """BEIR layout (plus ``top_ranked.jsonl`` for reranking) as ``{"default": {split: RetrievalSplitData}}``."""
    from datasets import Dataset

    corpus_rows = list(read_jsonl(_require(folder, "corpus.jsonl")))
    corpus = Dataset.from_dict(
        {
            "id": [str(r["_id"]) for r in corpus_rows],
            "title": [r.get("title") or "" for r in corpus_rows],
            "text": [r.get("text") or "" for r in corpus_rows],
        }
    )
    query_rows = list(read_jsonl(_require(folder, "queries.jsonl")))
    ranked: dict[str, list[str]] | None = None
    if top_ranked:
        ranked = {
            str(r["query-id"]): [str(c) for c in r["corpus-ids"]]
            for r in read_jsonl(_require(folder, "top_ranked.jsonl"))
        }
    out: dict[str, Any] = {}
    for split in splits:
        qrels = _read_qrels(_require(folder, f"qrels/{split}.tsv"))
        # like MTEB's RetrievalDatasetLoader: keep the queries judged in this split, in file order
        kept = [r for r in query_rows if str(r["_id"]) in qrels]
        queries = Dataset.from_dict({"id": [str(r["_id"]) for r in kept], "text": [r["text"] for r in kept]})
        missing = len(qrels) - len(kept)
        if missing:
            logger.warning(
                "%s: %d judged queries of split %s are not in queries.jsonl", folder, missing, split
            )
        split_data: dict[str, Any] = {
            "corpus": corpus,
            "queries": queries,
            "relevant_docs": qrels,
            "top_ranked": None,
        }
        if ranked is not None:
            split_data["top_ranked"] = {q: ranked[q] for q in queries["id"] if q in ranked}
        out[split] = split_data
        logger.info(
            "%s [%s]: %d documents, %d queries, %d judgements",
            folder.name,
            split,
            len(corpus),
            len(queries),
            sum(len(v) for v in qrels.values()),
        )
    return {"default": out}
