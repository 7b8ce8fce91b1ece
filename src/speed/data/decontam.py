"""Decontamination: drop synthetic examples that share text with the evaluation tasks of the run.

An LLM that writes training data may reproduce benchmark text it saw in pre-training; training on it
would inflate the scores the report compares with the paper. An example is contaminated when one of
its fields shares a word n-gram (13 lowercase words by default, as in GPT-3's decontamination) with a
text of a configured evaluation task.

Design choices:
- Eval texts shorter than ``n`` words have no n-gram. They still count: such a text (at least
  ``min_words`` long) contaminates a field that contains it whole, and any of at least
  ``min_exact_words`` contaminates a field equal to it. Most STS and Banking77 sentences are 5-12
  words, so without this they would never be caught.
- Speed: n-grams are hashed (Python's tuple hash, within one process) into one set per task; an
  example's n-grams are built and looked up in C (``zip`` over shifted word lists, ``set.isdisjoint``
  stopping at the first hit). Short eval texts are indexed by the hash of their first ``min_words``
  words and confirmed word by word only on an anchor hit.
- Which texts: STS ``sentence1``/``sentence2``, classification and clustering ``text``, retrieval and
  reranking ``corpus`` titles and texts and ``queries``. Training splits (``train.jsonl``) of STS and
  classification are skipped (they are not what is scored); clustering reads every split (SIB200's
  official transform merges them).
- Task names are the MTEB names of ``evaluate.tasks`` (folders from ``speed.evaluation``'s registry,
  which this module sits above), or folders relative to the evaluation directory (``sts/STSBenchmark``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from speed.data.filters import DropCounter, words
from speed.evaluation.registry import TASKS
from speed.io import iter_jsonl
from speed.paths import eval_data_dir

logger = logging.getLogger(__name__)

CONTAMINATED = "contaminated"

T = TypeVar("T")

#: layouts of shared/eval: (files to read, fields of each record)
_LAYOUT_FIELDS = {
    "sts": ("sentence1", "sentence2"),
    "classification": ("text",),
    "clustering": ("text",),
    "retrieval": ("title", "text"),
    "reranking": ("title", "text"),
}


class DecontamError(ValueError):
    """An evaluation task or folder that cannot be read; the message names it and the fix."""


def find_eval_dir(eval_dir: str | os.PathLike[str] | None = None) -> Path:
    """The evaluation data folder: ``eval_dir``, else ``speed.paths.eval_data_dir`` (config, then
    ``$SPEED_EVAL_DIR``, then a ``shared/eval`` beside the checkout).

    Raises:
        FileNotFoundError: no such folder.
    """
    return eval_data_dir(eval_dir)


def _registered() -> dict[str, tuple[str, str]]:
    return {name: (spec.folder, spec.layout) for name, spec in TASKS.items()}


def resolve_eval_folders(tasks: Iterable[str], eval_dir: Path) -> dict[str, tuple[Path, str]]:
    """Map task names to ``(folder, layout)``.

    Raises:
        DecontamError: a task is neither registered nor a folder ``layout/name`` of ``eval_dir``.
    """
    registered = _registered()
    found: dict[str, tuple[Path, str]] = {}
    for task in tasks:
        if task in registered:
            folder, layout = registered[task]
            found[task] = (eval_dir / folder, layout)
            continue
        candidates = [eval_dir / task] if "/" in task else sorted(eval_dir.glob(f"*/{task}"))
        candidates = [c for c in candidates if c.is_dir() and c.parent.name in _LAYOUT_FIELDS]
        if not candidates:
            known = sorted(
                {*registered, *(f"{p.parent.name}/{p.name}" for p in eval_dir.glob("*/*") if p.is_dir())}
            )
            raise DecontamError(
                f"evaluation task '{task}' has no folder under {eval_dir}; use a registered task name or "
                f"a folder such as 'sts/STSBenchmark'. Known: {', '.join(known)}"
            )
        found[task] = (candidates[0], candidates[0].parent.name)
    return found


def eval_texts(folder: Path, layout: str, documents: bool = True) -> Iterator[str]:
    """The texts of one evaluation folder that synthetic data must not contain.

    ``documents``: False leaves out the corpus of a retrieval or reranking task (its queries stay):
    for a run grounded on that very corpus, where quoting a document is the point, not a leak.

    Raises:
        DecontamError: an unknown layout, or a folder with no file to read.
    """
    if layout not in _LAYOUT_FIELDS:
        raise DecontamError(
            f"unknown evaluation layout '{layout}' of {folder}; one of {list(_LAYOUT_FIELDS)}"
        )
    if layout in ("retrieval", "reranking"):
        files = [folder / "corpus.jsonl", folder / "queries.jsonl"][0 if documents else 1 :]
    else:
        files = sorted(folder.glob("*.jsonl"))
        if layout != "clustering":
            files = [f for f in files if f.stem != "train"]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DecontamError(f"evaluation folder {folder} has no JSONL file to read for decontamination")
    for path in files:
        for record in iter_jsonl(path, error=DecontamError):
            for field in _LAYOUT_FIELDS[layout]:
                value = record.get(field)
                if isinstance(value, str) and value.strip():
                    yield value


def _ngrams(tokens: Sequence[str], n: int) -> Iterator[int]:
    return map(hash, zip(*(tokens[i:] for i in range(n)), strict=False))


class Decontaminator:
    """An index of evaluation n-grams and a check of synthetic texts against it.

    Args:
        n: words per n-gram (``synthesize.decontam_ngram``, 13 by default).
        min_words: shorter eval texts are matched only as a whole field (see the module doc).
        min_exact_words: shorter eval texts are ignored.

    Example:
        >>> d = Decontaminator(n=5, min_words=4)
        >>> d.add("toy", ["the quick brown fox jumps over the lazy dog"])
        >>> d.check("I saw the quick brown fox jumps over a fence")
        'toy'
    """

    def __init__(self, n: int = 13, min_words: int = 8, min_exact_words: int = 3) -> None:
        if n < 1 or min_words < 1 or min_words > n:
            raise ValueError(f"need 1 <= min_words <= n, got n={n}, min_words={min_words}")
        self.n = n
        self.min_words = min_words
        self.min_exact_words = min_exact_words
        self._ngrams: dict[str, set[int]] = {}
        self._exact: dict[int, str] = {}
        self._anchors: dict[int, list[tuple[tuple[str, ...], str]]] = {}
        self.sizes: dict[str, int] = {}

    @classmethod
    def from_eval_dir(
        cls,
        tasks: Iterable[str],
        eval_dir: str | os.PathLike[str] | None = None,
        n: int = 13,
        documents: bool = True,
        **kwargs: Any,
    ) -> Decontaminator:
        """Index the texts of the evaluation ``tasks`` found in ``eval_dir`` (see :func:`find_eval_dir`);
        ``documents``: as in :func:`eval_texts`."""
        root = find_eval_dir(eval_dir)
        index = cls(n=n, **kwargs)
        for task, (folder, layout) in resolve_eval_folders(tasks, root).items():
            index.add(task, eval_texts(folder, layout, documents))
        return index

    def add(self, task: str, texts: Iterable[str]) -> None:
        """Index the texts of one evaluation task."""
        grams = self._ngrams.setdefault(task, set())
        count = 0
        for text in texts:
            count += 1
            tokens = words(text)
            if len(tokens) >= self.n:
                grams.update(_ngrams(tokens, self.n))
                continue
            if len(tokens) >= self.min_exact_words:
                self._exact.setdefault(hash(tuple(tokens)), task)
            if len(tokens) >= self.min_words:
                anchor = hash(tuple(tokens[: self.min_words]))
                self._anchors.setdefault(anchor, []).append((tuple(tokens), task))
        self.sizes[task] = self.sizes.get(task, 0) + count
        logger.info("decontamination: indexed %d texts of %s (%d %d-grams)", count, task, len(grams), self.n)

    def check(self, text: str) -> str | None:
        """The evaluation task ``text`` shares an n-gram or a whole short text with, else None."""
        tokens = words(text)
        if not tokens:
            return None
        task = self._exact.get(hash(tuple(tokens)))
        if task is not None:
            return task
        if len(tokens) >= self.n:
            grams = list(_ngrams(tokens, self.n))
            for task, index in self._ngrams.items():
                if not index.isdisjoint(grams):
                    return task
        if self._anchors and len(tokens) >= self.min_words:
            anchors = list(_ngrams(tokens, self.min_words))
            if not self._anchors.keys().isdisjoint(anchors):
                for i, anchor in enumerate(anchors):
                    for whole, task in self._anchors.get(anchor, ()):
                        if tuple(tokens[i : i + len(whole)]) == whole:
                            return task
        return None

    def check_example(self, example: BaseModel | Mapping[str, Any]) -> str | None:
        """:meth:`check` over each string field of an example; the first task hit, else None."""
        data = example.model_dump() if isinstance(example, BaseModel) else example
        for value in data.values():
            if isinstance(value, str):
                task = self.check(value)
                if task is not None:
                    return task
        return None

    def filter(
        self,
        items: Iterable[T],
        fields: Callable[[T], BaseModel | Mapping[str, Any]] = lambda item: item,  # type: ignore[assignment,return-value]
        counter: DropCounter | None = None,
    ) -> tuple[list[T], dict[str, int]]:
        """Drop contaminated items.

        Args:
            items: examples (parsed models or dicts) or records holding them.
            fields: how to get an item's example (default: the item itself).
            counter: counts drops under ``contaminated``.

        Returns:
            The kept items and the number dropped per evaluation task.
        """
        kept: list[T] = []
        per_task: dict[str, int] = {}
        for item in items:
            task = self.check_example(fields(item))
            if task is None:
                kept.append(item)
                continue
            per_task[task] = per_task.get(task, 0) + 1
            if counter is not None:
                counter.drop(CONTAMINATED, f"shares text with {task}")
        if per_task:
            logger.info("decontamination dropped %d examples: %s", sum(per_task.values()), per_task)
        return kept, per_task
