"""Tasks that MTEB lacks, declared the MTEB way: a task class of the right type with its own metadata.

- ``Cranfield``: the classic Cranfield-1400 collection as a retrieval task (nDCG@10), graded
  judgements (relevance codes 1-4 mapped to gains 4-1).
- ``TrecQA-clean``: TREC-QA answer sentence selection (Wang et al. 2007), test questions with at least one
  correct and one wrong candidate, as a reranking task (MAP over each question's candidates).

Both are ``AbsTaskRetrieval`` subclasses, as MTEB 2 models reranking (retrieval restricted to
``top_ranked`` candidates). Their data comes only from local folders (see ``registry.py``), so the
``dataset`` field names no hub repository.
"""

from __future__ import annotations

from typing import Any


def _classes() -> dict[str, type[Any]]:
    """Build the task classes on first use, so that importing speed does not import mteb."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class Cranfield(AbsTaskRetrieval):
        """Cranfield-1400 aeronautics abstracts and questions, as an MTEB retrieval task."""

        metadata = TaskMetadata(
            name="Cranfield",
            description="Cranfield-1400: 1,400 aeronautical engineering abstracts and 225 questions with "
            "graded relevance judgements (codes 1-4 mapped to gains 4-1).",
            reference="http://ir.dcs.gla.ac.uk/resources/test_collections/cran/",
            dataset={"path": "local/Cranfield", "revision": "local"},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=("1960-01-01", "1967-12-31"),
            domains=["Academic", "Engineering", "Written"],
            task_subtypes=["Article retrieval"],
            license="not specified",
            annotations_creators="expert-annotated",
            dialect=[],
            sample_creation="found",
            bibtex_citation=r"""
@techreport{cleverdon1967cranfield,
  author = {Cleverdon, Cyril W.},
  institution = {Cranfield Institute of Technology},
  title = {The Cranfield tests on index language devices},
  year = {1967},
}
""",
        )

    class TrecQAClean(AbsTaskRetrieval):
        """TREC-QA answer sentence selection (clean test set), as an MTEB reranking task."""

        metadata = TaskMetadata(
            name="TrecQA-clean",
            description="TREC-QA answer sentence selection, clean test set: 68 factoid questions, each with "
            "candidate sentences of which at least one answers it and one does not; rank the candidates.",
            reference="https://aclanthology.org/D07-1003/",
            dataset={"path": "local/TrecQA-clean", "revision": "local"},
            type="Reranking",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="map_at_1000",
            date=("1999-01-01", "2007-12-31"),
            domains=["News", "Written"],
            task_subtypes=["Question answering"],
            license="not specified",
            annotations_creators="expert-annotated",
            dialect=[],
            sample_creation="found",
            bibtex_citation=r"""
@inproceedings{wang-etal-2007-jeopardy,
  address = {Prague, Czech Republic},
  author = {Wang, Mengqiu and Smith, Noah A. and Mitamura, Teruko},
  booktitle = {Proceedings of EMNLP-CoNLL 2007},
  pages = {22--32},
  title = {What is the {J}eopardy Model? A Quasi-Synchronous Grammar for {QA}},
  year = {2007},
}
""",
        )

    return {"Cranfield": Cranfield, "TrecQA-clean": TrecQAClean}


_CACHE: dict[str, type[Any]] = {}


def custom_task_class(name: str) -> type[Any]:
    """The task class of one of speed's own tasks (``Cranfield``, ``TrecQA-clean``)."""
    if not _CACHE:
        _CACHE.update(_classes())
    return _CACHE[name]
